"""Paths that only exist on CUDA. Skipped without a GPU; run them on a GPU machine with
`pytest -m gpu`."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from kubetune_trainer import recipe
from support.jobs import example_job

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_qlora_on_gpu_places_the_quantized_model_on_the_local_device(tmp_path: Path) -> None:
    import bitsandbytes as bnb

    job = example_job("tiny-qlora", tmp_path / "out", training={"maxSteps": 10})
    ready = recipe.setup(job, str(tmp_path / "out"), tmp_path / "work")
    expected = "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
    assert ready.precision.name == expected
    layers = [m for m in ready.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and all(m.weight.device.type == "cuda" for m in layers)
    assert layers[0].compute_dtype == ready.precision.dtype
    trainer = recipe.build_trainer(ready)
    trainer.train()
    assert trainer.state.log_history[-1]["train_loss"] > 0


def test_lora_bf16_run_publishes_a_trained_adapter(tmp_path: Path) -> None:
    result = recipe.run(example_job("tiny-lora", tmp_path / "out", training={"maxSteps": 20}))
    assert result is not None
    assert result.manifest["precision"] in ("bf16", "fp16")
    assert result.manifest["metrics"]["trainLoss"] < result.manifest["metrics"]["firstTrainLoss"]


# --- GPU-only training options (issue 13); on CPU they are refused (tests/trainer/test_options.py)

@pytest.mark.parametrize("optimizer", ["paged_adamw_8bit", "paged_adamw_32bit"])
def test_paged_optimizers_train_on_gpu(tmp_path: Path, optimizer: str) -> None:
    import bitsandbytes as bnb

    job = example_job("tiny-lora", tmp_path / "out",
                      training={"maxSteps": 3, "optimizer": optimizer})
    ready = recipe.setup(job, str(tmp_path / "out"), tmp_path / "work")
    trainer = recipe.build_trainer(ready)
    trainer.train()
    inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    assert isinstance(inner, bnb.optim.optimizer.Optimizer8bit) and inner.is_paged


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is None, reason="needs flash-attn")
def test_flash_attention_2_explicit_and_auto(tmp_path: Path) -> None:
    for attention in ("flash_attention_2", "auto"):
        job = example_job("tiny-lora", tmp_path / attention,
                          model={"attention": attention}, training={"maxSteps": 2})
        ready = recipe.setup(job, str(tmp_path / attention), tmp_path / f"work-{attention}")
        assert ready.model.config._attn_implementation == "flash_attention_2"
        recipe.build_trainer(ready).train()


@pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is None, reason="needs liger-kernel")
def test_liger_kernels_patch_the_model(tmp_path: Path) -> None:
    job = example_job("tiny-lora", tmp_path / "out",
                      training={"maxSteps": 2, "ligerKernels": True})
    ready = recipe.setup(job, str(tmp_path / "out"), tmp_path / "work")
    trainer = recipe.build_trainer(ready)
    trainer.train()
    assert ready.args.use_liger_kernel
    assert any("Liger" in type(m).__name__ for m in trainer.model.modules())


def test_compile_trains_on_gpu(tmp_path: Path) -> None:
    job = example_job("tiny-pretrain", tmp_path / "out",
                      training={"maxSteps": 4, "compile": True})
    result = recipe.run(job)
    assert result is not None and result.manifest["metrics"]["steps"] == 4
