"""The operator's indexes keep slim pods and Jobs (slim.py): the status logic must decide
exactly as on whole bodies, with a fraction of the memory."""

from __future__ import annotations

import copy
import datetime
import json
import types
from typing import Any

import kopf
import pytest

from kubetune_api.crd import Phase
from kubetune_operator import builders, handlers, main, slim
from kubetune_operator import status as st
from kubetune_operator.builders import LABEL_JOB, Owner
from kubetune_operator.handlers import pod_unread
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
    assert thin_pod["metadata"]["labels"] == {
        k: v for k, v in pod["metadata"]["labels"].items() if k in slim.KEPT_LABELS}
    assert thin_pod["metadata"]["annotations"] == {
        builders.ANNOTATION_COMPLETION_INDEX: "0"}
    assert thin_pod["status"] == pod["status"]
    assert "template" not in thin_job["spec"] and thin_job["spec"]["completions"] == 2
    assert "managedFields" not in thin_job["metadata"] and "managedFields" in job["metadata"]
    assert len(json.dumps(thin_pod)) < len(json.dumps(pod)) / 3


# What a kubelet writes besides what the status logic reads: more containers (a sidecar first),
# timestamps, ids, readiness conditions. Finished pods keep only the fields slim.py names.
KUBELET_CONDITIONS = [
    {"type": t, "status": "True" if t != "Ready" else "False",
     "lastTransitionTime": "2026-01-01T00:00:00Z"}
    for t in ("PodReadyToStartContainers", "Initialized", "Ready", "ContainersReady")]
NOW = datetime.datetime(2026, 1, 1, 0, 10, tzinfo=datetime.UTC)


def kubelet_pod(job: dict[str, Any], rank: int, phase: str, terminated: dict[str, Any] | None,
                attempt: int = 1, conditions: list[dict[str, Any]] | None = None,
                deleting: bool = False, **status: Any) -> dict[str, Any]:
    state = {"terminated": {"containerID": "containerd://abc", "startedAt": "2026-01-01T00:00:00Z",
                            "finishedAt": "2026-01-01T00:05:00Z", **terminated}} \
        if terminated is not None else RUNNING
    pod = pod_body(job, rank, state, phase, **status)
    pod["metadata"]["labels"][builders.LABEL_ATTEMPT] = str(attempt)
    pod["metadata"]["creationTimestamp"] = "2026-01-01T00:00:00Z"
    if deleting:
        pod["metadata"]["deletionTimestamp"] = "2026-01-01T00:06:00Z"
    pod["status"].update(hostIP="192.168.0.1", qosClass="Burstable",
                         startTime="2026-01-01T00:00:00Z",
                         conditions=[*KUBELET_CONDITIONS, *(conditions or [])])
    pod["status"]["containerStatuses"][0].update(image="trainer:1", imageID="sha256:1",
                                                 containerID="containerd://abc", started=False)
    pod["status"]["containerStatuses"].insert(0, {"name": "proxy", "state": {"terminated": {
        "exitCode": 0}}, "image": "proxy:1"})
    return pod


SUMMARY = json.dumps({"uri": "s3://bucket/out", "manifestSha256": "f00d"})
FINISHED = {
    "all-succeeded": (1, None, [("Succeeded", {"exitCode": 0, "message": SUMMARY}, {}),
                                ("Succeeded", {"exitCode": 0}, {})]),
    "one-succeeded-one-running": (1, None, [("Succeeded", {"exitCode": 0, "message": SUMMARY},
                                             {}), ("Running", None, {})]),
    "oom": (1, None, [("Failed", {"exitCode": 137, "reason": "OOMKilled"}, {}),
                      ("Running", None, {})]),
    "permanent": (1, None, [("Failed", {"exitCode": 2, "message": "bad config"}, {}),
                            ("Failed", {"exitCode": 143, "message": "SIGTERM"}, {})]),
    "disrupted": (1, None, [("Failed", {"exitCode": 143}, {"conditions": [
        {"type": "DisruptionTarget", "status": "True", "reason": "PreemptionByScheduler",
         "message": "preempted"}]}), ("Running", None, {})]),
    "evicted": (1, None, [("Failed", None, {"reason": "Evicted", "message": "disk"}),
                          ("Running", None, {})]),
    "deleted-succeeded": (1, None, [("Succeeded", {"exitCode": 0}, {"deleting": True}),
                                    ("Running", None, {})]),
    # Attempt 2 runs; attempt 1's pods (a permanent exit among them) are stale.
    "stale-attempt": (2, None, [("Failed", {"exitCode": 2, "message": "bad"}, {"attempt": 1}),
                                ("Failed", {"exitCode": 1}, {"attempt": 1, "deleting": True})]),
    "finished-job": (1, Phase.SUCCEEDED, [("Succeeded", {"exitCode": 0, "message": SUMMARY},
                                          {}), ("Succeeded", {"exitCode": 0}, {})]),
}


def _pods(job: dict[str, Any], states: list[Any]) -> list[dict[str, Any]]:
    pods = []
    for rank, (phase, terminated, extra) in enumerate(states):
        extra = dict(extra)
        pods.append(kubelet_pod(job, rank, phase, terminated, attempt=extra.pop("attempt", 1),
                                deleting=extra.pop("deleting", False), **extra))
    return pods


@pytest.mark.parametrize("scenario", FINISHED)
def test_the_planner_decides_the_same_with_finished_pods_compacted(scenario: str) -> None:
    attempt, phase, states = FINISHED[scenario]
    job = job_body()
    job["metadata"]["ownerReferences"] = [{"kind": "FineTuneJob", "name": OWNER.name,
                                           "uid": OWNER.uid}]
    job["metadata"]["name"] = builders.attempt_job_name(OWNER.name, attempt)
    pods = _pods(job, states)
    raw = {"attempt": attempt, "phase": phase,
           "startTime": "2026-01-01T00:00:00Z", "attemptStartTime": "2026-01-01T00:00:00Z"}

    def decide(jobs: list[Any], pods: list[Any]) -> st.Plan:
        children = st.owned_children(jobs, pods, OWNER.uid, OWNER.name)
        return st.plan(OWNER.name, SPEC, 1, st.parse_status(raw), children, NOW)

    full = decide(copy.deepcopy([job]), copy.deepcopy(pods))
    thin = decide([slim.job(job)], [slim.pod(p) for p in pods])
    assert thin == full
    finished = [slim.pod(p) for p in pods if p["status"]["phase"] != "Running"]
    assert all("spec" not in p and "containerID" not in json.dumps(p) for p in finished)


def test_a_finished_pod_keeps_only_what_the_status_logic_reads() -> None:
    pod = kubelet_pod(job_body(), 0, "Succeeded", {"exitCode": 0, "message": SUMMARY})
    thin = slim.pod(pod)
    assert thin["status"]["containerStatuses"] == [
        {"name": "trainer", "state": {"terminated": {"exitCode": 0, "message": SUMMARY}}}]
    assert thin["status"]["podIP"] == pod["status"]["podIP"]
    assert "conditions" not in thin["status"]  # only the conditions that explain a failure
    assert set(thin["metadata"]["annotations"]) == {builders.ANNOTATION_COMPLETION_INDEX}
    assert st.pod_rank(thin) == 0 and st.pod_attempt(thin) == 1
    assert st.success_output([thin], SPEC) == st.success_output([pod], SPEC)
    assert len(json.dumps(thin)) < len(json.dumps(slim.pod(
        kubelet_pod(job_body(), 0, "Running", None)))) * 0.7


@pytest.mark.parametrize(("pod_phase", "owners", "dropped"), [
    ("Succeeded", [Phase.SUCCEEDED], True),
    ("Failed", [Phase.FAILED], True),
    ("Succeeded", [Phase.RUNNING], False),  # the running attempt reads its finished pods
    ("Running", [Phase.FAILED], False),  # still running: the operator must see it go
    ("Succeeded", [], False),  # owner not indexed yet (start-up listing order)
    ("Succeeded", [Phase.SUCCEEDED, None], False),  # a re-created FineTuneJob of that name
])
def test_finished_pods_of_finished_finetunejobs_leave_the_index(
        pod_phase: str, owners: list[Any], dropped: bool) -> None:
    pod = {"metadata": {"name": "p"}, "status": {"phase": pod_phase}}
    assert pod_unread(pod, [{"name": "tiny-lora", "phase": p} for p in owners]) is dropped


def test_only_trainer_objects_are_watched_and_idle_workers_go_quickly() -> None:
    reconciler = types.SimpleNamespace(api=None, reconcile_soon=lambda *args: None)
    informers = handlers.trainer_informers(reconciler, Settings(), {})  # type: ignore[arg-type]
    assert [i.selector for i in informers] == [LABEL_JOB, LABEL_JOB]  # test_informer.py
    settings = kopf.OperatorSettings()
    main.configure_kopf(settings)
    assert settings.watching.chunk_size == main.LIST_PAGE_SIZE
    # An idle per-object worker holds its object's last whole body (kopf's queueing.worker):
    # with thousands of pods changing, kopf's 5 s default keeps thousands of them alive.
    assert settings.queueing.idle_timeout == main.WORKER_IDLE_SECONDS < 5.0


BIG = "x" * 250_000  # a tenant's annotation, as large as the API lets one be


def test_a_running_pod_keeps_no_tenant_metadata() -> None:
    """A tenant who labels or annotates pods cannot grow the shared operator's index."""
    pod = pod_body(job_body(), 0, RUNNING, "Running")
    pod["metadata"]["annotations"]["example.com/blob"] = BIG
    pod["metadata"]["labels"].update({f"team.example.com/l{i}": "v" * 63 for i in range(100)})
    thin = slim.pod(pod)
    assert set(thin["metadata"]["annotations"]) == {builders.ANNOTATION_COMPLETION_INDEX}
    assert set(thin["metadata"]["labels"]) <= set(slim.KEPT_LABELS)
    assert len(json.dumps(thin)) < 4000
    assert st.pod_rank(thin) == 0 and st.pod_attempt(thin) == 1


def test_labelled_pods_no_job_owns_stay_out_of_the_index() -> None:
    """Only pods a Job controls are indexed: a foreign pod that carries the
    kubetune.dev/finetunejob label (anyone may set it) is not the operator's business."""
    job = job_body()
    ours = pod_body(job, 0, RUNNING, "Running")
    foreign = copy.deepcopy(ours)
    foreign["metadata"]["ownerReferences"] = []
    foreign["metadata"]["annotations"]["example.com/blob"] = BIG
    replicaset = copy.deepcopy(foreign)
    replicaset["metadata"]["ownerReferences"] = [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                                                  "name": "x", "uid": "u", "controller": True}]
    assert slim.indexed(ours) and not slim.indexed(foreign) and not slim.indexed(replicaset)


def test_a_job_keeps_only_the_metadata_the_planner_reads_and_foreign_ones_stay_out() -> None:
    job = job_body()
    job["metadata"]["annotations"] = {"example.com/blob": BIG,
                                      builders.ANNOTATION_SUSPENDED_BY_OPERATOR: "true"}
    thin = slim.job(job)
    assert thin["metadata"]["annotations"] == {builders.ANNOTATION_SUSPENDED_BY_OPERATOR: "true"}
    assert len(json.dumps(thin)) < 4000 and slim.indexed_job(job)
    foreign = copy.deepcopy(job)
    foreign["metadata"]["ownerReferences"] = []
    assert not slim.indexed_job(foreign)


def test_the_informers_keep_only_controlled_children() -> None:
    """What the operator's informers keep (handlers.trainer_informers): a foreign labelled pod
    or Job is not kept."""
    job = job_body()
    pod = pod_body(job, 0, RUNNING, "Running")
    foreign_pod, foreign_job = copy.deepcopy(pod), copy.deepcopy(job)
    foreign_pod["metadata"]["ownerReferences"] = []
    foreign_job["metadata"]["ownerReferences"] = []
    reconciler = types.SimpleNamespace(api=None, reconcile_soon=lambda *args: None)
    pods, jobs = handlers.trainer_informers(reconciler, Settings(), {})  # type: ignore[arg-type]
    assert pods.keep(pod) == slim.pod(pod) and jobs.keep(job) == slim.job(job)
    assert pods.keep(foreign_pod) is None and jobs.keep(foreign_job) is None
