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
from kubetune_trainer.tiny import build_tiny_model
from kubetune_trainer.trainers import EpochSeededLengthSampler
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


@pytest.mark.parametrize("count", [7, 200, 5000])
def test_numpy_sampler_orders_exactly_like_hf_grouping(count: int) -> None:
    from transformers.trainer_pt_utils import get_length_grouped_indices

    lengths = [(i * 37) % 50 + 1 for i in range(count)]
    sampler = EpochSeededLengthSampler(8, lengths, seed=5)
    sampler.set_epoch(1)
    expected = get_length_grouped_indices(lengths, 8, generator=torch.Generator().manual_seed(6))
    assert list(sampler) == expected


def test_sigterm_before_training_stops_at_once_and_during_training_waits() -> None:
    callback = PreemptionCallback()
    try:
        with pytest.raises(Preempted, match="before training started"):
            os.kill(os.getpid(), signal.SIGTERM)
        callback.on_train_begin(None, None, None)
        callback.requested = False
        os.kill(os.getpid(), signal.SIGTERM)  # only flagged: the next micro-step saves
        assert callback.requested
    finally:
        callback.restore()


@pytest.mark.parametrize(("strategy", "trained_dtype"), [
    ("ddp", torch.float32),  # AMP: fp32 master weights on the model
    ("deepspeed-zero2", torch.float32),
    # ZeRO-3/FSDP flatten the head with the bf16 base and keep fp32 masters themselves: an fp32
    # head failed ZeRO-3's first step ("mat1 and mat2 must have the same dtype").
    ("deepspeed-zero3", torch.bfloat16),
    ("fsdp", torch.bfloat16),
])
def test_trainable_weights_dtype_when_the_base_loads_in_half(
        tmp_path: Path, strategy: str, trained_dtype: torch.dtype) -> None:
    build_tiny_model("bert", ["the meal was great", "the hotel was awful"] * 20, tmp_path,
                     max_positions=32, seed=0)
    job = example_job("tiny-full-classification", tmp_path / "out",
                      training={"strategy": strategy})
    job.spec.method = job.spec.method.model_validate({"type": "lora"})
    tok = load_tokenizer(str(tmp_path), None, "sequence-classification")
    model = load_model(job.spec, str(tmp_path), tok, Precision("bf16"), ["negative", "positive"])
    assert model.dtype == torch.bfloat16  # the frozen base in the training precision
    model = make_trainable(model, job.spec)
    trainable = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad}
    assert any("classifier" in n for n in trainable)  # the new head trains (modules_to_save)
    assert set(trainable.values()) == {trained_dtype}


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_activations_are_checkpointed_once(tmp_path: Path, strategy: str) -> None:
    """transformers' checkpointing on the model under every strategy (it restores the RNG state
    for the recompute: tests/trainer/test_checkpointing_rng.py), and never FSDP's own wrapper as
    well."""
    from kubetune_trainer import strategies

    build_tiny_model("llama", ["hello there", "general kenobi"] * 20, tmp_path,
                     max_positions=32, seed=0)
    job = example_job("tiny-lora", tmp_path / "out",
                      training={"strategy": strategy, "gradientCheckpointing": True})
    tok = load_tokenizer(str(tmp_path), None, "causal-lm")
    model = make_trainable(load_model(job.spec, str(tmp_path), tok, Precision("fp32"), None),
                           job.spec)
    assert model.base_model.model.is_gradient_checkpointing
    if strategy == "fsdp":
        assert strategies.fsdp_arguments(job.spec)["fsdp_config"][
            "activation_checkpointing"] is False


@pytest.mark.parametrize(("strategy", "prepared", "adapter_dtype"), [
    ("ddp", True, torch.float32),  # k-bit preparation, adapters upcast for the grad scaler
    ("deepspeed-zero3", False, torch.bfloat16),  # sharded: one dtype to flatten, no upcasts
])
def test_sharded_qlora_is_not_prepared_like_single_device_qlora(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, strategy: str, prepared: bool,
        adapter_dtype: torch.dtype) -> None:
    from kubetune_trainer import modeling, strategies

    build_tiny_model("llama", ["hello there", "general kenobi"] * 20, tmp_path,
                     max_positions=32, seed=0)
    job = example_job("tiny-qlora", tmp_path / "out",
                      training={"strategy": strategy, "gradientCheckpointing": True})
    job.spec.method.quantization.compute_dtype = "bfloat16"  # type: ignore[union-attr]
    calls: list[str] = []
    real = modeling.prepare_model_for_kbit_training
    monkeypatch.setattr(modeling, "prepare_model_for_kbit_training",
                        lambda model, **kw: calls.append("prepared") or real(model, **kw))
    tok = load_tokenizer(str(tmp_path), None, "causal-lm")
    model = load_model(job.spec, str(tmp_path), tok, Precision("bf16"), None,
                       device_map={"": "cpu"},
                       quant_storage=strategies.quant_storage(job.spec, Precision("bf16")))
    model = make_trainable(model, job.spec)
    assert bool(calls) is prepared
    assert {p.dtype for n, p in model.named_parameters() if "lora_" in n} == {adapter_dtype}
    embeddings = model.get_input_embeddings()
    assert embeddings.weight.dtype == (torch.float32 if prepared else torch.bfloat16)
    hidden = embeddings(torch.tensor([[1, 2]]))
    assert hidden.requires_grad  # input grads on: lora_B trains under checkpointing (peft#137)


def test_modules_the_checkpoint_lacks_are_saved_with_the_adapter(tmp_path: Path) -> None:
    """The tiny BERT is an MLM checkpoint: no pooler. from_pretrained initializes one at
    random; frozen and unsaved, the published adapter reloaded onto another random pooler."""
    from peft import PeftModel

    build_tiny_model("bert", ["the meal was great", "the hotel was awful"] * 20, tmp_path,
                     max_positions=32, seed=0)
    job = example_job("tiny-full-classification", tmp_path / "out")
    job.spec.method = job.spec.method.model_validate({"type": "lora"})
    tok = load_tokenizer(str(tmp_path), None, "sequence-classification")

    def base() -> torch.nn.Module:
        return load_model(job.spec, str(tmp_path), tok, Precision("fp32"), ["neg", "pos"])

    torch.manual_seed(1)
    model = make_trainable(base(), job.spec)
    assert any("pooler" in n for n, p in model.named_parameters() if p.requires_grad)
    model.save_pretrained(tmp_path / "adapter")
    inputs = tok(["the meal was awful"], return_tensors="pt")
    torch.manual_seed(2)  # another random init for whatever the adapter does not carry
    reloaded = PeftModel.from_pretrained(base(), str(tmp_path / "adapter"))
    assert torch.equal(model.eval()(**inputs).logits, reloaded.eval()(**inputs).logits)
