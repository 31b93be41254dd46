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
)
from kubetune_api.spec import FineTuneJobSpec
from kubetune_operator.builders import (
    ANNOTATION_COMPLETION_INDEX,
    LABEL_ATTEMPT,
    TRAINER_CONTAINER,
    attempt_job_name,
)
from kubetune_operator.redact import redact

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

# Container waiting reasons that need the user (bad image, missing Secret, ...) come first
# in a Pending message; ContainerCreating is just slow.
ERROR_WAITING_REASONS = ("ImagePullBackOff", "ErrImagePull", "InvalidImageName",
                         "CreateContainerConfigError", "CreateContainerError", "CrashLoopBackOff",
                         "RunContainerError")

EXIT_CODE_HINTS = {
    contract.EXIT_INVALID_SPEC: "bad spec or data; restarting cannot help",
    contract.EXIT_PREEMPTED: "stopped by SIGTERM after a checkpoint",
    137: "killed (SIGKILL)",
}
MESSAGE_TAIL = 400  # characters of a termination message quoted in a condition


# --- one attempt --------------------------------------------------------------------------------

@dataclass(frozen=True)
class AttemptState:
    kind: Literal["waiting", "running", "succeeded", "failed"]
    reason: str
    message: str = ""
    retryable: bool = True
    output: Output | None = None


def pod_rank(pod: Manifest) -> int:
    meta = pod.get("metadata", {})
    index = (meta.get("annotations") or {}).get(ANNOTATION_COMPLETION_INDEX)
    return int(index) if index is not None and str(index).isdigit() else 0


def pod_attempt(pod_or_job: Manifest) -> int | None:
    value = (pod_or_job.get("metadata", {}).get("labels") or {}).get(LABEL_ATTEMPT)
    return int(value) if value is not None and str(value).isdigit() else None


def _trainer_status(pod: Manifest) -> Manifest:
    statuses = pod.get("status", {}).get("containerStatuses") or []
    return next((s for s in statuses if s.get("name") == TRAINER_CONTAINER),
                statuses[0] if statuses else {})


def _terminated(pod: Manifest) -> Manifest | None:
    return _trainer_status(pod).get("state", {}).get("terminated")


def _tail(text: str | None) -> str:
    text = redact((text or "").strip())  # log lines may print credentials (redact.py)
    return text if len(text) <= MESSAGE_TAIL else "…" + text[-MESSAGE_TAIL:]


def pod_failure(pod: Manifest) -> AttemptState | None:
    """Why this rank failed, or None while it has not."""
    status, rank = pod.get("status", {}), pod_rank(pod)
    if status.get("reason") == "Evicted" or _has_condition(pod, "DisruptionTarget"):
        return AttemptState("failed", REASON_EVICTED, f"rank {rank} was evicted: "
                            f"{status.get('message') or 'disruption'}")
    terminated = _terminated(pod)
    if terminated is None or terminated.get("exitCode", 0) == 0:
        if status.get("phase") == "Failed":
            return AttemptState("failed", REASON_RANK_FAILED, f"rank {rank} failed: "
                                f"{status.get('reason') or status.get('message') or 'unknown'}")
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
        return AttemptState("failed", REASON_PREEMPTED, text)
    return AttemptState("failed", REASON_RANK_FAILED, text)


def _has_condition(obj: Manifest, type_: str) -> bool:
    return any(c.get("type") == type_ and c.get("status") == "True"
               for c in obj.get("status", {}).get("conditions") or [])


def _condition(obj: Manifest, type_: str) -> Manifest | None:
    return next((c for c in obj.get("status", {}).get("conditions") or []
                 if c.get("type") == type_ and c.get("status") == "True"), None)


def pod_waiting_reason(pod: Manifest) -> tuple[str, str] | None:
    """(reason, message) for a pod that is not running yet."""
    rank = pod_rank(pod)
    waiting = _trainer_status(pod).get("state", {}).get("waiting")
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
                    queue_managed: bool = False) -> AttemptState:
    """The state of one attempt from its Job and its (non-terminating) pods."""
    # The Job's own size: a spec edited behind the API server's back must not change it.
    nodes = int((job or {}).get("spec", {}).get("completions") or spec.resources.nodes)
    if job is not None and job.get("spec", {}).get("suspend"):
        # Pods of a suspended Job are being stopped on purpose (by the user or by Kueue's
        # preemption): their exits are not failures.
        who = "Kueue admission" if queue_managed else "the Job to be resumed"
        return AttemptState("waiting", REASON_QUEUED, f"waiting for {who}")
    failures = [f for f in map(pod_failure, pods) if f is not None]
    if failures:
        # A permanent failure wins (restarting cannot help), then the lowest rank's.
        return sorted(failures, key=lambda f: f.retryable)[0]
    if job is not None and (failed := _condition(job, "Failed")):
        return AttemptState("failed", REASON_ATTEMPT_FAILED, f"Job {failed.get('reason')}: "
                            f"{failed.get('message') or ''}".strip())
    succeeded = [p for p in pods if p.get("status", {}).get("phase") == "Succeeded"]
    if (job is not None and _has_condition(job, "Complete")) or len(succeeded) >= nodes:
        return AttemptState("succeeded", REASON_TRAINING_COMPLETE,
                            output=success_output(pods, spec))
    running = [p for p in pods if p.get("status", {}).get("phase") == "Running"]
    if len(running) + len(succeeded) >= nodes:
        return AttemptState("running", REASON_ALL_RANKS_RUNNING, f"{nodes}/{nodes} ranks running")
    waiting = sorted(filter(None, map(pod_waiting_reason, pods)), key=_waiting_rank)
    if waiting:
        reason, message = waiting[0]
        return AttemptState("waiting", reason, f"{message} ({len(running)}/{nodes} ranks "
                            "running)")
    return AttemptState("waiting", REASON_WAITING_FOR_PODS,
                        waiting_for_pods_message(len(pods), nodes))


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
    suspend_job: bool | None = None  # patch the current Job's spec.suspend
    delete_self: bool = False  # ttlSecondsAfterFinished has passed
    events: list[Event] = field(default_factory=list)
    recheck_after: float | None = None  # seconds until a deadline or TTL is due


@dataclass(frozen=True)
class Children:
    jobs: list[Manifest]
    pods: list[Manifest]

    def job_of(self, name: str) -> Manifest | None:
        return next((j for j in self.jobs if j["metadata"]["name"] == name), None)

    def pods_of(self, attempt: int) -> list[Manifest]:
        return [p for p in self.pods if pod_attempt(p) == attempt
                and not p["metadata"].get("deletionTimestamp")]


def _iso(moment: datetime.datetime) -> str:
    return moment.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str | None) -> datetime.datetime | None:
    if not text:
        return None
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))


class _Planner:
    """One reconcile decision. Methods fill `self.plan` and return it."""

    def __init__(self, name: str, spec: FineTuneJobSpec, generation: int | None,
                 status: FineTuneJobStatus, children: Children, now: datetime.datetime,
                 queue_managed: bool) -> None:
        self.name, self.spec, self.generation = name, spec, generation
        self.children, self.now, self.queue_managed = children, now, queue_managed
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

    def run(self) -> Plan:
        if self.old.phase in TERMINAL_PHASES:
            return self.finished()
        current = attempt_job_name(self.name, self.attempt)
        self.plan.delete_jobs = [j["metadata"]["name"] for j in self.children.jobs
                                 if j["metadata"]["name"] != current]
        if self.spec.run_policy.suspend:
            return self.suspended(self.children.job_of(current))
        if self.deadline_passed():
            return self.fail(REASON_DEADLINE_EXCEEDED, "activeDeadlineSeconds "
                             f"({self.spec.run_policy.active_deadline_seconds}s) passed",
                             stop_current=True)
        stale = [p for p in self.children.pods if pod_attempt(p) != self.attempt]
        if stale or self.plan.delete_jobs:
            return self.wait_for_old_pods(len(stale))
        job = self.children.job_of(current)
        if job is None:
            return self.start_attempt()
        self.resume_if_needed(job)
        state = observe_attempt(job, self.children.pods_of(self.attempt), self.spec,
                                self.queue_managed)
        return self.follow(state)

    # --- transitions ----------------------------------------------------------------------

    def finished(self) -> Plan:
        ttl = self.spec.run_policy.ttl_seconds_after_finished
        done = parse_time(self.status.completion_time)
        if ttl is not None and done is not None:
            left = ttl - (self.now - done).total_seconds()
            self.plan.delete_self = left <= 0
            self.plan.recheck_after = left if left > 0 else None
        failed = next((c for c in self.status.conditions if c.type == COND_FAILED), None)
        if failed is not None and failed.reason == REASON_DEADLINE_EXCEEDED:
            # Keep stopping the pods until they are gone (the first delete may have failed).
            self.plan.delete_jobs = [j["metadata"]["name"] for j in self.children.jobs]
        return self.plan

    def suspended(self, job: Manifest | None) -> Plan:
        self.set_phase(Phase.SUSPENDED, Event("Normal", REASON_SUSPENDED,
                                              "pods stopped; they checkpoint on SIGTERM"))
        self.condition(COND_SUSPENDED, True, REASON_SUSPENDED, "runPolicy.suspend is true")
        self.condition(COND_RUNNING, False, REASON_SUSPENDED)
        self.status.start_time = None  # the deadline counts running time, as for a Job
        if job is None and not self.plan.delete_jobs:
            self.plan.create_attempt = self.attempt  # created suspended, ready to resume
        elif job is not None and not job.get("spec", {}).get("suspend"):
            self.plan.suspend_job = True
        return self.plan

    def resume_if_needed(self, job: Manifest) -> None:
        if job.get("spec", {}).get("suspend") and not self.queue_managed:
            self.plan.suspend_job = False
        if self.old.phase == Phase.SUSPENDED:
            self.clear(COND_SUSPENDED, REASON_RESUMED)
            self.plan.events.append(Event("Normal", REASON_RESUMED, "runPolicy.suspend is false"))
            self.status.start_time = self.stamp

    def deadline_passed(self) -> bool:
        deadline = self.spec.run_policy.active_deadline_seconds
        started = parse_time(self.status.start_time)
        if deadline is None or started is None:
            return False
        left = deadline - (self.now - started).total_seconds()
        self.plan.recheck_after = left if left > 0 else None
        return left <= 0

    def wait_for_old_pods(self, stale_pods: int) -> Plan:
        phase = Phase.RESTARTING if self.attempt > 1 else Phase.PENDING
        self.set_phase(phase)
        self.condition(COND_RUNNING, False, REASON_STALE_PODS,
                       f"waiting for {stale_pods} pods of earlier attempts to terminate")
        return self.plan

    def start_attempt(self) -> Plan:
        self.plan.create_attempt = self.attempt
        self.status.start_time = self.status.start_time or self.stamp
        if self.old.phase is None:
            self.plan.events.append(Event("Normal", REASON_CREATED,
                                          f"created attempt {self.attempt} "
                                          f"({self.spec.resources.nodes} nodes)"))
        self.set_phase(Phase.PENDING)
        # The same words observe_attempt will find next time: no second write for nothing.
        self.condition(COND_RUNNING, False, REASON_WAITING_FOR_PODS,
                       waiting_for_pods_message(0, self.spec.resources.nodes))
        return self.plan

    def follow(self, state: AttemptState) -> Plan:
        if state.kind == "failed":
            return self.handle_failure(state)
        if state.kind == "succeeded":
            return self.succeed(state)
        self.clear(COND_RESTARTING, REASON_RESTARTED)
        if state.kind == "running":
            self.set_phase(Phase.RUNNING, Event("Normal", state.reason, state.message))
            self.condition(COND_RUNNING, True, state.reason, state.message)
        else:
            kind: Literal["Normal", "Warning"] = \
                "Warning" if state.reason in ERROR_WAITING_REASONS else "Normal"
            if self.old.phase == Phase.PENDING and self._old_reason(COND_RUNNING) != state.reason:
                self.plan.events.append(Event(kind, state.reason, state.message))  # new cause
            self.set_phase(Phase.PENDING, Event(kind, state.reason, state.message))
            self.condition(COND_RUNNING, False, state.reason, state.message)
        return self.plan

    def _old_reason(self, type_: str) -> str | None:
        return next((c.reason for c in self.old.conditions if c.type == type_), None)

    def handle_failure(self, state: AttemptState) -> Plan:
        if not state.retryable:
            return self.fail(state.reason, state.message)
        limit = self.spec.run_policy.backoff_limit
        if self.status.restarts >= limit:
            return self.fail(REASON_BACKOFF_LIMIT_EXCEEDED,
                             f"{self.status.restarts + 1} attempts failed (backoffLimit "
                             f"{limit}); last: {state.reason}: {state.message}")
        self.plan.delete_jobs.append(attempt_job_name(self.name, self.attempt))
        self.status.attempt = self.attempt + 1
        self.status.restarts += 1
        message = f"attempt {self.attempt - 1} failed ({state.message}); starting attempt " \
                  f"{self.attempt} from the last checkpoint"
        self.set_phase(Phase.RESTARTING, Event("Warning", state.reason, message))
        self.condition(COND_RESTARTING, True, state.reason, message)
        self.condition(COND_RUNNING, False, state.reason, state.message)
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
            self.plan.delete_jobs = [j["metadata"]["name"] for j in self.children.jobs]
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


def plan(name: str, spec: FineTuneJobSpec, generation: int | None, status: FineTuneJobStatus,
         children: Children, now: datetime.datetime, queue_managed: bool = False) -> Plan:
    """Decide the next status and actions for one FineTuneJob (level-based, idempotent)."""
    return _Planner(name, spec, generation, status, children, now, queue_managed).run()


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

def parse_progress(text: str, now: datetime.datetime) -> Progress | None:
    """Progress from rank 0's Prometheus exposition (contract.METRIC_*); None if absent."""
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels.get("rank", "0") == "0" and sample.name not in values:
                values[sample.name] = sample.value
    step = values.get(contract.METRIC_STEP)
    if step is None:
        return None
    total = values.get(contract.METRIC_TOTAL_STEPS)
    eta = values.get(contract.METRIC_ETA_SECONDS)
    eta_seconds = int(eta) if eta is not None and math.isfinite(eta) else None
    return Progress(
        step=int(step), total_steps=int(total) if total else None,
        percent=round(100.0 * step / total, 1) if total else None,
        loss=_finite(values.get(contract.METRIC_LOSS)),
        tokens_per_second=_finite(values.get(contract.METRIC_TOKENS_PER_SECOND)),
        eta_seconds=eta_seconds, eta=human_duration(eta_seconds),
        last_update_time=_iso(now))


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
