"""The planner: the spec, the current status and the children → a Plan (the new status,
children to create or delete, events, when to look again). Pure."""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from typing import Literal

from kubetune_api.crd import TERMINAL_PHASES, FineTuneJobStatus, Phase, Runtime
from kubetune_api.spec import FineTuneJobSpec
from kubetune_operator.builders import ANNOTATION_SUSPENDED_BY_OPERATOR, attempt_job_name
from kubetune_operator.conditions import (
    COND_FAILED,
    COND_RESTARTING,
    COND_RUNNING,
    COND_SUCCEEDED,
    COND_SUSPENDED,
    REASON_BACKOFF_LIMIT_EXCEEDED,
    REASON_CREATE_FAILED,
    REASON_CREATED,
    REASON_DEADLINE_EXCEEDED,
    REASON_FORCE_DELETED,
    REASON_JOB_DELETED,
    REASON_PERMANENT_FAILURE,
    REASON_PREEMPTED,
    REASON_QUEUED,
    REASON_RESTARTED,
    REASON_RESUMED,
    REASON_SCHEDULING_TIMEOUT,
    REASON_STALE_PODS,
    REASON_STALLED,
    REASON_SUSPENDED,
    REASON_WAITING_FOR_PODS,
    Event,
    Manifest,
    _clear_condition,
    _iso,
    parse_time,
    set_condition,
)
from kubetune_operator.observe import (
    ERROR_WAITING_REASONS,
    AttemptState,
    Children,
    observe_attempt,
    pod_attempt,
    pod_failure,
    queued_by_others,
    waiting_for_pods_message,
    was_suspended,
)
from kubetune_operator.policy import REASON_POLICY_VIOLATION

# A Job missing this long after its creation was written to status was deleted (or never
# created: the operator died in between); before that, the watch may simply lag.
CREATION_GRACE_SECONDS = 30.0


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
