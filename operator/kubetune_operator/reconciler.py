"""Carry out one reconcile of a FineTuneJob: read it, decide (status.plan), act, record.

All reconciles of one FineTuneJob run one at a time (a lock per object), whatever triggered
them: kopf's create/update/resume handlers, events of its pods and Jobs, the timer. A request
that arrives while another waits for the lock is dropped: the waiting one will read the
newer state anyway. The FineTuneJob itself is read fresh from the API under the lock, so a
decision never rests on a status this operator has already replaced.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import dataclasses
import datetime
import logging
import time
from collections.abc import Callable
from typing import Any, cast

import kopf

from kubetune_api.crd import Phase, Runtime
from kubetune_api.load import SpecError, validate_job
from kubetune_api.runtime import RUNTIME_KINDS
from kubetune_api.spec import GROUP, PLURAL, VERSION, FineTuneJob
from kubetune_operator import gang, policy, runtimes
from kubetune_operator import status as st
from kubetune_operator.builders import (
    ANNOTATION_SUSPENDED_BY_OPERATOR,
    Owner,
    attempt_job_name,
    base_name,
    build_children,
    is_queue_managed,
    master_address,
)
from kubetune_operator.kube import (
    CONFIG_MAPS,
    EVENTS,
    JOBS,
    NETWORK_POLICIES,
    PODS,
    RETRYABLE_STATUSES,
    SERVICES,
    ApiError,
    KubeApi,
    Resource,
)
from kubetune_operator.metrics import OperatorMetrics
from kubetune_operator.scrape import scrape_progress
from kubetune_operator.settings import Settings

logger = logging.getLogger(__name__)

FINETUNEJOBS = Resource(GROUP, VERSION, PLURAL)
CHILD_RESOURCES = {"ConfigMap": CONFIG_MAPS, "Service": SERVICES,
                   "NetworkPolicy": NETWORK_POLICIES, "Job": JOBS}

# Curated runtimes (runtimes.py), by kind: read once per job, before its first attempt.
RUNTIMES = {kind: runtimes.resource(kind) for kind in RUNTIME_KINDS}
# The gang schedulers' PodGroups (gang.py), by gang.GangApi.name.
POD_GROUPS = {g.name: g.resource for g in (gang.VOLCANO, gang.COSCHEDULING)}
Key = tuple[str, str]  # (namespace, name)
RETRY_SECONDS = 5.0  # after a failed reconcile that no handler will retry
# A gang's pods change together (its 8 pods are created, start, finish or are deleted within
# milliseconds of each other): child events wait this long, and one reconcile reads them all.
CHILD_EVENT_WINDOW_SECONDS = 0.1
ChildrenLookup = Callable[[str, str], st.Children]  # (namespace, base name) → labelled ones
SCRAPE_CONCURRENCY = 32  # rank-0 scrapes in flight at once per tick
# FailedCreate events are read 20 a page, at most 10 pages a reconcile: pages come in name
# order, so the newest may be on the last one. The API server folds repeats of one message
# into one event (its count), so one Job rarely has more than a few.
FAILED_CREATE_EVENTS, FAILED_CREATE_PAGES = 20, 10


class InvalidSpec(Exception):
    """The spec got past the CRD schema but not the contract; retrying cannot help."""


class CreateRefused(Exception):
    """The API refused a child for a reason no retry can change (a 4xx other than 409/429,
    or a name taken by an object that is not ours)."""


def refused_for_good(exc: ApiError) -> bool:
    return 400 <= exc.status < 500 and exc.status not in (401, 409, *RETRYABLE_STATUSES)


def runtime_of(settings: Settings) -> Runtime:
    return Runtime(trainer_image=settings.trainer_image,
                   termination_grace_seconds=settings.termination_grace_seconds,
                   storage_secret=settings.storage_secret,
                   image_pull_secrets=list(settings.image_pull_secrets),
                   service_account=settings.service_account)


def pinned(settings: Settings, runtime: Runtime | None) -> Settings:
    """The operator settings an attempt builds with: the first attempt's, once pinned."""
    if runtime is None:
        return settings
    return dataclasses.replace(settings, trainer_image=runtime.trainer_image,
                               termination_grace_seconds=runtime.termination_grace_seconds,
                               storage_secret=runtime.storage_secret,
                               image_pull_secrets=tuple(runtime.image_pull_secrets),
                               service_account=runtime.service_account)


def utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def status_patch(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """A merge patch from old to new status (null removes a field that is gone)."""
    return {**{k: None for k in old if k not in new}, **new}


def no_children(namespace: str, base: str) -> st.Children:
    return st.Children([], [])


class Reconciler:
    def __init__(self, api: KubeApi, settings: Settings, metrics: OperatorMetrics,
                 clock: Callable[[], datetime.datetime] = utcnow) -> None:
        self.api, self.settings, self.metrics, self.clock = api, settings, metrics, clock
        self.children: ChildrenLookup = no_children  # kopf's indexes, once handlers run
        self.limits = st.Limits(runtime_of(settings), settings.force_delete_after)
        self._locks: dict[Key, asyncio.Lock] = collections.defaultdict(asyncio.Lock)
        self._queued: set[Key] = set()
        self._rechecks: dict[Key, asyncio.TimerHandle] = {}
        self._batched: dict[Key, asyncio.TimerHandle] = {}  # child events waiting, per object
        # (object uid, attempt) created, monotonic time: a re-created object of the same name
        # is another object.
        self._created: dict[Key, tuple[str, int, float]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        # (uid, names of its Jobs seen in the index) per object
        self._seen_jobs: dict[Key, tuple[str, set[str]]] = {}
        # Per object, uids of children a uid-precondition DELETE found gone (404, or 409: the
        # name is another object's now) while kopf's index still holds them: after a watch
        # expired (410 Gone) kopf relists, and its indexes drop an entry only on a DELETED
        # event, so an object deleted in the gap stays there, a ghost the planner would wait
        # for forever. Kept while the index holds them.
        self._gone: dict[Key, set[str]] = {}
        # Per object, the last spec that passed validation and its model: most reconciles
        # (every pod phase, every status write) see the same spec again, and need neither
        # pydantic nor a worker thread's round trip for it (a small part of the operator's
        # CPU at 1000 x 8, docs/benchmarks.md; more with large specs).
        self._validated: dict[Key, tuple[str, Any, FineTuneJob]] = {}
        # A kopf handler's context (handlers.py sets it): kopf.event needs kopf's event poster,
        # which lives there, and child events come from the informers' tasks, outside it.
        self.event_context: contextvars.Context | None = None

    async def reconcile(self, namespace: str, name: str) -> None:
        key = (namespace, name)
        if key in self._queued:
            return  # the queued run will see whatever triggered this one
        self._queued.add(key)
        try:
            async with self._locks[key]:
                self._queued.discard(key)
                with self.metrics.reconcile_duration.time():
                    await self._reconcile(namespace, name)
        except InvalidSpec:
            raise
        except Exception:
            self.metrics.reconcile_errors.inc()
            raise
        finally:
            self._queued.discard(key)

    async def reconcile_or_retry(self, namespace: str, name: str) -> None:
        """For triggers nobody retries (child events, scheduled wake-ups): on an error, try
        again a little later instead of waiting for the next event."""
        try:
            await self.reconcile(namespace, name)
        except InvalidSpec:
            pass  # recorded as Failed/InvalidSpec; nothing to retry
        except Exception as exc:
            logger.warning("%s/%s: reconcile failed (%s); retrying in %.0fs", namespace, name,
                           exc, RETRY_SECONDS)
            self._recheck_later((namespace, name), RETRY_SECONDS)

    def reconcile_soon(self, namespace: str, name: str) -> None:
        """For child events: one reconcile CHILD_EVENT_WINDOW_SECONDS after the first event,
        for every event of the object in that window (each still wakes the reconciler; none
        is lost). Errors are retried as in reconcile_or_retry."""
        key = (namespace, name)
        if key not in self._batched:
            self._batched[key] = asyncio.get_running_loop().call_later(
                CHILD_EVENT_WINDOW_SECONDS, self._spawn, key, self._batched)

    async def _reconcile(self, namespace: str, name: str) -> None:
        body = await self.api.get(FINETUNEJOBS, namespace, name)
        if body is None or body["metadata"].get("deletionTimestamp"):
            self.forget((namespace, name))
            return
        status = st.parse_status(body.get("status"))
        generation = body["metadata"].get("generation")
        try:
            job = await self._validated_job(body, (namespace, name))
        except SpecError as exc:
            await self._reject(body, status, str(exc))
            raise InvalidSpec(str(exc)) from None
        try:
            job, curated, runtime_problems = await self._under_runtime(job, namespace, status)
        except runtimes.RuntimeUnusable as exc:
            await self._reject(body, status, str(exc), reason=exc.reason)
            raise InvalidSpec(str(exc)) from None
        owner = self._admitted_owner(body, curated, runtime_problems)
        if not status.attempt and status.phase is None:  # before the first child exists
            problems = runtime_problems + policy.violations(
                job.spec, owner.labels, self.settings.policy, self.settings.trainer_image)
            if problems:
                message = policy.summary(problems)
                await self._reject(body, status, message, reason=policy.REASON_POLICY_VIOLATION)
                raise InvalidSpec(message)
        children = await self._with_failed_creates(self._children_of(owner), namespace,
                                                   attempt_job_name(name, status.attempt or 1))
        plan = st.plan(name, job.spec, generation, status, children,
                       self.clock(), queue_managed=is_queue_managed(owner),
                       limits=self.limits)
        if curated is not None and plan.status.runtime is not None:
            plan.status.runtime = runtimes.record(plan.status.runtime, curated)
        if plan.create_attempt is not None:
            await self._admit_attempt(plan, job, owner, body, children, runtime_problems)
        plan.status = await self._gang_reason(job, owner, plan.status, generation)
        await self._execute(plan, job, owner, body, status)

    async def _validated_job(self, body: dict[str, Any], key: Key) -> FineTuneJob:
        """The FineTuneJob model of body: validated when its spec differs from the last one
        that passed (compared by content, not by generation, so a spec changed without a new
        generation is validated too), else the model of that one with body's metadata."""
        uid, spec = body["metadata"].get("uid", ""), body.get("spec")
        cached = self._validated.get(key)
        if cached is not None and cached[0] == uid and cached[1] == spec \
                and body.get("apiVersion") == cached[2].api_version \
                and body.get("kind") == cached[2].kind:
            return cached[2].model_copy(update={"metadata": body["metadata"]})
        # Off the event loop: a spec may be large (up to load.MAX_SPEC_BYTES), and every
        # other job's reconcile waits while the loop is busy.
        job = await asyncio.to_thread(
            validate_job, {k: v for k, v in body.items() if k != "status"},
            source=f"{key[0]}/{key[1]}")
        self._validated[key] = (uid, spec, job)
        return job

    async def _admit_attempt(self, plan: st.Plan, job: FineTuneJob, owner: Owner,
                             body: dict[str, Any], children: st.Children,
                             runtime_problems: list[str]) -> None:
        """The policy, re-checked on the FineTuneJob as it is now, before every attempt: labels
        a tenant changed since, a spec changed behind the API server's back, a policy the
        admin tightened. A violation fails the job and stops what is left of it."""
        status = st.parse_status(body.get("status"))
        runtime = plan.status.runtime or self.limits.runtime
        problems = runtime_problems + policy.attempt_violations(
            job.spec, owner.labels, self.settings.policy,
            runtime.trainer_image if runtime else self.settings.trainer_image,
            status.admitted_spec_hash)
        if problems:
            message = policy.summary(problems)
            await self._reject(body, status, message, reason=policy.REASON_POLICY_VIOLATION)
            for child in children.jobs:
                meta = child["metadata"]
                await self.api.delete(JOBS, owner.namespace, meta["name"], uid=meta.get("uid"))
            raise InvalidSpec(message)
        plan.status.admitted_spec_hash = status.admitted_spec_hash or policy.spec_hash(job.spec)

    async def _gang_reason(self, job: FineTuneJob, owner: Owner,
                           status: st.FineTuneJobStatus, generation: int | None
                           ) -> st.FineTuneJobStatus:
        """A gang-scheduled attempt that waits: its PodGroup's reason (one GET, while
        Pending only)."""
        gang_kind = gang.gang_api(job.spec.pod.scheduler_name)
        if gang_kind is None or status.phase != Phase.PENDING or not status.attempt:
            return status
        group = await self.api.get(POD_GROUPS[gang_kind.name], owner.namespace,
                                   attempt_job_name(owner.name, status.attempt))
        return gang.explain_pending(status, gang.pending_reason(gang_kind, group), generation)

    async def _under_runtime(self, job: FineTuneJob, namespace: str,
                             status: st.FineTuneJobStatus
                             ) -> tuple[FineTuneJob, runtimes.Resolved | None, list[str]]:
        """The job merged with its curated runtime (runtimes.py): the one status.runtime
        recorded, else the one the API serves now."""
        ref = job.spec.runtime_ref
        if ref is None:
            return job, None, []
        curated = runtimes.pinned(ref, status.runtime)
        if curated is None:
            # A FineTuneRuntime is read in the job's namespace only (no team borrows another
            # team's); a ClusterFineTuneRuntime's path has no namespace (Resource.path).
            body = await self.api.get(RUNTIMES[ref.kind], namespace, ref.name)
            curated = runtimes.resolve(ref, namespace, body)
        merged, problems = runtimes.merge(job, curated)
        return merged, curated, problems

    def _admitted_owner(self, body: dict[str, Any], curated: runtimes.Resolved | None = None,
                        problems: list[str] | None = None) -> Owner:
        """The owner with the runtime's Kueue queue (its conflicts added to problems), else
        the admin's default queue, applied (policy.py)."""
        owner = Owner.from_body(body)
        labels = owner.labels
        if curated is not None:
            labels, conflicts = runtimes.queue_labels(labels, curated)
            if problems is not None:
                problems += conflicts
        labels = policy.with_default_queue(labels, self.settings.policy)
        return Owner(owner.name, owner.namespace, owner.uid, labels)

    def _children_of(self, owner: Owner) -> st.Children:
        labelled = self.children(owner.namespace, base_name(owner.name))
        key = (owner.namespace, owner.name)
        jobs, pods = self._without_ghosts(key, labelled.jobs, labelled.pods)
        children = st.owned_children(jobs, pods, owner.uid, owner.name)
        if key not in self._seen_jobs or self._seen_jobs[key][0] != owner.uid:
            self._seen_jobs[key] = (owner.uid, set())
        seen = self._seen_jobs[key][1]
        seen.update(j["metadata"]["name"] for j in children.jobs)
        return dataclasses.replace(children, seen=frozenset(seen))

    def _without_ghosts(self, key: Key, jobs: list[dict[str, Any]],
                        pods: list[dict[str, Any]]) -> tuple[list[dict[str, Any]],
                                                             list[dict[str, Any]]]:
        gone = self._gone.get(key)
        if not gone:
            return jobs, pods
        indexed = {o["metadata"].get("uid") for o in [*jobs, *pods]}
        gone &= indexed  # the index dropped the rest: nothing to hide any more
        return ([j for j in jobs if j["metadata"].get("uid") not in gone],
                [p for p in pods if p["metadata"].get("uid") not in gone])

    async def _delete(self, key: Key, resource: Any, namespace: str, name: str,
                      uid: str | None, grace_seconds: int | None = None) -> bool:
        """A DELETE with the uid precondition; True when it found the object gone: a ghost
        of the index, left out of the children from now on."""
        deleted = await self.api.delete(resource, namespace, name, uid=uid,
                                        grace_seconds=grace_seconds)
        if deleted or uid is None:
            return False
        self._gone.setdefault(key, set()).add(uid)
        return True

    async def _with_failed_creates(self, children: st.Children, namespace: str,
                                   job_name: str) -> st.Children:
        """The Job controller's FailedCreate events of the current Job, read (a bounded,
        server-side filtered list, every page) only while it has fewer pods than ranks."""
        job = st.creating_pods(children, job_name)
        if job is None:
            return children
        try:
            events = await self.api.list(EVENTS, namespace, st.failed_create_selector(job),
                                         limit=FAILED_CREATE_EVENTS,
                                         pages=FAILED_CREATE_PAGES)
        except ApiError as exc:  # e.g. RBAC without events/list: the rest still works
            logger.warning("%s/%s: cannot read its pod-creation events (%s)", namespace,
                           job_name, exc)
            return children
        return dataclasses.replace(children, failed_creates=events)

    async def _reject(self, body: dict[str, Any], status: st.FineTuneJobStatus,
                      message: str, reason: str = st.REASON_INVALID_SPEC) -> None:
        """Failed/<reason> once; later reconciles find it failed and stop there."""
        if status.phase == Phase.FAILED:
            return
        meta = body["metadata"]
        new = st.invalid_spec_status(status, message, meta.get("generation"), self.clock(),
                                     reason=reason)
        await self._write_status(meta["namespace"], meta["name"], status, new)
        kopf.event(_as_body(body), type="Warning", reason=reason, message=message)
        self.metrics.failed.labels(reason).inc()

    async def _execute(self, plan: st.Plan, job: FineTuneJob, owner: Owner,
                       body: dict[str, Any], old: st.FineTuneJobStatus) -> None:
        ns, name = owner.namespace, owner.name
        if plan.delete_self:
            logger.info("%s/%s: ttlSecondsAfterFinished passed; deleting it", ns, name)
            await self.api.delete(FINETUNEJOBS, ns, name)
            return
        # Status first: if the operator dies after it, the next reconcile finishes the job
        # (e.g. deletes the failed attempt) instead of redoing the decision.
        await self._write_status(ns, name, old, plan.status)
        if plan.create_attempt is not None and not self._in_flight(owner,
                                                                  plan.create_attempt):
            try:
                await self._create_attempt(plan, job, owner, body)
            except CreateRefused as exc:
                await self._create_failed(body, plan.status, str(exc))
                return
        key, ghosts = (ns, name), False
        for job_name in plan.delete_jobs:
            ghosts |= await self._delete(key, JOBS, ns, job_name, plan.uids.get(job_name))
        for pod_name in plan.delete_pods:
            ghosts |= await self._delete(key, PODS, ns, pod_name, plan.uids.get(pod_name))
        for pod_name in plan.force_delete_pods:
            ghosts |= await self._delete(key, PODS, ns, pod_name, plan.uids.get(pod_name),
                                         grace_seconds=0)
        if plan.suspend_job is not None:
            current = attempt_job_name(name, plan.status.attempt or 1)
            mark = "true" if plan.suspend_job else None  # null removes it
            await self.api.patch(JOBS, ns, current, {
                "metadata": {"annotations": {ANNOTATION_SUSPENDED_BY_OPERATOR: mark}},
                "spec": {"suspend": plan.suspend_job}})
        for event in plan.events:
            kopf.event(_as_body(body), type=event.type, reason=event.reason, message=event.message)
        self._count(old, plan.status, body)
        if ghosts:  # no event will come for them: plan again at once, without them
            self._recheck_later(key, 0)
        elif plan.recheck_after is not None:
            self._recheck_later(key, plan.recheck_after)

    async def _create_attempt(self, plan: st.Plan, job: FineTuneJob, owner: Owner,
                              body: dict[str, Any]) -> None:
        attempt = plan.create_attempt
        assert attempt is not None
        settings = pinned(self.settings, plan.status.runtime)
        gang_kind = gang.gang_api(job.spec.pod.scheduler_name)
        manifests = await asyncio.to_thread(build_children, job, owner, attempt, settings)
        for manifest in manifests:
            if gang_kind is not None and manifest["kind"] == "Job":
                gang.mark_pods(manifest, gang_kind, manifest["metadata"]["name"])
            await self._ensure(manifest, owner, body)
            if gang_kind is not None and manifest["kind"] == "Job":
                await self._ensure_pod_group(gang_kind, manifest, owner)
        self._created[(owner.namespace, owner.name)] = (owner.uid, attempt, time.monotonic())

    async def _ensure_pod_group(self, gang_kind: gang.GangApi, job_manifest: dict[str, Any],
                                owner: Owner) -> None:
        """The attempt's PodGroup, owned by its Job (created just before): until it exists
        the gang scheduler holds the pods, so they never start one by one."""
        name = job_manifest["metadata"]["name"]
        created = await self.api.get(JOBS, owner.namespace, name)
        if created is None:
            raise ApiError(404, f"Job {owner.namespace}/{name} is gone before its PodGroup")
        group = gang.build_pod_group(gang_kind, job_manifest, created["metadata"]["uid"])
        resource = POD_GROUPS[gang_kind.name]
        try:
            await self.api.create(POD_GROUPS[gang_kind.name], owner.namespace, group)
        except ApiError as exc:
            if refused_for_good(exc):
                raise CreateRefused(f"creating PodGroup {owner.namespace}/{name} failed: "
                                    f"{exc}") from None
            raise
        # A create answered 404 (no such API: the CRD is not installed) reads as done; a
        # PodGroup that cannot be read back says which scheduler needs it.
        if await self.api.get(POD_GROUPS[gang_kind.name], owner.namespace, name) is None:
            scheduler = job_manifest["spec"]["template"]["spec"]["schedulerName"]
            raise CreateRefused(f"schedulerName {scheduler!r} needs {gang_kind.api_version} "
                                f"PodGroups ({resource.path(owner.namespace)}), and that "
                                "API is not served")

    async def _ensure(self, manifest: dict[str, Any], owner: Owner,
                      body: dict[str, Any]) -> None:
        """Create a child; an existing one of that name must be ours. One left by an earlier
        FineTuneJob of the same name is replaced (never reused: it may hold the old spec);
        anyone else's is never touched, and the job fails saying whose it is."""
        kind, ns, name = manifest["kind"], owner.namespace, manifest["metadata"]["name"]
        what = f"{kind} {ns}/{name}"
        try:
            if await self.api.create(CHILD_RESOURCES[kind], ns, manifest):
                return
            existing = await self.api.get(CHILD_RESOURCES[kind], ns, name)
            if existing is None or owner.uid in st.owner_uids(existing):
                return  # ours (a retry after a lost answer), or gone: the next pass sees
            if not st.left_by_namesake(existing, owner.name, owner.uid):
                owners = ", ".join(f"{r.get('kind')} {r.get('name')}" for r in
                                   existing["metadata"].get("ownerReferences") or []) \
                    or "no owner"
                raise CreateRefused(f"{what} already exists and is not this FineTuneJob's "
                                    f"({owners}); delete it or rename the FineTuneJob")
            logger.info("%s: left by an earlier FineTuneJob %s; replacing it", what, owner.name)
            await self.api.delete(CHILD_RESOURCES[kind], ns, name)
            kopf.event(_as_body(body), type="Normal", reason="ReplacedLeftover",
                       message=f"{what} was left by an earlier FineTuneJob of this name")
            if not await self.api.create(CHILD_RESOURCES[kind], ns, manifest):
                raise ApiError(409, f"{what} is still being deleted; retrying")
        except ApiError as exc:
            if refused_for_good(exc):
                raise CreateRefused(f"creating {what} failed: {exc}") from None
            raise

    async def _create_failed(self, body: dict[str, Any], status: st.FineTuneJobStatus,
                             message: str) -> None:
        meta = body["metadata"]
        new = st.create_failed_status(status, message, meta.get("generation"), self.clock())
        await self._write_status(meta["namespace"], meta["name"], status, new)
        kopf.event(_as_body(body), type="Warning", reason=st.REASON_CREATE_FAILED,
                   message=message)
        self.metrics.failed.labels(st.REASON_CREATE_FAILED).inc()
        ttl = (body.get("spec", {}).get("runPolicy") or {}).get("ttlSecondsAfterFinished")
        if ttl is not None:
            self._recheck_later((meta["namespace"], meta["name"]), float(ttl))

    def _in_flight(self, owner: Owner, attempt: int) -> bool:
        """Created moments ago but not in the index yet: creating again would only 409."""
        created = self._created.get((owner.namespace, owner.name))
        return created is not None and created[:2] == (owner.uid, attempt) \
            and time.monotonic() - created[2] < st.CREATION_GRACE_SECONDS

    async def _write_status(self, namespace: str, name: str, old: st.FineTuneJobStatus,
                            new: st.FineTuneJobStatus) -> None:
        before, after = st.dump_status(old), st.dump_status(new)
        if before != after:  # no-op writes would wake every watcher for nothing
            await self.api.patch(FINETUNEJOBS, namespace, name,
                                 {"status": status_patch(before, after)}, subresource="status")

    def _count(self, old: st.FineTuneJobStatus, new: st.FineTuneJobStatus,
               body: dict[str, Any]) -> None:
        if old.phase is None and new.phase is not None:
            self.metrics.created.inc()
        if new.restarts > old.restarts:
            reason = next((c.reason for c in new.conditions if c.type == st.COND_RESTARTING),
                          "Unknown")
            self.metrics.restarted.labels(reason).inc()
        if new.phase == old.phase:
            return
        if new.phase == Phase.SUCCEEDED:
            self.metrics.succeeded.inc()
        elif new.phase == Phase.FAILED:
            reason = next((c.reason for c in new.conditions if c.type == st.COND_FAILED),
                          "Unknown")
            self.metrics.failed.labels(reason).inc()
        elif new.phase == Phase.RUNNING and new.restarts == 0:
            created = st.parse_time(body["metadata"].get("creationTimestamp"))
            if created is not None:
                self.metrics.time_to_running.observe((self.clock() - created).total_seconds())

    def _recheck_later(self, key: Key, delay: float) -> None:
        """Wake up exactly when a deadline or TTL is due (the timer is coarser)."""
        if key in self._rechecks:
            self._rechecks.pop(key).cancel()
        loop = asyncio.get_running_loop()
        self._rechecks[key] = loop.call_later(max(delay, 0.05), self._spawn, key, self._rechecks)

    def _spawn(self, key: Key, timers: dict[Key, asyncio.TimerHandle]) -> None:
        timers.pop(key, None)  # the timer that fired
        task = asyncio.create_task(self.reconcile_or_retry(*key), context=self.event_context)
        self._tasks.add(task)  # keep a reference until it is done
        task.add_done_callback(self._tasks.discard)

    def forget(self, key: Key) -> None:
        for timers in (self._rechecks, self._batched):
            if key in timers:
                timers.pop(key).cancel()
        self._created.pop(key, None)
        self._seen_jobs.pop(key, None)
        self._gone.pop(key, None)
        self._validated.pop(key, None)
        lock = self._locks.get(key)
        if lock is not None and not lock.locked():
            del self._locks[key]

    # --- progress -------------------------------------------------------------------------

    async def tick(self, running: Callable[[], list[Key]]) -> None:
        """Every progress interval: resync the running jobs (missed events, the scheduling
        and stall clocks) and scrape their rank 0. A plain task, not a kopf timer: kopf puts
        a finalizer on every object a timer runs for, and nothing removes it once the
        operator is uninstalled."""
        gate = asyncio.Semaphore(SCRAPE_CONCURRENCY)

        async def one(key: Key) -> None:
            async with gate:
                await self.reconcile_or_retry(*key)
                try:
                    await self.refresh_progress(*key)
                except Exception as exc:  # one job's trouble must not stop the others
                    logger.warning("%s/%s: progress refresh failed: %s", *key, exc)

        while True:
            await asyncio.sleep(self.settings.progress_interval)
            await asyncio.gather(*(one(key) for key in running()))

    async def refresh_progress(self, namespace: str, name: str) -> None:
        """Scrape rank 0's /metrics and record status.progress when it moved."""
        body = await self.api.get(FINETUNEJOBS, namespace, name)
        if body is None:
            return
        status = st.parse_status(body.get("status"))
        if status.phase != Phase.RUNNING:
            return
        url = self._rank0_metrics_url(body, status.attempt or 1)
        if url is None:
            return
        try:
            progress = await scrape_progress(self.api.plain_session(), url,
                                             self.settings.scrape_timeout, self.clock(),
                                             previous=status.progress)
        except Exception as exc:  # a slow, hostile or restarting rank must not fail the tick
            logger.debug("%s/%s: no progress from %s: %s", namespace, name, url, exc)
            return
        if progress is None or _same_progress(progress, status.progress):
            return
        async with self._locks[(namespace, name)]:
            await self.api.patch(FINETUNEJOBS, namespace, name,
                                 {"status": {"progress": progress.model_dump(
                                     by_alias=True, mode="json", exclude_none=True)}},
                                 subresource="status")

    def _rank0_metrics_url(self, body: dict[str, Any], attempt: int) -> str | None:
        meta = body["metadata"]
        port = (body.get("spec", {}).get("metrics") or {}).get("port", 9400)
        pods = self._children_of(Owner.from_body(body)).pods_of(attempt)
        rank0 = next((p for p in pods if st.pod_rank(p) == 0
                      and not p["metadata"].get("deletionTimestamp")), None)
        if rank0 is None:
            return None
        host = rank0.get("status", {}).get("podIP") or \
            f"{master_address(meta['name'], attempt)}.{meta['namespace']}.svc"
        return f"http://{host}:{port}/metrics"


def _same_progress(new: st.Progress, old: st.Progress | None) -> bool:
    if old is None:
        return False
    ignore = {"last_update_time"}
    return new.model_dump(exclude=ignore) == old.model_dump(exclude=ignore)


def _as_body(body: dict[str, Any]) -> kopf.Body:
    return kopf.Body(cast(kopf.RawBody, body))
