"""The words of a FineTuneJob's status: condition types and reasons, upserting a condition,
the status of a job refused outright, reading and writing the status, and time stamps. Pure."""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any, Literal

from kubetune_api.crd import Condition, FineTuneJobStatus, Phase

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


@dataclass(frozen=True)
class Event:
    type: Literal["Normal", "Warning"]
    reason: str
    message: str


def _iso(moment: datetime.datetime) -> str:
    return moment.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str | None) -> datetime.datetime | None:
    if not text:
        return None
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))


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
