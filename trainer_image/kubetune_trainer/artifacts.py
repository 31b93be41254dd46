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


SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
GENERATION_CONFIG = "generation_config.json"


def tensor_sizes(path: Path) -> list[tuple[str, int]]:
    """(name, bytes) of each tensor in a safetensors file, in file order, from its header alone
    (8-byte little-endian length, then JSON with each tensor's data_offsets)."""
    with path.open("rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(length))
    header.pop("__metadata__", None)
    entries = sorted(header.items(), key=lambda item: item[1]["data_offsets"][0])
    return [(name, meta["data_offsets"][1] - meta["data_offsets"][0]) for name, meta in entries]


def weight_files(directory: Path) -> list[Path]:
    """The safetensors files of a saved model: the single file, or the index's shards."""
    if (directory / SAFE_INDEX).is_file():
        index = json.loads((directory / SAFE_INDEX).read_text())
        return [directory / name for name in dict.fromkeys(index["weight_map"].values())]
    return [directory / SAFE_WEIGHTS] if (directory / SAFE_WEIGHTS).is_file() else []


def reshard(directory: Path, max_bytes: int) -> None:
    """Rewrite a saved model's safetensors as shards of at most max_bytes (a tensor larger than
    that alone in its shard) with transformers' names and index, as save_pretrained(
    max_shard_size=...) writes them. For outputs saved by the Trainer, which never passes a
    shard size (transformers 5's default is 50GB). One shard's tensors are in memory at a time."""
    sources = weight_files(directory)
    sizes = [(name, size, path) for path in sources for name, size in tensor_sizes(path)]
    groups: list[list[tuple[str, int, Path]]] = [[]]
    for entry in sizes:
        if groups[-1] and sum(size for _, size, _ in groups[-1]) + entry[1] > max_bytes:
            groups.append([])
        groups[-1].append(entry)
    if len(groups) == 1 and sources == [directory / SAFE_WEIGHTS]:
        return  # already one file within the limit
    from safetensors.torch import save_file

    count, written, weight_map = len(groups), [], {}
    for number, group in enumerate(groups, start=1):
        name = SAFE_WEIGHTS if count == 1 else \
            f"model-{number:05d}-of-{count:05d}.safetensors"
        tensors = {}
        for path in dict.fromkeys(p for _, _, p in group):
            with safe_open(str(path), framework="pt") as weights:
                tensors.update({t: weights.get_tensor(t) for t, _, p in group if p == path})
        save_file(tensors, str(directory / f".{name}.partial"), metadata={"format": "pt"})
        written.append(name)
        weight_map.update({tensor: name for tensor in tensors})
        del tensors
    for path in sources:
        path.unlink()
    (directory / SAFE_INDEX).unlink(missing_ok=True)
    for name in written:
        (directory / f".{name}.partial").rename(directory / name)
    if count > 1:
        total = sum(size for _, size, _ in sizes)
        (directory / SAFE_INDEX).write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))},
            indent=2) + "\n")

