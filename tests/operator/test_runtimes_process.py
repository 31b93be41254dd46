"""Runtimes curated by admins, with the real operator process against the emulated API
server (the runtime CRDs registered from crds/, as `kubectl apply -f crds/` does): two
namespaces naming two runtimes get different images and GPU caps; a runtime is pinned by a
job's first attempt; the operator-wide policy stays the floor. Tests play Kueue, the Job
controller and the kubelet (support/operator_process.py)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune_api.crd import RUNTIME_CRD_PATHS
from support.kube_emulator import EmulatorThread
from support.operator_process import (
    FTJ,
    JOBS,
    OperatorCluster,
    OperatorProcess,
    set_pod_state,
    start_job_pods,
)

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
CLUSTER_RUNTIMES = "kubetune.dev/v1alpha1/clusterfinetuneruntimes"
RUNTIMES = "kubetune.dev/v1alpha1/finetuneruntimes"
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
CHILDREN = ("v1/configmaps", "v1/services", JOBS)
# The operator-wide floor: no runtime can give a job more than this.
POLICY = {"maxGpusPerJob": 16}

BIG = {"image": "registry.corp/ml/trainer-big:1", "nodeSelector": {"pool": "h100"},
       "queue": "team-a", "cpu": "8", "memory": "32Gi",
       "policy": {"maxGpusPerJob": 8, "allowedMethods": ["lora", "full"]}}
SMALL = {"image": "registry.corp/ml/trainer-small:1", "nodeSelector": {"pool": "t4"},
         "policy": {"maxGpusPerJob": 2, "allowedStoragePrefixes": ["out/"]}}


def finetunejob(name: str, namespace: str, runtime_ref: dict[str, str], nodes: int,
                gpus: int) -> dict[str, Any]:
    body: dict[str, Any] = yaml.safe_load((ROOT / "examples" / "tiny-lora.yaml").read_text())
    body["metadata"] = {"name": name, "namespace": namespace}
    body["spec"]["resources"] = {"nodes": nodes, "gpusPerNode": gpus}
    body["spec"]["runtimeRef"] = runtime_ref
    return body


def runtime(kind: str, name: str, spec: dict[str, Any],
            namespace: str | None = None) -> dict[str, Any]:
    meta = {"name": name, **({"namespace": namespace} if namespace else {})}
    return {"apiVersion": "kubetune.dev/v1alpha1", "kind": kind, "metadata": meta, "spec": spec}


def pod_spec(job: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = job["spec"]["template"]["spec"]
    return spec


def trainer_image(job: dict[str, Any]) -> str:
    return str(next(c["image"] for c in pod_spec(job)["containers"] if c["name"] == "trainer"))


def failure(cluster: OperatorCluster, name: str) -> dict[str, Any]:
    status = cluster.wait_phase(name, "Failed")
    return dict(next(c for c in status["conditions"] if c["type"] == "Failed"))


@pytest.fixture(scope="module")
def clusters(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, OperatorCluster]]:
    with EmulatorThread() as api:
        api.emulator.declare(FTJ, "FineTuneJob", shortnames=["ftj"])
        for path in RUNTIME_CRD_PATHS.values():
            api.emulator.register_crd(yaml.safe_load(path.read_text()))
        api.create(CLUSTER_RUNTIMES, runtime("ClusterFineTuneRuntime", "big", BIG))
        api.create(RUNTIMES, runtime("FineTuneRuntime", "small", SMALL, "team-b"))
        api.create(CLUSTER_RUNTIMES, runtime("ClusterFineTuneRuntime", "huge", {
            "image": "registry.corp/ml/trainer-big:1", "policy": {"maxGpusPerJob": 64}}))
        with OperatorProcess(api, tmp_path_factory.mktemp("operator"),
                             KUBETUNE_POLICY=json.dumps(POLICY)) as operator:
            yield {ns: OperatorCluster(api, operator, namespace=ns)
                   for ns in ("team-a", "team-b")}


@pytest.fixture
def team_a(clusters: dict[str, OperatorCluster]) -> OperatorCluster:
    return clusters["team-a"]


@pytest.fixture
def team_b(clusters: dict[str, OperatorCluster]) -> OperatorCluster:
    return clusters["team-b"]


def test_two_namespaces_two_runtimes_get_their_images_and_gpu_caps(
        team_a: OperatorCluster, team_b: OperatorCluster) -> None:
    big_ref = {"kind": "ClusterFineTuneRuntime", "name": "big"}
    small_ref = {"kind": "FineTuneRuntime", "name": "small"}
    team_a.api.create(FTJ, finetunejob("a-fits", "team-a", big_ref, nodes=2, gpus=4))
    team_b.api.create(FTJ, finetunejob("b-fits", "team-b", small_ref, nodes=1, gpus=2))

    job_a, job_b = team_a.job("a-fits-a1"), team_b.job("b-fits-a1")
    assert trainer_image(job_a) == "registry.corp/ml/trainer-big:1"
    assert trainer_image(job_b) == "registry.corp/ml/trainer-small:1"
    assert pod_spec(job_a)["nodeSelector"]["pool"] == "h100"
    assert pod_spec(job_b)["nodeSelector"]["pool"] == "t4"
    assert job_a["metadata"]["labels"][QUEUE_LABEL] == "team-a"  # the runtime's queue
    assert QUEUE_LABEL not in job_b["metadata"]["labels"]
    trainer_a = next(c for c in pod_spec(job_a)["containers"] if c["name"] == "trainer")
    assert trainer_a["resources"]["requests"]["cpu"] == "8"  # the runtime's default

    recorded_a = team_a.wait(lambda: team_a.status("a-fits").get("runtime", {}).get("ref"),
                             "status.runtime.ref")
    assert recorded_a == big_ref
    runtime_b = team_b.status("b-fits")["runtime"]
    assert runtime_b["ref"] == small_ref
    assert runtime_b["spec"]["image"] == "registry.corp/ml/trainer-small:1"
    assert runtime_b["uid"] == team_b.api.get(RUNTIMES, "team-b", "small")["metadata"]["uid"]

    # The same 4 GPUs that team-a's runtime allows are over team-b's cap of 2.
    team_b.api.create(FTJ, finetunejob("b-over", "team-b", small_ref, nodes=2, gpus=2))
    failed = failure(team_b, "b-over")
    assert failed["reason"] == "PolicyViolation"
    assert "spec.resources: 2 nodes x 2 GPUs = 4 GPUs (FineTuneRuntime small: " \
           "maxGpusPerJob: 2)" in failed["message"], failed["message"]
    for resource in CHILDREN:
        assert team_b.owned(resource, "b-over") == [], resource
    team_a.api.create(FTJ, finetunejob("a-over", "team-a", big_ref, nodes=2, gpus=8))
    assert "16 GPUs (ClusterFineTuneRuntime big: maxGpusPerJob: 8)" in \
        failure(team_a, "a-over")["message"]


def test_a_namespaced_runtime_serves_only_its_namespace(team_a: OperatorCluster) -> None:
    team_a.api.create(FTJ, finetunejob("borrower", "team-a",
                                       {"kind": "FineTuneRuntime", "name": "small"}, 1, 1))
    failed = failure(team_a, "borrower")
    assert failed["reason"] == "RuntimeNotFound"
    assert failed["message"] == ("spec.runtimeRef: FineTuneRuntime small not found in "
                                 "namespace team-a")
    for resource in CHILDREN:
        assert team_a.owned(resource, "borrower") == [], resource


def test_the_operator_wide_policy_stays_the_floor(team_a: OperatorCluster) -> None:
    team_a.api.create(FTJ, finetunejob("greedy", "team-a",
                                       {"kind": "ClusterFineTuneRuntime", "name": "huge"}, 4, 8))
    failed = failure(team_a, "greedy")
    assert failed["reason"] == "PolicyViolation"
    assert "4 nodes x 8 GPUs = 32 GPUs (maxGpusPerJob: 16)" in failed["message"]


def test_a_later_attempt_keeps_the_runtime_its_first_attempt_resolved(
        team_b: OperatorCluster) -> None:
    team_b.api.create(RUNTIMES, runtime("FineTuneRuntime", "pinned-rt", SMALL, "team-b"))
    team_b.api.create(FTJ, finetunejob("pinned", "team-b",
                                       {"kind": "FineTuneRuntime", "name": "pinned-rt"}, 1, 1))
    first = team_b.job("pinned-a1")
    team_b.wait(lambda: team_b.status("pinned").get("runtime", {}).get("ref"), "recorded")
    # The admin moves the runtime on, then deletes it: the started job keeps what it got.
    team_b.api.patch(RUNTIMES, "team-b", "pinned-rt",
                     {"spec": {"image": "registry.corp/ml/trainer-small:2"}})
    team_b.api.delete(RUNTIMES, "team-b", "pinned-rt")
    start_job_pods(team_b.api, first)
    team_b.wait_phase("pinned", "Running")
    set_pod_state(team_b.api, "team-b", "pinned-a1-0", "Failed", exit_code=1, message="NCCL")
    second = team_b.job("pinned-a2")
    assert trainer_image(second) == "registry.corp/ml/trainer-small:1"
    assert pod_spec(second)["nodeSelector"]["pool"] == "t4"
    assert team_b.status("pinned")["runtime"]["spec"]["image"] == \
        "registry.corp/ml/trainer-small:1"


def test_a_job_relabelled_to_another_queue_fails_before_its_next_attempt(
        team_a: OperatorCluster) -> None:
    team_a.api.create(FTJ, finetunejob("relabel", "team-a",
                                       {"kind": "ClusterFineTuneRuntime", "name": "big"}, 1, 1))
    first = team_a.job("relabel-a1")
    team_a.api.patch(JOBS, "team-a", "relabel-a1", {"spec": {"suspend": False}})  # Kueue
    start_job_pods(team_a.api, first)
    team_a.wait_phase("relabel", "Running")
    team_a.api.patch(FTJ, "team-a", "relabel", {"metadata": {"labels": {QUEUE_LABEL: "gold"}}})
    set_pod_state(team_a.api, "team-a", "relabel-a1-0", "Failed", exit_code=1, message="NCCL")
    failed = failure(team_a, "relabel")
    assert failed["reason"] == "PolicyViolation"
    assert "gold differs from the runtime's team-a (ClusterFineTuneRuntime big: queue is set " \
           "by the runtime)" in failed["message"], failed["message"]
    assert team_a.api.get(JOBS, "team-a", "relabel-a2") is None
