"""kopf wiring: which events reach the reconciler. Thin on purpose; decisions live in
observe.py and planner.py (status.py), manifests in builders.py, API calls in reconciler.py.

- FineTuneJob created / resumed (operator start) / updated → reconcile it.
- A trainer pod or Job changed → reconcile its FineTuneJob (found through an index) a moment
  later, once for all the events of that moment. Pods and Jobs are watched by informer.py, not
  by kopf: kopf's per-event machinery was most of the operator's CPU at thousands of pods.
- Every progress interval, a task (not a kopf timer: timers put finalizers on the objects,
  and after an uninstall nothing would remove them) resyncs the Running FineTuneJobs and
  scrapes rank 0's progress. Deadlines and TTLs wake the reconciler at the exact moment.

The informers keep the children in memory, so a reconcile lists nothing; the startup handler
waits for their initial lists, and kopf starts the FineTuneJob handlers only after it, so a
restarted operator sees all existing pods and Jobs before it decides anything (and so
duplicates nothing). The FineTuneJob index is kopf's, `async` so that kopf calls it on the
event loop (a plain function goes through a thread pool). Child events are batched per
FineTuneJob (Reconciler.reconcile_soon): a gang's pods change together.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
from typing import Any

import kopf

from kubetune_api.crd import TERMINAL_PHASES, Phase
from kubetune_api.spec import GROUP, PLURAL, VERSION
from kubetune_operator import slim
from kubetune_operator.builders import LABEL_JOB, base_name
from kubetune_operator.informer import Informer
from kubetune_operator.kube import JOBS as JOB_RESOURCE
from kubetune_operator.kube import PODS as POD_RESOURCE
from kubetune_operator.kube import ApiError
from kubetune_operator.reconciler import InvalidSpec, Reconciler
from kubetune_operator.settings import Settings
from kubetune_operator.status import Children

logger = logging.getLogger(__name__)

FTJ = (GROUP, VERSION, PLURAL)
PODS = ("", "v1", "pods")
JOBS = ("batch", "v1", "jobs")
RETRY_DELAY = 5.0  # seconds before kopf retries a create/update handler after an API error


def children_lookup(pods: Informer, jobs: Informer) -> Any:
    def lookup(namespace: str, base: str) -> Children:
        return Children(jobs=jobs.get(namespace, base), pods=pods.get(namespace, base))
    return lookup


def trainer_informers(reconciler: Reconciler, settings: Settings,
                      jobs_by_key: Any) -> tuple[Informer, Informer]:
    """The trainer pods and Jobs, each change waking its FineTuneJob(s) a moment later."""
    def changed(namespace: str, base: str) -> None:
        for owner in list(jobs_by_key.get((namespace, base), [])):
            reconciler.reconcile_soon(namespace, owner["name"])

    def keep_pod(body: Any) -> Any:
        key = (body["metadata"]["namespace"], body["metadata"]["labels"][LABEL_JOB])
        if not slim.indexed(body) or pod_unread(body, jobs_by_key.get(key, [])):
            return None  # not kept (anyone's labelled pod; a finished pod nobody reads)
        return slim.pod(body)

    def keep_job(body: Any) -> Any:
        return slim.job(body) if slim.indexed_job(body) else None  # else someone else's

    namespaces = settings.watch_namespaces
    return (Informer(reconciler.api, POD_RESOURCE, LABEL_JOB, namespaces, keep_pod, changed),
            Informer(reconciler.api, JOB_RESOURCE, LABEL_JOB, namespaces, keep_job, changed))


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

    ticker: list[asyncio.Task[None]] = []
    watching: list[asyncio.Task[None]] = []
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
        pods, jobs = trainer_informers(reconciler, settings, jobs_by_key)
        watching.extend(asyncio.create_task(informer.run(), name=f"kubetune-{name}")
                        for name, informer in (("pods", pods), ("jobs", jobs)))
        await asyncio.gather(pods.ready.wait(), jobs.ready.wait())
        reconciler.children = children_lookup(pods, jobs)
        reconciler.metrics.track_phases(
            lambda: [entry["phase"] for key in list(jobs_by_key)
                     for entry in jobs_by_key.get(key, [])])

        def running() -> list[tuple[str, str]]:
            return [(key[0], entry["name"]) for key in list(jobs_by_key)
                    for entry in jobs_by_key.get(key, []) if entry["phase"] == Phase.RUNNING]
        running_jobs.append(running)

    @kopf.on.cleanup(id="stop-ticker", registry=registry)
    async def stop(**_: Any) -> None:
        for task in [*ticker, *watching]:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    @kopf.on.resume(*FTJ, id="reconcile", registry=registry, backoff=RETRY_DELAY)
    @kopf.on.create(*FTJ, id="reconcile", registry=registry, backoff=RETRY_DELAY)
    @kopf.on.update(*FTJ, id="reconcile", registry=registry, backoff=RETRY_DELAY)
    async def reconcile(**kw: Any) -> None:
        if reconciler.event_context is None:
            reconciler.event_context = contextvars.copy_context()
        start_ticker()
        try:
            await reconciler.reconcile(kw["namespace"], kw["name"])
        except InvalidSpec as exc:
            raise kopf.PermanentError(str(exc)) from None
        except ApiError as exc:
            raise kopf.TemporaryError(str(exc), delay=RETRY_DELAY) from None
