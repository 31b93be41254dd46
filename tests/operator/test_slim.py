"""The operator's indexes keep slim pods and Jobs (slim.py): the status logic must decide
exactly as on whole bodies, with a fraction of the memory."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from kubetune_operator import builders, slim
from kubetune_operator import status as st
from kubetune_operator.builders import Owner
from kubetune_operator.settings import Settings
from support.jobs import example_job
from support.operator_process import job_pod

SPEC = example_job("tiny-lora", "s3://bucket/out", resources={"nodes": 2}).spec
JOB = example_job("tiny-lora", "s3://bucket/out", resources={"nodes": 2})
OWNER = Owner("tiny-lora", "ml", "uid-1", {})
MANAGED = [{"manager": "kube-controller-manager", "operation": "Update",
            "fieldsV1": {"f:status": {"f:phase": {}}}}]


def job_body(suspend: bool = False, failed: bool = False) -> dict[str, Any]:
    body = builders.build_job(JOB, OWNER, 1, Settings())
    body["metadata"].update(uid="job-uid", managedFields=MANAGED)
    body["spec"]["suspend"] = suspend
    if failed:
        body["status"] = {"conditions": [{"type": "Failed", "status": "True",
                                          "reason": "BackoffLimitExceeded"}]}
    return body


def pod_body(job: dict[str, Any], rank: int, state: dict[str, Any], phase: str,
             **status: Any) -> dict[str, Any]:
    pod = job_pod(job, rank)
    pod["metadata"].update(uid=f"pod-{rank}", managedFields=MANAGED)
    pod["status"] = {"phase": phase, "podIP": f"10.0.0.{rank}", "containerStatuses": [
        {"name": "trainer", "state": state, "ready": phase == "Running"}], **status}
    return pod


RUNNING = {"running": {"startedAt": "2026-01-01T00:00:00Z"}}
SCENARIOS = {
    "running": (job_body(), [("Running", RUNNING, {}), ("Running", RUNNING, {})]),
    "image-pull": (job_body(), [("Pending", {"waiting": {"reason": "ImagePullBackOff",
                                                         "message": "denied"}}, {}),
                                ("Running", RUNNING, {})]),
    "unschedulable": (job_body(), [("Pending", {}, {"conditions": [
        {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
         "message": "0/4 nodes: insufficient nvidia.com/gpu"}]}), ("Running", RUNNING, {})]),
    "rank-failed": (job_body(), [("Running", RUNNING, {}), ("Failed", {"terminated": {
        "exitCode": 1, "reason": "Error", "message": "CUDA error"}}, {})]),
    "permanent": (job_body(), [("Failed", {"terminated": {"exitCode": 2, "message": "bad"}},
                                {}), ("Running", RUNNING, {})]),
    "evicted": (job_body(), [("Failed", {}, {"reason": "Evicted", "message": "disk"}),
                             ("Running", RUNNING, {})]),
    "succeeded": (job_body(), [("Succeeded", {"terminated": {"exitCode": 0, "message": json.dumps(
        {"uri": "s3://bucket/out", "manifestSha256": "f00d"})}}, {}),
        ("Succeeded", {"terminated": {"exitCode": 0}}, {})]),
    "suspended": (job_body(suspend=True), [("Running", RUNNING, {})]),
    "job-failed": (job_body(failed=True), []),
}


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_status_logic_decides_the_same_on_slim_bodies(scenario: str) -> None:
    job, states = SCENARIOS[scenario]
    pods = [pod_body(job, rank, state, phase, **extra)
            for rank, (phase, state, extra) in enumerate(states)]
    full = st.observe_attempt(copy.deepcopy(job), copy.deepcopy(pods), SPEC)
    thin = st.observe_attempt(slim.job(job), [slim.pod(p) for p in pods], SPEC)
    assert thin == full
    children_full = st.Children([job], pods)
    children_thin = st.Children([slim.job(job)], [slim.pod(p) for p in pods])
    assert [st.pod_rank(p) for p in children_thin.pods_of(1)] == \
        [st.pod_rank(p) for p in children_full.pods_of(1)]


def test_slim_bodies_drop_the_pod_spec_template_and_managed_fields() -> None:
    job = job_body()
    pod = pod_body(job, 0, RUNNING, "Running")
    thin_pod, thin_job = slim.pod(pod), slim.job(job)
    assert "spec" not in thin_pod and "managedFields" not in thin_pod["metadata"]
    assert thin_pod["metadata"]["labels"] == pod["metadata"]["labels"]
    assert thin_pod["metadata"]["annotations"] == pod["metadata"]["annotations"]
    assert thin_pod["status"] == pod["status"]
    assert "template" not in thin_job["spec"] and thin_job["spec"]["completions"] == 2
    assert "managedFields" not in thin_job["metadata"] and "managedFields" in job["metadata"]
    assert len(json.dumps(thin_pod)) < len(json.dumps(pod)) / 3
