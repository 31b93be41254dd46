"""An empty or untrained adapter is refused, never published (artifacts.verify_adapter): each
refusal on crafted files, and through a real run whose adapter did not train."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from kubetune_api.contract import MANIFEST_FILE
from kubetune_trainer import artifacts, recipe
from kubetune_trainer.artifacts import ADAPTER_WEIGHTS, ArtifactError, verify_adapter
from support.jobs import example_job

LORA_A = "base_model.model.layers.0.self_attn.q_proj.lora_A.weight"
LORA_B = "base_model.model.layers.0.self_attn.q_proj.lora_B.weight"


def adapter(tmp_path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    save_file(tensors, str(tmp_path / ADAPTER_WEIGHTS))
    return tmp_path


def test_a_trained_adapter_passes(tmp_path: Path) -> None:
    lora_b = torch.zeros(16, 8)
    lora_b[3, 2] = 0.01  # one trained entry is enough
    verify_adapter(adapter(tmp_path, {LORA_A: torch.randn(8, 16), LORA_B: lora_b,
                                      LORA_B.replace("q_proj", "v_proj"): torch.zeros(16, 8)}))


def test_missing_or_zero_byte_adapter_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="adapter weights missing or empty"):
        verify_adapter(tmp_path)
    (tmp_path / ADAPTER_WEIGHTS).write_bytes(b"")
    with pytest.raises(ArtifactError, match="adapter weights missing or empty"):
        verify_adapter(tmp_path)


@pytest.mark.parametrize("tensors", [
    {},
    {LORA_A: torch.randn(8, 16), LORA_B: torch.empty(0)},  # an ungathered ZeRO-3 save
], ids=["no-tensors", "empty-tensor"])
def test_empty_tensors_are_refused(tmp_path: Path, tensors: dict[str, torch.Tensor]) -> None:
    with pytest.raises(ArtifactError, match=r"adapter holds no \(or empty\) tensors"):
        verify_adapter(adapter(tmp_path, tensors))


def test_all_zero_lora_b_is_refused(tmp_path: Path) -> None:
    tensors = {LORA_A: torch.randn(8, 16), LORA_B: torch.zeros(16, 8),
               LORA_B.replace("q_proj", "v_proj"): torch.zeros(16, 8)}
    with pytest.raises(ArtifactError, match="every lora_B is zero; the adapter did not train"):
        verify_adapter(adapter(tmp_path, tensors))


@pytest.mark.slow
def test_a_run_whose_adapter_did_not_train_publishes_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """peft#137: input grads off, lora_B never moves. Here lora_B is frozen before training;
    the real save path must refuse the adapter and leave no artifact."""
    build = recipe.build_trainer

    def frozen_lora_b(ready: recipe.Setup, *args: object, **kwargs: object) -> object:
        for name, parameter in ready.model.named_parameters():
            if "lora_B" in name:
                parameter.requires_grad_(False)
        return build(ready, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(recipe, "build_trainer", frozen_lora_b)
    output = tmp_path / "out"
    job = example_job("tiny-lora", output, training={"maxSteps": 3})
    with pytest.raises(ArtifactError, match="every lora_B is zero") as refused:
        recipe.run(job, workdir=str(tmp_path / "work"))
    assert str(tmp_path / "work") in str(refused.value)  # names the file it checked
    assert not (output / MANIFEST_FILE).exists()
    assert not (output / ADAPTER_WEIGHTS).exists()
    assert artifacts.ADAPTER_WEIGHTS == "adapter_model.safetensors"


def test_the_manifest_keeps_no_env_values_or_credentials(tmp_path: Path) -> None:
    job = example_job("tiny-lora", tmp_path / "out")
    job.spec.pod.env = {"DEBUG_LEVEL": "verbose-canary-value"}
    job.spec.dataset.chat_template = None
    job.spec.dataset.train = "s3://b/train.jsonl?x=1&sig=CanarySasSignature0123"
    manifest = artifacts.build_manifest(job, tmp_path)
    text = str(manifest)
    assert "verbose-canary-value" not in text and "CanarySasSignature0123" not in text
    assert manifest["spec"]["pod"]["env"] == {"DEBUG_LEVEL": "***"}
    assert manifest["spec"]["model"] == job.spec.model.model_dump(mode="json", by_alias=True)
