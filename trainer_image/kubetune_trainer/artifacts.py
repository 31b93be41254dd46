"""What a finished job leaves behind: HF-loadable files plus a manifest written last."""

from __future__ import annotations

import hashlib
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from kubetune_api.redact import MASK, redact
from kubetune_api.spec import FineTuneJob, FineTuneJobSpec
from kubetune_trainer import __version__

ADAPTER_WEIGHTS = "adapter_model.safetensors"
BASE_MODEL_DIR = "base_model"  # tiny mode: the generated base, so the adapter can be reloaded
MERGED_DIR = "merged"


class ArtifactError(RuntimeError):
    """The trained result is not fit to publish (e.g. an empty adapter)."""


def verify_adapter(directory: Path) -> None:
    """An adapter file that is missing, empty or untrained is an error, never an artifact.

    Under ZeRO-3/FSDP an ungathered save writes empty tensors (trl#4416, peft#2892); with input
    grads off, lora_B silently stays all zero (peft#137).
    """
    path = directory / ADAPTER_WEIGHTS
    if not path.is_file() or path.stat().st_size == 0:
        raise ArtifactError(f"{path}: adapter weights missing or empty")
    with safe_open(str(path), framework="pt") as weights:
        tensors = {name: weights.get_tensor(name) for name in weights.keys()}  # noqa: SIM118
    if not tensors or any(t.numel() == 0 for t in tensors.values()):
        raise ArtifactError(f"{path}: adapter holds no (or empty) tensors")
    lora_b = [t for name, t in tensors.items() if "lora_B" in name]
    if lora_b and all(not torch.any(t) for t in lora_b):
        raise ArtifactError(f"{path}: every lora_B is zero; the adapter did not train")


def copy_base_model(source: Path, directory: Path) -> None:
    shutil.copytree(source, directory / BASE_MODEL_DIR, dirs_exist_ok=True)


def file_digests(directory: Path) -> dict[str, dict[str, Any]]:
    digests = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        sha = hashlib.sha256()
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                sha.update(chunk)
        digests[path.relative_to(directory).as_posix()] = {"sha256": sha.hexdigest(),
                                                           "bytes": path.stat().st_size}
    return digests


def recorded_spec(spec: FineTuneJobSpec) -> dict[str, Any]:
    """The spec as the manifest keeps it: plain pod.env values are the job's own business
    (only their names are kept), and anything that looks like a credential is masked."""
    recorded: dict[str, Any] = _masked(spec.model_dump(mode="json", by_alias=True))
    env = recorded.get("pod", {}).get("env", {})
    for name, value in env.items():
        if isinstance(value, str):
            env[name] = MASK
    return recorded


def _masked(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {key: _masked(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_masked(item) for item in value]
    return value


def build_manifest(job: FineTuneJob, directory: Path, **facts: Any) -> dict[str, Any]:
    spec = job.spec
    return {
        "kubetuneVersion": __version__,
        "job": job.name,
        "createdAt": datetime.now(UTC).isoformat(timespec="seconds"),
        "baseModel": {"name": spec.model.name, "revision": spec.model.revision},
        "method": spec.method.type,
        "task": spec.model.task,
        "spec": recorded_spec(spec),
        **facts,
        "files": file_digests(directory),
    }
