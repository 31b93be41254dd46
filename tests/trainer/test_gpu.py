"""Paths that only exist on CUDA. Skipped without a GPU; run them on a GPU machine with
`pytest -m gpu`."""

from __future__ import annotations

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
    expected = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
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
