"""What rank 0 shows a person (or a CI log) while a job trains, and the summary at the end.

Progress goes to stderr, the summary to stdout (so `kubetune run --json job.yaml > out.json`
captures the summary alone). On a terminal: one tqdm bar, step/total with loss, learning rate,
tokens/s and ETA in its postfix. Without one (CI, pods): one line per logged step. The Trainer's
own bar and its raw log dicts are removed (`build_trainer`).

`kubetune run` passes its choices to every rank through the environment (ranks may be torchrun
children): KUBETUNE_PROGRESS = auto | bar | lines | none, KUBETUNE_SUMMARY = text | json | none.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO

from transformers import TrainerCallback

from kubetune_trainer.env import PROGRESS_ENV, SUMMARY_ENV
from kubetune_trainer.evaluation import REPORTED
from kubetune_trainer.oci import Pushed

PROGRESS_MODES = ("auto", "bar", "lines", "none")
SUMMARY_MODES = ("text", "json", "none")
BAR_FORMAT = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]"


@dataclass(frozen=True)
class Console:
    progress: str = "auto"  # PROGRESS_MODES
    summary: str = "text"  # SUMMARY_MODES

    @classmethod
    def from_env(cls) -> Console:
        progress = os.environ.get(PROGRESS_ENV, "auto")
        summary = os.environ.get(SUMMARY_ENV, "text")
        return cls(progress if progress in PROGRESS_MODES else "auto",
                   summary if summary in SUMMARY_MODES else "text")

    @property
    def quiet(self) -> bool:
        return self.progress == "none"

    def progress_mode(self, stream: TextIO) -> str:
        if self.progress != "auto":
            return self.progress
        return "bar" if stream.isatty() else "lines"

    def info(self, message: str) -> None:
        """A one-off note (resuming, ...); silent under --quiet."""
        if not self.quiet:
            print(f"kubetune: {message}", file=sys.stderr, flush=True)

    def report(self, uri: str, manifest: dict[str, Any], digest: str,
               pushed: Pushed | None = None) -> None:
        if self.summary == "json":
            print(json.dumps(summary_dict(uri, manifest, digest, pushed)), flush=True)
        elif self.summary == "text":
            print(summary_text(uri, manifest, pushed), flush=True)


def oci_summary(pushed: Pushed | None) -> dict[str, str] | None:
    """status.output.oci: the reference pushed and the manifest's digest."""
    return {"reference": pushed.reference, "digest": pushed.digest} if pushed else None


def summary_dict(uri: str, manifest: dict[str, Any], digest: str,
                 pushed: Pushed | None = None) -> dict[str, Any]:
    return {"uri": uri, "manifestSha256": digest, "oci": oci_summary(pushed),
            "job": manifest["job"],
            "method": manifest["method"], "task": manifest["task"],
            "baseModel": manifest["baseModel"], "metrics": manifest["metrics"],
            "parameters": manifest["parameters"], "precision": manifest["precision"],
            "worldSize": manifest["worldSize"]}


def summary_text(uri: str, manifest: dict[str, Any], pushed: Pushed | None = None) -> str:
    m, p = manifest["metrics"], manifest["parameters"]
    losses = ""
    if m["firstTrainLoss"] is not None:
        losses = f"  train loss {m['firstTrainLoss']:.4f} -> {m['trainLoss']:.4f}"
    evals = [f"{label} {m[key]:.4f}" for key, label in EVAL_LABELS if m.get(key) is not None]
    if evals:
        losses += (", " if losses else "  ") + ", ".join(evals)
    rewards = ""
    accuracy, margin = m.get("rewardAccuracy") or {}, m.get("rewardMargin") or {}
    if accuracy.get("final") is not None:  # preference objectives (dpo, orpo)
        rewards = (f"  reward accuracy {accuracy['first']:.2f} -> {accuracy['final']:.2f}, "
                   f"margin {margin['first']:.3f} -> {margin['final']:.3f}")
    lines = [
        f"kubetune: {manifest['method']} {manifest['task']} on {manifest['baseModel']['name']}"
        f" done in {m['steps']} steps ({m['trainSeconds']:.1f} s, "
        f"{m['tokensPerSecond']:.0f} tokens/s{_nonpad(m)}, world size {manifest['worldSize']})",
        losses,
        rewards,
        f"  trainable parameters {p['trainable']:,} of {p['total']:,}",
        f"  artifact: {uri}",
        f"  pushed: {pushed.by_digest()}" if pushed else "",
    ]
    return "\n" + "\n".join(line for line in lines if line)


def _nonpad(metrics: dict[str, Any]) -> str:
    """The share of real tokens among the positions trained on (packing: close to 100 %)."""
    fraction = metrics.get("nonPadFraction")
    return f", {fraction:.0%} non-pad" if fraction is not None else ""


EVAL_LABELS = (("evalLoss", "eval loss"), ("evalPerplexity", "eval perplexity"),
               ("evalAccuracy", "eval accuracy"), ("evalF1", "eval macro-F1"))


def format_duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    hours, rest = divmod(round(seconds), 3600)
    minutes_seconds = f"{rest // 60:02d}:{rest % 60:02d}"
    return f"{hours}:{minutes_seconds}" if hours else minutes_seconds


class ProgressCallback(TrainerCallback):
    """Rank 0's progress: a bar on a terminal, else one line per logged step.

    `rates()` returns (tokens/s, ETA seconds) as the metrics module measured them over the
    recent steps, so the terminal and Prometheus show the same figures.
    """

    def __init__(self, mode: str, rates: Callable[[], tuple[float, float | None]],
                 stream: TextIO | None = None) -> None:
        self.mode = mode
        self.rates = rates
        self.stream = stream or sys.stderr
        self.bar: Any = None
        self.last: dict[str, float] = {}
        self.training = False  # the final evaluation is in the summary, not a progress line

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.training = True
        if self.mode == "bar" and state.is_world_process_zero:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=state.max_steps, initial=state.global_step, file=self.stream,
                            bar_format=BAR_FORMAT, dynamic_ncols=True, desc="training")

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)
            self.bar.set_postfix_str(self._postfix(), refresh=False)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None,
               **kwargs: Any) -> None:
        if not state.is_world_process_zero or self.mode == "none" or not logs:
            return
        for key in ("loss", "learning_rate"):
            if key in logs:
                self.last[key] = float(logs[key])
        evals = {k.removeprefix("eval_"): v for k, v in logs.items()
                 if self.training and k.removeprefix("eval_") in REPORTED
                 and k.startswith("eval_")}
        if self.bar is not None:
            if evals:
                self.bar.write(f"eval at step {state.global_step}: {_pairs(evals)}",
                               file=self.stream)
            self.bar.set_postfix_str(self._postfix())
        elif self.mode == "lines" and "loss" in logs:
            print(f"step {state.global_step}/{state.max_steps} {self._postfix(' ')}",
                  file=self.stream, flush=True)
        elif self.mode == "lines" and evals:
            print(f"eval at step {state.global_step}: {_pairs(evals)}", file=self.stream,
                  flush=True)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.training = False
        if self.bar is not None:
            self.bar.set_postfix_str(self._postfix())
            self.bar.close()
            self.bar = None

    def _postfix(self, sep: str = "=") -> str:
        tokens_per_s, eta = self.rates()
        parts = []
        if "loss" in self.last:
            parts.append(f"loss{sep}{self.last['loss']:.4f}")
        if "learning_rate" in self.last:
            parts.append(f"lr{sep}{self.last['learning_rate']:.2e}")
        parts.append(f"tokens/s{sep}{tokens_per_s:.0f}")
        parts.append(f"eta{sep}{format_duration(eta)}")
        return ", ".join(parts) if sep == "=" else " ".join(parts)


def _pairs(values: dict[str, Any]) -> str:
    return " ".join(f"{k} {float(v):.4f}" for k, v in values.items())
