"""SIGTERM (preemption, suspend, node drain): checkpoint at the next micro-step, then stop.

torchrun forwards the pod's SIGTERM to its workers and SIGKILLs them after
TORCH_ELASTIC_SHUTDOWN_TIMEOUT, which the operator sets from the pod's grace period. The stop is
checked before every micro-batch (not only after a whole optimizer step: with 16 accumulation
steps of a 7B model that alone can outlast the grace period). A stop in the middle of an
accumulation drops the partial gradients and saves the state of the last optimizer step, which
is exactly where a resumed run continues. Ranks may receive the signal at different times (or
only one node may be drained), so they agree with an all-reduce: all stop at the same micro-step
and save one consistent checkpoint, instead of one rank leaving the others hanging in a
collective.
"""

from __future__ import annotations

import signal
from typing import Any

import torch
import torch.distributed as dist
from transformers import TrainerCallback


class Preempted(Exception):
    """Training stopped on SIGTERM after saving a checkpoint; rerunning resumes it."""


class PreemptionCallback(TrainerCallback):
    def __init__(self) -> None:
        self.requested = False
        self.training = self._finished = False
        self.stopped_at: int | None = None
        self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

    def restore(self) -> None:
        """Put back the SIGTERM handler that was there before."""
        signal.signal(signal.SIGTERM, self._previous)

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        self.requested = True
        if not self.training and not self._finished:
            # Still loading (model download, data): nothing to save, so stop now rather than
            # when the grace period runs out. After training, finishing the save is the point.
            raise Preempted("SIGTERM before training started; nothing to checkpoint")

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.training = True

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.training, self._finished = False, True

    def stop_requested(self, device: torch.device) -> bool:
        """Did any rank get SIGTERM? Every rank must call this at the same point."""
        if not dist.is_initialized():
            return self.requested
        flag = torch.tensor([int(self.requested)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


class StopTraining(Exception):
    """Raised before a micro-step when the ranks agreed to stop; the trainer catches it."""
