"""What a finished job leaves behind: HF-loadable files plus a manifest written last."""

from __future__ import annotations

import hashlib
import json
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
ADAPTER_CONFIG = "adapter_config.json"
MODEL_CARD = "README.md"


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


def name_base_model(directory: Path, base: str, revision: str | None) -> None:
    """adapter_config.json names the base the adapter belongs to (PEFT writes the local
    directory it was loaded from: a cache path, or tiny mode's deleted temporary directory)."""
    path = directory / ADAPTER_CONFIG
    config = json.loads(path.read_text())
    config["base_model_name_or_path"] = base
    config["revision"] = revision
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def write_model_card(job: FineTuneJob, directory: Path, base: str,
                     facts: dict[str, Any]) -> None:
    """README.md from what the run knows (PEFT's is boilerplate): base model and revision,
    method and hyperparameters, data sources with digests, metrics, the kubetune version."""
    spec, t = job.spec, job.spec.training
    adapter = spec.method.type != "full"
    front = {"base_model": base, "library_name": "peft" if adapter else "transformers",
             "tags": ["kubetune", spec.method.type, spec.model.task]}
    lines = ["---", *(f"{k}: {json.dumps(v)}" for k, v in front.items()), "---", "",
             f"# {job.name}", "",
             f"{spec.method.type} fine-tune of `{spec.model.name}` (revision "
             f"`{spec.model.revision or 'default'}`) for {spec.model.task}, trained by "
             f"kubetune {__version__}.", "", "## Method", ""]
    if spec.method.lora:
        lora = spec.method.lora
        lines.append(f"- LoRA: r {lora.r}, alpha {lora.alpha}, dropout {lora.dropout}, "
                     f"target modules {lora.target_modules}")
    if spec.method.quantization:
        q = spec.method.quantization
        lines.append(f"- base quantized to {q.bits} bit ({q.quant_type}, double quant "
                     f"{q.double_quant})")
    lines += [f"- objective {t.objective}, {t.epochs} epochs (max steps {t.max_steps}), "
              f"learning rate {t.learning_rate} ({t.lr_scheduler}), batch "
              f"{t.per_device_batch_size} x {t.gradient_accumulation_steps} accumulation per "
              f"device, seed {t.seed}, precision {facts.get('precision', t.precision)}",
              f"- max sequence length {spec.dataset.max_seq_length}, packing "
              f"{spec.dataset.packing}", "", "## Data", ""]
    data = facts.get("dataset", {})
    for source in data.get("sources") or []:
        lines.append(f"- `{source['path']}` ({source['type']}): {source['records']} records, "
                     f"{source['examples']} examples, sha256 `{source['sha256']}`")
    if data.get("eval"):
        lines.append(f"- eval: `{data['eval']}`")
    lines += [f"- {data.get('trainRecords')} training and {data.get('evalRecords')} evaluation "
              f"examples; data sha256 `{data.get('sha256')}`", "", "## Metrics", "",
              "| metric | value |", "|---|---|"]
    metrics = facts.get("metrics", {})
    for key in ("steps", "firstTrainLoss", "trainLoss", "evalLoss", "evalPerplexity",
                "evalAccuracy", "evalF1"):
        if metrics.get(key) is not None:
            value = metrics[key]
            lines.append(f"| {key} | {value:.4f} |" if isinstance(value, float)
                         else f"| {key} | {value} |")
    (directory / MODEL_CARD).write_text("\n".join(lines) + "\n")


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
