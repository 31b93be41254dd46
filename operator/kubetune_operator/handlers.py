"""kopf wiring: which events reach the reconciler. Thin on purpose; decisions live in
observe.py and planner.py (status.py), manifests in builders.py, API calls in reconciler.py.

- FineTuneJob created / resumed (operator start) / updated → reconcile it.
- A trainer pod or Job changed → reconcile its FineTuneJob (found through an index) a moment
  later, once for all the events of that moment.
- Every progress interval, a task (not a kopf timer: timers put finalizers on the objects,
  and after an uninstall nothing would remove them) resyncs the Running FineTuneJobs and
  scrapes rank 0's progress. Deadlines and TTLs wake the reconciler at the exact moment.

kopf's indexes keep the children in memory, so a reconcile lists nothing; kopf starts the
handlers only once every index has its initial listing, so a restarted operator sees all
existing pods and Jobs before it decides anything (and so duplicates nothing). The index
functions are `async` so that kopf calls them on the event loop: a plain function goes through
a thread pool for every event of every trainer pod. Child events are batched per FineTuneJob
(Reconciler.reconcile_soon): a gang's pods change together.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import kopf

from kubetune_api.crd import TERMINAL_PHASES, Phase
from kubetune_api.spec import GROUP, PLURAL, VERSION
from kubetune_operator import slim
from kubetune_operator.builders import LABEL_JOB, base_name
from kubetune_operator.kube import ApiError
from kubetune_operator.reconciler import InvalidSpec, Reconciler
from kubetune_operator.settings import Settings
from kubetune_operator.status import Children

logger = logging.getLogger(__name__)

FTJ = (GROUP, VERSION, PLURAL)
PODS = ("", "v1", "pods")
JOBS = ("batch", "v1", "jobs")
TRAINER_LABELS = {LABEL_JOB: kopf.PRESENT}
RETRY_DELAY = 5.0  # seconds before kopf retries a create/update handler after an API error


def children_lookup(pods_index: kopf.Index[Any, Any],
                    jobs_index: kopf.Index[Any, Any]) -> Any:
    def lookup(namespace: str, base: str) -> Children:
        key = (namespace, base)
        return Children(jobs=list(jobs_index.get(key, [])), pods=list(pods_index.get(key, [])))
    return lookup


def pod_unread(body: Any, owners: Any) -> bool:
    """A finished pod whose FineTuneJob(s) of that name all finished: the status logic of a
    finished FineTuneJob reads no pod (status._Planner.finished), so the index need not keep
    it. A pod that is still running, or whose owner is unknown yet, is always kept."""
    owners = list(owners)
    return (body.get("status") or {}).get("phase") in slim.FINISHED_POD_PHASES \
        and bool(owners) and all(o["phase"] in TERMINAL_PHASES for o in owners)


def register(registry: kopf.OperatorRegistry, reconciler: Reconciler,
             settings: Settings) -> None:
    @kopf.index(*FTJ, id="finetunejobs", registry=registry)
    async def finetunejobs(**kw: Any) -> dict[Any, Any]:
        return {(kw["namespace"], base_name(kw["name"])): {"name": kw["name"],
                                                           "phase": kw["status"].get("phase")}}

    @kopf.index(*PODS, labels=TRAINER_LABELS, id="trainer_pods", registry=registry)
    async def trainer_pods(**kw: Any) -> dict[Any, Any]:
        key = (kw["namespace"], kw["labels"][LABEL_JOB])
        if not slim.indexed(kw["body"]) or \
                pod_unread(kw["body"], kw["finetunejobs"].get(key, [])):
            return {}  # dropped from the index (kopf discards the keys not returned)
        return {key: slim.pod(kw["body"])}

    @kopf.index(*JOBS, labels=TRAINER_LABELS, id="trainer_jobs", registry=registry)
    async def trainer_jobs(**kw: Any) -> dict[Any, Any]:
        if not slim.indexed_job(kw["body"]):
            return {}  # someone else's Job with the label: not indexed
        return {(kw["namespace"], kw["labels"][LABEL_JOB]): slim.job(kw["body"])}

    ticker: list[asyncio.Task[None]] = []
    running_jobs: list[Any] = []

    def start_ticker() -> None:
        # Started from a handler, not from the startup activity: kopf's event poster lives
        # in the handlers' context (the task inherits it).
        if not ticker and running_jobs:
            ticker.append(asyncio.create_task(reconciler.tick(running_jobs[0]),
                                              name="kubetune-ticker"))

    @kopf.on.startup(id="wire-indexes", registry=registry)
    async def start(**kw: Any) -> None:
        # Indexes are live views: capture them once for the reconciler and the metrics.
        jobs_by_key: kopf.Index[Any, Any] = kw["finetunejobs"]
        reconciler.children = children_lookup(kw["trainer_pods"], kw["trainer_jobs"])
        reconciler.metrics.track_phases(
            lambda: [entry["phase"] for key in list(jobs_by_key)
                     for entry in jobs_by_key.get(key, [])])

        def running() -> list[tuple[str, str]]:
            return [(key[0], entry["name"]) for key in list(jobs_by_key)
                    for entry in jobs_by_key.get(key, []) if entry["phase"] == Phase.RUNNING]
        running_jobs.append(running)

    @kopf.on.cleanup(id="stop-ticker", registry=registry)
    async def stop(**_: Any) -> None:
        for task in ticker:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    @kopf.on.resume(*FTJ, id="reconcile", registry=registry, backoff=RETRY_DELAY)
    @kopf.on.create(*FTJ, id="reconcile", registry=registry, backoff=RETRY_DELAY)
    @kopf.on.update(*FTJ, id="reconcile", registry=registry, backoff=RETRY_DELAY)
    async def reconcile(**kw: Any) -> None:
        start_ticker()
        try:
            await reconciler.reconcile(kw["namespace"], kw["name"])
        except InvalidSpec as exc:
            raise kopf.PermanentError(str(exc)) from None
        except ApiError as exc:
            raise kopf.TemporaryError(str(exc), delay=RETRY_DELAY) from None

    @kopf.on.event(*PODS, labels=TRAINER_LABELS, id="child_changed", registry=registry)
    @kopf.on.event(*JOBS, labels=TRAINER_LABELS, id="child_changed", registry=registry)
    async def child_changed(**kw: Any) -> None:
        namespace, parents = kw["namespace"], kw["finetunejobs"]
        for owner in list(parents.get((namespace, kw["labels"][LABEL_JOB]), [])):
            reconciler.reconcile_soon(namespace, owner["name"])
