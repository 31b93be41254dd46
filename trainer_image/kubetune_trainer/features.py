"""Records → token features per task, packing, and the collators that batch them.

Labels are built here, explicitly, rather than by a collator that masks every pad token: when
pad == eos (Llama, GPT-2, Mistral) such a collator also masks every EOS, and the model never
learns to stop (trl#976, transformers#23530). Padding is masked by position instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import (
    DataCollatorForLanguageModeling,
    DataCollatorForSeq2Seq,
    DataCollatorWithPadding,
    PreTrainedTokenizerBase,
)

from kubetune_api.spec import DatasetSpec, Task
from kubetune_trainer.data import IGNORE_INDEX, DataError, Record

Feature = dict[str, Any]
MLM_PROBABILITY = 0.15


def tokenize(records: Sequence[Record], spec: DatasetSpec, task: str,
             tokenizer: PreTrainedTokenizerBase, label_names: list[str] | None = None,
             num_labels: int | None = None) -> list[Feature]:
    """Tokenize for the task; examples left with no token to learn from are dropped."""
    fields, max_len = spec.fields, spec.max_seq_length
    text, label_key = fields.text or "", fields.label or ""
    prompt, completion = fields.prompt or "", fields.completion or ""
    features: list[Feature] = []
    for record in records:
        values = record.values
        if task == Task.SEQUENCE_CLASSIFICATION:
            ids = tokenizer(values[text], truncation=True, max_length=max_len)["input_ids"]
            label = _class_id(values[label_key], record.where, label_names, num_labels)
            features.append({"input_ids": ids, "labels": label})
        elif task == Task.MASKED_LM:
            ids = tokenizer(values[text], truncation=True, max_length=max_len)["input_ids"]
            features.append({"input_ids": ids})
        elif task == Task.SEQ2SEQ_LM:
            source = tokenizer(values[prompt], truncation=True, max_length=max_len)
            target = tokenizer(values[completion], truncation=True, max_length=max_len)
            features.append({"input_ids": source["input_ids"], "labels": target["input_ids"]})
        else:
            ids, labels = _causal_example(values, spec, tokenizer)
            features.append({"input_ids": ids[:max_len], "labels": labels[:max_len]})
    return [f for f in features if _has_target(f)]


def _has_target(feature: Feature) -> bool:
    labels = feature.get("labels")
    if labels is None or isinstance(labels, int):
        return bool(feature["input_ids"])
    return any(label != IGNORE_INDEX for label in labels)


def _causal_example(values: dict[str, Any], spec: DatasetSpec,
                    tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[int]]:
    fields = spec.fields
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if fields.messages:
        return _chat_example(values[fields.messages], tokenizer)
    if fields.prompt and fields.completion:
        # Loss on the completion (and its EOS) only.
        prompt = tokenizer(values[fields.prompt])["input_ids"]
        completion = tokenizer(values[fields.completion], add_special_tokens=False)["input_ids"]
        completion = completion + eos
        return prompt + completion, [IGNORE_INDEX] * len(prompt) + completion
    ids = tokenizer(values[fields.text or ""])["input_ids"]
    if eos and (not ids or ids[-1] != eos[0]):
        ids = ids + eos
    return ids, list(ids)


def _chat_example(messages: list[dict[str, str]],
                  tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[int]]:
    """Render with the tokenizer's chat template; loss on assistant turns only.

    Each assistant turn's tokens are those that rendering messages[:i+1] adds to rendering
    messages[:i] with the generation prompt, so the template decides the format, not us.
    """
    if not tokenizer.chat_template:
        raise DataError("dataset.fields.messages needs a tokenizer with a chat template; "
                        "this model's tokenizer has none")

    def render(turns: list[dict[str, str]], prompt: bool) -> list[int]:
        text = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=prompt)
        return list(tokenizer(str(text), add_special_tokens=False)["input_ids"])

    ids = render(messages, prompt=False)
    labels = [IGNORE_INDEX] * len(ids)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt, turn = render(messages[:i], prompt=True), render(messages[: i + 1], prompt=False)
        if ids[:len(prompt)] != prompt or ids[:len(turn)] != turn:
            raise DataError("dataset.fields.messages: the tokenizer's chat template does not "
                            "render a conversation as a prefix of its continuation, so the "
                            "assistant turns cannot be located")
        labels[len(prompt):len(turn)] = ids[len(prompt):len(turn)]
    return ids, labels


def _class_id(value: Any, where: str, names: list[str] | None, num_labels: int | None) -> int:
    label = names.index(value) if names else int(value)
    if num_labels is not None and not 0 <= label < num_labels:
        raise DataError(f"{where}: label {value!r} is outside 0..{num_labels - 1} "
                        f"(spec.model.numLabels is {num_labels})")
    return label


def pack(features: Sequence[Feature], block_size: int) -> list[Feature]:
    """Concatenate causal-LM examples (each already ends in EOS) into full blocks.

    Only full blocks are kept (as in HF run_clm), unless the data is smaller than one block;
    labels keep their prompt masking across the concatenation.
    """
    ids = [t for f in features for t in f["input_ids"]]
    labels = [t for f in features for t in f["labels"]]
    full = len(ids) // block_size * block_size or len(ids)
    blocks = [(ids[i:i + block_size], labels[i:i + block_size]) for i in range(0, full, block_size)]
    return [{"input_ids": b, "labels": lab} for b, lab in blocks if _has_target({"input_ids": b,
                                                                                "labels": lab})]


class CausalCollator:
    """Right-pads input_ids with the pad token and labels with IGNORE_INDEX, by position."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, batch: list[Feature]) -> dict[str, torch.Tensor]:
        longest = max(len(f["input_ids"]) for f in batch)
        if self.pad_to_multiple_of:
            longest = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        ids = torch.full((len(batch), longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(batch), longest), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(batch), longest), dtype=torch.long)
        for row, feature in enumerate(batch):
            n = len(feature["input_ids"])
            ids[row, :n] = torch.tensor(feature["input_ids"])
            labels[row, :n] = torch.tensor(feature["labels"])
            mask[row, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def collator_for(task: str, tokenizer: PreTrainedTokenizerBase, model: Any, seed: int,
                 pad_to_multiple_of: int | None = None) -> Any:
    if task == Task.MASKED_LM:
        return DataCollatorForLanguageModeling(tokenizer, mlm=True, seed=seed,
                                               mlm_probability=MLM_PROBABILITY,
                                               pad_to_multiple_of=pad_to_multiple_of)
    if task == Task.SEQ2SEQ_LM:
        return DataCollatorForSeq2Seq(tokenizer, model=model, label_pad_token_id=IGNORE_INDEX,
                                      pad_to_multiple_of=pad_to_multiple_of)
    if task == Task.SEQUENCE_CLASSIFICATION:
        return DataCollatorWithPadding(tokenizer, pad_to_multiple_of=pad_to_multiple_of)
    return CausalCollator(tokenizer.pad_token_id, pad_to_multiple_of)


def count_input_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Non-pad tokens in a collated batch (throughput is counted in these)."""
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())
