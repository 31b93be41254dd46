"""Packed blocks through a real model: no token attends across a document boundary."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from kubetune_api.spec import FineTuneJobSpec
from kubetune_trainer.features import CausalCollator, pack
from kubetune_trainer.modeling import make_trainable
from kubetune_trainer.tiny import tiny_config, train_tokenizer

TEXTS = ["the cat sees the ball", "capital of France", "Paris", "hello there"] * 20


def job_spec() -> FineTuneJobSpec:
    return FineTuneJobSpec.model_validate({
        "model": {"name": "tiny://llama"}, "method": {"type": "full"},
        "dataset": {"train": "x.jsonl", "packing": True},
        "output": {"uri": "/tmp/x"}})


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_no_token_attends_across_a_document_boundary(arch: str) -> None:
    tok = train_tokenizer(arch, TEXTS)
    torch.manual_seed(0)
    model = make_trainable(AutoModelForCausalLM.from_config(tiny_config(arch, tok, 64)),
                           job_spec())
    model.train()  # as the Trainer runs it (the tiny configs have no dropout in attention)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    doc_a = tok("the cat sees the ball")["input_ids"]
    doc_b = tok("capital of France Paris")["input_ids"]
    other_a = tok("hello there hello there")["input_ids"][: len(doc_a)]
    other_a += [tok.eos_token_id] * (len(doc_a) - len(other_a))
    collate = CausalCollator(tok.eos_token_id)

    def logits_of_b(first: list[int]) -> torch.Tensor:
        [block] = pack([{"input_ids": first, "labels": first},
                        {"input_ids": doc_b, "labels": doc_b}], 64)
        batch = collate([block])
        batch.pop("labels")
        with torch.no_grad():
            return model(**batch).logits[0, len(first):]

    alone = collate([{"input_ids": doc_b, "labels": doc_b}])
    alone.pop("labels")
    with torch.no_grad():
        reference = model(**alone).logits[0]
    packed = logits_of_b(doc_a)
    assert torch.allclose(packed, logits_of_b(other_a), atol=1e-5)  # A's tokens do not matter
    assert torch.allclose(packed, reference, atol=1e-5)  # B sees exactly what it sees alone
    # The check can fail: with running positions and one mask, B's logits depend on A.
    [block] = pack([{"input_ids": doc_a, "labels": doc_a},
                    {"input_ids": doc_b, "labels": doc_b}], 64)
    leaky = {"input_ids": torch.tensor([block["input_ids"]])}
    with torch.no_grad():
        leaked = model(**leaky).logits[0, len(doc_a):]
    assert not torch.allclose(leaked, reference, atol=1e-5)


def test_the_summary_reports_the_non_pad_fraction() -> None:
    from kubetune_trainer.console import summary_text

    metrics = {"steps": 3, "trainSeconds": 1.0, "tokensPerSecond": 900.0,
               "firstTrainLoss": None, "trainLoss": None, "nonPadFraction": 0.987}
    manifest = {"method": "lora", "task": "causal-lm", "baseModel": {"name": "m"},
                "metrics": metrics, "parameters": {"trainable": 1, "total": 2}, "worldSize": 1}
    assert "900 tokens/s, 99% non-pad, world size 1)" in summary_text("out", manifest)
