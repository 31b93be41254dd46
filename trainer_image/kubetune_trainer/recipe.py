"""Fine-tune one FineTuneJob: setup → train → save.

What every pod of the gang runs (the operator sets the PET_* variables, torchrun reads them):

    torchrun -m kubetune_trainer --config /etc/kubetune/finetunejob.yaml

On a laptop, the same YAML: `kubetune run examples/tiny-lora.yaml`.

Full, LoRA and QLoRA differ only in `factories.py`, SFT and preference tuning only in
`objectives.py`; everything here is shared. What setup builds (`Setup`) and the Trainer base
every objective derives from live below this module (prepared.py, trainers.py). All input is
checked in `setup` before anything is written to the output URI; rank 0 alone writes.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import (
    EarlyStoppingCallback,
    PreTrainedModel,
    PrinterCallback,
    Trainer,
    TrainingArguments,
)
from transformers import ProgressCallback as TrainerProgressCallback
from transformers import logging as hf_logging
from transformers.trainer_utils import set_seed

from kubetune_api.load import SpecError
from kubetune_api.spec import TINY_SCHEME, FineTuneJob, MethodType
from kubetune_trainer import (
    artifacts,
    checkpoints,
    evaluation,
    factories,
    feature_store,
    hub,
    objectives,
    oci,
    storage,
    strategies,
)
from kubetune_trainer.chat import job_template
from kubetune_trainer.checkpoints import CheckpointCallback
from kubetune_trainer.console import Console, ProgressCallback
from kubetune_trainer.data import LoadedData, read_data
from kubetune_trainer.env import METRICS_PORT_ENV
from kubetune_trainer.hold import hold_callback
from kubetune_trainer.metrics import TrainerMetrics, metrics_callback
from kubetune_trainer.modeling import (
    Precision,
    attention_note,
    compute_dtype,
    load_model,
    load_tokenizer,
    make_trainable,
    parameter_counts,
    resolve_precision,
)
from kubetune_trainer.preemption import Preempted, PreemptionCallback
from kubetune_trainer.prepared import Setup
from kubetune_trainer.ranks import global_rank, is_local_leader, is_rank0, local_rank, world_size
from kubetune_trainer.samples import write_samples
from kubetune_trainer.tiny import build_tiny_model
from kubetune_trainer.tracking import tracking_run

TRAINER_PICKLE = "training_args.bin"
LOCAL_CHECKPOINTS = "checkpoints"  # where the Trainer writes before the upload
TENSORBOARD_DIR = "logs"  # local event files; published under <output>/logs/
DATA_DIR = "data"  # records and tokenized features, memory-mapped Arrow
log = logging.getLogger("kubetune")
# Raised inside transformers/peft on every run; nothing a user of kubetune can act on.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.* is deprecated",
                        category=FutureWarning)
# peft's note at every save when dataset.addSpecialTokens resized the embeddings: intended.
warnings.filterwarnings("ignore", message="Setting `save_embedding_layers` to `True`")


@dataclass
class RunResult:
    output_uri: str
    manifest: dict[str, Any]
    manifest_sha256: str
    oci: oci.Pushed | None = None  # spec.output.oci: what was pushed, by digest


def run(job: FineTuneJob, *, output_uri: str | None = None,
        workdir: str | Path | None = None) -> RunResult | None:
    """Train the job; returns the published result on rank 0 and None on other ranks.

    Raises Preempted after saving a checkpoint when SIGTERM arrives during training.
    """
    hf_logging.disable_progress_bar()  # keep the training bar, drop shard-writing bars
    if Console.from_env().quiet:
        hf_logging.set_verbosity_error()
        warnings.simplefilter("ignore")
    scratch = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="kubetune-"))
    metrics = start_metrics(job)
    preemption = PreemptionCallback()
    try:
        ready = setup(job, output_uri or job.spec.output.uri, scratch, metrics,
                      data_dir=data_dir(workdir, scratch))
        trainer = build_trainer(ready, preemption)
        resumed = resume(ready)
        started = time.monotonic()
        with tracking_run(job):
            trainer.train(resume_from_checkpoint=str(resumed) if resumed else None)
            if resumed and is_local_leader():
                shutil.rmtree(resumed, ignore_errors=True)  # loaded; the remote copy is kept
            if preemption.stopped_at is not None:
                saved = ("checkpoint saved" if preemption.stopped_at
                         else "no step to checkpoint yet")
                raise Preempted(f"stopped by SIGTERM at step {preemption.stopped_at}; {saved}")
            evaluated = evaluate(ready, trainer)
        facts = summarize(ready, trainer, evaluated, time.monotonic() - started)
        facts["resumedFromStep"] = _step_of(resumed)
        result = save(ready, trainer, facts)
        metrics.set_phase("done")
        return result
    except Preempted:
        metrics.set_phase("checkpointing")  # stopped on purpose, resumable
        raise
    except BaseException:
        metrics.set_phase("failed")
        raise
    finally:
        metrics.stop()
        preemption.restore()
        if workdir is None:
            shutil.rmtree(scratch, ignore_errors=True)


def data_dir(workdir: str | Path | None, scratch: Path) -> Path:
    """Where the data is read and tokenized once per node: the given work directory (shared by
    the node's ranks), else the node's temp directory when ranks share a node (the pod's /tmp),
    else this run's scratch."""
    if workdir is not None:
        return Path(workdir) / DATA_DIR
    if world_size() > 1:
        return Path(tempfile.gettempdir()) / "kubetune-data"
    return scratch / DATA_DIR


def start_metrics(job: FineTuneJob) -> TrainerMetrics:
    """Serve this rank's /metrics on spec.metrics.port + local rank (observability is never
    worth failing a run for: a busy port only logs a warning)."""
    metrics = job_metrics(job)
    port = int(os.environ.get(METRICS_PORT_ENV, job.spec.metrics.port)) + local_rank()
    try:
        metrics.serve(port)
    except OSError as exc:
        log.warning("metrics: cannot listen on port %d (%s); continuing without /metrics",
                    port, exc)
    metrics.set_phase("loading")
    return metrics


def job_metrics(job: FineTuneJob) -> TrainerMetrics:
    spec = job.spec
    return TrainerMetrics(global_rank(), model=spec.model.name, method=spec.method.type,
                          task=spec.model.task)


def setup(job: FineTuneJob, output_uri: str, workdir: Path,
          metrics: TrainerMetrics | None = None, data_dir: Path | None = None) -> Setup:
    spec = job.spec
    set_seed(spec.training.seed)
    cache = data_dir or workdir / DATA_DIR
    # Shared next to the checkpoints of a job that keeps them; a job that keeps none gets
    # no checkpoints/ folder in its output (its artifact stays the model alone). Preference
    # pairs are not tokenized here: nothing to share.
    store = (feature_store.store_uri(checkpoints.root_uri(spec, output_uri))
             if (spec.checkpoint.uri or spec.checkpoint.every_steps)
             and not objectives.is_preference(spec) else None)
    data = read_data(spec.dataset, spec.model.task, spec.training.seed, cache, store)
    precision = resolve_precision(spec.training.precision, torch.cuda.is_available())
    strategies.check_precision(spec, precision)
    source = model_source(job, data, workdir)
    tokenizer = load_tokenizer(source, spec.model.revision, spec.model.task,
                               spec.dataset.add_special_tokens)
    template = job_template(spec.dataset, tokenizer)
    if template:
        tokenizer.chat_template = template  # also saved with the artifact: inference matches
    train_features, eval_features = objectives.features(spec, data, tokenizer, cache, store)
    # Arguments before the model: with ZeRO-3 they make from_pretrained load sharded.
    args = training_arguments(job, precision, workdir, has_eval=eval_features is not None,
                              cuda=torch.cuda.is_available(),
                              config=objectives.arguments_class(spec))
    strategies.prepare_loading(spec)
    model = load_model(spec, source, tokenizer, precision, data.label_names,
                       device_map=strategies.device_map(spec, local_device()),
                       quant_storage=strategies.quant_storage(spec, precision),
                       cuda=torch.cuda.is_available())
    if is_rank0():
        Console.from_env().info(attention_note(model, spec.model.attention,
                                               torch.cuda.is_available(), precision))
    return Setup(job, output_uri, workdir, precision, data, source, tokenizer, args,
                 make_trainable(model, spec), train_features, eval_features,
                 metrics or job_metrics(job))


def model_source(job: FineTuneJob, data: LoadedData, workdir: Path) -> str:
    """The model id, or for tiny:// a freshly built local model directory.

    Every rank builds the same tiny model from the same seed and data (nodes share no disk).
    """
    spec = job.spec
    if not spec.model.name.startswith(TINY_SCHEME):
        return spec.model.name
    arch = spec.model.name.removeprefix(TINY_SCHEME)
    texts = list(objectives.texts(data, spec))
    directory = workdir / f"tiny-{arch}-rank{global_rank()}"
    build_tiny_model(arch, texts, directory, max_positions=spec.dataset.max_seq_length,
                     seed=spec.training.seed)
    return str(directory)


def build_trainer(ready: Setup, preemption: PreemptionCallback | None = None) -> Trainer:
    callbacks = trainer_callbacks(ready, preemption)
    trainer = objectives.build_trainer(ready, callbacks)
    # Ours replaces the Trainer's bar (or, with tqdm off, its printing of raw log dicts).
    trainer.remove_callback(TrainerProgressCallback)
    trainer.remove_callback(PrinterCallback)
    for callback in trainer.callback_handler.callbacks:
        if type(callback).__name__ == "TensorBoardCallback":  # event files join the artifact
            callback.logging_dir = str(ready.workdir / TENSORBOARD_DIR)
    return trainer


def trainer_callbacks(ready: Setup, preemption: PreemptionCallback | None) -> list[Any]:
    """Metrics, progress, checkpoints (complete marker, upload), early stopping and SIGTERM:
    the same for every objective."""
    spec = ready.job.spec
    callbacks: list[Any] = [
        metrics_callback(ready.metrics, ready.tokens.take,
                         nonpad_fraction=lambda: ready.tokens.nonpad_fraction),
        ProgressCallback(ready.console.progress_mode(sys.stderr), ready.metrics.rates),
        CheckpointCallback(checkpoints.root_uri(spec, ready.output_uri),
                           spec.checkpoint.keep_last, ready.identity, ready.metrics),
    ]
    if spec.training.early_stopping:
        callbacks.append(EarlyStoppingCallback(
            early_stopping_patience=spec.training.early_stopping.patience,
            early_stopping_threshold=spec.training.early_stopping.threshold))
    if preemption:
        callbacks.append(preemption)
    if (hold := hold_callback(preemption)) is not None:
        callbacks.append(hold)
    return callbacks


def resume(ready: Setup) -> Path | None:
    """The newest complete checkpoint, downloaded, or None for a fresh start."""
    root = checkpoints.root_uri(ready.job.spec, ready.output_uri)
    step = checkpoints.resume_step(root, ready.identity)
    if step is None:
        return None
    if is_rank0():
        ready.console.info(f"resuming from {root} step {step}")
    every_rank = strategies.reads_every_partition(ready.job.spec)
    local = checkpoints.fetch(root, step, ready.workdir / LOCAL_CHECKPOINTS, every_rank)
    if ready.args.load_best_model_at_end:
        checkpoints.fetch_best(root, local, ready.workdir / LOCAL_CHECKPOINTS, every_rank)
    return local


def _step_of(checkpoint: Path | None) -> int | None:
    return int(checkpoint.name.removeprefix(checkpoints.PREFIX)) if checkpoint else None


def evaluate(ready: Setup, trainer: Trainer) -> dict[str, float]:
    """The final evaluation's metrics (eval_loss, eval_perplexity / eval_accuracy, eval_f1)."""
    if ready.eval_features is None:
        return {}
    ready.metrics.set_phase("evaluating")
    return {k: float(v) for k, v in trainer.evaluate().items()
            if k.removeprefix("eval_") in evaluation.REPORTED and math.isfinite(v)}


def training_arguments(job: FineTuneJob, precision: Precision, workdir: Path, *,
                       has_eval: bool, cuda: bool,
                       config: Callable[..., TrainingArguments] = TrainingArguments
                       ) -> TrainingArguments:
    """The spec's training section in the Trainer's terms (`config`: the objective's
    TrainingArguments class, e.g. TRL's DPOConfig)."""
    t = job.spec.training
    strategies.join_process_group(job.spec, cuda)
    evaluate_periodically = bool(has_eval and t.eval_every_steps)
    best = factories.best_model_arguments(t, has_eval=has_eval)
    save_steps = job.spec.checkpoint.every_steps
    if best.get("load_best_model_at_end"):
        # The Trainer picks the best among saved checkpoints: save at evaluations (or at a
        # multiple of them, which the spec checks).
        save_steps = save_steps or t.eval_every_steps
    return config(
        output_dir=str(workdir / LOCAL_CHECKPOINTS),
        num_train_epochs=t.epochs,
        max_steps=t.max_steps or -1,
        per_device_train_batch_size=t.per_device_batch_size,
        per_device_eval_batch_size=t.per_device_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        warmup_steps=t.warmup_ratio,  # a float in [0, 1) is a ratio of the total steps
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        bf16=precision.name == "bf16",
        fp16=precision.name == "fp16",
        use_cpu=not cuda,
        ddp_backend="gloo" if not cuda and world_size() > 1 else None,
        ddp_find_unused_parameters=False,
        ddp_timeout=t.collective_timeout_seconds,  # on GPUs accelerate/DeepSpeed pass it on
        seed=t.seed,
        data_seed=t.seed,
        run_name=job.name,  # the run's name in MLflow / W&B
        logging_steps=t.log_every_steps,
        logging_first_step=True,
        eval_strategy="steps" if evaluate_periodically else "no",
        eval_steps=t.eval_every_steps if evaluate_periodically else None,
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500,
        # The Trainer reloads the best checkpoint from local disk on every node; by default only
        # node 0 would hold its weights.
        save_on_each_node=bool(best.get("load_best_model_at_end"))
        and job.spec.resources.nodes > 1,
        remove_unused_columns=False,
        # Batches of similar length waste less compute on padding; packed blocks are uniform.
        # (TRL's preference datasets have no input_ids to group by.)
        train_sampling_strategy="random" if job.spec.dataset.packing
        or objectives.is_preference(job.spec) else "group_by_length",
        disable_tqdm=True,  # console.ProgressCallback shows progress on rank 0
        **factories.option_arguments(t, cuda=cuda),
        **best,
        **strategies.strategy_arguments(job.spec, precision, cuda),
    )


def summarize(ready: Setup, trainer: Trainer, evaluated: dict[str, float] | float | None,
              seconds: float) -> dict[str, Any]:
    """The manifest's facts. `evaluated`: the final evaluation's metrics (`evaluate`), a bare
    eval loss, or None without evaluation."""
    if not isinstance(evaluated, dict):
        evaluated = {} if evaluated is None else {"eval_loss": float(evaluated)}
    curve = [[e["step"], e["loss"]] for e in trainer.state.log_history if "loss" in e]
    losses = [loss for _, loss in curve]
    trainable, total = parameter_counts(ready.model)
    world = trainer.args.world_size
    return {
        "dataset": {"train": ready.job.spec.model_dump(mode="json", by_alias=True,
                                                        exclude_none=True)["dataset"]["train"],
                    "eval": ready.job.spec.dataset.eval,
                    "sha256": ready.data.digest, "trainRecords": ready.data.counts["train"],
                    "evalRecords": ready.data.counts["eval"],
                    "sources": ready.data.source_facts},
        "metrics": {"steps": trainer.state.global_step,
                    "firstTrainLoss": losses[0] if losses else None,
                    "trainLoss": losses[-1] if losses else None,
                    "evalLoss": evaluated.get("eval_loss"),
                    "evalPerplexity": evaluated.get("eval_perplexity"),
                    "evalAccuracy": evaluated.get("eval_accuracy"),
                    "evalF1": evaluated.get("eval_f1"),
                    "lossCurve": curve,
                    "trainSeconds": round(seconds, 3),
                    "tokensPerSecond": round(ready.tokens.total * world / max(seconds, 1e-9),
                                             1),
                    "nonPadFraction": ready.tokens.nonpad_fraction,
                    **objectives.manifest_facts(ready.job.spec, trainer.state.log_history)},
        "parameters": {"trainable": trainable, "total": total},
        "objective": ready.job.spec.training.objective,
        "precision": ready.precision.name,
        "worldSize": world,
    }


def save(ready: Setup, trainer: Trainer, facts: dict[str, Any]) -> RunResult | None:
    """Every rank joins the save (ZeRO-3/FSDP gather the full weights); rank 0 then checks the
    files and publishes them with the manifest last."""
    spec = ready.job.spec
    ready.metrics.set_phase("saving")
    staging = ready.workdir / "artifact"
    trainer.save_model(str(staging))  # model or adapter, and the tokenizer
    if not is_rank0():
        return None
    (staging / TRAINER_PICKLE).unlink(missing_ok=True)  # a pickle has no place in an artifact
    logs = ready.workdir / TENSORBOARD_DIR
    if "tensorboard" in spec.training.report_to and logs.is_dir():
        shutil.copytree(logs, staging / TENSORBOARD_DIR, dirs_exist_ok=True)
    if spec.method.type == MethodType.FULL:  # a whole model: shards + index, as serving reads
        artifacts.reshard(staging, spec.output.max_shard_bytes)
    base = spec.model.name
    if spec.model.name.startswith(TINY_SCHEME) and spec.method.type != MethodType.FULL:
        base = storage.join(ready.output_uri, artifacts.BASE_MODEL_DIR)  # published beside it
    if spec.method.type != MethodType.FULL:
        artifacts.verify_adapter(staging)
        artifacts.name_base_model(staging, base, spec.model.revision)
        if spec.model.name.startswith(TINY_SCHEME):
            artifacts.copy_base_model(Path(ready.source), staging)
        if spec.output.merge_adapter:
            merge_adapter(ready, staging)
    artifacts.write_model_card(ready.job, staging, base, facts)
    if spec.output.samples:
        write_samples(sampling_model(ready, trainer, staging), ready.tokenizer, spec, staging)
    manifest = artifacts.build_manifest(ready.job, staging, **facts)
    digest = storage.publish(staging, ready.output_uri, manifest)
    ready.metrics.add_uploaded_bytes(sum(f["bytes"] for f in manifest["files"].values()))
    if spec.output.push_to_hub:  # after the artifact is whole in storage: a failure loses nothing
        commit = hub.push(ready.job, staging, ready.output_uri, storage.manifest_bytes(manifest))
        ready.console.info(f"pushed to the Hub: {commit.commit_url}")
    pushed = push_to_registry(ready, staging, manifest, digest) if spec.output.oci else None
    ready.console.report(ready.output_uri, manifest, digest, pushed)
    return RunResult(ready.output_uri, manifest, digest, pushed)


def push_to_registry(ready: Setup, staging: Path, manifest: dict[str, Any],
                     digest: str) -> oci.Pushed:
    """spec.output.oci: the files just published (kubetune-manifest.json included, the same
    bytes), pushed after the object-storage artifact is whole, which stays whatever happens
    here. A permanent refusal (denied, unknown repository) is a spec error, exit 2; a
    transient one outlasting the retries is exit 1 and the gang's restart tries again."""
    spec = ready.job.spec
    target = spec.output.oci
    assert target is not None
    annotations = {oci.CREATED: manifest["createdAt"], "dev.kubetune.job": ready.job.name,
                   "dev.kubetune.base-model": spec.model.name,
                   "dev.kubetune.manifest-sha256": digest, "dev.kubetune.uri": ready.output_uri}
    artifact_type = (oci.ARTIFACT_TYPE_MODEL if spec.method.type == MethodType.FULL
                     else oci.ARTIFACT_TYPE_ADAPTER)
    try:
        return oci.push(staging, target.reference, artifact_type=artifact_type,
                        annotations=annotations,
                        extra={storage.MANIFEST_FILE: storage.manifest_bytes(manifest)},
                        plain_http=target.plain_http)
    except oci.OciError as e:
        kept = f"the artifact at {ready.output_uri} is kept"
        if e.permanent:
            raise SpecError(f"spec.output.oci: pushing to {target.reference} was refused: "
                            f"{e}; {kept}") from None
        raise oci.OciError(f"spec.output.oci: pushing to {target.reference} failed: {e}; "
                           f"{kept}", permanent=False) from None


def sampling_model(ready: Setup, trainer: Trainer, staging: Path) -> PreTrainedModel:
    """The trained model, whole on rank 0: the one in memory, or under FSDP/ZeRO-3 (where rank 0
    holds only a shard) a fresh load of what was just saved. Rank 0 loads alone, the other
    ranks have finished: never through the strategy's sharded loading (strategies.py)."""
    if not strategies.shards_parameters(ready.job.spec):
        return trainer.model  # type: ignore[return-value]
    spec = ready.job.spec.model_copy(deep=True)
    spec.training.pretrain = False
    cuda = torch.cuda.is_available()
    with strategies.unsharded_loading():
        if spec.method.type == MethodType.FULL:
            return load_model(spec, str(staging), ready.tokenizer, ready.precision,
                              ready.data.label_names, device_map=local_device(), cuda=cuda)
        from peft import PeftModel

        base = load_model(spec, ready.source, ready.tokenizer, ready.precision,
                          ready.data.label_names, device_map=local_device(), cuda=cuda)
        return PeftModel.from_pretrained(base, str(staging))  # type: ignore[return-value]


def merge_adapter(ready: Setup, staging: Path) -> None:
    """merged/: the base with the adapter added in, as a plain model (full config, tokenizer,
    generation config, safetensors shards of output.maxShardSize with their index), loaded by
    rank 0 alone outside the strategy's sharded loading (strategies.py).

    lora: into a fresh copy of the base at its own precision. qlora: into the base as it
    trained, quantized the same way and then dequantized (transformers' dequantize), so the
    merged model computes what the trained one did; a 4-bit base cannot hold the sum (PEFT
    would re-quantize it), and the original full-precision weights are not what the adapter
    learned against."""
    from peft import PeftModel

    spec = ready.job.spec
    base_spec = spec.model_copy(deep=True)
    quantized = spec.method.type == MethodType.QLORA
    if not quantized:
        base_spec.method.type = MethodType.LORA
        base_spec.method.quantization = None
    with strategies.unsharded_loading():
        base = load_model(base_spec, ready.source, ready.tokenizer, ready.precision,
                          ready.data.label_names, cuda=torch.cuda.is_available(),
                          device_map=local_device() if quantized else None)
        if quantized:
            # bitsandbytes' dequantization of each layer, the config's quantization dropped
            base = base.dequantize()
            torch.nn.Module.to(base, compute_dtype(spec, ready.precision))
        merged = PeftModel.from_pretrained(base, str(staging)).merge_and_unload()
    target = staging / artifacts.MERGED_DIR
    merged.save_pretrained(target, max_shard_size=spec.output.max_shard_bytes)
    ready.tokenizer.save_pretrained(target)


def local_device() -> str | int:
    return local_rank() if torch.cuda.is_available() else "cpu"


