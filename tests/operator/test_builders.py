"""Pure builder tests: every spec field reaches the manifests, which Kubernetes would accept."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from kubetune_api import contract
from kubetune_api.load import validate_job
from kubetune_api.spec import FineTuneJob
from kubetune_operator import builders
from kubetune_operator.builders import Owner
from kubetune_operator.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
SETTINGS = Settings(trainer_image="registry.example/trainer:1", storage_secret="default-s3",
                    image_pull_secrets=("operator-pull",), service_account="trainer")

FULL_SPEC: dict[str, Any] = {
    "model": {"name": "meta-llama/Llama-3.1-8B", "revision": "main", "task": "causal-lm"},
    "method": {"type": "qlora", "lora": {"r": 32, "alpha": 64, "targetModules": ["q_proj"]},
               "quantization": {"bits": 4}},
    "dataset": {"train": "s3://data/train.jsonl", "fields": {"messages": "messages"}},
    "training": {"maxSteps": 100, "strategy": "fsdp"},
    "resources": {"nodes": 4, "gpusPerNode": 8},
    "output": {"uri": "s3://models/out"},
    "runPolicy": {"backoffLimit": 5},
    "pod": {
        "image": "registry.example/custom:2",
        "imagePullSecrets": ["spec-pull"],
        "nodeSelector": {"gpu": "h100"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [{"matchExpressions": [
                {"key": "zone", "operator": "In", "values": ["a"]}]}]}}},
        "priorityClassName": "training",
        "schedulerName": "volcano",
        "cpu": "32",
        "memory": "256Gi",
        "shmSize": "64Gi",
        "env": {"NCCL_DEBUG": "INFO", "PET_NNODES": "ignored"},
    },
    "storage": {"secretName": "team-s3", "endpointUrl": "http://minio:9000",
                "region": "eu-west-1"},
    "metrics": {"port": 9500},
}


def make_job(spec: dict[str, Any] | None = None, name: str = "llama") -> FineTuneJob:
    return validate_job({"apiVersion": "kubetune.dev/v1alpha1", "kind": "FineTuneJob",
                         "metadata": {"name": name, "namespace": "ml"},
                         "spec": spec or FULL_SPEC})


OWNER = Owner(name="llama", namespace="ml", uid="1234-5678",
              labels={builders.LABEL_KUEUE_QUEUE: "gpu-queue", "team": "a"})


def pod_spec(job: FineTuneJob, owner: Owner = OWNER, attempt: int = 2) -> dict[str, Any]:
    return builders.build_job(job, owner, attempt, SETTINGS)["spec"]["template"]["spec"]


def trainer(job: FineTuneJob, owner: Owner = OWNER) -> dict[str, Any]:
    containers: list[dict[str, Any]] = pod_spec(job, owner)["containers"]
    return containers[0]


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def test_names_are_deterministic_dns_labels() -> None:
    assert builders.base_name("llama") == "llama"
    long = "a-very-long-fine-tune-job-name-that-keeps-going-and-going"
    assert builders.base_name(long) == builders.base_name(long)
    assert len(builders.base_name(long)) <= builders.MAX_BASE_LENGTH
    assert builders.base_name(long) != builders.base_name(long + "-2")
    for odd in ("my.job", "1st-run", long):
        base = builders.base_name(odd)
        assert base[0].isalpha() and all(c.isalnum() or c == "-" for c in base)
        assert len(f"{builders.attempt_job_name(odd, 99)}-999") <= 63
    assert builders.attempt_job_name("llama", 3) == "llama-a3"
    assert builders.master_address("llama", 3) == "llama-a3-0.llama"


def test_all_children_are_owned_and_labelled() -> None:
    children = builders.build_children(make_job(), OWNER, 1, SETTINGS)
    assert [c["kind"] for c in children] == ["ConfigMap", "Service", "Job"]
    for child in children:
        assert child["metadata"]["ownerReferences"] == [{
            "apiVersion": "kubetune.dev/v1alpha1", "kind": "FineTuneJob", "name": "llama",
            "uid": "1234-5678", "controller": True, "blockOwnerDeletion": True}]
        assert child["metadata"]["namespace"] == "ml"
        assert child["metadata"]["labels"][builders.LABEL_JOB] == "llama"
    assert children == builders.build_children(make_job(), OWNER, 1, SETTINGS)


@pytest.mark.parametrize("spec", [FULL_SPEC, None], ids=["full-spec", "example"])
def test_every_manifest_validates_against_kubernetes(spec: dict[str, Any] | None) -> None:
    job = make_job(spec) if spec else validate_job(yaml.safe_load(
        (ROOT / "examples" / "tiny-lora.yaml").read_text()))
    owner = Owner(job.name, "default", "uid-1", {})
    for manifest in builders.build_children(job, owner, 1, Settings()):
        kubernetes_validate.validate(manifest, "1.35", strict=True)


def test_config_map_holds_the_whole_job_for_the_trainer() -> None:
    cm = builders.build_config_map(make_job(), OWNER)
    document = yaml.safe_load(cm["data"][contract.CONFIG_FILE])
    assert document["apiVersion"] == "kubetune.dev/v1alpha1"
    assert document["kind"] == "FineTuneJob"
    assert document["metadata"] == {"name": "llama", "namespace": "ml"}
    reparsed = validate_job(document)
    assert reparsed.spec == make_job().spec  # nothing lost on the way to the trainer
    assert document["spec"]["training"]["strategy"] == "fsdp"


def test_service_is_headless_and_resolves_before_ranks_are_ready() -> None:
    svc = builders.build_service(make_job(), OWNER)["spec"]
    assert svc["clusterIP"] == "None" and svc["publishNotReadyAddresses"] is True
    assert svc["selector"] == {builders.LABEL_JOB: "llama"}
    assert {p["port"] for p in svc["ports"]} == {contract.DEFAULT_MASTER_PORT, 9500}


def test_indexed_job_shape_and_queueing() -> None:
    job = builders.build_job(make_job(), OWNER, 2, SETTINGS)
    spec = job["spec"]
    assert job["metadata"]["name"] == "llama-a2"
    assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == \
        ("Indexed", 4, 4)
    assert spec["backoffLimit"] == 0  # the operator owns restarts
    assert job["metadata"]["labels"][builders.LABEL_KUEUE_QUEUE] == "gpu-queue"
    assert "team" not in job["metadata"]["labels"]
    assert spec["suspend"] is True  # Kueue admits the gang by unsuspending it
    assert spec["template"]["metadata"]["labels"][builders.LABEL_ATTEMPT] == "2"
    plain = Owner("llama", "ml", "uid", {})
    assert builders.build_job(make_job(), plain, 1, SETTINGS)["spec"]["suspend"] is False
    suspended = {**FULL_SPEC, "runPolicy": {"suspend": True}}
    assert builders.build_job(make_job(suspended), plain, 1, SETTINGS)["spec"]["suspend"]


def test_pod_placement_fields_reach_the_pod() -> None:
    spec = pod_spec(make_job())
    pod = FULL_SPEC["pod"]
    assert spec["nodeSelector"] == pod["nodeSelector"]
    assert spec["tolerations"] == pod["tolerations"]
    assert spec["affinity"] == pod["affinity"]
    assert spec["priorityClassName"] == "training"
    assert spec["schedulerName"] == "volcano"
    assert spec["imagePullSecrets"] == [{"name": "spec-pull"}, {"name": "operator-pull"}]
    assert spec["subdomain"] == "llama"
    assert spec["restartPolicy"] == "Never"
    assert spec["serviceAccountName"] == "trainer"
    assert spec["automountServiceAccountToken"] is False
    assert spec["securityContext"]["runAsNonRoot"] is True
    shm = next(v for v in spec["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": "64Gi"}


def test_trainer_container_runs_the_node_launcher_with_the_launch_contract() -> None:
    container = trainer(make_job())
    assert container["image"] == "registry.example/custom:2"
    assert container["command"] == ["python", "-m", contract.NODE_LAUNCHER_MODULE,
                                    "-m", contract.TRAINER_MODULE,
                                    "--config", contract.CONFIG_PATH]
    env = env_of(container)
    assert env[contract.PET_NNODES] == "4"
    assert env[contract.PET_NPROC_PER_NODE] == "8"
    assert env[contract.PET_MASTER_ADDR] == "llama-a2-0.llama"
    assert env[contract.PET_MASTER_PORT] == str(contract.DEFAULT_MASTER_PORT)
    assert env[contract.PET_NODE_RANK] == {"fieldRef": {"fieldPath":
        f"metadata.annotations['{builders.ANNOTATION_COMPLETION_INDEX}']"}}
    assert env["AWS_ENDPOINT_URL"] == "http://minio:9000"
    assert env["AWS_DEFAULT_REGION"] == "eu-west-1"
    assert env["NCCL_DEBUG"] == "INFO"
    assert [e["name"] for e in container["env"]].count(contract.PET_NNODES) == 1
    assert contract.TERMINATION_LOG_ENV not in env  # the default path is the contract
    assert container["envFrom"] == [{"secretRef": {"name": "team-s3"}}]
    assert {"name": "metrics", "containerPort": 9500} in container["ports"]
    limits = container["resources"]["limits"]
    assert limits == {builders.GPU_RESOURCE: "8", "cpu": "32", "memory": "256Gi"}
    assert container["resources"]["requests"] == limits
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts[contract.CONFIG_DIR]["readOnly"] is True and "/dev/shm" in mounts
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}


def test_operator_defaults_fill_what_the_spec_leaves_out() -> None:
    minimal = {"model": {"name": "tiny://llama"}, "method": {"type": "lora"},
               "dataset": {"train": "data.jsonl"}, "output": {"uri": "out"},
               "resources": {"gpusPerNode": 0}}
    container = trainer(make_job(minimal), Owner("llama", "ml", "uid", {}))
    assert container["image"] == SETTINGS.trainer_image
    assert container["envFrom"] == [{"secretRef": {"name": "default-s3"}}]
    assert env_of(container)[contract.PET_NPROC_PER_NODE] == "1"  # one CPU process
    assert "resources" not in container or container["resources"] == {}
    assert "AWS_ENDPOINT_URL" not in env_of(container)
    spec = pod_spec(make_job(minimal), Owner("llama", "ml", "uid", {}))
    assert "nodeSelector" not in spec and "affinity" not in spec
    bare = builders.build_job(make_job(minimal), Owner("llama", "ml", "uid", {}), 1, Settings())
    container = bare["spec"]["template"]["spec"]["containers"][0]
    assert "envFrom" not in container
    assert "serviceAccountName" not in bare["spec"]["template"]["spec"]
