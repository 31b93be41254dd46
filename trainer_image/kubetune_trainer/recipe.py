"""Fine-tune one FineTuneJob: setup → train → save.

What every pod of the gang runs (the operator sets the PET_* variables, torchrun reads them):

    torchrun -m kubetune_trainer --config /etc/kubetune/finetunejob.yaml

On a laptop, the same YAML: `kubetune run examples/tiny-lora.yaml`.

Full, LoRA and QLoRA differ only in `factories.py`; everything here is shared. All input is
checked in `setup` before anything is written to the output URI; rank 0 alone writes.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer, TrainingArguments
from transformers import logging as hf_logging
from transformers.trainer_utils import set_seed

from kubetune_api.spec import FineTuneJob, MethodType
from kubetune_trainer import artifacts, storage
from kubetune_trainer.data import LoadedData, load_records, training_texts
from kubetune_trainer.features import collator_for, count_target_tokens, pack, tokenize
from kubetune_trainer.modeling import (
    Precision,
    load_model,
    load_tokenizer,
    make_trainable,
    parameter_counts,
    resolve_precision,
)
from kubetune_trainer.tiny import build_tiny_model

TINY_PREFIX = "tiny://"


@dataclass
class RunResult:
    output_uri: str
    manifest: dict[str, Any]
    manifest_sha256: str


@dataclass
class Setup:
    """Everything the run needs, built and checked before training starts."""

    job: FineTuneJob
    output_uri: str
    workdir: Path
    precision: Precision
    data: LoadedData
    source: str  # model id or local directory (tiny mode)
    tokenizer: PreTrainedTokenizerBase
    model: PreTrainedModel
    train_features: list[dict[str, Any]]
    eval_features: list[dict[str, Any]]
    tokens_seen: list[int] = field(default_factory=lambda: [0])


def run(job: FineTuneJob, *, output_uri: str | None = None,
        workdir: str | Path | None = None) -> RunResult | None:
    """Train the job; returns the published result on rank 0 and None on other ranks."""
    hf_logging.disable_progress_bar()  # keep the training bar, drop shard-writing bars
    scratch = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="kubetune-"))
    try:
        ready = setup(job, output_uri or job.spec.output.uri, scratch)
        trainer = build_trainer(ready)
        started = time.monotonic()
        trainer.train()
        eval_loss = trainer.evaluate()["eval_loss"] if ready.eval_features else None
        facts = summarize(ready, trainer, eval_loss, time.monotonic() - started)
        return save(ready, trainer, facts) if is_rank0() else None
    finally:
        if workdir is None:
            shutil.rmtree(scratch, ignore_errors=True)


def setup(job: FineTuneJob, output_uri: str, workdir: Path) -> Setup:
    spec = job.spec
    set_seed(spec.training.seed)
    data = load_records(spec.dataset, spec.model.task, spec.training.seed)
    precision = resolve_precision(spec.training.precision, torch.cuda.is_available())
    source = model_source(job, data, workdir)
    tokenizer = load_tokenizer(source, spec.model.revision, spec.model.task)

    def features(records: list[Any]) -> list[dict[str, Any]]:
        tokenized = tokenize(records, spec.dataset, spec.model.task, tokenizer,
                             data.label_names, spec.model.num_labels)
        return pack(tokenized, spec.dataset.max_seq_length) if spec.dataset.packing else tokenized

    train_features, eval_features = features(data.train), features(data.eval)
    if not train_features:
        raise artifacts.ArtifactError(f"{spec.dataset.train}: no record has a token to learn "
                                      f"from after truncation to {spec.dataset.max_seq_length}")
    device_map = {"": local_device()}
    model = load_model(spec, source, tokenizer, precision, data.label_names, device_map)
    return Setup(job, output_uri, workdir, precision, data, source, tokenizer,
                 make_trainable(model, spec), train_features, eval_features)


def model_source(job: FineTuneJob, data: LoadedData, workdir: Path) -> str:
    """The model id, or for tiny:// a freshly built local model directory.

    Every rank builds the same tiny model from the same seed and data (nodes share no disk).
    """
    spec = job.spec
    if not spec.model.name.startswith(TINY_PREFIX):
        return spec.model.name
    arch = spec.model.name.removeprefix(TINY_PREFIX)
    texts = list(training_texts(data, spec.dataset))
    directory = workdir / f"tiny-{arch}-rank{os.environ.get('RANK', '0')}"
    build_tiny_model(arch, texts, directory, max_positions=spec.dataset.max_seq_length,
                     seed=spec.training.seed)
    return str(directory)


def build_trainer(ready: Setup) -> Trainer:
    spec, cuda = ready.job.spec, torch.cuda.is_available()
    args = training_arguments(ready.job, ready.precision, ready.workdir,
                              has_eval=bool(ready.eval_features), cuda=cuda)
    collate = collator_for(spec.model.task, ready.tokenizer, ready.model, spec.training.seed,
                           pad_to_multiple_of=8 if cuda else None)

    def counting_collator(batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        collated = collate(batch)
        ready.tokens_seen[0] += count_target_tokens(collated)
        return collated

    return Trainer(model=ready.model, args=args, train_dataset=ready.train_features,
                   eval_dataset=ready.eval_features or None, data_collator=counting_collator,
                   processing_class=ready.tokenizer)


def training_arguments(job: FineTuneJob, precision: Precision, workdir: Path, *,
                       has_eval: bool, cuda: bool) -> TrainingArguments:
    """The spec's training section in the Trainer's terms."""
    t = job.spec.training
    evaluate_periodically = bool(has_eval and t.eval_every_steps)
    return TrainingArguments(
        output_dir=str(workdir / "trainer"),
        num_train_epochs=t.epochs,
        max_steps=t.max_steps or -1,
        per_device_train_batch_size=t.per_device_batch_size,
        per_device_eval_batch_size=t.per_device_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio,  # a float in [0, 1) is a ratio of the total steps
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        bf16=precision.name == "bf16",
        fp16=precision.name == "fp16",
        use_cpu=not cuda,
        ddp_backend="gloo" if not cuda and world_size() > 1 else None,
        ddp_find_unused_parameters=False,
        seed=t.seed,
        data_seed=t.seed,
        logging_steps=t.log_every_steps,
        logging_first_step=True,
        eval_strategy="steps" if evaluate_periodically else "no",
        eval_steps=t.eval_every_steps if evaluate_periodically else None,
        save_strategy="no",
        report_to=[],
        remove_unused_columns=False,
        # Batches of similar length waste less compute on padding; packed blocks are uniform.
        train_sampling_strategy="random" if job.spec.dataset.packing else "group_by_length",
        disable_tqdm=not is_rank0(),
    )


def summarize(ready: Setup, trainer: Trainer, eval_loss: float | None,
              seconds: float) -> dict[str, Any]:
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    trainable, total = parameter_counts(ready.model)
    world = trainer.args.world_size
    return {
        "dataset": {"train": ready.job.spec.dataset.train, "eval": ready.job.spec.dataset.eval,
                    "sha256": ready.data.digest, "trainRecords": len(ready.data.train),
                    "evalRecords": len(ready.data.eval)},
        "metrics": {"steps": trainer.state.global_step,
                    "firstTrainLoss": losses[0] if losses else None,
                    "trainLoss": losses[-1] if losses else None,
                    "evalLoss": eval_loss,
                    "trainSeconds": round(seconds, 3),
                    "tokensPerSecond": round(ready.tokens_seen[0] * world / max(seconds, 1e-9),
                                             1)},
        "parameters": {"trainable": trainable, "total": total},
        "precision": ready.precision.name,
        "worldSize": world,
    }


def save(ready: Setup, trainer: Trainer, facts: dict[str, Any]) -> RunResult:
    """Write HF-loadable files locally, then publish them with the manifest last."""
    spec = ready.job.spec
    staging = ready.workdir / "artifact"
    model = trainer.model
    adapter = spec.method.type != MethodType.FULL
    model.save_pretrained(staging)  # type: ignore[union-attr,operator]
    ready.tokenizer.save_pretrained(staging)
    if adapter:
        artifacts.verify_adapter(staging)
        if spec.model.name.startswith(TINY_PREFIX):
            artifacts.copy_base_model(Path(ready.source), staging)
        if spec.output.merge_adapter:
            merge_adapter(ready, staging)
    manifest = artifacts.build_manifest(ready.job, staging, **facts)
    digest = storage.publish(staging, ready.output_uri, manifest)
    print_summary(ready.output_uri, manifest)
    return RunResult(ready.output_uri, manifest, digest)


def merge_adapter(ready: Setup, staging: Path) -> None:
    """Merge into a fresh, unquantized copy of the base (a 4-bit base cannot hold the sum)."""
    from peft import PeftModel

    spec = ready.job.spec
    base_spec = spec.model_copy(deep=True)
    base_spec.method.type = MethodType.LORA
    base_spec.method.quantization = None
    base = load_model(base_spec, ready.source, ready.tokenizer, ready.precision,
                      ready.data.label_names)
    merged = PeftModel.from_pretrained(base, str(staging)).merge_and_unload()
    merged.save_pretrained(staging / artifacts.MERGED_DIR)
    ready.tokenizer.save_pretrained(staging / artifacts.MERGED_DIR)


def print_summary(uri: str, manifest: dict[str, Any]) -> None:
    m, p = manifest["metrics"], manifest["parameters"]
    eval_part = f", eval loss {m['evalLoss']:.4f}" if m["evalLoss"] is not None else ""
    print(
        f"\nkubetune: {manifest['method']} {manifest['task']} on {manifest['baseModel']['name']}"
        f" done in {m['steps']} steps ({m['trainSeconds']:.1f} s, "
        f"{m['tokensPerSecond']:.0f} tokens/s, world size {manifest['worldSize']})\n"
        f"  train loss {m['firstTrainLoss']:.4f} -> {m['trainLoss']:.4f}{eval_part}\n"
        f"  trainable parameters {p['trainable']:,} of {p['total']:,}\n"
        f"  artifact: {uri}",
        flush=True,
    )


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_rank0() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def local_device() -> str | int:
    return int(os.environ.get("LOCAL_RANK", "0")) if torch.cuda.is_available() else "cpu"


