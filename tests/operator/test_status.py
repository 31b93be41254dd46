"""Table-driven status aggregation: pod/Job fixtures → phase, reason, actions."""

from __future__ import annotations

import datetime
from typing import Any

import pytest

from kubetune_api import contract
from kubetune_api.crd import Condition, FineTuneJobStatus, Phase, Progress, Runtime
from kubetune_api.load import validate_job
from kubetune_api.spec import FineTuneJobSpec
from kubetune_operator import status as st
from kubetune_operator.builders import (
    ANNOTATION_COMPLETION_INDEX,
    ANNOTATION_SUSPENDED_BY_OPERATOR,
    LABEL_ATTEMPT,
    LABEL_OWNER_UID,
)

NOW = datetime.datetime(2026, 1, 1, 12, 0, 0, tzinfo=datetime.UTC)
STAMP = "2026-01-01T12:00:00Z"


def spec(nodes: int = 2, **run_policy: Any) -> FineTuneJobSpec:
    return validate_job({"spec": {
        "model": {"name": "tiny://llama"}, "method": {"type": "lora"},
        "dataset": {"train": "d.jsonl"}, "output": {"uri": "s3://b/out"},
        "resources": {"nodes": nodes, "gpusPerNode": 1}, "runPolicy": run_policy}}).spec


def pod(rank: int, phase: str = "Running", attempt: int = 1, *, exit_code: int | None = None,
        reason: str | None = None, message: str = "", waiting: str | None = None,
        unschedulable: str | None = None, evicted: bool = False,
        terminating: bool = False) -> dict[str, Any]:
    state: dict[str, Any] = {"running": {}}
    if waiting:
        state = {"waiting": {"reason": waiting, "message": message}}
    elif exit_code is not None:
        state = {"terminated": {"exitCode": exit_code, "reason": reason or "Error",
                                "message": message}}
    status: dict[str, Any] = {"phase": phase, "podIP": f"10.0.0.{rank}",
                              "containerStatuses": [{"name": "trainer", "state": state}]}
    if unschedulable:
        status["conditions"] = [{"type": "PodScheduled", "status": "False",
                                 "reason": "Unschedulable", "message": unschedulable}]
        status["containerStatuses"] = []
    if evicted:
        status.update(reason="Evicted", message="The node was low on resource: memory.")
    meta: dict[str, Any] = {"name": f"llama-a{attempt}-{rank}",
                            "labels": {LABEL_ATTEMPT: str(attempt)},
                            "annotations": {ANNOTATION_COMPLETION_INDEX: str(rank)}}
    if terminating:
        meta["deletionTimestamp"] = STAMP
    return {"metadata": meta, "status": status}


def job(attempt: int = 1, *, condition: str | None = None, suspend: bool = False,
        message: str = "", by_operator: bool = False) -> dict[str, Any]:
    conditions = [{"type": condition, "status": "True", "reason": "BackoffLimitExceeded",
                   "message": message}] if condition else []
    annotations = {ANNOTATION_SUSPENDED_BY_OPERATOR: "true"} if by_operator else {}
    return {"metadata": {"name": f"llama-a{attempt}", "labels": {LABEL_ATTEMPT: str(attempt)},
                         "annotations": annotations},
            "spec": {"suspend": suspend}, "status": {"conditions": conditions}}


SUCCESS_MESSAGE = '{"uri": "s3://b/out", "manifestSha256": "abc123"}'

ATTEMPT_CASES = [
    # (id, job, pods, kind, reason, retryable)
    ("no-pods-yet", job(), [], "waiting", st.REASON_WAITING_FOR_PODS, True),
    ("unschedulable", job(), [pod(0), pod(1, "Pending", unschedulable="0/8 nodes: "
                                          "insufficient nvidia.com/gpu")],
     "waiting", st.REASON_UNSCHEDULABLE, True),
    ("image-pull-beats-unschedulable", job(),
     [pod(0, "Pending", waiting="ImagePullBackOff", message="pull access denied"),
      pod(1, "Pending", unschedulable="insufficient gpu")],
     "waiting", "ImagePullBackOff", True),
    ("missing-secret", job(), [pod(0, "Pending", waiting="CreateContainerConfigError",
                                   message='secret "s3" not found'), pod(1)],
     "waiting", "CreateContainerConfigError", True),
    ("container-creating", job(), [pod(0, "Pending", waiting="ContainerCreating"), pod(1)],
     "waiting", "ContainerCreating", True),
    ("queued-by-kueue", job(suspend=True), [], "waiting", st.REASON_QUEUED, True),
    ("all-running", job(), [pod(0), pod(1)], "running", st.REASON_ALL_RANKS_RUNNING, True),
    ("rank-crashed", job(), [pod(0), pod(1, "Failed", exit_code=1, message="CUDA error")],
     "failed", st.REASON_RANK_FAILED, True),
    ("preempted-sigterm", job(), [pod(0, "Failed", exit_code=contract.EXIT_PREEMPTED),
                                  pod(1)], "failed", st.REASON_PREEMPTED, True),
    ("oom-killed", job(), [pod(0), pod(1, "Failed", exit_code=137, reason="OOMKilled")],
     "failed", st.REASON_OOM_KILLED, True),
    ("evicted", job(), [pod(0, "Failed", evicted=True), pod(1)],
     "failed", st.REASON_EVICTED, True),
    ("permanent-exit-code-wins", job(),
     [pod(0, "Failed", exit_code=1), pod(1, "Failed", exit_code=contract.EXIT_INVALID_SPEC,
                                         message="error: dataset.fields: no text")],
     "failed", st.REASON_PERMANENT_FAILURE, False),
    ("job-failed-without-pods", job(condition="Failed", message="pod deleted"), [],
     "failed", st.REASON_ATTEMPT_FAILED, True),
    ("succeeded", job(condition="Complete"),
     [pod(0, "Succeeded", exit_code=0, message=SUCCESS_MESSAGE),
      pod(1, "Succeeded", exit_code=0)], "succeeded", st.REASON_TRAINING_COMPLETE, True),
]


@pytest.mark.parametrize(("job_obj", "pods", "kind", "reason", "retryable"),
                         [c[1:] for c in ATTEMPT_CASES], ids=[c[0] for c in ATTEMPT_CASES])
def test_observe_attempt(job_obj: dict[str, Any], pods: list[dict[str, Any]], kind: str,
                         reason: str, retryable: bool) -> None:
    state = st.observe_attempt(job_obj, pods, spec(), queue_managed=True)
    assert (state.kind, state.reason, state.retryable) == (kind, reason, retryable)


def test_pending_message_says_why() -> None:
    state = st.observe_attempt(job(), [pod(0), pod(1, "Pending", unschedulable="0/8 nodes "
                                                "are available: insufficient nvidia.com/gpu")],
                               spec())
    assert "rank 1" in state.message and "insufficient nvidia.com/gpu" in state.message
    assert "1/2 ranks running" in state.message


def test_failure_message_quotes_exit_code_and_log_tail() -> None:
    state = st.observe_attempt(job(), [pod(0, "Failed", exit_code=2, message="x" * 2000 +
                                           "dataset.fields: bad")], spec())
    assert "rank 0 exited with code 2" in state.message
    assert state.message.endswith("dataset.fields: bad")
    assert len(state.message) < 600
    oom = st.observe_attempt(job(), [pod(0, "Failed", exit_code=137, reason="OOMKilled")],
                             spec())
    assert "spec.pod.memory" in oom.message


def test_success_reads_rank0_termination_message() -> None:
    state = st.observe_attempt(job(condition="Complete"), [
        pod(1, "Succeeded", exit_code=0, message="not json"),
        pod(0, "Succeeded", exit_code=0, message=SUCCESS_MESSAGE)], spec())
    assert state.output is not None
    assert (state.output.uri, state.output.manifest_sha256) == ("s3://b/out", "abc123")
    fallback = st.observe_attempt(job(condition="Complete"), [pod(0, "Succeeded", exit_code=0)],
                                  spec())
    assert fallback.output is not None and fallback.output.uri == "s3://b/out"
    assert fallback.output.manifest_sha256 is None


def test_success_records_the_oci_push_from_the_termination_message() -> None:
    message = ('{"uri": "s3://b/out", "manifestSha256": "abc123", "oci": {"reference": '
               '"registry.example.com/team/a:v1", "digest": "sha256:d1"}}')
    done = [pod(0, "Succeeded", exit_code=0, message=message), pod(1, "Succeeded", exit_code=0)]
    plan = run(spec(), status(Phase.RUNNING), children([job(condition="Complete")], done))
    dumped = plan.status.model_dump(mode="json", by_alias=True, exclude_none=True)
    assert dumped["output"] == {"uri": "s3://b/out", "manifestSha256": "abc123",
                                "oci": {"reference": "registry.example.com/team/a:v1",
                                        "digest": "sha256:d1"}}
    without = st.observe_attempt(job(condition="Complete"), [
        pod(0, "Succeeded", exit_code=0, message=SUCCESS_MESSAGE)], spec())
    assert without.output is not None and without.output.oci is None


# --- plan: transitions --------------------------------------------------------------------------

def children(jobs: list[dict[str, Any]] = (), pods: list[dict[str, Any]] = ()) -> st.Children:
    return st.Children(list(jobs), list(pods))


def status(phase: Phase | None = None, attempt: int = 1, restarts: int = 0,
           **fields: Any) -> FineTuneJobStatus:
    return FineTuneJobStatus(phase=phase, attempt=attempt, restarts=restarts, **fields)


def run(job_spec: FineTuneJobSpec, old: FineTuneJobStatus, kids: st.Children,
        now: datetime.datetime = NOW) -> st.Plan:
    return st.plan("llama", job_spec, 3, old, kids, now)


def condition(plan: st.Plan, type_: str) -> Condition:
    return next(c for c in plan.status.conditions if c.type == type_)


def test_new_job_creates_attempt_one() -> None:
    plan = run(spec(), FineTuneJobStatus(), children())
    assert plan.create_attempt == 1
    assert (plan.status.phase, plan.status.attempt, plan.status.restarts) == \
        (Phase.PENDING, 1, 0)
    assert plan.status.attempt_start_time == STAMP and plan.status.observed_generation == 3
    assert plan.status.start_time is None  # set once all ranks run
    assert [e.reason for e in plan.events] == [st.REASON_CREATED]


def test_existing_attempt_is_not_created_again() -> None:
    plan = run(spec(), status(Phase.PENDING), children([job()], [pod(0), pod(1)]))
    assert plan.create_attempt is None
    assert plan.status.phase == Phase.RUNNING
    assert condition(plan, st.COND_RUNNING).status == "True"
    assert [e.reason for e in plan.events] == [st.REASON_ALL_RANKS_RUNNING]


def test_retryable_failure_restarts_the_gang() -> None:
    failed = [pod(0), pod(1, "Failed", exit_code=contract.EXIT_PREEMPTED)]
    plan = run(spec(backoffLimit=3), status(Phase.RUNNING), children([job()], failed))
    assert plan.delete_jobs == ["llama-a1"]
    assert (plan.status.phase, plan.status.attempt, plan.status.restarts) == \
        (Phase.RESTARTING, 2, 1)
    assert condition(plan, st.COND_RESTARTING).reason == st.REASON_PREEMPTED
    assert plan.events[0].type == "Warning"
    # Next round: the old attempt's pods are still terminating → wait, create nothing.
    waiting = run(spec(), plan.status, children([], [pod(0, terminating=True)]))
    assert waiting.create_attempt is None and waiting.status.phase == Phase.RESTARTING
    # Then they are gone → attempt 2 starts.
    started = run(spec(), waiting.status, children())
    assert started.create_attempt == 2 and started.status.phase == Phase.PENDING


def test_backoff_limit_exceeded_fails() -> None:
    failed = [pod(0, "Failed", exit_code=1, attempt=4), pod(1, attempt=4)]
    plan = run(spec(backoffLimit=3), status(Phase.RUNNING, attempt=4, restarts=3),
               children([job(4)], failed))
    assert plan.status.phase == Phase.FAILED
    failed_condition = condition(plan, st.COND_FAILED)
    assert failed_condition.reason == st.REASON_BACKOFF_LIMIT_EXCEEDED
    assert "4 attempts failed" in failed_condition.message
    # The ranks still running are stopped: a failed job holds no GPUs.
    assert plan.status.completion_time == STAMP and plan.delete_jobs == ["llama-a4"]


def test_permanent_failure_fails_at_once() -> None:
    plan = run(spec(backoffLimit=5), status(Phase.RUNNING),
               children([job()], [pod(0, "Failed", exit_code=contract.EXIT_INVALID_SPEC)]))
    assert plan.status.phase == Phase.FAILED and plan.status.restarts == 0
    assert condition(plan, st.COND_FAILED).reason == st.REASON_PERMANENT_FAILURE


def test_success_records_output() -> None:
    done = [pod(0, "Succeeded", exit_code=0, message=SUCCESS_MESSAGE),
            pod(1, "Succeeded", exit_code=0)]
    old = status(Phase.RUNNING, progress=Progress(step=90, total_steps=100, percent=90.0))
    plan = run(spec(), old, children([job(condition="Complete")], done))
    assert plan.status.phase == Phase.SUCCEEDED
    assert plan.status.output is not None and plan.status.output.manifest_sha256 == "abc123"
    assert plan.status.progress is not None and plan.status.progress.percent == 100.0
    assert condition(plan, st.COND_SUCCEEDED).status == "True"


def test_deadline_fails_and_stops_the_pods() -> None:
    started = (NOW - datetime.timedelta(seconds=61)).strftime("%Y-%m-%dT%H:%M:%SZ")
    plan = run(spec(activeDeadlineSeconds=60), status(Phase.RUNNING, start_time=started),
               children([job()], [pod(0), pod(1)]))
    assert plan.status.phase == Phase.FAILED
    assert condition(plan, st.COND_FAILED).reason == st.REASON_DEADLINE_EXCEEDED
    assert plan.delete_jobs == ["llama-a1"]
    early = run(spec(activeDeadlineSeconds=120), status(Phase.RUNNING, start_time=started),
                children([job()], [pod(0), pod(1)]))
    assert early.status.phase == Phase.RUNNING and early.recheck_after == pytest.approx(59)


def test_suspend_and_resume() -> None:
    plan = run(spec(suspend=True), status(Phase.RUNNING, start_time=STAMP),
               children([job()], [pod(0), pod(1)]))
    assert plan.suspend_job is True and plan.status.phase == Phase.SUSPENDED
    assert plan.status.start_time is None
    assert condition(plan, st.COND_SUSPENDED).status == "True"
    # The Job controller stopped the pods (exit 75 on SIGTERM): no restart is counted.
    quiet = run(spec(suspend=True), plan.status, children([job(suspend=True, by_operator=True)],
                                                          [pod(0, "Failed", exit_code=75)]))
    assert quiet.status.restarts == 0 and quiet.suspend_job is None and not quiet.delete_jobs
    resumed = run(spec(suspend=False), quiet.status,
                  children([job(suspend=True, by_operator=True)], []))
    assert resumed.suspend_job is False
    # The deadline clock runs again once all ranks run, not at the resume.
    assert resumed.status.phase == Phase.PENDING and resumed.status.start_time is None
    assert condition(resumed, st.COND_SUSPENDED).status == "False"
    assert st.REASON_RESUMED in [e.reason for e in resumed.events]


def test_kueue_managed_job_is_never_unsuspended_by_the_operator() -> None:
    plan = st.plan("llama", spec(), 1, status(Phase.PENDING), children([job(suspend=True)]),
                   NOW, queue_managed=True)
    assert plan.suspend_job is None
    assert condition(plan, st.COND_RUNNING).reason == st.REASON_QUEUED


def test_ttl_after_finished() -> None:
    finished = (NOW - datetime.timedelta(seconds=30)).strftime("%Y-%m-%dT%H:%M:%SZ")
    old = status(Phase.SUCCEEDED, completion_time=finished)
    assert run(spec(ttlSecondsAfterFinished=10), old, children()).delete_self
    later = run(spec(ttlSecondsAfterFinished=100), old, children())
    assert not later.delete_self and later.recheck_after == pytest.approx(70)
    assert not run(spec(), old, children()).delete_self


def test_transition_time_moves_only_when_status_flips() -> None:
    conditions = st.set_condition([], "Running", False, "A", "", "t1", 1)
    conditions = st.set_condition(conditions, "Running", False, "B", "m", "t2", 1)
    assert conditions[0].last_transition_time == "t1" and conditions[0].reason == "B"
    conditions = st.set_condition(conditions, "Running", True, "C", "", "t3", 2)
    assert conditions[0].last_transition_time == "t3" and len(conditions) == 1


def test_steady_state_plans_no_writes() -> None:
    first = run(spec(), status(Phase.PENDING), children([job()], [pod(0), pod(1)]))
    again = run(spec(), first.status, children([job()], [pod(0), pod(1)]))
    assert st.dump_status(again.status) == st.dump_status(first.status)
    assert again.events == [] and again.create_attempt is None


# --- progress -----------------------------------------------------------------------------------

METRICS_TEXT = f"""# HELP {contract.METRIC_STEP} Optimizer steps completed.
# TYPE {contract.METRIC_STEP} gauge
{contract.METRIC_STEP}{{rank="0"}} 250.0
{contract.METRIC_STEP}{{rank="1"}} 249.0
# TYPE {contract.METRIC_TOTAL_STEPS} gauge
{contract.METRIC_TOTAL_STEPS}{{rank="0"}} 1000.0
# TYPE {contract.METRIC_LOSS} gauge
{contract.METRIC_LOSS}{{rank="0"}} 1.23456789
# TYPE {contract.METRIC_TOKENS_PER_SECOND} gauge
{contract.METRIC_TOKENS_PER_SECOND}{{rank="0"}} 5120.5
# TYPE {contract.METRIC_ETA_SECONDS} gauge
{contract.METRIC_ETA_SECONDS}{{rank="0"}} 3725.0
# TYPE kubetune_trainer_tokens counter
kubetune_trainer_tokens_total{{rank="0"}} 12345.0
"""


def test_parse_progress_reads_rank0() -> None:
    progress = st.parse_progress(METRICS_TEXT, NOW)
    assert progress is not None
    assert (progress.step, progress.total_steps, progress.percent) == (250, 1000, 25.0)
    assert progress.loss == pytest.approx(1.2346)
    assert progress.tokens_per_second == pytest.approx(5120.5)
    assert (progress.eta_seconds, progress.eta) == (3725, "1h02m")
    assert progress.last_update_time == STAMP


def test_parse_progress_without_trainer_metrics() -> None:
    assert st.parse_progress("# nothing here\n", NOW) is None
    nan_eta = f"{contract.METRIC_STEP} 3\n{contract.METRIC_ETA_SECONDS} NaN\n"
    progress = st.parse_progress(nan_eta, NOW)
    assert progress is not None and progress.step == 3 and progress.eta_seconds is None


@pytest.mark.parametrize(("seconds", "text"), [(0, "0s"), (59, "59s"), (61, "1m01s"),
                                               (7260, "2h01m"), (None, None)])
def test_human_duration(seconds: int | None, text: str | None) -> None:
    assert st.human_duration(seconds) == text


def test_exits_of_a_suspended_jobs_pods_are_not_failures() -> None:
    stopping = [pod(0, "Failed", exit_code=contract.EXIT_PREEMPTED), pod(1, "Failed",
                                                                         evicted=True)]
    state = st.observe_attempt(job(suspend=True), stopping, spec(), queue_managed=True)
    assert (state.kind, state.reason) == ("waiting", st.REASON_QUEUED)


def test_gang_size_comes_from_the_job_not_an_edited_spec() -> None:
    sized = job()
    sized["spec"]["completions"] = 2
    state = st.observe_attempt(sized, [pod(0), pod(1)], spec(nodes=4))
    assert state.kind == "running"


def test_a_new_pending_cause_posts_an_event() -> None:
    creating = run(spec(), status(Phase.PENDING), children([job()], [
        pod(0, "Pending", waiting="ContainerCreating"), pod(1)]))
    assert [e.reason for e in creating.events] == ["ContainerCreating"]
    pulling = run(spec(), creating.status, children([job()], [
        pod(0, "Pending", waiting="ImagePullBackOff", message="denied"), pod(1)]))
    assert [(e.type, e.reason) for e in pulling.events] == [("Warning", "ImagePullBackOff")]
    same = run(spec(), pulling.status, children([job()], [
        pod(0, "Pending", waiting="ImagePullBackOff", message="denied"), pod(1)]))
    assert same.events == []


# --- children by owner uid ------------------------------------------------------------------

UID, OLD_UID = "uid-now", "uid-before"


def ago(seconds: float) -> str:
    return (NOW - datetime.timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%SZ")


def owned(obj: dict[str, Any], uid: str, kind: str = "FineTuneJob",
          name: str = "llama") -> dict[str, Any]:
    api_version = "kubetune.dev/v1alpha1" if kind == "FineTuneJob" else "batch/v1"
    obj["metadata"]["ownerReferences"] = [{"apiVersion": api_version, "kind": kind,
                                           "name": name, "uid": uid}]
    obj["metadata"].setdefault("uid", f"{uid}-{obj['metadata']['name']}")
    obj["kind"] = "Job" if kind == "FineTuneJob" else "Pod"
    return obj


def job_pod(attempt_job: dict[str, Any], rank: int, uid_label: str | None = UID,
            **kw: Any) -> dict[str, Any]:
    made = owned(pod(rank, attempt=int(attempt_job["metadata"]["labels"][LABEL_ATTEMPT]),
                     **kw), attempt_job["metadata"]["uid"], kind="Job",
                 name=attempt_job["metadata"]["name"])
    if uid_label:
        made["metadata"]["labels"][LABEL_OWNER_UID] = uid_label
    return made


def test_children_are_matched_by_owner_uid_never_by_label_alone() -> None:
    ours = owned(job(), UID)
    foreign = owned(job(), "someone-else", name="other-app")  # same label, other owner
    earlier = owned(job(), OLD_UID)  # an earlier FineTuneJob named llama
    pods = [job_pod(ours, 0), job_pod(ours, 1, uid_label=None),
            job_pod(foreign, 0, uid_label=None), job_pod(earlier, 1, uid_label=OLD_UID),
            owned(pod(0, attempt=0), "gone-job-uid", kind="Job") | {}]
    pods[-1]["metadata"]["labels"][LABEL_OWNER_UID] = UID  # its Job is already deleted
    kids = st.owned_children([ours, foreign, earlier], pods, UID, "llama")
    assert kids.jobs == [ours]
    assert [p["metadata"]["ownerReferences"][0]["uid"] for p in kids.pods] == \
        [ours["metadata"]["uid"], ours["metadata"]["uid"], "gone-job-uid"]
    assert kids.leftovers == [earlier, pods[3]]


def test_a_foreign_labelled_pod_never_blocks_and_is_never_deleted() -> None:
    stray = pod(0, attempt=7)  # labelled, owned by nobody we know
    kids = st.owned_children([], [stray], UID, "llama")
    plan = run(spec(), FineTuneJobStatus(), kids)
    assert plan.create_attempt == 1
    assert not plan.delete_pods and not plan.force_delete_pods and not plan.delete_jobs


def test_an_earlier_objects_gang_is_deleted_and_waited_for() -> None:
    earlier = owned(job(), OLD_UID)
    old_pod = job_pod(earlier, 0, uid_label=OLD_UID)
    plan = run(spec(), FineTuneJobStatus(), st.owned_children([earlier], [old_pod], UID,
                                                                 "llama"))
    assert plan.create_attempt is None and plan.delete_jobs == ["llama-a1"]
    assert plan.delete_pods == ["llama-a1-0"]
    assert condition(plan, st.COND_RUNNING).reason == st.REASON_STALE_PODS
    gone = run(spec(), plan.status, st.owned_children([], [], UID, "llama"))
    assert gone.create_attempt == 1


# --- one gang at a time -----------------------------------------------------------------------

def test_pods_stuck_terminating_are_force_deleted_after_a_bounded_wait() -> None:
    stuck = pod(0, terminating=True)  # attempt 1's pod; attempt 2 waits for it
    stuck["metadata"]["deletionTimestamp"] = ago(50)
    restarting = status(Phase.RESTARTING, attempt=2, restarts=1)
    limits = st.Limits(force_delete_after=60)
    waiting = st.plan("llama", spec(), 3, restarting, children([], [stuck]), NOW,
                      limits=limits)
    assert waiting.force_delete_pods == [] and waiting.recheck_after == pytest.approx(10)
    assert waiting.create_attempt is None
    stuck["metadata"]["deletionTimestamp"] = ago(61)
    forced = st.plan("llama", spec(), 3, restarting, children([], [stuck]), NOW,
                     limits=limits)
    assert forced.force_delete_pods == ["llama-a1-0"] and forced.create_attempt is None
    assert [(e.type, e.reason) for e in forced.events] == [("Warning", st.REASON_FORCE_DELETED)]
    assert "llama-a1-0" in forced.events[0].message


def test_a_job_deleted_mid_run_starts_a_new_attempt_never_the_same_name() -> None:
    running = status(Phase.RUNNING, attempt_start_time=ago(120))
    plan = run(spec(backoffLimit=0), running, children([], [pod(0), pod(1)]))
    assert plan.create_attempt is None and plan.status.attempt == 2
    assert (plan.status.restarts, plan.status.preemptions) == (1, 1)  # not the training's fault
    assert condition(plan, st.COND_RESTARTING).reason == st.REASON_JOB_DELETED
    # Just created, not in the watch yet: create again (idempotent), decide nothing.
    fresh = run(spec(), status(Phase.PENDING, attempt_start_time=ago(5)), children())
    assert fresh.create_attempt == 1 and fresh.status.attempt == 1
    assert fresh.recheck_after == pytest.approx(st.CREATION_GRACE_SECONDS - 5)
    # Seen in the watch, then gone: deleted, however young.
    seen = st.Children([], [], seen=frozenset({"llama-a1"}))
    gone = run(spec(), status(Phase.PENDING, attempt_start_time=ago(5)), seen)
    assert gone.create_attempt is None and gone.status.attempt == 2


def test_a_restart_whose_old_gang_is_already_gone_wakes_the_next_attempt_itself() -> None:
    """The Job and its pods were deleted together: no later event of theirs will come, so
    the restart asks for the next reconcile, which starts attempt 2."""
    seen = st.Children([], [], seen=frozenset({"llama-a1"}))
    plan = run(spec(), status(Phase.RUNNING, attempt_start_time=ago(120)), seen)
    assert plan.status.phase == Phase.RESTARTING and plan.recheck_after is not None
    assert plan.recheck_after < 1
    started = run(spec(), plan.status, seen)
    assert started.create_attempt == 2 and started.status.phase == Phase.PENDING


# --- node loss, disruption, preemptions -------------------------------------------------------

DISRUPTIONS = [
    ("terminating", pod(1, terminating=True), st.REASON_POD_DELETED),
    ("disruption-target", pod(1) | {"status": {
        "phase": "Running", "conditions": [{"type": "DisruptionTarget", "status": "True",
                                            "reason": "PreemptionByScheduler"}]}},
     st.REASON_EVICTED),
    ("node-lost", pod(1) | {"status": {"phase": "Running", "reason": "NodeLost",
                                       "message": "Node gpu-7 which was running pod "
                                                  "llama-a1-1 is unresponsive"}},
     st.REASON_NODE_LOST),
    ("sigterm-checkpointed", pod(1, "Failed", exit_code=contract.EXIT_PREEMPTED),
     st.REASON_PREEMPTED),
]


@pytest.mark.parametrize(("lost", "reason"), [c[1:] for c in DISRUPTIONS],
                         ids=[c[0] for c in DISRUPTIONS])
def test_disruptions_restart_without_using_the_backoff_limit(lost: dict[str, Any],
                                                             reason: str) -> None:
    plan = run(spec(backoffLimit=0), status(Phase.RUNNING, restarts=2, preemptions=2),
               children([job()], [pod(0), lost]))
    assert plan.status.phase == Phase.RESTARTING, plan.status.conditions
    assert condition(plan, st.COND_RESTARTING).reason == reason
    assert (plan.status.attempt, plan.status.restarts, plan.status.preemptions) == (2, 3, 3)
    assert "not counted against backoffLimit" in condition(plan, st.COND_RESTARTING).message


def test_a_disruption_explains_the_other_ranks_crashes() -> None:
    state = st.observe_attempt(job(), [pod(0, "Failed", exit_code=1, message="gloo: "
                                           "connection reset"), pod(1, "Failed", evicted=True)],
                               spec())
    assert (state.reason, state.preemption) == (st.REASON_EVICTED, True)


def test_real_failures_use_the_backoff_limit_preemptions_do_not() -> None:
    old = status(Phase.RUNNING, attempt=4, restarts=3, preemptions=2)  # one failure so far
    crashed = [pod(0, "Failed", exit_code=1, attempt=4), pod(1, attempt=4)]
    assert run(spec(backoffLimit=2), old, children([job(4)], crashed)).status.phase == \
        Phase.RESTARTING
    assert run(spec(backoffLimit=1), old, children([job(4)], crashed)).status.phase == \
        Phase.FAILED


def test_a_permanent_exit_wins_whatever_order_the_events_arrive_in() -> None:
    failed_job = job(condition="Failed", message="backoff limit")
    failed_job["status"]["conditions"][0]["lastTransitionTime"] = ago(2)
    # 1. The Job's Failed condition arrives before the rank's exit: wait for the rank.
    early = st.observe_attempt(failed_job, [pod(0), pod(1)], spec(), now=NOW)
    assert (early.kind, early.reason) == ("waiting", st.REASON_JOB_FAILED_PENDING)
    assert early.recheck_after == pytest.approx(st.EXIT_REPORT_GRACE_SECONDS - 2)
    plan = run(spec(), status(Phase.RUNNING), children([failed_job], [pod(0), pod(1)]))
    assert plan.status.phase == Phase.PENDING  # "WaitingForRankExits", for a few seconds
    assert plan.status.restarts == 0 and not plan.delete_jobs
    exited = [pod(0, "Failed", exit_code=contract.EXIT_INVALID_SPEC), pod(1)]
    assert run(spec(), plan.status, children([failed_job], exited)).status.phase == \
        Phase.FAILED
    # 2. A retryable exit of another rank came first and the restart began: the permanent
    # exit still ends the job while the old pods terminate.
    restarting = run(spec(), status(Phase.RUNNING), children([job()], [
        pod(0), pod(1, "Failed", exit_code=1)]))
    assert restarting.status.phase == Phase.RESTARTING
    late = run(spec(), restarting.status, children([], [
        pod(0, "Failed", exit_code=contract.EXIT_INVALID_SPEC, terminating=True)]))
    assert late.status.phase == Phase.FAILED
    assert condition(late, st.COND_FAILED).reason == st.REASON_PERMANENT_FAILURE
    # 3. Nobody reports within the grace period: the Job's word decides.
    failed_job["status"]["conditions"][0]["lastTransitionTime"] = ago(31)
    assert st.observe_attempt(failed_job, [pod(0), pod(1)], spec(), now=NOW).reason == \
        st.REASON_ATTEMPT_FAILED


# --- pinned runtime -----------------------------------------------------------------------------

RUNTIME_V1 = Runtime(trainer_image="trainer:1", termination_grace_seconds=300)
RUNTIME_V2 = Runtime(trainer_image="trainer:2", termination_grace_seconds=60)


def test_the_first_attempt_pins_the_runtime_later_ones_keep_it() -> None:
    first = st.plan("llama", spec(), 1, FineTuneJobStatus(), children(), NOW,
                    limits=st.Limits(RUNTIME_V1))
    assert first.status.runtime == RUNTIME_V1
    restarted = status(Phase.RESTARTING, attempt=2, restarts=1, runtime=RUNTIME_V1)
    second = st.plan("llama", spec(), 1, restarted, children(), NOW,
                     limits=st.Limits(RUNTIME_V2))  # the operator was upgraded meanwhile
    assert second.create_attempt == 2 and second.status.runtime == RUNTIME_V1


# --- scheduling timeout and stall watchdog ---------------------------------------------------

def test_a_partial_gang_is_torn_down_after_the_scheduling_timeout() -> None:
    partial = [pod(0), pod(1, "Pending", unschedulable="0/8 nodes: insufficient nvidia.com/gpu")]
    early = run(spec(schedulingTimeoutSeconds=600),
                status(Phase.PENDING, attempt_start_time=ago(500)), children([job()], partial))
    assert early.status.phase == Phase.PENDING and early.recheck_after == pytest.approx(100)
    late = run(spec(schedulingTimeoutSeconds=600),
               status(Phase.PENDING, attempt_start_time=ago(601)), children([job()], partial))
    restarting = condition(late, st.COND_RESTARTING)
    assert late.delete_jobs == ["llama-a1"] and late.status.attempt == 2
    assert restarting.reason == st.REASON_SCHEDULING_TIMEOUT
    assert "rank 1" in restarting.message and "insufficient nvidia.com/gpu" in restarting.message
    assert late.status.preemptions == 0  # counted against backoffLimit
    # Time queued (a suspended Job) does not count: the Job's startTime does.
    admitted = job()
    admitted["status"]["startTime"] = ago(30)
    queued_long = run(spec(schedulingTimeoutSeconds=600),
                      status(Phase.PENDING, attempt_start_time=ago(3600)),
                      children([admitted], partial))
    assert queued_long.status.phase == Phase.PENDING


def test_stall_watchdog_restarts_a_gang_whose_step_stopped() -> None:
    stuck = Progress(step=37, total_steps=100, last_step_time=ago(301), last_update_time=ago(1))
    old = status(Phase.RUNNING, attempt_start_time=ago(900), progress=stuck)
    plan = run(spec(stallTimeoutSeconds=300), old, children([job()], [pod(0), pod(1)]))
    assert plan.status.phase == Phase.RESTARTING and plan.delete_jobs == ["llama-a1"]
    restarting = condition(plan, st.COND_RESTARTING)
    assert restarting.reason == st.REASON_STALLED and "step 37" in restarting.message
    assert "step 37" in plan.events[0].message
    off = run(spec(), old, children([job()], [pod(0), pod(1)]))  # default: no watchdog
    assert off.status.phase == Phase.RUNNING
    moving = status(Phase.RUNNING, attempt_start_time=ago(900),
                    progress=Progress(step=38, total_steps=100, last_step_time=ago(10),
                                      last_update_time=ago(1)))
    fine = run(spec(stallTimeoutSeconds=300), moving, children([job()], [pod(0), pod(1)]))
    assert fine.status.phase == Phase.RUNNING and fine.recheck_after == pytest.approx(290)
    # Loading (rank 0 not scraped yet) is not training.
    assert run(spec(stallTimeoutSeconds=300), status(Phase.RUNNING, attempt_start_time=ago(900)),
               children([job()], [pod(0), pod(1)])).status.phase == Phase.RUNNING
    # A new attempt gets the whole timeout: the progress of the last one does not count.
    resumed = status(Phase.RUNNING, attempt=2, restarts=1, attempt_start_time=ago(100),
                     progress=stuck.model_copy(update={"last_update_time": ago(400)}))
    assert run(spec(stallTimeoutSeconds=300), resumed,
               children([job(2)], [pod(0, attempt=2), pod(1, attempt=2)])).status.phase == \
        Phase.RUNNING


def test_the_stall_clock_moves_with_the_step_and_outside_training() -> None:
    first = st.parse_progress(METRICS_TEXT, NOW)
    assert first is not None and first.last_step_time == STAMP
    later = NOW + datetime.timedelta(seconds=40)
    same = st.parse_progress(METRICS_TEXT, later, first)
    assert same is not None and same.last_step_time == STAMP  # step 250 did not move
    phase = 'kubetune_trainer_phase{rank="0",phase="checkpointing"} 1.0\n'
    saving = st.parse_progress(METRICS_TEXT + phase, later, first)
    assert saving is not None and saving.last_step_time == st._iso(later)
    moved = st.parse_progress(METRICS_TEXT.replace(" 250.0", " 251.0"), later, first)
    assert moved is not None and moved.last_step_time == st._iso(later)


def test_finishing_wakes_the_reconciler_when_the_ttl_is_due() -> None:
    done = [pod(0, "Succeeded", exit_code=0), pod(1, "Succeeded", exit_code=0)]
    plan = run(spec(ttlSecondsAfterFinished=30), status(Phase.RUNNING),
               children([job(condition="Complete")], done))
    assert plan.status.phase == Phase.SUCCEEDED and plan.recheck_after == 30
    crashed = [pod(0, "Failed", exit_code=contract.EXIT_INVALID_SPEC), pod(1)]
    failed = run(spec(ttlSecondsAfterFinished=0), status(Phase.RUNNING),
                 children([job()], crashed))
    assert failed.status.phase == Phase.FAILED and failed.recheck_after == 0.05


# --- Kueue and the deadline clock ----------------------------------------------------------------

def kueue_job(attempt: int = 1, **kw: Any) -> dict[str, Any]:
    made = job(attempt, **kw)
    made["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] = "team-a"
    return made


def test_a_job_someone_else_suspended_is_never_unsuspended() -> None:
    # Kueue's webhook suspended our Job (a default LocalQueue): the FineTuneJob has no label.
    plan = run(spec(), status(Phase.PENDING), children([job(suspend=True)]))
    assert plan.suspend_job is None
    running = condition(plan, st.COND_RUNNING)
    assert (running.reason, running.message) == (st.REASON_QUEUED, "waiting for Kueue admission")
    ours = run(spec(), status(Phase.SUSPENDED), children([job(suspend=True, by_operator=True)]))
    assert ours.suspend_job is False


def test_a_kueue_preemption_resumes_the_same_attempt_on_readmission() -> None:
    stopped = [pod(0, "Failed", exit_code=contract.EXIT_PREEMPTED, terminating=True), pod(1)]
    plan = run(spec(backoffLimit=0), status(Phase.RUNNING, start_time=ago(100)),
               children([kueue_job(suspend=True)], stopped))
    assert (plan.status.phase, plan.status.attempt) == (Phase.PENDING, 1)
    assert (plan.status.restarts, plan.status.preemptions) == (0, 1)
    assert not plan.delete_jobs and plan.suspend_job is None
    assert (plan.events[0].type, plan.events[0].reason) == ("Warning", st.REASON_PREEMPTED)
    assert plan.status.active_seconds == 100 and plan.status.start_time is None
    again = run(spec(backoffLimit=0), plan.status, children([kueue_job(suspend=True)], []))
    assert again.status.preemptions == 1 and again.events == []  # counted once
    # Re-admitted: the Job's startTime moves; the old stretch's pods are not failures.
    resumed = run(spec(backoffLimit=0), again.status, readmitted(old_rank=0, new_created=STAMP))
    assert (resumed.status.phase, resumed.status.attempt) == (Phase.RUNNING, 1)


def readmitted(old_rank: int, new_created: str) -> st.Children:
    """A re-admitted Kueue Job (startTime now), a pod its suspension stopped, and the
    resumed gang created at `new_created`."""
    admitted = kueue_job()
    admitted["status"]["startTime"] = STAMP
    old_pod = pod(old_rank, "Failed", exit_code=contract.EXIT_PREEMPTED, terminating=True)
    old_pod["metadata"]["creationTimestamp"] = ago(200)
    new_pods = [pod(0), pod(1)]
    for new in new_pods:
        new["metadata"]["creationTimestamp"] = new_created
    return children([admitted], [old_pod, *new_pods])


def test_pods_created_in_the_resume_sync_before_the_new_start_time_are_the_gang() -> None:
    # The Job controller creates the pods of a resumed Job, then writes its new startTime in
    # the same sync: with one-second timestamps the pods can look a second older. Only pods
    # the suspension stopped (deleted or failed) are from before the resume.
    queued = status(Phase.PENDING, preemptions=1, active_seconds=100)
    resumed = run(spec(backoffLimit=0), queued, readmitted(old_rank=1, new_created=ago(1)))
    assert (resumed.status.phase, resumed.status.attempt) == (Phase.RUNNING, 1)
    assert (resumed.status.restarts, resumed.status.preemptions) == (0, 1)


def test_suspending_a_queued_job_stops_its_attempt_instead_of_fighting_kueue() -> None:
    plan = run(spec(suspend=True), status(Phase.RUNNING, start_time=ago(10)),
               children([kueue_job()], [pod(0), pod(1)]))
    assert plan.suspend_job is None and plan.delete_jobs == ["llama-a1"]
    assert (plan.status.phase, plan.status.attempt, plan.status.preemptions) == \
        (Phase.SUSPENDED, 2, 1)
    waiting = st.plan("llama", spec(suspend=True), 1, plan.status, children(), NOW,
                      queue_managed=True)
    assert waiting.create_attempt is None  # Kueue would admit it: nothing while suspended
    resumed = st.plan("llama", spec(), 1, waiting.status, children(), NOW, queue_managed=True)
    assert resumed.create_attempt == 2


def test_the_deadline_clock_runs_only_while_all_ranks_run() -> None:
    queued = status(Phase.PENDING, attempt_start_time=ago(3600))
    plan = run(spec(activeDeadlineSeconds=60), queued, children([kueue_job(suspend=True)]))
    assert plan.status.phase == Phase.PENDING and plan.recheck_after is None
    running = run(spec(activeDeadlineSeconds=60), plan.status,
                  children([kueue_job()], [pod(0), pod(1)]))
    assert running.status.start_time == STAMP and running.recheck_after == pytest.approx(60)
    earlier = status(Phase.RUNNING, active_seconds=50, start_time=ago(11))
    assert run(spec(activeDeadlineSeconds=60), earlier, children([job()], [pod(0), pod(1)])
               ).status.phase == Phase.FAILED


def test_a_job_failed_while_suspended_is_not_queued_forever() -> None:
    failed = kueue_job(suspend=True, condition="Failed", message="deactivated")
    plan = run(spec(), status(Phase.PENDING), children([failed]))
    assert plan.status.phase == Phase.RESTARTING
    assert condition(plan, st.COND_RESTARTING).reason == st.REASON_ATTEMPT_FAILED


def test_deletions_name_the_uid_they_mean() -> None:
    """A lagging watch still shows the old Job of a name that a new one now has: the DELETE
    carries the old uid as a precondition, so the new Job survives it."""
    earlier = owned(job(), OLD_UID)
    plan = run(spec(), FineTuneJobStatus(), st.owned_children([earlier], [], UID, "llama"))
    assert plan.delete_jobs == ["llama-a1"]
    assert plan.uids["llama-a1"] == earlier["metadata"]["uid"]
    current = owned(job(), UID)
    restart = run(spec(), status(Phase.RUNNING), st.owned_children(
        [current], [job_pod(current, 0, exit_code=1, phase="Failed"), job_pod(current, 1)],
        UID, "llama"))
    assert restart.delete_jobs == ["llama-a1"]
    assert restart.uids["llama-a1"] == current["metadata"]["uid"]


def test_success_waits_for_rank0s_own_report_of_the_artifact() -> None:
    """The Job's Complete condition may arrive before rank 0's pod status (another watch)."""
    complete = job(condition="Complete")
    complete["status"]["conditions"][0]["lastTransitionTime"] = ago(1)
    early = st.observe_attempt(complete, [pod(0), pod(1, "Succeeded", exit_code=0)], spec(),
                               now=NOW)
    assert (early.kind, early.reason) == ("waiting", st.REASON_JOB_FAILED_PENDING)
    assert "Job completed" in early.message
    done = st.observe_attempt(complete, [pod(0, "Succeeded", exit_code=0,
                                             message=SUCCESS_MESSAGE),
                                         pod(1, "Succeeded", exit_code=0)], spec(), now=NOW)
    assert done.kind == "succeeded" and done.output is not None
    assert done.output.manifest_sha256 == "abc123"


# --- pods the Job controller could not create (FailedCreate events) -------------------------

QUOTA = ('Error creating: pods "llama-a1-1" is forbidden: exceeded quota: gpus, requested: '
         'pods=1, used: pods=1, limited: pods=1')


def failed_create(message: str = QUOTA, at: str = STAMP, reason: str = "FailedCreate",
                  job_name: str = "llama-a1") -> dict[str, Any]:
    return {"metadata": {"name": f"{job_name}.1", "creationTimestamp": at},
            "involvedObject": {"kind": "Job", "name": job_name, "uid": "job-uid"},
            "reason": reason, "type": "Warning", "message": message, "lastTimestamp": at}


def created_at(obj: dict[str, Any], stamp: str) -> dict[str, Any]:
    obj["metadata"]["creationTimestamp"] = stamp
    return obj


def test_pods_the_job_controller_cannot_create_show_in_pending() -> None:
    kids = st.Children([job()], [created_at(pod(0), ago(60))],
                       failed_creates=[failed_create(at=ago(30))])
    plan = run(spec(), status(Phase.PENDING), kids)
    running = condition(plan, st.COND_RUNNING)
    assert plan.status.phase == Phase.PENDING
    assert running.reason == st.REASON_POD_CREATION_FAILED
    assert running.message == f"Job llama-a1 cannot create pods: {QUOTA} (1/2 pods created)"
    assert [(e.type, e.reason) for e in plan.events] == [("Warning", "PodCreationFailed")]
    # The cause before a pod's own waiting reason: the user has to act.
    unschedulable = st.observe_attempt(job(), [pod(0, "Pending", unschedulable="no gpu")],
                                       spec(), failed_creates=[failed_create()])
    assert unschedulable.reason == st.REASON_POD_CREATION_FAILED


def test_the_latest_failed_create_is_quoted_capped_and_masked() -> None:
    older = failed_create('Error creating: pods "x" is forbidden: no PriorityClass with name '
                          'gpu-high was found', at=ago(90))
    latest = failed_create("Error creating: admission webhook denied: token=s3cr3tvalue "
                           + "x" * 1000, at=ago(10))
    message = st.pod_creation_failure([latest, older], [])
    assert message is not None and "s3cr3tvalue" not in message and "token=***" in message
    assert message.startswith("Error creating: admission webhook") and message.endswith("…")
    assert len(message) == st.MESSAGE_TAIL + 1
    assert st.pod_creation_failure([older], []) is not None
    assert st.pod_creation_failure([failed_create(reason="SuccessfulCreate")], []) is None


def test_a_failed_create_older_than_a_pod_is_history() -> None:
    """Once pods are created the cause is gone; the index may still lag behind a pod."""
    event = failed_create(at=ago(30))
    assert st.pod_creation_failure([event], [created_at(pod(0), ago(5))]) is None
    state = st.observe_attempt(job(), [created_at(pod(0), ago(5))], spec(),
                               failed_creates=[event])
    assert state.reason == st.REASON_WAITING_FOR_PODS
    # Every rank created: the events no longer matter, whatever their time.
    full = st.observe_attempt(job(), [pod(0), pod(1)], spec(), failed_creates=[failed_create()])
    assert full.reason == st.REASON_ALL_RANKS_RUNNING


def sized_job(uid: str = "job-uid", completions: int = 2, **fields: Any) -> dict[str, Any]:
    obj = job(**fields)
    obj["metadata"]["uid"] = uid
    obj["spec"]["completions"] = completions
    return obj


def pod_of(obj: dict[str, Any], uid: str = "job-uid") -> dict[str, Any]:
    obj["metadata"]["ownerReferences"] = [{"kind": "Job", "uid": uid}]
    return obj


def test_events_are_read_only_while_the_job_is_short_of_pods() -> None:
    short = st.Children([sized_job()], [pod_of(pod(0))])
    assert st.creating_pods(short, "llama-a1") is not None
    assert st.creating_pods(short, "llama-a2") is None  # not the current attempt's Job
    full = st.Children([sized_job()], [pod_of(pod(0)), pod_of(pod(1))])
    assert st.creating_pods(full, "llama-a1") is None
    others = st.Children([sized_job()], [pod_of(pod(0)), pod_of(pod(1), "another-job")])
    assert st.creating_pods(others, "llama-a1") is not None
    terminating = st.Children([sized_job()], [pod_of(pod(0)), pod_of(pod(1, terminating=True))])
    assert st.creating_pods(terminating, "llama-a1") is not None
    for idle in (sized_job(suspend=True), sized_job(condition="Complete"),
                 sized_job(condition="Failed")):
        assert st.creating_pods(st.Children([idle], []), "llama-a1") is None
    assert st.failed_create_selector(sized_job()) == (
        "involvedObject.kind=Job,involvedObject.name=llama-a1,involvedObject.uid=job-uid,"
        "reason=FailedCreate")


def test_a_job_short_of_pods_is_looked_at_again() -> None:
    """A failed pod creation changes no watched object: only a recheck can see its event."""
    short = run(spec(), status(Phase.PENDING), children([job()], [pod(0)]))
    assert short.recheck_after == st.POD_CREATION_RECHECK_SECONDS
    full = run(spec(), status(Phase.PENDING), children([job()], [
        pod(0), pod(1, "Pending", waiting="ContainerCreating")]))
    assert full.recheck_after is None or full.recheck_after > st.POD_CREATION_RECHECK_SECONDS


def test_a_leftover_is_ours_only_if_its_owner_is_our_group_and_kind() -> None:
    """Deleting a leftover matches the owner's API group too: another operator's
    FineTuneJob kind of the same name owns objects the operator must never delete."""
    def owned_by(api_version: str) -> dict[str, Any]:
        return {"metadata": {"ownerReferences": [
            {"apiVersion": api_version, "kind": "FineTuneJob", "name": "llama", "uid": "old"}]}}
    assert st.left_by_namesake(owned_by("kubetune.dev/v1alpha1"), "llama", "new")
    assert not st.left_by_namesake(owned_by("ml.example.com/v1"), "llama", "new")
    assert not st.left_by_namesake(owned_by("kubetune.dev/v1alpha1"), "llama", "old")


def admitted_before_the_job_controller(old_pods: list[dict[str, Any]]) -> st.Children:
    """Kueue unsuspended the Job; the Job controller has not synced it yet: its Suspended
    condition is still True and its startTime is gone (Kueue's ResetStatus on the stop)."""
    unsuspended = kueue_job()
    unsuspended["status"]["conditions"] = [{"type": "Suspended", "status": "True",
                                            "reason": "JobSuspended", "message": ""}]
    return children([unsuspended], old_pods)


def test_a_long_queue_wait_never_becomes_a_scheduling_timeout() -> None:
    # Queued for an hour, schedulingTimeoutSeconds 600: right after the admission the Job has
    # no startTime yet; the attempt's creation is not the pods' start.
    queued_long = status(Phase.PENDING, attempt_start_time=ago(3600))
    plan = run(spec(schedulingTimeoutSeconds=600, backoffLimit=0), queued_long,
               admitted_before_the_job_controller([]))
    assert (plan.status.phase, plan.status.attempt, plan.status.restarts) == \
        (Phase.PENDING, 1, 0)
    running = condition(plan, st.COND_RUNNING)
    assert (running.reason, running.message) == \
        (st.REASON_QUEUED, "unsuspended; waiting for the Job controller to resume it")
    # Resumed without a startTime (any Job that was ever suspended): still no clock.
    resumed = kueue_job()
    resumed["status"]["conditions"] = [{"type": "Suspended", "status": "False",
                                        "reason": "JobResumed", "message": ""}]
    waiting = run(spec(schedulingTimeoutSeconds=600, backoffLimit=0), queued_long,
                  children([resumed], [pod(0, "Pending"), pod(1, "Pending")]))
    assert (waiting.status.phase, waiting.status.restarts) == (Phase.PENDING, 0)
    # A Job never suspended and not synced yet keeps the attempt's creation as its clock.
    late = run(spec(schedulingTimeoutSeconds=600), queued_long,
               children([job()], [pod(0, "Pending"), pod(1, "Pending")]))
    assert condition(late, st.COND_RESTARTING).reason == st.REASON_SCHEDULING_TIMEOUT


def test_a_readmission_while_the_old_pods_terminate_resumes_the_same_attempt() -> None:
    # Kueue frees the quota once status.active is 0: the preempted pods may still be
    # checkpointing (Terminating) when it admits the Job again.
    stopping = [pod(0, terminating=True), pod(1, terminating=True)]
    preempted = status(Phase.PENDING, preemptions=1, active_seconds=100)
    plan = run(spec(backoffLimit=0), preempted, admitted_before_the_job_controller(stopping))
    assert (plan.status.phase, plan.status.attempt) == (Phase.PENDING, 1)
    assert (plan.status.restarts, plan.status.preemptions) == (0, 1)
    assert not plan.delete_jobs and all(e.type == "Normal" for e in plan.events)


def failing_job(type_: str = "FailureTarget") -> dict[str, Any]:
    return job(condition=type_)  # BackoffLimitExceeded: the Job controller's verdict


def test_a_crash_whose_survivors_the_job_controller_deleted_counts_as_a_failure() -> None:
    # Rank 1 crashed; the Job controller set FailureTarget and deleted rank 0, which got
    # SIGTERM and checkpointed (exit 75) or is still terminating: its collateral, not a
    # preemption. Reconciled late, the crash must still be what counts.
    for survivor in (pod(0, terminating=True),
                     pod(0, "Failed", exit_code=contract.EXIT_PREEMPTED, terminating=True)):
        for verdict in ("FailureTarget", "Failed"):
            plan = run(spec(backoffLimit=0), status(Phase.RUNNING),
                       children([failing_job(verdict)],
                                [survivor, pod(1, "Failed", exit_code=137)]))
            assert plan.status.phase == Phase.FAILED, (survivor, verdict)
            failed = condition(plan, st.COND_FAILED)
            assert failed.reason == st.REASON_BACKOFF_LIMIT_EXCEEDED
            assert "rank 1 exited with code 137" in failed.message
            assert plan.status.preemptions == 0
    # Before the verdict reaches us (the Job controller deletes the survivors first, then
    # writes FailureTarget): the same.
    early = run(spec(backoffLimit=0), status(Phase.RUNNING),
                children([job()], [pod(0, terminating=True), pod(1, "Failed", exit_code=1)]))
    assert (early.status.phase, early.status.preemptions) == (Phase.FAILED, 0)
    # A deleted pod alone is a disruption (a drain, a person): not counted.
    alone = run(spec(backoffLimit=0), status(Phase.RUNNING),
                children([job()], [pod(0, terminating=True), pod(1)]))
    assert (alone.status.phase, alone.status.preemptions) == (Phase.RESTARTING, 1)
    # A disruption the pod's status names stays one, whoever deletes the survivors.
    evicted = run(spec(backoffLimit=0), status(Phase.RUNNING),
                  children([failing_job()], [pod(0, "Failed", exit_code=137, evicted=True),
                                             pod(1, "Failed", exit_code=1)]))
    assert (evicted.status.phase, evicted.status.preemptions) == (Phase.RESTARTING, 1)
    assert condition(evicted, st.COND_RESTARTING).reason == st.REASON_EVICTED


def test_a_failure_target_without_pod_failures_waits_for_their_exit_codes() -> None:
    target = failing_job()
    target["status"]["conditions"][0]["lastTransitionTime"] = ago(5)
    plan = run(spec(), status(Phase.RUNNING), children([target], [pod(0), pod(1)]))
    running = condition(plan, st.COND_RUNNING)
    assert (plan.status.phase, running.reason) == (Phase.PENDING, st.REASON_JOB_FAILED_PENDING)
    assert running.message.startswith("the Job failed; waiting for rank(s) 0, 1")


def test_a_node_that_stopped_reporting_is_a_preemption_before_its_taint_eviction() -> None:
    # Current clusters: the node lifecycle controller marks the pod Ready=False; the taint
    # eviction (DisruptionTarget) comes only after the toleration. Rank 0's crash (its peer
    # vanished) is the lost node's collateral, whoever deletes the lost pod meanwhile.
    def lost(terminating: bool) -> dict[str, Any]:
        made = pod(1, terminating=terminating)
        made["status"]["conditions"] = [{"type": "Ready", "status": "False"}]
        return made
    for terminating in (False, True):
        plan = run(spec(backoffLimit=0), status(Phase.RUNNING),
                   children([failing_job()], [pod(0, "Failed", exit_code=1), lost(terminating)]))
        assert (plan.status.phase, plan.status.preemptions) == (Phase.RESTARTING, 1)
        assert condition(plan, st.COND_RESTARTING).reason == st.REASON_NODE_LOST
    ready = pod(1)
    ready["status"]["conditions"] = [{"type": "Ready", "status": "True"}]
    crashed = run(spec(backoffLimit=0), status(Phase.RUNNING),
                  children([failing_job()], [pod(0, "Failed", exit_code=1), ready]))
    assert crashed.status.phase == Phase.FAILED

