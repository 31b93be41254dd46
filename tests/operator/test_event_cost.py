"""What each watch event of a trainer pod or Job costs the operator (bench/operator_scale.py
measures it at 8,000 pods): child events are batched per FineTuneJob (the events of a gang's
pods that arrive together wake one reconcile, and none is lost), and kopf builds its diff base
for FineTuneJobs only."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import kopf
import pytest
from prometheus_client import CollectorRegistry

from kubetune_operator.main import FineTuneJobDiffBase, configure_kopf
from kubetune_operator.metrics import OperatorMetrics
from kubetune_operator.reconciler import Reconciler
from kubetune_operator.settings import Settings


def counting_reconciler() -> tuple[Reconciler, list[tuple[str, str]]]:
    reconciler = Reconciler(api=None, settings=Settings.from_env({}),  # type: ignore[arg-type]
                            metrics=OperatorMetrics(CollectorRegistry()))
    calls: list[tuple[str, str]] = []

    async def record(namespace: str, name: str) -> None:
        calls.append((namespace, name))

    reconciler.reconcile_or_retry = record  # type: ignore[method-assign]
    return reconciler, calls


async def wait_until(condition: Callable[[], object], timeout: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition never held"
        await asyncio.sleep(0.01)


async def test_events_of_one_gang_wake_one_reconcile() -> None:
    reconciler, calls = counting_reconciler()
    for _ in range(8):  # one event per pod of an 8-node gang
        reconciler.reconcile_soon("team", "job")
    reconciler.reconcile_soon("team", "other")
    await wait_until(lambda: len(calls) >= 2 and not reconciler._batched
                     and not reconciler._tasks)
    assert sorted(calls) == [("team", "job"), ("team", "other")]


async def test_an_event_after_the_batch_fired_wakes_another_reconcile() -> None:
    reconciler, calls = counting_reconciler()
    reconciler.reconcile_soon("team", "job")
    await wait_until(lambda: calls and not reconciler._batched)
    reconciler.reconcile_soon("team", "job")
    await wait_until(lambda: len(calls) == 2 and not reconciler._batched
                     and not reconciler._tasks)
    assert calls == [("team", "job")] * 2


async def test_a_forgotten_job_gets_no_batched_reconcile() -> None:
    reconciler, calls = counting_reconciler()
    reconciler.reconcile_soon("team", "job")
    reconciler.forget(("team", "job"))
    assert not reconciler._batched  # its timer is cancelled: nothing can fire any more
    reconciler.reconcile_soon("team", "other")
    await wait_until(lambda: calls and not reconciler._batched and not reconciler._tasks)
    assert calls == [("team", "other")]


def pod_body() -> Any:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "ft-a1-0", "labels": {"kubetune.dev/finetunejob": "ft"}},
            "spec": {"containers": [{"name": "trainer", "image": "trainer:1"}]},
            "status": {"phase": "Running"}}


def finetunejob_body() -> Any:
    return {"apiVersion": "kubetune.dev/v1alpha1", "kind": "FineTuneJob",
            "metadata": {"name": "ft", "labels": {"team": "a"}},
            "spec": {"method": {"type": "lora"}}, "status": {"phase": "Running"}}


@pytest.mark.parametrize("kind", ["Pod", "Job"])
def test_no_diff_base_is_built_for_trainer_pods_and_jobs(kind: str) -> None:
    body = pod_body() | {"kind": kind}
    assert FineTuneJobDiffBase().build(body=kopf.Body(body)) == {}


def test_the_finetunejob_diff_base_holds_its_spec_and_labels() -> None:
    """What kopf compares to call the update handler: a spec or label change is seen."""
    essence = FineTuneJobDiffBase().build(body=kopf.Body(finetunejob_body()))
    assert essence["spec"] == {"method": {"type": "lora"}}
    assert essence["metadata"]["labels"] == {"team": "a"}
    assert "status" not in essence


def test_the_operator_uses_it() -> None:
    settings = kopf.OperatorSettings()
    configure_kopf(settings)
    assert isinstance(settings.persistence.diffbase_storage, FineTuneJobDiffBase)
