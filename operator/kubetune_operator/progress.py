"""Progress from rank 0's Prometheus text (contract.METRIC_*) and its human-readable ETA."""

from __future__ import annotations

import datetime
import math

from prometheus_client.parser import text_string_to_metric_families

from kubetune_api import contract
from kubetune_api.crd import Progress
from kubetune_operator.conditions import _iso

METRIC_PHASE = "kubetune_trainer_phase"  # {rank, phase} = 1 for the phase a rank is in


def parse_progress(text: str, now: datetime.datetime,
                   previous: Progress | None = None) -> Progress | None:
    """Progress from rank 0's Prometheus exposition (contract.METRIC_*); None if absent.
    lastStepTime moves when the step does, and while rank 0 is not training (loading,
    checkpointing): the stall watchdog times training only."""
    values: dict[str, float] = {}
    phase = None
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels.get("rank", "0") != "0":
                continue
            if sample.name == METRIC_PHASE and sample.value == 1:
                phase = sample.labels.get("phase")
            elif sample.name not in values:
                values[sample.name] = sample.value
    step = values.get(contract.METRIC_STEP)
    if step is None:
        return None
    moved = previous is None or previous.step != int(step) or previous.last_step_time is None \
        or phase not in (None, "training")
    total = values.get(contract.METRIC_TOTAL_STEPS)
    eta = values.get(contract.METRIC_ETA_SECONDS)
    eta_seconds = int(eta) if eta is not None and math.isfinite(eta) else None
    return Progress(
        step=int(step), total_steps=int(total) if total else None,
        percent=round(100.0 * step / total, 1) if total else None,
        loss=_finite(values.get(contract.METRIC_LOSS)),
        tokens_per_second=_finite(values.get(contract.METRIC_TOKENS_PER_SECOND)),
        eta_seconds=eta_seconds, eta=human_duration(eta_seconds),
        last_update_time=_iso(now),
        last_step_time=_iso(now) if moved or previous is None else previous.last_step_time)


def _finite(value: float | None) -> float | None:
    return round(value, 4) if value is not None and math.isfinite(value) else None


def human_duration(seconds: int | None) -> str | None:
    if seconds is None:
        return None
    hours, rest = divmod(max(0, seconds), 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"
