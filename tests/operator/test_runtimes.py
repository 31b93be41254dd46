"""Curated runtimes (runtimes.py): resolving spec.runtimeRef, the merge's precedence and the
runtime's policy, without a cluster."""

from __future__ import annotations

from typing import Any

import pytest

from kubetune_api.crd import Runtime
from kubetune_api.load import validate_job
from kubetune_api.spec import FineTuneJob, RuntimeRef
from kubetune_operator import runtimes
from kubetune_operator.runtimes import RuntimeUnusable, merge, queue_labels, resolve

GPU_TAINT = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
SPOT_TAINT = {"key": "spot", "operator": "Exists", "effect": "NoSchedule"}
AFFINITY = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
    "nodeSelectorTerms": [{"matchExpressions": [
        {"key": "zone", "operator": "In", "values": ["a"]}]}]}}}
REF = RuntimeRef(kind="ClusterFineTuneRuntime", name="team-a")
FULL_RUNTIME: dict[str, Any] = {
    "image": "registry.corp/ml/trainer:2", "imagePullSecrets": ["corp-pull"],
    "cpu": "6", "memory": "24Gi", "nodeSelector": {"pool": "a100"},
    "tolerations": [GPU_TAINT, SPOT_TAINT], "affinity": AFFINITY,
    "schedulerName": "volcano", "priorityClassName": "team-a", "queue": "team-a",
    "labels": {"cost-center": "a"}, "annotations": {"k8s.v1.cni.cncf.io/networks": "rdma"},
    "env": {"NCCL_IB_HCA": "mlx5"},
    "policy": {"allowedMethods": ["lora", "qlora"], "maxGpusPerJob": 8,
               "allowedStoragePrefixes": ["s3://team-a/"]}}


def job(pod: dict[str, Any] | None = None, method: str = "lora", nodes: int = 1,
        gpus: int = 1, output: str = "s3://team-a/out",
        checkpoint: str | None = None) -> FineTuneJob:
    spec: dict[str, Any] = {
        "model": {"name": "tiny://llama"}, "method": {"type": method},
        "dataset": {"train": "data.jsonl"}, "output": {"uri": output},
        "resources": {"nodes": nodes, "gpusPerNode": gpus}, "pod": pod or {},
        "runtimeRef": {"name": "team-a"}}
    if checkpoint:
        spec["checkpoint"] = {"uri": checkpoint}
    return validate_job({"metadata": {"name": "j", "namespace": "ml"}, "spec": spec})


def runtime(spec: dict[str, Any], ref: RuntimeRef = REF) -> runtimes.Resolved:
    return resolve(ref, "ml", {"metadata": {"uid": "u-1", "generation": 3}, "spec": spec})


def test_the_runtime_fills_an_empty_pod_section() -> None:
    merged, problems = merge(job(), runtime(FULL_RUNTIME))
    assert problems == []
    pod = merged.spec.pod
    assert (pod.image, pod.cpu, pod.memory) == ("registry.corp/ml/trainer:2", "6", "24Gi")
    assert pod.node_selector == {"pool": "a100"}
    assert pod.tolerations == [GPU_TAINT, SPOT_TAINT]
    assert pod.affinity == AFFINITY
    assert (pod.scheduler_name, pod.priority_class_name) == ("volcano", "team-a")
    assert pod.image_pull_secrets == ["corp-pull"]
    assert pod.labels == {"cost-center": "a"}
    assert pod.annotations == {"k8s.v1.cni.cncf.io/networks": "rdma"}
    assert pod.env == {"NCCL_IB_HCA": "mlx5"}


def test_the_job_narrows_adds_and_overrides_defaults() -> None:
    pod = {"image": "registry.corp/ml/trainer:2", "cpu": "2", "memory": "8Gi",
           "nodeSelector": {"pool": "a100", "zone": "a"}, "tolerations": [GPU_TAINT],
           "imagePullSecrets": ["mine"], "labels": {"team-user": "bob"},
           "env": {"NCCL_IB_HCA": "mlx5", "MY_FLAG": "1"}}
    merged, problems = merge(job(pod), runtime(FULL_RUNTIME))
    assert problems == []
    out = merged.spec.pod
    assert (out.cpu, out.memory) == ("2", "8Gi")  # defaults, the job's win
    assert out.node_selector == {"pool": "a100", "zone": "a"}
    assert out.tolerations == [GPU_TAINT]  # picked from the runtime's
    assert out.image_pull_secrets == ["corp-pull", "mine"]
    assert out.labels == {"cost-center": "a", "team-user": "bob"}
    assert out.env == {"NCCL_IB_HCA": "mlx5", "MY_FLAG": "1"}


@pytest.mark.parametrize(("pod", "expected"), [
    ({"image": "docker.io/me/trainer:1"},
     "spec.pod.image: docker.io/me/trainer:1 differs from the runtime's "
     "registry.corp/ml/trainer:2 (ClusterFineTuneRuntime team-a: image is set by the runtime)"),
    ({"schedulerName": "default-scheduler"},
     "spec.pod.schedulerName: default-scheduler differs from the runtime's volcano"),
    ({"priorityClassName": "urgent"},
     "spec.pod.priorityClassName: urgent differs from the runtime's team-a"),
    ({"affinity": {"podAffinity": {}}}, "spec.pod.affinity: {\"podAffinity\": {}} differs"),
    ({"nodeSelector": {"pool": "h100"}},
     "spec.pod.nodeSelector.pool: h100 differs from the runtime's a100"),
    ({"labels": {"cost-center": "b"}}, "spec.pod.labels.cost-center: b differs"),
    ({"annotations": {"k8s.v1.cni.cncf.io/networks": "none"}},
     "spec.pod.annotations.k8s.v1.cni.cncf.io/networks: none differs"),
    ({"env": {"NCCL_IB_HCA": "mlx4"}}, "spec.pod.env.NCCL_IB_HCA: mlx4 differs"),
    ({"tolerations": [{"key": "x", "operator": "Exists"}]},
     "spec.pod.tolerations[0]: {\"key\": \"x\", \"operator\": \"Exists\"} is not one of the "
     "runtime's (ClusterFineTuneRuntime team-a: tolerations:"),
])
def test_the_job_may_not_widen_or_change_what_the_runtime_sets(pod: dict[str, Any],
                                                                 expected: str) -> None:
    _, problems = merge(job(pod), runtime(FULL_RUNTIME))
    assert len(problems) == 1 and problems[0].startswith(expected), problems


def test_a_runtime_field_left_out_constrains_nothing() -> None:
    pod = {"image": "docker.io/me/trainer:1", "schedulerName": "default-scheduler",
           "tolerations": [SPOT_TAINT], "affinity": AFFINITY, "nodeSelector": {"pool": "x"}}
    merged, problems = merge(job(pod, method="full", nodes=64, gpus=8,
                                 output="gs://anywhere/out"), runtime({}))
    assert problems == []
    assert merged.spec.pod == job(pod).spec.pod


@pytest.mark.parametrize(("kwargs", "expected"), [
    ({"method": "full"}, "spec.method.type: full is not allowed (ClusterFineTuneRuntime "
     "team-a: allowedMethods: lora, qlora)"),
    ({"nodes": 2, "gpus": 8}, "spec.resources: 2 nodes x 8 GPUs = 16 GPUs "
     "(ClusterFineTuneRuntime team-a: maxGpusPerJob: 8)"),
    ({"output": "s3://team-b/out"}, "spec.output.uri: s3://team-b/out is not allowed "
     "(ClusterFineTuneRuntime team-a: allowedStoragePrefixes: s3://team-a/)"),
    ({"checkpoint": "s3://scratch/ckpt"}, "spec.checkpoint.uri: s3://scratch/ckpt is not "
     "allowed (ClusterFineTuneRuntime team-a: allowedStoragePrefixes: s3://team-a/)"),
])
def test_the_runtimes_policy_names_the_broken_rule(kwargs: dict[str, Any],
                                                    expected: str) -> None:
    _, problems = merge(job(**kwargs), runtime(FULL_RUNTIME))
    assert problems == [expected]


def test_the_gpu_cap_allows_exactly_the_cap() -> None:
    _, problems = merge(job(nodes=2, gpus=4), runtime(FULL_RUNTIME))
    assert problems == []
    _, problems = merge(job(nodes=1, gpus=1), runtime({"policy": {"maxGpusPerJob": 0}}))
    assert problems == ["spec.resources: 1 nodes x 1 GPUs = 1 GPUs (ClusterFineTuneRuntime "
                        "team-a: maxGpusPerJob: 0)"]


def test_the_runtimes_queue_is_the_jobs_unless_it_names_another() -> None:
    curated = runtime({"queue": "team-a"})
    assert queue_labels({"app": "x"}, curated) == (
        {"app": "x", "kueue.x-k8s.io/queue-name": "team-a"}, [])
    same = {"kueue.x-k8s.io/queue-name": "team-a"}
    assert queue_labels(same, curated) == (same, [])
    _, problems = queue_labels({"kueue.x-k8s.io/queue-name": "gold"}, curated)
    assert problems == ["metadata.labels[kueue.x-k8s.io/queue-name]: gold differs from the "
                        "runtime's team-a (ClusterFineTuneRuntime team-a: queue is set by "
                        "the runtime)"]
    assert queue_labels(same, runtime({})) == (same, [])


def test_a_missing_or_malformed_runtime_is_unusable_and_says_which() -> None:
    with pytest.raises(RuntimeUnusable) as missing:
        resolve(RuntimeRef(kind="FineTuneRuntime", name="small"), "team-b", None)
    assert missing.value.reason == "RuntimeNotFound"
    assert str(missing.value) == ("spec.runtimeRef: FineTuneRuntime small not found in "
                                  "namespace team-b")
    with pytest.raises(RuntimeUnusable) as bad:
        resolve(REF, "ml", {"spec": {"policy": {"maxGpusPerJob": -1}}})
    assert bad.value.reason == "InvalidRuntime"
    assert "ClusterFineTuneRuntime team-a: spec.policy.maxGpusPerJob" in str(bad.value)
    # A runtime that breaks the job contract (a reserved variable) is refused naming it.
    with pytest.raises(RuntimeUnusable) as breaks_contract:
        merge(job(), runtime({"env": {"KUBETUNE_CONFIG": "x"}}))
    assert breaks_contract.value.reason == "InvalidRuntime"
    assert str(breaks_contract.value).startswith("ClusterFineTuneRuntime team-a")
    assert "env.KUBETUNE_CONFIG: reserved" in str(breaks_contract.value)


def test_namespaced_runtimes_are_read_in_the_jobs_namespace_only() -> None:
    assert runtimes.resource("FineTuneRuntime").path("team-b", "small") == \
        "/apis/kubetune.dev/v1alpha1/namespaces/team-b/finetuneruntimes/small"
    assert runtimes.resource("ClusterFineTuneRuntime").path("team-b", "team-a") == \
        "/apis/kubetune.dev/v1alpha1/clusterfinetuneruntimes/team-a"


def test_status_records_the_runtime_and_later_attempts_reuse_it() -> None:
    curated = runtime(FULL_RUNTIME)
    recorded = runtimes.record(Runtime(trainer_image="op:1", termination_grace_seconds=30),
                               curated)
    assert recorded.ref == REF and (recorded.uid, recorded.generation) == ("u-1", 3)
    assert recorded.spec is not None and recorded.spec["image"] == "registry.corp/ml/trainer:2"
    # Round trip through the status as the API server stores it.
    stored = Runtime.model_validate(recorded.model_dump(by_alias=True, mode="json"))
    assert runtimes.pinned(REF, stored) == curated
    assert runtimes.pinned(RuntimeRef(name="other"), stored) is None
    assert runtimes.pinned(REF, None) is None


def test_a_runtimes_service_account_runs_the_pods_without_a_storage_secret() -> None:
    """Workload identity per team: the runtime names a ServiceAccount (IRSA / GKE annotations
    live on it); every attempt's pods run as it, and a job without a storage Secret gets no
    credentials volume and no token mount from the operator."""
    from kubetune_operator.builders import Owner, build_pod_spec
    from kubetune_operator.reconciler import pinned
    from kubetune_operator.settings import Settings

    curated = runtime({**FULL_RUNTIME, "serviceAccountName": "team-a-irsa"})
    settings = Settings(service_account="kubetune-trainer")
    recorded = runtimes.record(Runtime(trainer_image="op:1", termination_grace_seconds=30,
                                       service_account="kubetune-trainer"), curated)
    stored = Runtime.model_validate(recorded.model_dump(by_alias=True, mode="json"))
    merged, problems = merge(job(), curated)
    assert problems == []
    owner = Owner("j", "ml", "uid-1", {})
    pod = build_pod_spec(merged, owner, 2, pinned(settings, stored))
    assert pod["serviceAccountName"] == "team-a-irsa"
    assert pod["automountServiceAccountToken"] is False
    assert not [v for v in pod["volumes"] if v["name"] == "storage-credentials"]
    # A runtime that names none keeps the operator's default.
    plain = runtimes.record(Runtime(trainer_image="op:1", termination_grace_seconds=30,
                                    service_account="kubetune-trainer"), runtime(FULL_RUNTIME))
    assert build_pod_spec(merged, owner, 1, pinned(settings, plain))["serviceAccountName"] \
        == "kubetune-trainer"
