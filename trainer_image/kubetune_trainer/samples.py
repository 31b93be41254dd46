"""output.samples: what the trained model says to a few prompts, published as samples.jsonl.

Greedy decoding, so the file is reproducible; rank 0 alone generates (recipe.save), with no
collective. Prompts are written the way the data was: a
`messages` dataset's prompt becomes one user turn rendered with the chat template (with the
generation prompt), any other layout uses the prompt text as is.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kubetune_api.spec import FineTuneJobSpec, Task

SAMPLES_FILE = "samples.jsonl"


def write_samples(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                  spec: FineTuneJobSpec, directory: Path) -> Path | None:
    samples = spec.output.samples
    if samples is None:
        return None
    was_training = model.training
    model.eval()
    path = directory / SAMPLES_FILE
    try:
        with path.open("w") as out, torch.no_grad():
            for prompt in samples.prompts:
                completion = generate(model, tokenizer, spec, prompt, samples.max_new_tokens)
                out.write(json.dumps({"prompt": prompt, "completion": completion,
                                      "maxNewTokens": samples.max_new_tokens}) + "\n")
    finally:
        model.train(was_training)
    return path


def generate(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
             spec: FineTuneJobSpec, prompt: str, max_new_tokens: int) -> str:
    text = render(tokenizer, spec, prompt)
    inputs: dict[str, Any] = dict(tokenizer(text, return_tensors="pt"))
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in inputs.items()}
    half = half_dtype(model)
    with torch.autocast(device.type, dtype=half or torch.float32, enabled=half is not None):
        return _generate(model, tokenizer, spec, inputs, max_new_tokens)


def half_dtype(model: PreTrainedModel) -> torch.dtype | None:
    """The half dtype the frozen base holds beside fp32 trained weights (an adapter, a
    modulesToSave head), if any: generation then runs under the autocast training ran under,
    else the fp32 head meets bf16 activations ("expected m1 and m2 to have the same dtype")."""
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    half = dtypes & {torch.bfloat16, torch.float16}
    return next(iter(half)) if half and torch.float32 in dtypes else None


def _generate(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
              spec: FineTuneJobSpec, inputs: dict[str, Any], max_new_tokens: int) -> str:
    # synced_gpus=False: rank 0 generates alone after the other ranks have finished. Under
    # ZeRO-3/FSDP transformers defaults to syncing every rank at each new token, an all-reduce
    # with ranks that are gone (gloo: "Connection closed by peer"; NCCL: a hang).
    output = model.generate(  # type: ignore[operator]  # GenerationMixin, not nn.Module
        **inputs, max_new_tokens=max_new_tokens, do_sample=False,
        pad_token_id=tokenizer.pad_token_id, synced_gpus=False)
    if spec.model.task == Task.CAUSAL_LM:  # the output repeats the prompt first
        output = output[:, inputs["input_ids"].shape[1]:]
    return str(tokenizer.decode(output[0], skip_special_tokens=True))


def render(tokenizer: PreTrainedTokenizerBase, spec: FineTuneJobSpec, prompt: str) -> str:
    if spec.dataset.fields.layout == "messages" and tokenizer.chat_template:
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                 tokenize=False, add_generation_prompt=True)
        return str(rendered)
    return prompt
