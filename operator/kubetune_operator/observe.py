"""Reading one attempt from what the API returns: its Job and pods (and the Job controller's
FailedCreate events) → an AttemptState; which children are this object's. Pure: plain dicts in."""

from __future__ import annotations

import datetime
import json
from dataclasses import dataclass, field
from typing import Literal

from kubetune_api import contract
from kubetune_api.crd import OciPushed, Output
from kubetune_api.redact import redact
from kubetune_api.spec import GROUP, KIND, FineTuneJobSpec
from kubetune_operator.builders import (
    ANNOTATION_COMPLETION_INDEX,
    ANNOTATION_SUSPENDED_BY_OPERATOR,
    LABEL_ATTEMPT,
    LABEL_KUEUE_QUEUE,
    LABEL_OWNER_UID,
    TRAINER_CONTAINER,
)
from kubetune_operator.conditions import (
    REASON_ALL_RANKS_RUNNING,
    REASON_ATTEMPT_FAILED,
    REASON_CONTAINER_CREATING,
    REASON_EVICTED,
    REASON_JOB_FAILED_PENDING,
    REASON_NODE_LOST,
    REASON_OOM_KILLED,
    REASON_PERMANENT_FAILURE,
    REASON_POD_CREATION_FAILED,
    REASON_POD_DELETED,
    REASON_PREEMPTED,
    REASON_QUEUED,
    REASON_RANK_FAILED,
    REASON_TRAINING_COMPLETE,
    REASON_UNSCHEDULABLE,
    REASON_WAITING_FOR_PODS,
    Manifest,
    parse_time,
)

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
    """Rank 0's termination message, {"uri", "manifestSha256", "oci"?}; the spec's URI
    without it."""
    rank0 = next((p for p in pods if pod_rank(p) == 0), None)
    message = (_terminated(rank0) or {}).get("message") if rank0 else None
    try:
        data = json.loads(message or "")
        pushed = data.get("oci")
        return Output(uri=str(data.get("uri") or spec.output.uri),
                      manifest_sha256=data.get("manifestSha256"),
                      oci=OciPushed(reference=str(pushed["reference"]),
                                    digest=str(pushed["digest"])) if pushed else None)
    except (ValueError, AttributeError, KeyError, TypeError):
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
