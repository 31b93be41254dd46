"""The e2e harness's Job controller (tests/support/pod_runner.py): its Job status, as pure
functions, for what the fault table's Kueue scenarios rely on (suspend, resume, startTime)."""

from __future__ import annotations

from typing import Any

from support.pod_runner import job_status


def indexed_job(suspend: bool, status: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"metadata": {"name": "j", "namespace": "default", "uid": "u"},
            "spec": {"completionMode": "Indexed", "completions": 2, "backoffLimit": 0,
                     "suspend": suspend}, "status": status or {}}


def pod(index: int, phase: str | None, deleting: bool = False) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": f"j-{index}", "annotations": {
        "batch.kubernetes.io/job-completion-index": str(index)}}
    if deleting:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    return {"metadata": meta, "status": {"phase": phase} if phase else {}}


def test_a_suspended_jobs_stopped_pods_are_not_failures() -> None:
    status = job_status(indexed_job(True, {"startTime": "2026-01-01T00:00:00Z"}),
                        [pod(0, "Failed", deleting=True), pod(1, "Running", deleting=True)])
    assert status.get("failed") is None and status.get("active") is None
    (suspended,) = status["conditions"]
    assert (suspended["type"], suspended["status"], suspended["reason"]) == \
        ("Suspended", "True", "JobSuspended")
    assert status["startTime"] == "2026-01-01T00:00:00Z"  # kept while suspended


def test_a_resume_flips_suspended_and_restarts_the_clock() -> None:
    suspended = job_status(indexed_job(True, {"startTime": "2026-01-01T00:00:00Z"}), [])
    resumed = job_status(indexed_job(False, suspended), [pod(0, None), pod(1, None)])
    (condition,) = resumed["conditions"]
    assert (condition["status"], condition["reason"]) == ("False", "JobResumed")
    assert resumed["startTime"] != "2026-01-01T00:00:00Z" and resumed["active"] == 2
    again = job_status(indexed_job(False, resumed), [pod(0, "Running"), pod(1, "Running")])
    assert again["startTime"] == resumed["startTime"]  # reset once, at the resume
    assert again["conditions"][0]["lastTransitionTime"] == condition["lastTransitionTime"]


def test_a_job_never_suspended_has_no_suspended_condition() -> None:
    status = job_status(indexed_job(False), [pod(0, "Succeeded"), pod(1, "Succeeded")])
    assert [c["type"] for c in status["conditions"]] == ["Complete"]


def test_the_clock_starts_at_the_first_sync_that_is_not_suspended() -> None:
    # syncJob: "Job first start. Set StartTime only if the job is not in the suspended state."
    assert "startTime" not in job_status(indexed_job(True), [])
    assert job_status(indexed_job(False), [pod(0, None), pod(1, None)])["startTime"]
    # Kueue cleared it on a preemption: a resume writes it again.
    cleared = job_status(indexed_job(True), [])
    assert job_status(indexed_job(False, cleared), [])["startTime"]


def test_a_failed_job_is_a_failure_target_until_its_survivors_are_gone() -> None:
    # syncJob: FailureTarget, deleteActivePods, Failed once no pod is left terminating.
    crashed = job_status(indexed_job(False), [pod(0, "Running"), pod(1, "Failed")])
    assert [c["type"] for c in crashed["conditions"]] == ["FailureTarget"]
    assert crashed["conditions"][0]["reason"] == "BackoffLimitExceeded"
    terminating = job_status(indexed_job(False, crashed),
                             [pod(0, "Running", deleting=True), pod(1, "Failed")])
    assert [c["type"] for c in terminating["conditions"]] == ["FailureTarget"]
    gone = job_status(indexed_job(False, terminating), [pod(1, "Failed")])
    assert [c["type"] for c in gone["conditions"]] == ["FailureTarget", "Failed"]
    assert gone["conditions"][0]["lastTransitionTime"] == crashed["conditions"][0][
        "lastTransitionTime"]
