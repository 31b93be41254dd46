"""Pieces that make a resumed run continue exactly: sampler order, SIGTERM before training,
trainable dtypes. No training here."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch

from kubetune_trainer.modeling import Precision, load_model, load_tokenizer, make_trainable
from kubetune_trainer.preemption import Preempted, PreemptionCallback
from kubetune_trainer.recipe import EpochSeededLengthSampler
from kubetune_trainer.tiny import build_tiny_model
from support.jobs import example_job


def test_length_grouped_order_depends_only_on_seed_and_epoch() -> None:
    lengths = [(i * 37) % 50 + 1 for i in range(200)]
    first = EpochSeededLengthSampler(8, lengths, seed=3)
    torch.manual_seed(123)  # the global RNG must not matter (HF's sampler uses it)
    orders = []
    for epoch in range(3):
        first.set_epoch(epoch)
        orders.append(list(first))
    resumed = EpochSeededLengthSampler(8, lengths, seed=3)  # a fresh process at epoch 2
    torch.manual_seed(999)
    resumed.set_epoch(2)
    assert list(resumed) == orders[2]
    assert orders[0] != orders[1] != orders[2]
    assert sorted(orders[1]) == list(range(200))


def test_sigterm_before_training_stops_at_once_and_during_training_waits() -> None:
    callback = PreemptionCallback()
    try:
        with pytest.raises(Preempted, match="before training started"):
            os.kill(os.getpid(), signal.SIGTERM)
        callback.on_train_begin(None, None, None)
        callback.requested = False
        os.kill(os.getpid(), signal.SIGTERM)  # only flagged: the next step end saves
        assert callback.requested
    finally:
        callback.restore()


def test_trainable_weights_stay_fp32_when_the_base_loads_in_half(tmp_path: Path) -> None:
    build_tiny_model("bert", ["the meal was great", "the hotel was awful"] * 20, tmp_path,
                     max_positions=32, seed=0)
    job = example_job("tiny-full-classification", tmp_path / "out")
    job.spec.method = job.spec.method.model_validate({"type": "lora"})
    tok = load_tokenizer(str(tmp_path), None, "sequence-classification")
    model = load_model(job.spec, str(tmp_path), tok, Precision("bf16"), ["negative", "positive"])
    assert model.dtype == torch.bfloat16  # the frozen base in the training precision
    model = make_trainable(model, job.spec)
    trainable = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad}
    assert any("classifier" in n for n in trainable)  # the new head trains (modules_to_save)
    assert set(trainable.values()) == {torch.float32}


@pytest.mark.parametrize(("strategy", "on_the_model"), [("ddp", True), ("fsdp", False)])
def test_fsdp_does_not_checkpoint_activations_twice(tmp_path: Path, strategy: str,
                                                    on_the_model: bool) -> None:
    build_tiny_model("llama", ["hello there", "general kenobi"] * 20, tmp_path,
                     max_positions=32, seed=0)
    job = example_job("tiny-lora", tmp_path / "out",
                      training={"strategy": strategy, "gradientCheckpointing": True})
    tok = load_tokenizer(str(tmp_path), None, "causal-lm")
    model = make_trainable(load_model(job.spec, str(tmp_path), tok, Precision("fp32"), None),
                           job.spec)
    assert model.base_model.model.is_gradient_checkpointing is on_the_model
