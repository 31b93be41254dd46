"""Experiment trackers (spec.training.reportTo) beyond what the Trainer's integrations do.

The Trainer's MLflow integration opens a run at train begin and closes it at train end, so the
final evaluation (after training) would land in a second run. Rank 0 opens the run itself,
around training and the final evaluation, and closes it with the job's outcome. The endpoint and
credentials come from the environment only (MLFLOW_TRACKING_URI, MLFLOW_TRACKING_TOKEN, ...;
Secrets reach it through spec.pod); nothing here prints them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from kubetune_api.spec import FineTuneJob
from kubetune_trainer.preemption import Preempted
from kubetune_trainer.ranks import is_rank0


@contextmanager
def tracking_run(job: FineTuneJob) -> Iterator[None]:
    if "mlflow" not in job.spec.training.report_to or not is_rank0():
        yield
        return
    import mlflow

    mlflow.start_run(run_name=job.name)
    status = "FAILED"
    try:
        yield
        status = "FINISHED"
    except Preempted:
        status = "KILLED"  # stopped on purpose; the next attempt opens a new run
        raise
    finally:
        mlflow.end_run(status=status)
