"""Prometheus metrics of one trainer rank (docs/metrics.md lists every series).

Each rank serves ``/metrics`` on ``spec.metrics.port + local_rank`` (default 9400); every
series carries a ``rank`` label. The operator scrapes rank 0 for ``status.progress`` and reads
the names in ``kubetune_api.contract`` (``METRIC_*``).

``TrainerMetrics`` needs only prometheus_client (no torch, no transformers); the Trainer hook
``MetricsCallback`` (or ``metrics_callback(...)``) imports transformers when first used.
"""

from __future__ import annotations

import sys
import time
from collections import deque
from collections.abc import Callable
from threading import Thread
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from kubetune_api.contract import (
    METRIC_ETA_SECONDS,
    METRIC_LOSS,
    METRIC_STEP,
    METRIC_TOKENS_PER_SECOND,
    METRIC_TOTAL_STEPS,
)

if TYPE_CHECKING:
    from transformers import TrainerCallback

DEFAULT_PORT = 9400  # spec.metrics.port; rank r of a node listens on port + local rank
PHASES = (
    "starting", "loading", "training", "evaluating", "checkpointing", "saving", "done", "failed",
)
# Throughput and ETA are measured over the last RATE_WINDOW optimizer steps.
RATE_WINDOW = 20
# Checkpoint save/upload durations, seconds: from a small adapter to a large full model.
DURATION_BUCKETS = (0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)


class TrainerMetrics:
    """The metrics of one rank, in their own registry (instances never collide)."""

    def __init__(
        self,
        rank: int,
        *,
        model: str,
        method: str,
        task: str,
        registry: CollectorRegistry | None = None,
        window: int = RATE_WINDOW,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rank = rank
        self.registry = registry if registry is not None else CollectorRegistry()
        self._clock = clock
        self._server: WSGIServer | None = None
        self._thread: Thread | None = None
        # (time, tokens, samples) of recent steps; the oldest entry only marks the start time.
        self._window: deque[tuple[float, int, int]] = deque(maxlen=max(1, window) + 1)
        self._total_steps = 0
        self.phase = ""
        self.tokens_per_second = 0.0  # as last measured (also shown by the progress bar)
        self.eta_seconds: float | None = None
        r = {"rank": str(rank)}
        reg = self.registry

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, ["rank"], registry=reg)

        self._step = gauge(METRIC_STEP, "Optimizer steps completed.").labels(**r)
        self._total = gauge(METRIC_TOTAL_STEPS, "Optimizer steps of the whole run.").labels(**r)
        self._epoch = gauge("kubetune_trainer_epoch", "Epochs completed (fractional).").labels(**r)
        self._loss = gauge(METRIC_LOSS, "Training loss, as last logged.").labels(**r)
        self._eval_loss = gauge("kubetune_trainer_eval_loss", "Loss of the last evaluation.") \
            .labels(**r)
        self._eval_metrics = {
            "accuracy": gauge("kubetune_trainer_eval_accuracy",
                              "Accuracy of the last evaluation (sequence-classification)."),
            "f1": gauge("kubetune_trainer_eval_f1",
                        "Macro-F1 of the last evaluation (sequence-classification)."),
            "perplexity": gauge("kubetune_trainer_eval_perplexity",
                                "exp(eval loss) of the last evaluation (language modelling)."),
        }
        self._lr = gauge("kubetune_trainer_learning_rate", "Learning rate, as last logged.") \
            .labels(**r)
        self._grad_norm = gauge("kubetune_trainer_grad_norm", "Gradient norm, as last logged.") \
            .labels(**r)
        self._tokens_per_s = gauge(
            METRIC_TOKENS_PER_SECOND, f"Tokens/s of this rank over the last {window} steps."
        ).labels(**r)
        self._nonpad = gauge(
            "kubetune_trainer_nonpad_fraction",
            "Share of the training positions fed so far that hold real tokens, not padding.",
        ).labels(**r)
        self._samples_per_s = gauge(
            "kubetune_trainer_samples_per_second",
            f"Samples/s of this rank over the last {window} steps.",
        ).labels(**r)
        self._eta = gauge(
            METRIC_ETA_SECONDS, "Estimated seconds to the last step, from the recent step rate."
        ).labels(**r)
        self._ckpt_step = gauge(
            "kubetune_trainer_checkpoint_last_step", "Step of the last complete checkpoint."
        ).labels(**r)
        self._gpu_allocated_metric = gauge(
            "kubetune_trainer_gpu_memory_allocated_bytes", "CUDA memory allocated by tensors."
        )
        self._gpu_reserved_metric = gauge(
            "kubetune_trainer_gpu_memory_reserved_bytes", "CUDA memory reserved by the allocator."
        )
        self._tokens = Counter(
            "kubetune_trainer_tokens", "Tokens processed by this rank.", ["rank"], registry=reg
        ).labels(**r)
        self._upload_bytes = Counter(
            "kubetune_trainer_upload_bytes", "Bytes uploaded to object storage.", ["rank"],
            registry=reg,
        ).labels(**r)
        self._save_seconds = Histogram(
            "kubetune_trainer_checkpoint_save_duration_seconds",
            "Time to write a checkpoint locally.", ["rank"], buckets=DURATION_BUCKETS,
            registry=reg,
        ).labels(**r)
        self._upload_seconds = Histogram(
            "kubetune_trainer_checkpoint_upload_duration_seconds",
            "Time to upload a checkpoint to object storage.", ["rank"],
            buckets=DURATION_BUCKETS, registry=reg,
        ).labels(**r)
        # Preference objectives (dpo, orpo) only: created unlabelled, so SFT runs export no 0s.
        self._rewards = {
            key: gauge(name, doc) for key, name, doc in (
                ("accuracy", "kubetune_trainer_reward_accuracy",
                 "Share of pairs whose chosen reward beats the rejected one, as last logged."),
                ("margin", "kubetune_trainer_reward_margin",
                 "Mean chosen minus rejected reward, as last logged."),
                ("chosen", "kubetune_trainer_rewards_chosen",
                 "Mean implicit reward of the chosen responses, as last logged."),
                ("rejected", "kubetune_trainer_rewards_rejected",
                 "Mean implicit reward of the rejected responses, as last logged."),
            )
        }
        self._phase = Gauge(
            "kubetune_trainer_phase", "1 for the phase this rank is in, 0 for the others.",
            ["rank", "phase"], registry=reg,
        )
        Gauge(
            "kubetune_trainer_info", "Always 1; labels describe the run.",
            ["rank", "model", "method", "task"], registry=reg,
        ).labels(rank=str(rank), model=model, method=method, task=task).set(1)
        self.set_phase("starting")

    # --- serving -------------------------------------------------------------------------

    def serve(self, port: int = DEFAULT_PORT, addr: str = "0.0.0.0") -> int:
        """Serve ``/metrics`` over HTTP in a daemon thread; returns the port (``port=0``
        picks a free one)."""
        if self._server is not None:
            return int(self._server.server_port)
        self._server, self._thread = start_http_server(port, addr=addr, registry=self.registry)
        return int(self._server.server_port)

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    # --- updates from the trainer -------------------------------------------------------

    def set_phase(self, phase: str) -> None:
        if phase not in PHASES:
            raise ValueError(f"unknown phase {phase!r}; expected one of {', '.join(PHASES)}")
        for p in PHASES:
            self._phase.labels(rank=str(self.rank), phase=p).set(1 if p == phase else 0)
        if phase == "training" and not self._window:
            self._window.append((self._clock(), 0, 0))  # the first step's rate counts from here
        if phase == "done":
            self._eta.set(0)
            self.eta_seconds = 0.0
        self.phase = phase

    def rates(self) -> tuple[float, float | None]:
        """(tokens/s, ETA seconds) over the recent steps; ETA is None before the first step."""
        return self.tokens_per_second, self.eta_seconds

    def set_total_steps(self, n: int) -> None:
        self._total_steps = n
        self._total.set(n)

    def on_step(self, step: int, epoch: float, *, tokens: int, samples: int,
                nonpad_fraction: float | None = None) -> None:
        """One optimizer step done: ``tokens``/``samples`` are what this rank processed in it;
        ``nonpad_fraction`` is the share of real tokens among all positions fed so far."""
        now = self._clock()
        if nonpad_fraction is not None:
            self._nonpad.set(nonpad_fraction)
        self._step.set(step)
        self._epoch.set(epoch)
        if tokens:
            self._tokens.inc(tokens)
        self._window.append((now, tokens, samples))
        if len(self._window) >= 2:
            elapsed = now - self._window[0][0]
            recent = list(self._window)[1:]
            if elapsed > 0:
                self.tokens_per_second = sum(t for _, t, _ in recent) / elapsed
                self._tokens_per_s.set(self.tokens_per_second)
                self._samples_per_s.set(sum(s for _, _, s in recent) / elapsed)
                steps_per_s = len(recent) / elapsed
                if self._total_steps:
                    self.eta_seconds = max(self._total_steps - step, 0) / steps_per_s
                    self._eta.set(self.eta_seconds)
        self._update_gpu_memory()

    def on_log(
        self,
        loss: float | None = None,
        learning_rate: float | None = None,
        grad_norm: float | None = None,
        eval_loss: float | None = None,
    ) -> None:
        for gauge, value in ((self._loss, loss), (self._lr, learning_rate),
                             (self._grad_norm, grad_norm), (self._eval_loss, eval_loss)):
            if value is not None:
                gauge.set(float(value))

    def on_eval(self, metrics: dict[str, Any]) -> None:
        """An evaluation's results, keyed as the Trainer reports them (eval_loss, eval_f1, ...);
        series only appear for the metrics the task has."""
        if metrics.get("eval_loss") is not None:
            self._eval_loss.set(float(metrics["eval_loss"]))
        for name, series in self._eval_metrics.items():
            value = metrics.get(f"eval_{name}")
            if value is not None:
                series.labels(rank=str(self.rank)).set(float(value))

    def on_rewards(self, **values: float | None) -> None:
        """Preference rewards as logged: accuracy, margin, chosen, rejected."""
        for key, value in values.items():
            if value is not None:
                self._rewards[key].labels(rank=str(self.rank)).set(float(value))

    def observe_checkpoint(
        self, step: int, save_seconds: float, upload_seconds: float, uploaded_bytes: int
    ) -> None:
        """A checkpoint of ``step`` is complete (saved, uploaded, marked)."""
        self._ckpt_step.set(step)
        self._save_seconds.observe(save_seconds)
        self._upload_seconds.observe(upload_seconds)
        self.add_uploaded_bytes(uploaded_bytes)

    def add_uploaded_bytes(self, n: int) -> None:
        if n:
            self._upload_bytes.inc(n)

    def _update_gpu_memory(self) -> None:
        torch = sys.modules.get("torch")  # never import torch just for this
        if torch is None:
            return
        try:
            if not torch.cuda.is_available():
                return
            device = torch.cuda.current_device()
            allocated = torch.cuda.memory_allocated(device)
            reserved = torch.cuda.memory_reserved(device)
        except Exception:  # metrics must never break training
            return
        r = str(self.rank)
        self._gpu_allocated_metric.labels(rank=r).set(allocated)
        self._gpu_reserved_metric.labels(rank=r).set(reserved)


# --- transformers.Trainer hook ---------------------------------------------------------------

_callback_class: type | None = None


def _metrics_callback_class() -> type:
    global _callback_class
    if _callback_class is not None:
        return _callback_class
    from transformers import TrainerCallback

    class MetricsCallback(TrainerCallback):
        """Feeds a TrainerMetrics from transformers.Trainer events.

        ``count_tokens()`` returns the tokens this rank processed since the previous call;
        the trainer counts them (non-pad tokens, i.e. ``attention_mask.sum()``, of the batches
        it feeds) and the callback drains the count once per optimizer step. Without it,
        tokens/s stays 0. ``count_samples()`` works the same way; by default a step is
        ``per_device_train_batch_size * gradient_accumulation_steps`` samples.

        Phases set here: ``training`` at train begin, ``evaluating`` while evaluation runs
        and ``training`` again after it. The trainer sets the others (loading, checkpointing,
        saving, done, failed) itself.
        """

        def __init__(
            self,
            metrics: TrainerMetrics,
            count_tokens: Callable[[], int] | None = None,
            count_samples: Callable[[], int] | None = None,
            nonpad_fraction: Callable[[], float | None] | None = None,
        ) -> None:
            self.metrics = metrics
            self.count_tokens = count_tokens
            self.count_samples = count_samples
            self.nonpad_fraction = nonpad_fraction
            self._training = False

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self._training = True
            self.metrics.set_total_steps(state.max_steps)
            self.metrics.set_phase("training")

        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self._training = False

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            tokens = self.count_tokens() if self.count_tokens else 0
            if self.count_samples:
                samples = self.count_samples()
            else:
                samples = args.per_device_train_batch_size * args.gradient_accumulation_steps
            self.metrics.on_step(
                state.global_step, float(state.epoch or 0.0), tokens=tokens, samples=samples,
                nonpad_fraction=self.nonpad_fraction() if self.nonpad_fraction else None)

        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None,
                   **kwargs: Any) -> None:
            logs = logs or {}
            self.metrics.on_log(loss=logs.get("loss"), learning_rate=logs.get("learning_rate"),
                                grad_norm=logs.get("grad_norm"), eval_loss=logs.get("eval_loss"))
            self.metrics.on_rewards(  # TRL's DPO/ORPO training logs
                accuracy=logs.get("rewards/accuracies"), margin=logs.get("rewards/margins"),
                chosen=logs.get("rewards/chosen"), rejected=logs.get("rewards/rejected"))

        def on_prediction_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if self.metrics.phase != "evaluating":
                self.metrics.set_phase("evaluating")

        def on_evaluate(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.metrics.on_eval(kwargs.get("metrics") or {})
            if self._training:
                self.metrics.set_phase("training")

    _callback_class = MetricsCallback
    return MetricsCallback


def metrics_callback(
    metrics: TrainerMetrics,
    count_tokens: Callable[[], int] | None = None,
    count_samples: Callable[[], int] | None = None,
    nonpad_fraction: Callable[[], float | None] | None = None,
) -> TrainerCallback:
    """A ``MetricsCallback`` for ``Trainer(callbacks=[...])`` (see its docstring)."""
    instance: TrainerCallback = _metrics_callback_class()(
        metrics, count_tokens, count_samples, nonpad_fraction)
    return instance


def __getattr__(name: str) -> Any:
    """``from kubetune_trainer.metrics import MetricsCallback`` imports transformers then."""
    if name == "MetricsCallback":
        return _metrics_callback_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
