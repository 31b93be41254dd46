"""Resumable checkpoints in object storage.

The HF Trainer writes `checkpoint-<step>/` locally (model or adapter, optimizer, scheduler, RNG
of every rank, trainer state with the step and so the data position). Then every node uploads
what it wrote, all ranks meet, and rank 0 writes the `COMPLETE` marker last. A checkpoint
without its marker (a crash mid-upload) is never resumed from (fms-hf-tuning#432).

Checkpoints belong to one job: the marker (and an owner file written before the upload starts)
records the job's identity, a digest of the FineTuneJob's UID (set by the operator) and of the
settings that shape the weights (model, method, dataset settings and data digest, training).
Two jobs sharing a checkpoint URI, or a job edited and re-applied, never resume, prune or
overwrite each other's checkpoints; the log says which were skipped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch.distributed as dist
from transformers import TrainerCallback

from kubetune_api.contract import CHECKPOINT_MARKER_FILE, CHECKPOINTS_SUBDIR, JOB_UID_ENV
from kubetune_api.spec import FineTuneJob, FineTuneJobSpec
from kubetune_trainer import storage
from kubetune_trainer.metrics import TrainerMetrics
from kubetune_trainer.ranks import global_rank, is_local_leader, is_rank0, local_rank, world_size

PREFIX = "checkpoint-"  # the HF Trainer's folder name
DOWNLOADED = ".kubetune-downloaded"  # node-local: the resume download is whole
TRAINER_STATE = "trainer_state.json"
OWNER_FILE = "kubetune-owner.json"  # written before the upload: whose partial folder this is
log = logging.getLogger("kubetune")


NOT_WEIGHT_SHAPING = {"epochs", "max_steps", "log_every_steps", "eval_every_steps",
                      "early_stopping", "load_best_at_end", "best_metric", "report_to",
                      "compile", "liger_kernels", "gradient_checkpointing",
                      "collective_timeout_seconds"}


def job_identity(job: FineTuneJob, data_digest: str) -> str:
    """Who a checkpoint belongs to: the FineTuneJob's UID (absent for `kubetune run`) and the
    settings that shape the weights learned so far. The run's length (a longer run continues),
    evaluation, reporting, speed-only settings, output, checkpoint, resources and metrics are
    not part of it: changing them keeps resuming."""
    shaping = job.spec.model_dump(
        mode="json", include={"model", "method", "dataset", "training"},
        exclude={"training": NOT_WEIGHT_SHAPING})
    facts = {"jobUid": os.environ.get(JOB_UID_ENV) or None, "dataSha256": data_digest, **shaping}
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:16]


def root_uri(spec: FineTuneJobSpec, output_uri: str) -> str:
    return spec.checkpoint.uri or storage.join(output_uri, CHECKPOINTS_SUBDIR)


def _steps(root: str) -> list[int]:
    names = storage.list_subdirs(root)
    return sorted(int(n.removeprefix(PREFIX)) for n in names
                  if n.startswith(PREFIX) and n.removeprefix(PREFIX).isdigit())


def _folder(root: str, step: int) -> str:
    return storage.join(root, f"{PREFIX}{step}")


def _identity_in(root: str, step: int, name: str) -> str | None:
    """The identity recorded in a checkpoint's marker or owner file ('' when it has none)."""
    uri = storage.join(_folder(root, step), name)
    if not storage.exists(uri):
        return None
    try:
        return str(json.loads(storage.read_text(uri)).get("identity") or "")
    except (ValueError, AttributeError):
        return ""


def complete_steps(root: str, identity: str | None = None) -> list[int]:
    """Steps of the complete checkpoints under `root`, oldest first; with `identity`, only
    that job's (others are logged as skipped)."""
    steps = []
    for step in _steps(root):
        owner = _identity_in(root, step, CHECKPOINT_MARKER_FILE)
        if owner is None:
            continue
        if identity is not None and owner != identity:
            log.warning("skipping %s: it belongs to another job (identity %s, this job %s)",
                        _folder(root, step), owner or "unrecorded", identity)
            continue
        steps.append(step)
    return steps


def prune(root: str, keep_last: int, identity: str, also_keep: int | None = None) -> None:
    """Keep this job's newest `keep_last` complete checkpoints (and `also_keep`, the best one
    under loadBestAtEnd, which a resumed attempt must still find); drop its older ones and its
    own partial leftovers. Other jobs' folders are never touched."""
    complete = complete_steps(root, identity)
    keep = set(complete[-keep_last:]) | {also_keep}
    newest = complete[-1] if complete else -1
    for step in _steps(root):
        if step in keep or step > newest:
            continue
        if step in complete or _identity_in(root, step, OWNER_FILE) == identity:
            storage.remove(_folder(root, step))


def foreign_owner(root: str, step: int, identity: str) -> str | None:
    """The identity of another job that already has a folder for `step` here, if any."""
    for name in (CHECKPOINT_MARKER_FILE, OWNER_FILE):
        owner = _identity_in(root, step, name)
        if owner is not None and owner != identity:
            return owner or "unrecorded"
    return None


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def resume_step(root: str, identity: str) -> int | None:
    """Rank 0 picks this job's newest complete checkpoint; every rank gets the same answer."""
    choice: list[int | None] = [None]
    if is_rank0():
        complete = complete_steps(root, identity)
        choice[0] = complete[-1] if complete else None
    if dist.is_initialized():
        dist.broadcast_object_list(choice, src=0)
    return choice[0]


# Files one rank writes for itself and reads back alone on resume (same world size): the HF
# Trainer's RNG state per process, DeepSpeed's ZeRO partitions (optimizer states, and under
# ZeRO-3 the model's too; bf16_ prefixed under bf16). Everything else is shared.
RANK_FILE = re.compile(r"(?:^|/)(?:rng_state_(\d+)\.pth"
                       r"|(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_\d+_(?:optim|model)_states\.pt)$")


def rank_of(name: str) -> int | None:
    """The rank a checkpoint file belongs to, or None for a file every rank reads."""
    match = RANK_FILE.search(name)
    return int(match.group(1) or match.group(2)) if match else None


def files_for_ranks(names: list[str], ranks: range, world: int) -> list[str]:
    """Of a checkpoint's files, those a node whose ranks are `ranks` reads on resume: the
    shared ones and its own ranks' (a 70B ZeRO-3 checkpoint is mostly per-rank partitions;
    every node fetching all of them multiplied the download by the node count). A checkpoint
    written by another world size is fetched whole: its partitions do not map to ranks."""
    saved = {rank for rank in map(rank_of, names) if rank is not None}
    if saved and max(saved) + 1 != world:
        log.warning("checkpoint written by %d ranks, resumed by %d: fetching every rank's "
                    "files", max(saved) + 1, world)
        return names
    return [name for name in names if rank_of(name) in (None, *ranks)]


def node_ranks() -> range:
    """The global ranks on this node: torchrun numbers a node's ranks consecutively from its
    first one (global rank = the node's base rank + local rank)."""
    first = global_rank() - local_rank()
    return range(first, first + int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def fetch(root: str, step: int, local_root: Path, every_rank: bool = False) -> Path:
    """Download checkpoint `step` once per node: the files its ranks read (files_for_ranks),
    or all of them with `every_rank` (strategies.reads_every_partition). The node's other
    ranks wait for it."""
    local = local_root / f"{PREFIX}{step}"
    if is_local_leader() and not (local / DOWNLOADED).exists():
        ranks, world = node_ranks(), world_size()
        storage.download_dir(_folder(root, step), local, select=None if every_rank else (
            lambda names: files_for_ranks(names, ranks, world)))
        (local / DOWNLOADED).touch()
    _barrier()
    return local


def _best_step(args: Any, state: Any) -> int | None:
    return state.best_global_step if args.load_best_model_at_end else None


def fetch_best(root: str, resumed: Path, local_root: Path, every_rank: bool = False) -> None:
    """loadBestAtEnd after a restart: download the best checkpoint too and point the resumed
    Trainer state at its local copy (the recorded path was the previous pod's disk)."""
    state_file = resumed / TRAINER_STATE
    state = json.loads(state_file.read_text())
    best = state.get("best_global_step")
    if not best:
        return
    local = resumed
    if f"{PREFIX}{best}" != resumed.name:
        if best not in complete_steps(root):
            return  # the Trainer then publishes the last weights and says so
        local = fetch(root, best, local_root, every_rank)
    state["best_model_checkpoint"] = str(local)
    if is_local_leader():
        state_file.write_text(json.dumps(state, indent=2))
    _barrier()


def _best_local(args: Any, state: Any) -> Path | None:
    """loadBestAtEnd: the Trainer reloads its best checkpoint from local disk at the end."""
    if args.load_best_model_at_end and state.best_model_checkpoint:
        return Path(state.best_model_checkpoint)
    return None


def drop_local_copies(local_root: Path, keep: Path | None) -> None:
    """The remote copies are the ones that count; locally only the best one stays (if any)."""
    for folder in local_root.glob(f"{PREFIX}*"):
        if keep is None or folder.resolve() != keep.resolve():
            shutil.rmtree(folder, ignore_errors=True)


class CheckpointCallback(TrainerCallback):
    """Uploads each checkpoint the Trainer saves, then marks it complete and prunes."""

    def __init__(self, root: str, keep_last: int, identity: str,
                 metrics: TrainerMetrics | None = None):
        self.root, self.keep_last, self.identity = root, keep_last, identity
        self.metrics = metrics
        self.step_ended = 0.0

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # The Trainer saves right after this hook; the gap is the local save time (unless it
        # evaluates first, which the measurement then leaves out).
        self.step_ended = 0.0 if control.should_evaluate else time.monotonic()

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        step = state.global_step
        save_seconds = time.monotonic() - self.step_ended if self.step_ended else 0.0
        local = Path(args.output_dir) / f"{PREFIX}{step}"
        remote = _folder(self.root, step)
        if self.metrics:
            self.metrics.set_phase("checkpointing")
        started = time.monotonic()
        if self._claim(remote, step):
            uploaded = storage.upload_dir(local, remote) if is_local_leader() else 0
            _barrier()
            if is_rank0():
                marker = {"step": step, "epoch": state.epoch, "time": time.time(),
                          "identity": self.identity}
                storage.write_text(storage.join(remote, CHECKPOINT_MARKER_FILE),
                                   json.dumps(marker))
                prune(self.root, self.keep_last, self.identity, _best_step(args, state))
        else:
            uploaded = 0
        if is_local_leader():
            drop_local_copies(Path(args.output_dir), keep=_best_local(args, state))
        if self.metrics:
            self.metrics.observe_checkpoint(step, save_seconds=save_seconds,
                                            upload_seconds=time.monotonic() - started,
                                            uploaded_bytes=uploaded)
            self.metrics.set_phase("training")

    def _claim(self, remote: str, step: int) -> bool:
        """Rank 0 clears this job's leftovers at `remote` and writes the owner file; every rank
        learns whether the upload goes ahead (not when another job owns that folder)."""
        decision: list[bool] = [True]
        if is_rank0():
            owner = foreign_owner(self.root, step, self.identity)
            if owner is not None:
                log.warning("not saving checkpoint %s: the folder belongs to another job "
                            "(identity %s); give each job its own checkpoint.uri", remote, owner)
                decision[0] = False
            else:
                storage.remove(remote)  # leftovers of this job's earlier attempt at this step
                storage.write_text(storage.join(remote, OWNER_FILE),
                                   json.dumps({"identity": self.identity}))
        if dist.is_initialized():
            dist.broadcast_object_list(decision, src=0)
        _barrier()  # every rank has written its part (RNG state, shards), the folder is clean
        return decision[0]
