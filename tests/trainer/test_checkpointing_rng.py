"""Activation checkpointing keeps LoRA dropout masks: the recompute in the backward must draw
the forward's masks. accelerate's FSDP checkpoint wrapper recomputes with
preserve_rng_state=False (other masks: wrong gradients, no error), so under fsdp the trainer
checkpoints through transformers (torch.utils.checkpoint, RNG state restored) instead."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from kubetune_trainer import modeling, strategies
from kubetune_trainer.modeling import Precision
from kubetune_trainer.tiny import build_tiny_model
from support.jobs import example_job

TEXTS = ["the quick brown fox jumps over the lazy dog", "a stitch in time saves nine"] * 10


def lora_grads(model: Any, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    model.train()
    torch.manual_seed(7)  # the same dropout draws for every model
    model(**batch).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_checkpointing_under_fsdp_keeps_the_dropout_masks(tmp_path: Path) -> None:
    source = build_tiny_model("llama", TEXTS, tmp_path / "tiny", max_positions=64, seed=1)
    tokenizer = modeling.load_tokenizer(str(source), None, "causal-lm")
    batch = dict(tokenizer(TEXTS[:2], return_tensors="pt", padding=True))
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)

    def trained(checkpointing: bool) -> Any:
        spec = example_job("tiny-lora", tmp_path, method={"type": "lora", "lora": {
            "r": 8, "alpha": 16, "dropout": 0.5}}, training={
            "strategy": "fsdp", "gradientCheckpointing": checkpointing}).spec
        model = modeling.load_model(spec, str(source), tokenizer, Precision("fp32"), None)
        torch.manual_seed(0)  # the same adapter init
        return modeling.make_trainable(model, spec), spec

    checkpointed, spec = trained(True)
    assert strategies.fsdp_arguments(spec)["fsdp_config"]["activation_checkpointing"] is False
    assert checkpointed.get_base_model().is_gradient_checkpointing  # transformers' own
    plain, _ = trained(False)
    expected = lora_grads(plain, batch)
    got = lora_grads(checkpointed, batch)
    assert expected.keys() == got.keys() and any("lora_A" in n for n in got)
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, msg=name)
    # The hazard, shown: recomputed without the RNG state (accelerate's FSDP wrapper), the
    # masks differ and so do the gradients.
    careless, _ = trained(True)
    careless.get_base_model().gradient_checkpointing_enable(
        gradient_checkpointing_kwargs={"use_reentrant": False, "preserve_rng_state": False})
    differ = lora_grads(careless, batch)
    assert any(not torch.allclose(differ[n], g) for n, g in expected.items())
