"""Pure status logic: what the children say → what the FineTuneJob's status is, and what the
operator must do next. No I/O; every input is a plain dict as the API returns it.

`observe_attempt` reads one attempt (its Job and pods) into an AttemptState; `plan` turns the
spec, the current status and the children into a Plan (new status, children to create or
delete, events). `parse_progress` reads rank 0's Prometheus text.
"""

from __future__ import annotations

import datetime
import json
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from prometheus_client.parser import text_string_to_metric_families

from kubetune_api import contract
from kubetune_api.crd import (
    TERMINAL_PHASES,
    Condition,
    FineTuneJobStatus,
    Output,
    Phase,
    Progress,
    Runtime,
)
from kubetune_api.redact import redact
from kubetune_api.spec import GROUP, KIND, FineTuneJobSpec
from kubetune_operator.builders import (
    ANNOTATION_COMPLETION_INDEX,
    ANNOTATION_SUSPENDED_BY_OPERATOR,
    LABEL_ATTEMPT,
    LABEL_KUEUE_QUEUE,
    LABEL_OWNER_UID,
    TRAINER_CONTAINER,
    attempt_job_name,
)
from kubetune_operator.policy import REASON_POLICY_VIOLATION

Manifest = dict[str, Any]

# Condition types.
COND_RUNNING = "Running"
COND_RESTARTING = "Restarting"
COND_SUSPENDED = "Suspended"
COND_SUCCEEDED = "Succeeded"
COND_FAILED = "Failed"

# Reasons (CamelCase, as in metav1.Condition). Waiting reasons explain a Pending job.
REASON_INVALID_SPEC = "InvalidSpec"
REASON_CREATED = "Created"
REASON_WAITING_FOR_PODS = "WaitingForPods"
REASON_QUEUED = "Queued"
REASON_UNSCHEDULABLE = "Unschedulable"
REASON_CONTAINER_CREATING = "ContainerCreating"
REASON_ALL_RANKS_RUNNING = "AllRanksRunning"
REASON_TRAINING_COMPLETE = "TrainingComplete"
REASON_SUSPENDED = "Suspended"
REASON_RESUMED = "Resumed"
REASON_RESTARTED = "Restarted"
REASON_PREEMPTED = "Preempted"
REASON_EVICTED = "Evicted"
REASON_OOM_KILLED = "OOMKilled"
REASON_RANK_FAILED = "RankFailed"
REASON_PERMANENT_FAILURE = "PermanentFailure"
REASON_ATTEMPT_FAILED = "AttemptFailed"
REASON_BACKOFF_LIMIT_EXCEEDED = "BackoffLimitExceeded"
REASON_DEADLINE_EXCEEDED = "DeadlineExceeded"
REASON_STALE_PODS = "WaitingForOldPods"
REASON_NODE_LOST = "NodeLost"
REASON_POD_DELETED = "PodDeleted"
REASON_JOB_DELETED = "JobDeleted"
REASON_CREATE_FAILED = "CreateFailed"
REASON_SCHEDULING_TIMEOUT = "SchedulingTimeout"
REASON_STALLED = "Stalled"
REASON_FORCE_DELETED = "ForceDeletedPods"
REASON_JOB_FAILED_PENDING = "WaitingForRankExits"
REASON_POD_CREATION_FAILED = "PodCreationFailed"  # the Job controller's FailedCreate events

# A Job missing this long after its creation was written to status was deleted (or never
# created: the operator died in between); before that, the watch may simply lag.
CREATION_GRACE_SECONDS = 30.0
# How long a failed Job's pods get to report their exit codes before the Job's own Failed
# condition decides (a permanent exit code must win whatever order the events arrive in).
EXIT_REPORT_GRACE_SECONDS = 30.0

# Container waiting reasons that need the user (bad image, missing Secret, ...) come first
# in a Pending message; ContainerCreating is just slow.
ERROR_WAITING_REASONS = ("ImagePullBackOff", "ErrImagePull", "InvalidImageName",
                         "CreateContainerConfigError", "CreateContainerError", "CrashLoopBackOff",
                         "RunContainerError", REASON_POD_CREATION_FAILED)

EXIT_CODE_HINTS = {
    contract.EXIT_INVALID_SPEC: "bad spec or data; restarting cannot help",
    contract.EXIT_PREEMPTED: "stopped by SIGTERM after a checkpoint",
    137: "killed (SIGKILL)",
}
MESSAGE_TAIL = 400  # characters of a termination message quoted in a condition
FAILED_CREATE = "FailedCreate"  # the Job controller's event reason: a pod it could not create
# A Job short of pods changes no watched object when the Job controller fails to create one
# (it only posts an event): look again this often for its FailedCreate events.
POD_CREATION_RECHECK_SECONDS = 10.0


# --- one attempt --------------------------------------------------------------------------------

@dataclass(frozen=True)
class AttemptState:
    kind: Literal["waiting", "running", "succeeded", "failed"]
    reason: str
    message: str = ""
    retryable: bool = True
    output: Output | None = None
    # Not the training's fault (preemption, eviction, node loss, a checkpointed SIGTERM, a
    # deleted Job): counted in status.preemptions, never against runPolicy.backoffLimit.
    preemption: bool = False
    recheck_after: float | None = None  # a waiting state that times out by itself


def pod_rank(pod: Manifest) -> int:
    meta = pod.get("metadata", {})
    index = (meta.get("annotations") or {}).get(ANNOTATION_COMPLETION_INDEX)
    return int(index) if index is not None and str(index).isdigit() else 0


def pod_attempt(pod_or_job: Manifest) -> int | None:
    value = (pod_or_job.get("metadata", {}).get("labels") or {}).get(LABEL_ATTEMPT)
    return int(value) if value is not None and str(value).isdigit() else None


def trainer_status(pod: Manifest) -> Manifest:
    statuses = pod.get("status", {}).get("containerStatuses") or []
    return next((s for s in statuses if s.get("name") == TRAINER_CONTAINER),
                statuses[0] if statuses else {})


def _terminated(pod: Manifest) -> Manifest | None:
    return trainer_status(pod).get("state", {}).get("terminated")


def _tail(text: str | None) -> str:
    text = redact((text or "").strip())  # log lines may print credentials (redact.py)
    return text if len(text) <= MESSAGE_TAIL else "…" + text[-MESSAGE_TAIL:]


def pod_failure(pod: Manifest) -> AttemptState | None:
    """Why this rank failed, or None while it has not."""
    status, rank = pod.get("status", {}), pod_rank(pod)
    if status.get("reason") == "Evicted" or _has_condition(pod, "DisruptionTarget"):
        cause = _condition(pod, "DisruptionTarget") or {}
        why = status.get("message") or cause.get("message") or cause.get("reason") \
            or "disruption"
        return AttemptState("failed", REASON_EVICTED, f"rank {rank} was evicted: {why}",
                            preemption=True)
    if status.get("reason") == REASON_NODE_LOST:  # the node controller: node unreachable
        return AttemptState("failed", REASON_NODE_LOST, f"rank {rank}: "
                            f"{status.get('message') or 'its node is unreachable'}",
                            preemption=True)
    if _node_not_ready(pod):
        return AttemptState("failed", REASON_NODE_LOST, f"rank {rank}: its node stopped "
                            "reporting (pod Ready=False while its container runs: node "
                            "unreachable)", preemption=True)
    terminated = _terminated(pod)
    if terminated is None or terminated.get("exitCode", 0) == 0:
        if status.get("phase") == "Failed":
            return AttemptState("failed", REASON_RANK_FAILED, f"rank {rank} failed: "
                                f"{status.get('reason') or status.get('message') or 'unknown'}")
        if pod["metadata"].get("deletionTimestamp") and status.get("phase") != "Succeeded":
            # Nobody but us deletes the pods of a live attempt on purpose: a drain, an
            # eviction, a node going away (the pod then stays Terminating), or a person.
            return AttemptState("failed", REASON_POD_DELETED, f"rank {rank}'s pod "
                                f"{pod['metadata'].get('name')} is being deleted (drain, "
                                "eviction, node loss or by hand)", preemption=True)
        return None
    code = int(terminated["exitCode"])
    details = _tail(terminated.get("message"))
    hint = EXIT_CODE_HINTS.get(code)
    text = f"rank {rank} exited with code {code}" + (f" ({hint})" if hint else "") \
        + (f": {details}" if details else "")
    if terminated.get("reason") == "OOMKilled":
        return AttemptState("failed", REASON_OOM_KILLED, f"rank {rank} ran out of memory "
                            "(OOMKilled); raise spec.pod.memory or lower "
                            "training.perDeviceBatchSize / dataset.maxSeqLength")
    if code in contract.PERMANENT_EXIT_CODES:
        return AttemptState("failed", REASON_PERMANENT_FAILURE, text, retryable=False)
    if code in contract.RETRYABLE_EXIT_CODES:
        return AttemptState("failed", REASON_PREEMPTED, text, preemption=True)
    return AttemptState("failed", REASON_RANK_FAILED, text)


def _node_not_ready(pod: Manifest) -> bool:
    """The node lifecycle controller's mark for a pod on an unreachable node (MarkPodsNotReady):
    Ready=False while the pod runs and its container's last word is still "running". The
    trainer has no readiness probe, so only a node that stopped reporting does this; its
    taint eviction (DisruptionTarget) comes only after the toleration (300 s by default)."""
    ready = next((c for c in pod.get("status", {}).get("conditions") or []
                  if c.get("type") == "Ready"), None)
    return ready is not None and ready.get("status") == "False" \
        and pod.get("status", {}).get("phase") == "Running" \
        and "running" in trainer_status(pod).get("state", {})


# Disruptions a pod's own status names (the eviction API's or taint manager's
# DisruptionTarget, the node controller's Ready=False or NodeLost): never the Job
# controller's doing.
NAMED_DISRUPTIONS = frozenset({REASON_EVICTED, REASON_NODE_LOST})


def _failure_order(failure: AttemptState) -> int:
    """Which failure explains an attempt: a permanent exit code (restarting cannot help),
    then a disruption the pod's status names (the other ranks' crashes are its collateral),
    then a crash, then a pod deleted or stopped by SIGTERM (exit 75) for no reason it names:
    with a crash beside it, that is the Job controller deleting the survivors of a failed Job
    (backoffLimit 0: FailureTarget, then deleteActivePods), so the crash counts. Ranked the
    other way, a deterministic crash reconciled late would restart forever, uncounted."""
    if not failure.retryable:
        return 0
    if not failure.preemption:
        return 2
    return 1 if failure.reason in NAMED_DISRUPTIONS else 3


def _has_condition(obj: Manifest, type_: str) -> bool:
    return any(c.get("type") == type_ and c.get("status") == "True"
               for c in obj.get("status", {}).get("conditions") or [])


def _condition(obj: Manifest, type_: str) -> Manifest | None:
    return next((c for c in obj.get("status", {}).get("conditions") or []
                 if c.get("type") == type_ and c.get("status") == "True"), None)


def pod_waiting_reason(pod: Manifest) -> tuple[str, str] | None:
    """(reason, message) for a pod that is not running yet."""
    rank = pod_rank(pod)
    waiting = trainer_status(pod).get("state", {}).get("waiting")
    if waiting and waiting.get("reason"):
        message = waiting.get("message") or waiting["reason"]
        return waiting["reason"], f"rank {rank}: {message}"
    for cond in pod.get("status", {}).get("conditions") or []:
        if cond.get("type") == "PodScheduled" and cond.get("status") == "False":
            reason = cond.get("reason") or REASON_UNSCHEDULABLE
            return reason, f"rank {rank}: {cond.get('message') or reason}"
    if pod.get("status", {}).get("phase") in (None, "Pending"):
        return REASON_CONTAINER_CREATING, f"rank {rank}: pod is starting"
    return None


def _waiting_rank(item: tuple[str, str]) -> int:
    reason = item[0]
    if reason in ERROR_WAITING_REASONS:
        return 0
    return 1 if reason == REASON_UNSCHEDULABLE else 2


def success_output(pods: list[Manifest], spec: FineTuneJobSpec) -> Output:
    """Rank 0's termination message, {"uri", "manifestSha256"}; the spec's URI without it."""
    rank0 = next((p for p in pods if pod_rank(p) == 0), None)
    message = (_terminated(rank0) or {}).get("message") if rank0 else None
    try:
        data = json.loads(message or "")
        return Output(uri=str(data.get("uri") or spec.output.uri),
                      manifest_sha256=data.get("manifestSha256"))
    except (ValueError, AttributeError):
        return Output(uri=spec.output.uri)


def observe_attempt(job: Manifest | None, pods: list[Manifest], spec: FineTuneJobSpec,
                    queue_managed: bool = False,
                    now: datetime.datetime | None = None,
                    failed_creates: list[Manifest] | None = None) -> AttemptState:
    """The state of one attempt from its Job and its pods (terminating ones included), and
    the Job controller's FailedCreate events of that Job (pods it could not create)."""
    # The Job's own size: a spec edited behind the API server's back must not change it.
    nodes = int((job or {}).get("spec", {}).get("completions") or spec.resources.nodes)
    pods = [p for p in pods if not _before_resume(p, job)]
    if job is not None and (job.get("spec", {}).get("suspend") or _has_condition(job, "Suspended")):
        if failed := _condition(job, "Failed"):  # failed while suspended: not queued
            return AttemptState("failed", REASON_ATTEMPT_FAILED, "Job failed while suspended: "
                                f"{failed.get('reason')}: {failed.get('message') or ''}".strip())
        if not job.get("spec", {}).get("suspend"):
            # Unsuspended (Kueue admitted it) but the Job controller has not resumed it yet:
            # it writes Suspended=False and the new startTime in the sync that creates the
            # pods. Until then the old pods still terminating are the suspension's, and the
            # attempt has not started: no failure, no scheduling clock.
            return AttemptState("waiting", REASON_QUEUED, "unsuspended; waiting for the Job "
                                "controller to resume it")
        # Pods of a suspended Job are being stopped on purpose (by the user or by Kueue's
        # preemption): their exits are not failures.
        who = "Kueue admission" if queue_managed or queued_by_others(job) \
            else "the Job to be resumed"
        return AttemptState("waiting", REASON_QUEUED, f"waiting for {who}")
    failures = [f for f in map(pod_failure, pods) if f is not None]
    if failures:
        return sorted(failures, key=_failure_order)[0]  # stable: the lowest rank first
    # The Job controller's verdict: FailureTarget while it deletes the survivors, then Failed.
    if job is not None and (failed := _condition(job, "Failed")
                            or _condition(job, "FailureTarget")):
        return _job_failed(failed, pods, now)
    live = [p for p in pods if not p["metadata"].get("deletionTimestamp")]
    succeeded = [p for p in live if p.get("status", {}).get("phase") == "Succeeded"]
    if (job is not None and (complete := _condition(job, "Complete"))) \
            or len(succeeded) >= nodes:
        rank0 = next((p for p in live if pod_rank(p) == 0), None)
        if len(succeeded) < nodes and rank0 is not None and _terminated(rank0) is None:
            # The Job says Complete before rank 0's own status (its artifact digest) has
            # arrived: wait for it as for a failure's exit codes (watch order is per object).
            waited = _job_failed(complete, [rank0], now) if complete else None
            if waited is not None and waited.kind == "waiting":
                return waited
        return AttemptState("succeeded", REASON_TRAINING_COMPLETE,
                            output=success_output(pods, spec))
    running = [p for p in live if p.get("status", {}).get("phase") == "Running"]
    if len(running) + len(succeeded) >= nodes:
        return AttemptState("running", REASON_ALL_RANKS_RUNNING, f"{nodes}/{nodes} ranks running")
    # Pods still to be created: their creation may fail with nothing but an event.
    again = POD_CREATION_RECHECK_SECONDS if job is not None and len(live) < nodes else None
    refused = pod_creation_failure(failed_creates or [], pods) if again else None
    if job is not None and refused is not None:  # the user must act (quota, PriorityClass)
        return AttemptState("waiting", REASON_POD_CREATION_FAILED, f"Job "
                            f"{job['metadata']['name']} cannot create pods: {refused} "
                            f"({waiting_for_pods_message(len(live), nodes)})",
                            recheck_after=again)
    waiting = sorted(filter(None, map(pod_waiting_reason, live)), key=_waiting_rank)
    if waiting:
        reason, message = waiting[0]
        return AttemptState("waiting", reason, f"{message} ({len(running)}/{nodes} ranks "
                            "running)", recheck_after=again)
    return AttemptState("waiting", REASON_WAITING_FOR_PODS,
                        waiting_for_pods_message(len(live), nodes), recheck_after=again)


def queued_by_others(job: Manifest) -> bool:
    """Kueue decides when this Job runs: it names a queue (label or annotation, as Kueue reads
    them), or someone other than the operator suspended it (Kueue's webhook does that for
    Jobs of a default LocalQueue). The operator never unsuspends such a Job."""
    meta = job.get("metadata", {})
    if LABEL_KUEUE_QUEUE in (meta.get("labels") or {}) \
            or LABEL_KUEUE_QUEUE in (meta.get("annotations") or {}):
        return True
    return bool(job.get("spec", {}).get("suspend")) and \
        ANNOTATION_SUSPENDED_BY_OPERATOR not in (meta.get("annotations") or {})


def was_suspended(job: Manifest) -> bool:
    """Queued in Kueue, or suspended at some point (the Job controller's Suspended condition,
    True or False): its attempt's creation time says nothing about when its pods started."""
    return queued_by_others(job) or any(
        c.get("type") == "Suspended" for c in job.get("status", {}).get("conditions") or [])


def _before_resume(pod: Manifest, job: Manifest | None) -> bool:
    """A pod from before the Job's last resume (its startTime) that the suspension stopped
    (deleted, or failed): not a failure of the gang running now. A live pod is never one:
    the Job controller writes the new startTime after creating the resumed pods, so with
    one-second timestamps they can look older than it."""
    started = parse_time(((job or {}).get("status") or {}).get("startTime"))
    created = parse_time(pod["metadata"].get("creationTimestamp"))
    stopped = bool(pod["metadata"].get("deletionTimestamp")) \
        or pod.get("status", {}).get("phase") == "Failed"
    return stopped and started is not None and created is not None and created < started


def _job_failed(failed: Manifest, pods: list[Manifest],
                now: datetime.datetime | None) -> AttemptState:
    """The Job says Failed but no pod has said why yet: its pods' statuses may still be on
    their way (watch events of different objects arrive in any order). Wait a little for
    them, so that a permanent exit code is never retried; then the Job's word decides."""
    verdict = AttemptState("failed", REASON_ATTEMPT_FAILED, f"Job {failed.get('reason')}: "
                           f"{failed.get('message') or ''}".strip())
    unreported = [p for p in pods if p.get("status", {}).get("phase") not in
                  ("Succeeded", "Failed")]
    since = parse_time(failed.get("lastTransitionTime"))
    if not unreported or now is None or since is None:
        return verdict
    left = EXIT_REPORT_GRACE_SECONDS - (now - since).total_seconds()
    if left <= 0:
        return verdict
    ranks = ", ".join(str(pod_rank(p)) for p in unreported)
    verb = "completed" if failed.get("type") == "Complete" else "failed"
    return AttemptState("waiting", REASON_JOB_FAILED_PENDING, f"the Job {verb}; waiting for "
                        f"rank(s) {ranks} to report their exit", recheck_after=left)


def _event_time(event: Manifest) -> datetime.datetime | None:
    """When an event last happened: core/v1 (lastTimestamp) or events.k8s.io (series)."""
    series = event.get("series") or {}
    return parse_time(series.get("lastObservedTime") or event.get("lastTimestamp")
                      or event.get("eventTime") or event["metadata"].get("creationTimestamp"))


def pod_creation_failure(events: list[Manifest], pods: list[Manifest]) -> str | None:
    """The latest FailedCreate message of the Job controller (quota exceeded, a missing
    PriorityClass, an admission webhook's denial), redacted and capped; None when a pod of the
    attempt was created after it (the cause is gone: the index merely lags)."""
    dated = [(moment, e) for e in events if e.get("reason") == FAILED_CREATE
             and (moment := _event_time(e)) is not None]
    if not dated:
        return None
    moment, latest = max(dated, key=lambda pair: pair[0])
    created = [t for p in pods if (t := parse_time(p["metadata"].get("creationTimestamp")))]
    if created and max(created) > moment:
        return None
    text = redact(str(latest.get("message") or FAILED_CREATE).strip())
    return text if len(text) <= MESSAGE_TAIL else text[:MESSAGE_TAIL] + "…"


def creating_pods(children: Children, job_name: str) -> Manifest | None:
    """The current attempt's Job while it has fewer pods than ranks and is neither suspended
    nor finished: only then is reading its FailedCreate events worth an API call."""
    job = children.job_of(job_name)
    if job is None or job.get("spec", {}).get("suspend") or job["metadata"].get(
            "deletionTimestamp") or _condition(job, "Complete") or _condition(job, "Failed"):
        return None
    pods = [p for p in children.pods if owner_uids(p) & {job["metadata"].get("uid")}
            and not p["metadata"].get("deletionTimestamp")]
    return job if len(pods) < int(job.get("spec", {}).get("completions") or 1) else None


def failed_create_selector(job: Manifest) -> str:
    """A server-side field selector for the Job controller's FailedCreate events of `job`."""
    meta = job["metadata"]
    return ",".join(["involvedObject.kind=Job", f"involvedObject.name={meta['name']}",
                     f"involvedObject.uid={meta.get('uid', '')}", f"reason={FAILED_CREATE}"])


def waiting_for_pods_message(created: int, nodes: int) -> str:
    return f"{created}/{nodes} pods created"


# --- conditions ---------------------------------------------------------------------------------

def set_condition(conditions: list[Condition], type_: str, status: bool, reason: str,
                  message: str, now: str, generation: int | None) -> list[Condition]:
    """Upsert one condition; lastTransitionTime moves only when its status flips."""
    value: Literal["True", "False"] = "True" if status else "False"
    old = next((c for c in conditions if c.type == type_), None)
    since = old.last_transition_time if old is not None and old.status == value else now
    new = Condition(type=type_, status=value, reason=reason, message=message,
                    last_transition_time=since, observed_generation=generation)
    return [new if c.type == type_ else c for c in conditions] if old else [*conditions, new]


def _clear_condition(conditions: list[Condition], type_: str, reason: str, now: str,
                     generation: int | None) -> list[Condition]:
    """Turn a condition False only if it exists (never-suspended jobs have no Suspended)."""
    if any(c.type == type_ for c in conditions):
        return set_condition(conditions, type_, False, reason, "", now, generation)
    return conditions


# --- the plan -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Event:
    type: Literal["Normal", "Warning"]
    reason: str
    message: str


@dataclass
class Plan:
    status: FineTuneJobStatus
    create_attempt: int | None = None  # ensure ConfigMap + Service + this attempt's Job
    delete_jobs: list[str] = field(default_factory=list)
    delete_pods: list[str] = field(default_factory=list)  # stale pods nobody is deleting yet
    force_delete_pods: list[str] = field(default_factory=list)  # grace 0: their node is gone
    # The uid each deletion above is meant for (a precondition of the DELETE): a watch that
    # lags must never delete a newer object of the same name.
    uids: dict[str, str] = field(default_factory=dict)
    suspend_job: bool | None = None  # patch the current Job's spec.suspend
    delete_self: bool = False  # ttlSecondsAfterFinished has passed
    events: list[Event] = field(default_factory=list)
    recheck_after: float | None = None  # seconds until a deadline or TTL is due


@dataclass(frozen=True)
class Children:
    """The children of one FineTuneJob object, matched by uid (owned_children)."""

    jobs: list[Manifest]  # owned by this object (owner reference uid)
    pods: list[Manifest]  # of those Jobs, or carrying this object's uid label
    # Jobs and pods of an earlier object of the same name (deleted, then re-created): they
    # are garbage on their way out, and their gang must be gone before ours starts.
    leftovers: list[Manifest] = field(default_factory=list)
    # Names of this object's Jobs the operator has seen since it started: one of them
    # missing now was deleted (not merely not yet in the watch).
    seen: frozenset[str] = frozenset()
    # The Job controller's FailedCreate events of the current attempt's Job (read only while
    # it has fewer pods than ranks: creating_pods).
    failed_creates: list[Manifest] = field(default_factory=list)

    def job_of(self, name: str) -> Manifest | None:
        return next((j for j in self.jobs if j["metadata"]["name"] == name), None)

    def pods_of(self, attempt: int) -> list[Manifest]:
        return [p for p in self.pods if pod_attempt(p) == attempt]


def owner_uids(obj: Manifest) -> set[str]:
    return {str(ref.get("uid")) for ref in obj["metadata"].get("ownerReferences") or []}


def left_by_namesake(obj: Manifest, name: str, uid: str) -> bool:
    """Owned by an earlier FineTuneJob of the same name, not by ours (deleted; the GC is on
    its way)."""
    return uid not in owner_uids(obj) and any(
        ref.get("kind") == KIND and ref.get("name") == name
        and ref.get("apiVersion", "").split("/")[0] == GROUP  # not another group's kind
        for ref in obj["metadata"].get("ownerReferences") or [])


def owned_children(jobs: list[Manifest], pods: list[Manifest], uid: str,
                   name: str) -> Children:
    """Which of the labelled Jobs and pods are this object's: never the label alone.

    Jobs: an owner reference with our uid. Pods: owned by one of those Jobs, or labelled with
    our uid (the pods of a Job already deleted). Leftovers: Jobs owned by a FineTuneJob of our
    name with another uid, and their pods. Anything else with our label is someone else's:
    never deleted, never waited for."""
    ours = [j for j in jobs if uid in owner_uids(j)]
    earlier = [j for j in jobs if left_by_namesake(j, name, uid)]
    our_jobs = {j["metadata"].get("uid") for j in ours}
    earlier_jobs = {j["metadata"].get("uid") for j in earlier}
    our_pods, earlier_pods = [], []
    for pod in pods:
        label = (pod["metadata"].get("labels") or {}).get(LABEL_OWNER_UID)
        owners = owner_uids(pod)
        if label == uid or owners & our_jobs:
            our_pods.append(pod)
        elif owners & earlier_jobs or label:
            earlier_pods.append(pod)
    return Children(ours, our_pods, [*earlier, *earlier_pods])


def _iso(moment: datetime.datetime) -> str:
    return moment.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str | None) -> datetime.datetime | None:
    if not text:
        return None
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))


@dataclass(frozen=True)
class Limits:
    """Operator-wide knobs the plan needs (settings.py)."""

    runtime: Runtime | None = None  # what a first attempt pins (trainer image, defaults)
    force_delete_after: float = 60.0  # seconds a pod may outlive its deletion deadline


class _Planner:
    """One reconcile decision. Methods fill `self.plan` and return it."""

    def __init__(self, name: str, spec: FineTuneJobSpec, generation: int | None,
                 status: FineTuneJobStatus, children: Children, now: datetime.datetime,
                 queue_managed: bool, limits: Limits) -> None:
        self.name, self.spec, self.generation = name, spec, generation
        self.children, self.now, self.queue_managed = children, now, queue_managed
        self.limits = limits
        self.stamp = _iso(now)
        self.old = status
        self.status = status.model_copy(deep=True)
        self.status.observed_generation = generation
        self.status.attempt = status.attempt or 1
        self.plan = Plan(status=self.status)

    @property
    def attempt(self) -> int:
        return self.status.attempt or 1

    def condition(self, type_: str, status: bool, reason: str, message: str = "") -> None:
        self.status.conditions = set_condition(self.status.conditions, type_, status, reason,
                                               message, self.stamp, self.generation)

    def clear(self, type_: str, reason: str) -> None:
        self.status.conditions = _clear_condition(self.status.conditions, type_, reason,
                                                  self.stamp, self.generation)

    def names(self, objects: list[Manifest]) -> list[str]:
        """The names of objects to delete, their uids recorded as preconditions."""
        for obj in objects:
            if obj["metadata"].get("uid"):
                self.plan.uids[obj["metadata"]["name"]] = obj["metadata"]["uid"]
        return [obj["metadata"]["name"] for obj in objects]

    def seconds_since(self, stamp: str | None) -> float | None:
        moment = parse_time(stamp)
        return None if moment is None else (self.now - moment).total_seconds()

    def recheck(self, seconds: float) -> None:
        if self.plan.recheck_after is None or seconds < self.plan.recheck_after:
            self.plan.recheck_after = max(seconds, 0.05)

    def run(self) -> Plan:
        plan = self.decide()
        self.run_clock()
        return plan

    def run_clock(self) -> None:
        """status.startTime is set while all ranks run; activeSeconds keeps the earlier
        stretches. activeDeadlineSeconds counts their sum: time queued, suspended, pending
        or restarting does not count."""
        running = self.status.phase == Phase.RUNNING
        if running and self.status.start_time is None:
            self.status.start_time = self.stamp
            deadline = self.spec.run_policy.active_deadline_seconds
            if deadline is not None:
                self.recheck(deadline - self.status.active_seconds)
        elif not running and self.status.start_time is not None:
            stretch = self.seconds_since(self.status.start_time) or 0.0
            self.status.active_seconds += max(0, int(stretch))
            self.status.start_time = None

    def decide(self) -> Plan:
        if self.old.phase in TERMINAL_PHASES:
            return self.finished()
        current = attempt_job_name(self.name, self.attempt)
        leftover_jobs = [o for o in self.children.leftovers if o.get("kind") == "Job"]
        self.plan.delete_jobs = self.names([j for j in self.children.jobs
                                            if j["metadata"]["name"] != current])
        self.plan.delete_jobs += self.names([j for j in leftover_jobs
                                             if not j["metadata"].get("deletionTimestamp")])
        if self.spec.run_policy.suspend:
            return self.suspended(self.children.job_of(current))
        if self.deadline_passed():
            return self.fail(REASON_DEADLINE_EXCEEDED, "activeDeadlineSeconds "
                             f"({self.spec.run_policy.active_deadline_seconds}s) passed",
                             stop_current=True)
        # One gang at a time: no pod of an earlier attempt (or an earlier object of this
        # name) may share hostnames and checkpoints with the next one, terminating or not.
        stale = [p for p in self.children.pods if pod_attempt(p) != self.attempt]
        stale += [o for o in self.children.leftovers if o.get("kind") != "Job"]
        if stale or self.plan.delete_jobs:
            return self.wait_for_old_pods(stale)
        job = self.children.job_of(current)
        if job is None:
            return self.job_missing()
        self.resume_if_needed(job)
        state = observe_attempt(job, self.children.pods_of(self.attempt), self.spec,
                                self.queue_managed, self.now, self.children.failed_creates)
        return self.follow(state, job)

    # --- transitions ----------------------------------------------------------------------

    def finished(self) -> Plan:
        ttl = self.spec.run_policy.ttl_seconds_after_finished
        done = parse_time(self.status.completion_time)
        if ttl is not None and done is not None:
            left = ttl - (self.now - done).total_seconds()
            self.plan.delete_self = left <= 0
            self.plan.recheck_after = left if left > 0 else None
        failed = next((c for c in self.status.conditions if c.type == COND_FAILED), None)
        if failed is not None and failed.reason in STOPPING_REASONS:
            # Keep stopping the pods until they are gone (the first delete may have failed).
            self.plan.delete_jobs = self.names(self.children.jobs)
        return self.plan

    def suspended(self, job: Manifest | None) -> Plan:
        self.set_phase(Phase.SUSPENDED, Event("Normal", REASON_SUSPENDED,
                                              "pods stopped; they checkpoint on SIGTERM"))
        self.condition(COND_SUSPENDED, True, REASON_SUSPENDED, "runPolicy.suspend is true")
        self.condition(COND_RUNNING, False, REASON_SUSPENDED)
        if job is not None and queued_by_others(job):
            # Kueue owns this Job's spec.suspend (it would undo ours): stop the attempt
            # instead; resuming starts the next one, queued again.
            self.plan.delete_jobs += self.names([job])
            self.status.attempt = self.attempt + 1
            self.status.restarts += 1
            self.status.preemptions += 1
            self.status.attempt_start_time = None
        elif job is None and not self.plan.delete_jobs and not self.queue_managed:
            self.plan.create_attempt = self.attempt  # created suspended, ready to resume
            self.status.attempt_start_time = self.stamp
            self.status.runtime = self.status.runtime or self.limits.runtime
        elif job is not None and not job.get("spec", {}).get("suspend"):
            self.plan.suspend_job = True
        return self.plan

    def resume_if_needed(self, job: Manifest) -> None:
        annotations = job.get("metadata", {}).get("annotations") or {}
        if job.get("spec", {}).get("suspend") and ANNOTATION_SUSPENDED_BY_OPERATOR in annotations:
            self.plan.suspend_job = False  # only a suspension of our own is ours to lift
        if self.old.phase == Phase.SUSPENDED:
            self.clear(COND_SUSPENDED, REASON_RESUMED)
            self.plan.events.append(Event("Normal", REASON_RESUMED, "runPolicy.suspend is false"))

    def deadline_passed(self) -> bool:
        deadline = self.spec.run_policy.active_deadline_seconds
        if deadline is None:
            return False
        stretch = self.seconds_since(self.status.start_time)
        left = deadline - self.status.active_seconds - (stretch or 0.0)
        if left > 0 and stretch is not None:  # the clock runs only while all ranks run
            self.recheck(left)
        return left <= 0

    def wait_for_old_pods(self, stale: list[Manifest]) -> Plan:
        # A permanent exit of the attempt just stopped wins even if a retryable failure of
        # another rank was seen first and already started the restart.
        for pod in stale:
            failure = pod_failure(pod)
            if failure is not None and not failure.retryable and pod in self.children.pods:
                return self.fail(failure.reason, f"attempt {pod_attempt(pod)}: "
                                 f"{failure.message}", stop_current=True)
        forced = []
        for pod in stale:
            meta = pod["metadata"]
            deadline = parse_time(meta.get("deletionTimestamp"))
            if meta.get("uid"):
                self.plan.uids[meta["name"]] = meta["uid"]
            if deadline is None:
                self.plan.delete_pods.append(meta["name"])
                continue
            overdue = (self.now - deadline).total_seconds() - self.limits.force_delete_after
            if overdue >= 0:
                forced.append(meta["name"])
            else:
                self.recheck(-overdue)
        if forced:
            self.plan.force_delete_pods = forced
            self.plan.events.append(Event(
                "Warning", REASON_FORCE_DELETED, f"force-deleted {', '.join(sorted(forced))}: "
                f"still terminating {self.limits.force_delete_after:.0f}s after their grace "
                "period (their node is likely gone)"))
        phase = Phase.RESTARTING if self.attempt > 1 else Phase.PENDING
        self.set_phase(phase)
        what = f"{len(stale)} pods of earlier attempts" if stale else "earlier attempts' Jobs"
        self.condition(COND_RUNNING, False, REASON_STALE_PODS,
                       f"waiting for {what} to terminate")
        return self.plan

    def job_missing(self) -> Plan:
        """No Job for the current attempt: create it, unless it was created and is gone."""
        created = self.seconds_since(self.status.attempt_start_time)
        job = attempt_job_name(self.name, self.attempt)
        if created is None:
            return self.start_attempt()
        if created < CREATION_GRACE_SECONDS and job not in self.children.seen:
            # Not seen yet: the watch may lag behind our own create.
            self.plan.create_attempt = self.attempt  # idempotent: 409 if it exists
            self.recheck(CREATION_GRACE_SECONDS - created)
            return self.plan
        return self.restart(AttemptState(
            "failed", REASON_JOB_DELETED, f"Job {job} was deleted before it finished",
            preemption=True))

    def start_attempt(self) -> Plan:
        self.plan.create_attempt = self.attempt
        self.status.attempt_start_time = self.stamp
        self.status.runtime = self.status.runtime or self.limits.runtime
        if self.old.phase is None:
            self.plan.events.append(Event("Normal", REASON_CREATED,
                                          f"created attempt {self.attempt} "
                                          f"({self.spec.resources.nodes} nodes)"))
        self.set_phase(Phase.PENDING)
        # The same words observe_attempt will find next time: no second write for nothing.
        self.condition(COND_RUNNING, False, REASON_WAITING_FOR_PODS,
                       waiting_for_pods_message(0, self.spec.resources.nodes))
        return self.plan

    def follow(self, state: AttemptState, job: Manifest) -> Plan:
        if state.kind == "failed":
            return self.restart(state)
        if state.kind == "succeeded":
            return self.succeed(state)
        if state.recheck_after is not None:
            self.recheck(state.recheck_after)
        self.clear(COND_RESTARTING, REASON_RESTARTED)
        if state.kind == "running":
            if (stalled := self.stalled()) is not None:
                return self.restart(stalled)
            self.set_phase(Phase.RUNNING, Event("Normal", state.reason, state.message))
            self.condition(COND_RUNNING, True, state.reason, state.message)
            return self.plan
        if state.reason != REASON_QUEUED and (late := self.scheduling_late(state, job)):
            return self.restart(late)
        if state.reason == REASON_QUEUED and self.old.phase == Phase.RUNNING \
                and queued_by_others(job):
            # Kueue preempted the gang (it suspends the Job): the pods checkpoint on SIGTERM
            # and the same attempt resumes from there when Kueue admits it again.
            self.status.preemptions += 1
            self.plan.events.append(Event("Warning", REASON_PREEMPTED, "Kueue preempted the "
                                          "gang; it resumes from its last checkpoint when "
                                          "re-admitted (not counted against backoffLimit)"))
        kind: Literal["Normal", "Warning"] = \
            "Warning" if state.reason in ERROR_WAITING_REASONS else "Normal"
        if self.old.phase == Phase.PENDING and self._old_reason(COND_RUNNING) != state.reason:
            self.plan.events.append(Event(kind, state.reason, state.message))  # new cause
        self.set_phase(Phase.PENDING, Event(kind, state.reason, state.message))
        self.condition(COND_RUNNING, False, state.reason, state.message)
        return self.plan

    def scheduling_late(self, state: AttemptState, job: Manifest) -> AttemptState | None:
        """A partial gang holds its GPUs while the rest waits: tear it down after
        runPolicy.schedulingTimeoutSeconds from the pods' creation (the Job's startTime:
        time queued in Kueue does not count). A Job that was ever suspended has no other
        clock: Kueue clears its startTime on preemption, and after an admission the Job
        controller writes it only once it has created the pods."""
        timeout = self.spec.run_policy.scheduling_timeout_seconds
        started = (job.get("status") or {}).get("startTime")
        if started is None and not was_suspended(job):
            started = self.status.attempt_start_time  # the Job controller has not synced it
        elapsed = self.seconds_since(started)
        if elapsed is None:
            return None
        if elapsed < timeout:
            self.recheck(timeout - elapsed)
            return None
        return AttemptState("failed", REASON_SCHEDULING_TIMEOUT, f"not every rank ran within "
                            f"schedulingTimeoutSeconds ({timeout}s): {state.message}")

    def stalled(self) -> AttemptState | None:
        """runPolicy.stallTimeoutSeconds: rank 0's step has not moved while training."""
        timeout = self.spec.run_policy.stall_timeout_seconds
        progress = self.status.progress
        if timeout is None or progress is None or progress.last_step_time is None:
            return None  # rank 0 has not been seen yet: loading is not training
        attempt_age = self.seconds_since(self.status.attempt_start_time)
        scraped_age = self.seconds_since(progress.last_update_time)
        if attempt_age is not None and (scraped_age is None or scraped_age > attempt_age):
            return None  # the progress is an earlier attempt's: this one was not seen yet
        idle = min(c for c in (self.seconds_since(progress.last_step_time), attempt_age)
                   if c is not None)
        if idle < timeout:
            self.recheck(timeout - idle)
            return None
        step = progress.step if progress is not None and progress.step is not None else 0
        return AttemptState("failed", REASON_STALLED, f"rank 0 stalled at step {step}: no "
                            f"progress for {idle:.0f}s (stallTimeoutSeconds {timeout})")

    def _old_reason(self, type_: str) -> str | None:
        return next((c.reason for c in self.old.conditions if c.type == type_), None)

    def restart(self, state: AttemptState) -> Plan:
        """Stop this attempt and start the next from the last checkpoint, or fail."""
        if not state.retryable:
            return self.fail(state.reason, state.message, stop_current=True)
        limit = self.spec.run_policy.backoff_limit
        failures = self.status.restarts - self.status.preemptions
        if not state.preemption and failures >= limit:
            return self.fail(REASON_BACKOFF_LIMIT_EXCEEDED,
                             f"{failures + 1} attempts failed (backoffLimit "
                             f"{limit}); last: {state.reason}: {state.message}",
                             stop_current=True)
        current = self.children.job_of(attempt_job_name(self.name, self.attempt))
        self.plan.delete_jobs += self.names([current]) if current is not None \
            else [attempt_job_name(self.name, self.attempt)]
        self.status.attempt = self.attempt + 1
        self.status.restarts += 1
        self.status.preemptions += int(state.preemption)
        self.status.attempt_start_time = None
        counted = "not counted against backoffLimit" if state.preemption else \
            f"{failures + 1} of backoffLimit {limit}"
        message = f"attempt {self.attempt - 1} stopped ({state.message}; {counted}); " \
                  f"starting attempt {self.attempt} from the last checkpoint"
        self.set_phase(Phase.RESTARTING, Event("Warning", state.reason, message))
        self.condition(COND_RESTARTING, True, state.reason, message)
        self.condition(COND_RUNNING, False, state.reason, state.message)
        # The next reconcile starts the next attempt (or waits for the old pods): it must not
        # wait for an event, since the old Job and pods may all be gone already (a Job deleted
        # together with its pods, whose events arrived in one batch).
        self.recheck(0)
        return self.plan

    def succeed(self, state: AttemptState) -> Plan:
        self.status.output = state.output
        self.status.completion_time = self.stamp
        if self.status.progress is not None and self.status.progress.total_steps:
            self.status.progress.step = self.status.progress.total_steps
            self.status.progress.percent = 100.0
            self.status.progress.eta_seconds, self.status.progress.eta = 0, "0s"
        uri = state.output.uri if state.output else self.spec.output.uri
        self.set_phase(Phase.SUCCEEDED, Event("Normal", state.reason, f"artifact at {uri}"))
        self.clear(COND_RESTARTING, REASON_RESTARTED)
        self.condition(COND_RUNNING, False, state.reason)
        self.condition(COND_SUCCEEDED, True, state.reason, f"artifact at {uri}")
        return self.plan

    def fail(self, reason: str, message: str, stop_current: bool = False) -> Plan:
        if stop_current:
            self.plan.delete_jobs = self.names(self.children.jobs)
        self.status.completion_time = self.stamp
        self.set_phase(Phase.FAILED, Event("Warning", reason, message))
        self.clear(COND_RESTARTING, reason)
        self.condition(COND_RUNNING, False, reason, message)
        self.condition(COND_FAILED, True, reason, message)
        return self.plan

    def set_phase(self, phase: Phase, event: Event | None = None) -> None:
        if self.old.phase != phase and event is not None:
            self.plan.events.append(event)
        self.status.phase = phase
        ttl = self.spec.run_policy.ttl_seconds_after_finished
        if phase in TERMINAL_PHASES and ttl is not None:
            self.plan.recheck_after = max(ttl, 0.05)  # nothing else would wake us then


# Failed jobs whose pods the operator keeps stopping until they are gone.
STOPPING_REASONS = frozenset({REASON_DEADLINE_EXCEEDED, REASON_PERMANENT_FAILURE,
                              REASON_BACKOFF_LIMIT_EXCEEDED, REASON_CREATE_FAILED,
                              REASON_POLICY_VIOLATION})


def plan(name: str, spec: FineTuneJobSpec, generation: int | None, status: FineTuneJobStatus,
         children: Children, now: datetime.datetime, queue_managed: bool = False,
         limits: Limits | None = None) -> Plan:
    """Decide the next status and actions for one FineTuneJob (level-based, idempotent)."""
    return _Planner(name, spec, generation, status, children, now, queue_managed,
                    limits or Limits()).run()


def create_failed_status(status: FineTuneJobStatus, message: str, generation: int | None,
                         now: datetime.datetime) -> FineTuneJobStatus:
    """The API refused a child for good (a 4xx other than 409/429): retrying cannot help."""
    new = status.model_copy(deep=True)
    stamp = _iso(now)
    new.phase, new.observed_generation, new.completion_time = Phase.FAILED, generation, stamp
    for type_, value in ((COND_RUNNING, False), (COND_FAILED, True)):
        new.conditions = set_condition(new.conditions, type_, value, REASON_CREATE_FAILED,
                                       message, stamp, generation)
    return new


def invalid_spec_status(status: FineTuneJobStatus, message: str, generation: int | None,
                        now: datetime.datetime,
                        reason: str = REASON_INVALID_SPEC) -> FineTuneJobStatus:
    new = status.model_copy(deep=True)
    stamp = _iso(now)
    new.phase, new.observed_generation, new.completion_time = Phase.FAILED, generation, stamp
    new.conditions = set_condition(new.conditions, COND_FAILED, True, reason,
                                   message, stamp, generation)
    return new


def parse_status(raw: Manifest | None) -> FineTuneJobStatus:
    """The status as written by this operator; anything unreadable starts afresh."""
    try:
        return FineTuneJobStatus.model_validate(raw or {})
    except ValueError:
        return FineTuneJobStatus()


def dump_status(status: FineTuneJobStatus) -> Manifest:
    return status.model_dump(by_alias=True, mode="json", exclude_none=True)


# --- progress from rank 0's /metrics ------------------------------------------------------------

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
