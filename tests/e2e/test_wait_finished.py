"""The harness waits for a job's end as long as the job makes progress: its timeout bounds a
stall, not the run (a run on a busy machine is slow, not failed)."""

from __future__ import annotations

from itertools import count
from typing import Any

import pytest

from support.e2e_cluster import LocalCluster


class QuietRunner:
    errors: list[Any] = []

    def output_size(self) -> int:
        return 0

    def logs(self) -> str:
        return ""


def cluster_reporting(statuses: Any) -> LocalCluster:
    cluster = object.__new__(LocalCluster)  # no API server or operator: only the wait
    cluster.runner = QuietRunner()  # type: ignore[assignment]
    cluster.status = lambda name: next(statuses)  # type: ignore[method-assign]
    cluster.diagnostics = lambda: "(diagnostics)"  # type: ignore[method-assign]
    return cluster


def test_a_job_that_keeps_moving_is_waited_for_past_the_timeout() -> None:
    # Every poll shows a new step; the run ends only after 20 polls (5 s of polling), ten
    # times the stall limit.
    steps = count()
    statuses = ({"phase": "Succeeded"} if (step := next(steps)) >= 20 else
                {"phase": "Running", "progress": {"step": step}} for _ in count())
    assert cluster_reporting(statuses).wait_finished("job", 0.5)["phase"] == "Succeeded"


def test_a_job_that_stops_moving_fails_the_wait() -> None:
    statuses = ({"phase": "Running", "progress": {"step": 3}} for _ in count())
    with pytest.raises(AssertionError, match=r"made no progress for 0\.5s"):
        cluster_reporting(statuses).wait_finished("job", 0.5)
