"""What each watch event of a trainer pod or Job costs the operator (bench/operator_scale.py
measures it at 8,000 pods): child events are batched per FineTuneJob (the events of a gang's
pods that arrive together wake one reconcile, and none is lost), and kopf sees none of them
(informer.py watches them; test_informer.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from prometheus_client import CollectorRegistry

from kubetune_operator.main import build
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


def test_kopf_handles_finetunejobs_only() -> None:
    """Trainer pods and Jobs are informer.py's: kopf watches, indexes and handles no event of
    theirs (its per-event machinery was most of the operator's CPU at 8,000 pods)."""
    registry, _, _ = build(Settings.from_env({}))
    kinds = (registry._indexing, registry._watching, registry._changing, registry._spawning)
    plurals = {selector.plural or selector.any_name for sub in kinds
               for selector in sub.get_all_selectors()}
    assert plurals == {"finetunejobs"}
