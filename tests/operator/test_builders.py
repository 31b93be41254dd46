"""Pure builder tests: every spec field reaches the manifests, which Kubernetes would accept."""

from __future__ import annotations

import dataclasses
import ipaddress
import json
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from kubetune_api import contract
from kubetune_api.load import SpecError, validate_job
from kubetune_api.spec import FineTuneJob
from kubetune_operator import builders
from kubetune_operator.builders import Owner
from kubetune_operator.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
SETTINGS = Settings(trainer_image="registry.example/trainer:1", storage_secret="default-s3",
                    image_pull_secrets=("operator-pull",), service_account="trainer")

FULL_SPEC: dict[str, Any] = {
    "model": {"name": "meta-llama/Llama-3.1-8B", "revision": "main", "task": "causal-lm",
              "cache": {"pvc": "hf-models"}, "tokenSecret": {"name": "hf", "key": "token"}},
    "method": {"type": "qlora", "lora": {"r": 32, "alpha": 64, "targetModules": ["q_proj"]},
               "quantization": {"bits": 4}},
    "dataset": {"train": "s3://data/train.jsonl", "fields": {"messages": "messages"}},
    "training": {"maxSteps": 100, "strategy": "fsdp"},
    "resources": {"nodes": 4, "gpusPerNode": 8, "gpuResource": "amd.com/gpu",
                  "extraResources": {"rdma/hca_shared_devices_a": 1}},
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
        "env": {"NCCL_DEBUG": "INFO", "WANDB_API_KEY": {"valueFrom": {"secretKeyRef": {
            "name": "wandb", "key": "api-key"}}}},
        "envFrom": [{"configMapRef": {"name": "nccl-tuning"}, "prefix": "NCCL_"}],
        "volumes": [{"name": "datasets", "persistentVolumeClaim": {"claimName": "datasets",
                                                                   "readOnly": True}},
                    {"name": "gcp", "secret": {"secretName": "gcp-key"}}],
        "volumeMounts": [{"name": "datasets", "mountPath": "/data", "readOnly": True},
                         {"name": "gcp", "mountPath": "/var/run/gcp", "readOnly": True}],
        "labels": {"team": "nlp"},
        "annotations": {"k8s.v1.cni.cncf.io/networks": "rdma-net"},
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
    assert [c["kind"] for c in children] == ["ConfigMap", "Service", "NetworkPolicy", "Job"]
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
    for labels in (job["metadata"]["labels"], spec["template"]["metadata"]["labels"]):
        assert labels[builders.LABEL_OWNER_UID] == OWNER.uid  # children are matched by uid
    plain = Owner("llama", "ml", "uid", {})
    assert builders.build_job(make_job(), plain, 1, SETTINGS)["spec"]["suspend"] is False
    suspended = {**FULL_SPEC, "runPolicy": {"suspend": True}}
    ours = builders.build_job(make_job(suspended), plain, 1, SETTINGS)
    assert ours["spec"]["suspend"]
    # Only a suspension of its own is ever lifted by the operator; Kueue lifts its own.
    assert ours["metadata"]["annotations"] == {builders.ANNOTATION_SUSPENDED_BY_OPERATOR: "true"}
    assert "annotations" not in job["metadata"]


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
    # The storage Secret as files, never variables (the spec's own envFrom stays as written).
    assert container["envFrom"] == [
        {"configMapRef": {"name": "nccl-tuning", "optional": False}, "prefix": "NCCL_"}]
    assert env[contract.STORAGE_CREDENTIALS_DIR_ENV] == contract.STORAGE_SECRET_DIR
    assert {"name": "metrics", "containerPort": 9500} in container["ports"]
    limits = container["resources"]["limits"]
    assert limits == {"amd.com/gpu": "8", "rdma/hca_shared_devices_a": "1", "cpu": "32",
                      "memory": "256Gi"}
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
    assert "envFrom" not in container
    mount = next(m for m in container["volumeMounts"] if m["name"] == "storage-credentials")
    assert mount == {"name": "storage-credentials", "mountPath": contract.STORAGE_SECRET_DIR,
                     "readOnly": True}
    assert env_of(container)[contract.PET_NPROC_PER_NODE] == "1"  # one CPU process
    # CPU-only pod: the operator's per-pod defaults; memory is also the limit, CPU is not.
    assert container["resources"] == {"requests": {"cpu": "1", "memory": "4Gi"},
                                      "limits": {"memory": "4Gi"}}
    assert "AWS_ENDPOINT_URL" not in env_of(container)
    spec = pod_spec(make_job(minimal), Owner("llama", "ml", "uid", {}))
    assert "nodeSelector" not in spec and "affinity" not in spec
    bare = builders.build_job(make_job(minimal), Owner("llama", "ml", "uid", {}), 1, Settings())
    container = bare["spec"]["template"]["spec"]["containers"][0]
    assert "envFrom" not in container
    assert "serviceAccountName" not in bare["spec"]["template"]["spec"]


# --- pod customization, model cache, token, defaults (issue 11) --------------------------------

def test_spec_volumes_mounts_labels_and_annotations_reach_the_pod() -> None:
    job = builders.build_job(make_job(), OWNER, 1, SETTINGS)
    template = job["spec"]["template"]
    spec, container = template["spec"], template["spec"]["containers"][0]
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["datasets"] == {"name": "datasets", "persistentVolumeClaim": {
        "claimName": "datasets", "readOnly": True}}
    assert volumes["gcp"] == {"name": "gcp", "secret": {"secretName": "gcp-key"}}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts["/data"] == {"name": "datasets", "mountPath": "/data", "readOnly": True}
    assert mounts["/var/run/gcp"]["name"] == "gcp"
    assert template["metadata"]["labels"]["team"] == "nlp"
    assert template["metadata"]["labels"][builders.LABEL_JOB] == "llama"  # still the operator's
    assert template["metadata"]["annotations"]["k8s.v1.cni.cncf.io/networks"] == "rdma-net"
    assert "team" not in job["metadata"]["labels"]  # pod labels are for pods only
    env = env_of(container)
    assert env["WANDB_API_KEY"] == {"secretKeyRef": {"name": "wandb", "key": "api-key"}}


def test_model_cache_is_the_hub_cache_and_token_is_a_file() -> None:
    spec = pod_spec(make_job())
    container = spec["containers"][0]
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    env = env_of(container)
    assert volumes["hf-cache"]["persistentVolumeClaim"] == {"claimName": "hf-models",
                                                            "readOnly": False}
    assert mounts["hf-cache"]["mountPath"] == env["HF_HUB_CACHE"] == contract.HF_HUB_CACHE_DIR
    assert env["HF_HOME"] == contract.HF_HOME_DIR and mounts["hf-home"]["mountPath"] == \
        contract.HF_HOME_DIR
    assert "HF_HUB_OFFLINE" not in env
    # The token: one key of the Secret, as a read-only file the Hub client reads.
    assert volumes["hf-token"]["secret"] == {"secretName": "hf", "defaultMode": 0o440,
                                             "items": [{"key": "token", "path": "token"}]}
    assert mounts["hf-token"] == {"name": "hf-token", "mountPath": contract.HF_TOKEN_DIR,
                                  "readOnly": True}
    assert env["HF_TOKEN_PATH"] == f"{contract.HF_TOKEN_DIR}/token"
    assert "HF_TOKEN" not in env and not any("secretKeyRef" in str(e.get("valueFrom"))
                                             and e["name"].startswith("HF_")
                                             for e in container["env"])


def test_a_push_token_of_its_own_is_a_second_file_and_the_model_token_stays() -> None:
    """output.pushToHub.tokenSecret: one key, read-only, at its own path the trainer is told
    (KUBETUNE_HUB_PUSH_TOKEN_PATH); the model's token (HF_TOKEN_PATH) still reads the base."""
    push = {"repo": "acme/support-lora", "tokenSecret": {"name": "hub-writer", "key": "w"}}
    spec = pod_spec(make_job({**FULL_SPEC, "output": {"uri": "s3://m/o", "pushToHub": push}}))
    container = spec["containers"][0]
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    env = env_of(container)
    assert volumes["hub-push-token"]["secret"] == {"secretName": "hub-writer",
                                                   "defaultMode": 0o440,
                                                   "items": [{"key": "w", "path": "w"}]}
    assert mounts["hub-push-token"] == {"name": "hub-push-token", "readOnly": True,
                                        "mountPath": contract.HUB_PUSH_TOKEN_DIR}
    assert env[contract.HUB_PUSH_TOKEN_PATH_ENV] == f"{contract.HUB_PUSH_TOKEN_DIR}/w"
    assert env["HF_TOKEN_PATH"] == f"{contract.HF_TOKEN_DIR}/token"
    # Pushing with the model's token mounts nothing more.
    shared = {"uri": "s3://m/o", "pushToHub": {"repo": "acme/support-lora"}}
    plain = pod_spec(make_job({**FULL_SPEC, "output": shared}))
    assert "hub-push-token" not in {v["name"] for v in plain["volumes"]}
    assert contract.HUB_PUSH_TOKEN_PATH_ENV not in env_of(plain["containers"][0])


def test_read_only_cache_runs_the_hub_offline_and_no_cache_means_an_empty_dir() -> None:
    read_only = {**FULL_SPEC, "model": {"name": "gpt2", "cache": {"pvc": "models",
                                                                   "readOnly": True}}}
    spec = pod_spec(make_job(read_only))
    assert {"claimName": "models", "readOnly": True} in \
        [v.get("persistentVolumeClaim") for v in spec["volumes"]]
    mount = next(m for m in spec["containers"][0]["volumeMounts"] if m["name"] == "hf-cache")
    assert mount["readOnly"] is True
    assert env_of(spec["containers"][0])["HF_HUB_OFFLINE"] == "1"
    plain = pod_spec(make_job({**FULL_SPEC, "model": {"name": "gpt2"}}))
    names = {v["name"] for v in plain["volumes"]}
    assert "hf-cache" not in names and "hf-token" not in names and "hf-home" in names
    assert env_of(plain["containers"][0])["HF_HUB_CACHE"] == contract.HF_HUB_CACHE_DIR


def test_root_filesystem_is_read_only_and_every_written_path_is_a_volume() -> None:
    container = trainer(make_job())
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    mounted = {m["mountPath"] for m in container["volumeMounts"]}
    for path in (contract.SCRATCH_DIR, contract.SHM_DIR, contract.HF_HOME_DIR,
                 contract.IMAGE_OUTPUT_DIR, contract.HOME_CACHE_DIR):
        assert path in mounted, path
    # HOME itself stays the image's: a derived image's `pip install --user` (~/.local) is kept.
    assert contract.IMAGE_HOME_DIR not in mounted
    writable = builders.build_job(make_job(), OWNER, 1, Settings(
        read_only_root_filesystem=False))["spec"]["template"]["spec"]["containers"][0]
    assert writable["securityContext"]["readOnlyRootFilesystem"] is False
    assert Settings.from_env({"KUBETUNE_READ_ONLY_ROOT_FILESYSTEM": "false"}) \
        .read_only_root_filesystem is False


def test_the_images_writable_directories_are_the_mounted_ones() -> None:
    """The trainer Dockerfiles chown exactly HOME and out/ to the pod's uid: with a read-only
    root filesystem those must be volumes, and HOME must be the one the images set."""
    for dockerfile in ("Dockerfile", "Dockerfile.cpu"):
        text = (ROOT / "trainer_image" / dockerfile).read_text()
        assert f"HOME={contract.IMAGE_HOME_DIR}" in text, dockerfile
        assert contract.IMAGE_OUTPUT_DIR in text, dockerfile


@pytest.mark.parametrize(("gpus", "settings", "expected"), [
    (8, Settings(), {"requests": {"amd.com/gpu": "8", "cpu": "32", "memory": "256Gi"},
                     "limits": {"amd.com/gpu": "8", "memory": "256Gi"}}),
    (2, Settings(cpu_per_gpu="500m", memory_per_gpu="1.5Gi"),
     {"requests": {"amd.com/gpu": "2", "cpu": "1000m", "memory": "3Gi"},
      "limits": {"amd.com/gpu": "2", "memory": "3Gi"}}),
    (1, Settings(cpu_per_gpu="", memory_per_gpu=""),
     {"requests": {"amd.com/gpu": "1"}, "limits": {"amd.com/gpu": "1"}}),
    (0, Settings(cpu_without_gpu="3", memory_without_gpu="6Gi"),
     {"requests": {"cpu": "3", "memory": "6Gi"}, "limits": {"memory": "6Gi"}}),
])
def test_default_requests_scale_with_the_gpu_count(gpus: int, settings: Settings,
                                                   expected: dict[str, Any]) -> None:
    spec = {**FULL_SPEC, "resources": {"gpusPerNode": gpus, "gpuResource": "amd.com/gpu"},
            "pod": {}}
    container = builders.build_job(make_job(spec), OWNER, 1, settings)["spec"]["template"][
        "spec"]["containers"][0]
    assert container["resources"] == expected


def test_explicit_cpu_and_memory_win_over_the_defaults() -> None:
    spec = {**FULL_SPEC, "resources": {"gpusPerNode": 2}, "pod": {"memory": "10Gi"}}
    resources = trainer(make_job(spec))["resources"]
    assert resources["limits"] == {"nvidia.com/gpu": "2", "memory": "10Gi"}
    assert resources["requests"] == {"nvidia.com/gpu": "2", "memory": "10Gi", "cpu": "8"}


@pytest.mark.parametrize(("env", "message"), [
    ({"KUBETUNE_CPU_PER_GPU": "four"}, "KUBETUNE_CPU_PER_GPU='four'"),
    ({"KUBETUNE_MEMORY_WITHOUT_GPU": "8 GB"}, "KUBETUNE_MEMORY_WITHOUT_GPU"),
])
def test_bad_default_quantities_stop_the_operator_with_the_variable(env: dict[str, str],
                                                                    message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Settings.from_env(env)
    assert Settings.from_env({"KUBETUNE_MEMORY_PER_GPU": ""}).memory_per_gpu == ""


def spec_error(pod: dict[str, Any] | None = None, **sections: dict[str, Any]) -> str:
    spec = {**FULL_SPEC, "pod": pod or {}}
    for key, value in sections.items():
        spec[key] = {**FULL_SPEC.get(key, {}), **value}
    with pytest.raises(Exception) as caught:
        make_job(spec)
    return str(caught.value)


@pytest.mark.parametrize(("pod", "field", "words"), [
    ({"volumes": [{"name": "h", "hostPath": {"path": "/"}}]}, "spec.pod.volumes.0",
     "hostPath is not allowed"),
    ({"volumes": [{"name": "tmp", "emptyDir": {}}]}, "spec.pod", "tmp is reserved"),
    ({"volumes": [{"name": "a", "emptyDir": {}, "secret": {"secretName": "s"}}]},
     "spec.pod.volumes.0", "exactly one source"),
    ({"volumes": [{"name": "a", "persistentVolumeClaim": {}}]}, "spec.pod.volumes.0",
     "claimName is required"),
    ({"volumes": [{"name": "a", "emptyDir": {}}],
      "volumeMounts": [{"name": "b", "mountPath": "/x"}]}, "spec.pod", "b is not in pod.volumes"),
    ({"volumes": [{"name": "a", "emptyDir": {}}],
      "volumeMounts": [{"name": "a", "mountPath": "/etc/kubetune/x"}]},
     "spec.pod.volumeMounts.0", "overlaps /etc/kubetune"),
    ({"volumes": [{"name": "a", "emptyDir": {}}],
      "volumeMounts": [{"name": "a", "mountPath": "/var"}]},
     "spec.pod.volumeMounts.0", "overlaps /var/cache/kubetune"),
    ({"volumes": [{"name": "a", "emptyDir": {}}],
      "volumeMounts": [{"name": "a", "mountPath": "/tmp"}]}, "spec.pod.volumeMounts.0",
     "overlaps /tmp"),
    ({"env": {"PET_NNODES": "9"}}, "spec.pod", "env.PET_NNODES: reserved"),
    ({"env": {"HF_TOKEN": "hf_x"}}, "spec.pod", "use model.tokenSecret"),
    ({"env": {"HF_HUB_CACHE": "/x"}}, "spec.pod", "env.HF_HUB_CACHE: reserved"),
    # Endpoints: where the Hub token and the storage keys would be sent.
    ({"env": {"HF_ENDPOINT": "http://attacker"}}, "spec.pod", "env.HF_ENDPOINT: reserved"),
    ({"env": {"AWS_ENDPOINT_URL_S3": "http://attacker"}}, "spec.pod",
     "env.AWS_ENDPOINT_URL_S3: reserved"),
    ({"env": {"AWS_ENDPOINT_URL": "http://attacker"}}, "spec.pod",
     "env.AWS_ENDPOINT_URL: reserved"),
    ({"env": {"STORAGE_EMULATOR_HOST": "http://attacker"}}, "spec.pod",
     "env.STORAGE_EMULATOR_HOST: reserved"),
    ({"env": {"AWS_DEFAULT_REGION": "eu"}}, "spec", "conflicts with spec.storage"),
    # Secret-looking plain values: refused, pointing to valueFrom.
    ({"env": {"GH": "ghp_" + "CanaryGithubToken0123456789abcdefgh"}}, "spec.pod",
     "env.GH: the value looks like a credential; put it in a Secret and use {valueFrom"),
    ({"env": {"AZ": "AccountName=a;AccountKey=Zm9vYmFy0123456789=="}}, "spec.pod",
     "env.AZ: the value looks like a credential"),
    ({"env": {"X": {"valueFrom": {}}}}, "spec.pod.env", "X: valueFrom needs exactly one of"),
    ({"env": {"X": 1}}, "spec.pod.env", "X: a string or {valueFrom"),
    ({"envFrom": [{"prefix": "X_"}]}, "spec.pod.envFrom.0", "exactly one of secretRef"),
    ({"labels": {builders.LABEL_JOB: "other"}}, "spec.pod", "reserved"),
    ({"labels": {builders.LABEL_KUEUE_QUEUE: "q"}}, "spec.pod", "Kueue labels on the"),
    ({"labels": {"job-name": "x"}}, "spec.pod", "labels.job-name: reserved"),
    ({"labels": {"team": "a b"}}, "spec.pod", "not a valid label value"),
    ({"annotations": {"kubectl.kubernetes.io/default-container": "x"}}, "spec.pod",
     "reserved"),
])
def test_reserved_or_unsafe_pod_fields_are_invalid_specs(pod: dict[str, Any], field: str,
                                                         words: str) -> None:
    message = spec_error(pod)
    assert f"{field}:" in message and words in message, message


@pytest.mark.parametrize(("resources", "words"), [
    ({"gpuResource": "gpu"}, "spec.resources.gpuResource"),
    ({"extraResources": {"memory": 1}}, "extraResources.memory: not an extended resource"),
    ({"extraResources": {"amd.com/gpu": 1}}, "requested by gpusPerNode"),
    ({"extraResources": {"rdma/hca": 0}}, "at least 1"),
])
def test_bad_resources_are_invalid_specs(resources: dict[str, Any], words: str) -> None:
    message = spec_error(resources=resources)
    assert words in message, message


def test_customized_pods_still_validate_against_kubernetes() -> None:
    spec = {**FULL_SPEC, "pod": {**FULL_SPEC["pod"], "volumes": [
        {"name": "scratch", "ephemeral": {"volumeClaimTemplate": {"spec": {
            "accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Ti"}}}}}},
        {"name": "info", "downwardAPI": {"items": [{"path": "labels", "fieldRef": {
            "fieldPath": "metadata.labels"}}]}},
        {"name": "fuse", "csi": {"driver": "gcsfuse.csi.storage.gke.io",
                                 "volumeAttributes": {"bucketName": "b"}}}],
        "volumeMounts": [{"name": "scratch", "mountPath": "/scratch"},
                         {"name": "info", "mountPath": "/etc/podinfo", "readOnly": True},
                         {"name": "fuse", "mountPath": "/gcs", "subPath": "data"}]}}
    for manifest in builders.build_children(make_job(spec), OWNER, 1, SETTINGS):
        kubernetes_validate.validate(manifest, "1.35", strict=True)


OPERATOR_PEER = {"namespaceSelector": {"matchLabels": {
    "kubernetes.io/metadata.name": "kubetune"}}, "podSelector": {"matchLabels": {
        "app.kubernetes.io/component": "operator"}}}
EXTRA_EGRESS = {"to": [{"ipBlock": {"cidr": "10.0.0.10/32"}}],
                "ports": [{"protocol": "TCP", "port": 3128}]}


def test_network_policy_lets_ranks_talk_and_only_scrapers_reach_metrics() -> None:
    settings = Settings(metrics_from=(OPERATOR_PEER,), extra_egress=(EXTRA_EGRESS,),
                        endpoint_ports=(9000,))
    policy = builders.build_network_policy(make_job(), OWNER, settings)
    spec = policy["spec"]
    ranks = [{"podSelector": {"matchLabels": {builders.LABEL_JOB: "llama"}}}]
    assert spec["podSelector"] == ranks[0]["podSelector"]
    assert spec["policyTypes"] == ["Ingress", "Egress"]
    assert spec["ingress"] == [
        {"from": ranks},  # every port: rendezvous, NCCL
        {"from": [OPERATOR_PEER], "ports": [{"protocol": "TCP", "port": 9500,
                                             "endPort": 9507}]}]  # 8 local ranks
    assert spec["egress"] == [
        {"to": ranks},
        {"ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]},
        {"to": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": ["169.254.0.0/16"]}},
                {"ipBlock": {"cidr": "::/0", "except": ["fe80::/10"]}}],
         "ports": [{"protocol": "TCP", "port": 80}, {"protocol": "TCP", "port": 443},
                   {"protocol": "TCP", "port": 9000}]},  # spec.storage.endpointUrl's port
        EXTRA_EGRESS]
    assert policy["metadata"]["ownerReferences"][0]["uid"] == OWNER.uid
    kubernetes_validate.validate(policy, "1.35", strict=True)


def egress_allows(policy: dict[str, Any], address: str, port: int) -> bool:
    """Whether a rank may connect to address:port, as a CNI reads the rendered egress rules
    (a rule matches when its peers and ports do; no `to`/`ports`: any)."""
    ip = ipaddress.ip_address(address)

    def peer_matches(peer: dict[str, Any]) -> bool:
        block = peer.get("ipBlock")
        if block is None:
            return False  # pod/namespace selectors: not an outside address
        network = ipaddress.ip_network(block["cidr"])
        return ip.version == network.version and ip in network and not any(
            ip in ipaddress.ip_network(e) for e in block.get("except", [])
            if ipaddress.ip_network(e).version == ip.version)

    return any(("to" not in rule or any(peer_matches(p) for p in rule["to"]))
               and ("ports" not in rule or any(p["port"] <= port <= p.get("endPort", p["port"])
                                               for p in rule["ports"]))
               for rule in policy["spec"]["egress"])


def test_web_egress_has_no_holes_to_metadata_nodes_pods_or_the_api_server() -> None:
    settings = Settings.from_env({"KUBETUNE_EGRESS_EXCEPT": "10.0.0.0/16, 10.244.0.0/16,fd00::/8",
                                  "KUBERNETES_SERVICE_HOST": "10.96.0.1",
                                  "KUBETUNE_ENDPOINT_PORTS": "9000"})
    kubelet = {**FULL_SPEC, "storage": {"endpointUrl": "https://minio.example.com:10250"}}
    policy = builders.build_network_policy(make_job(kubelet), OWNER, settings)
    kubernetes_validate.validate(policy, "1.35", strict=True)
    for address, port in [("169.254.169.254", 80), ("fe80::1", 443), ("10.0.3.4", 443),
                          ("10.244.1.2", 80), ("10.96.0.1", 443), ("fd00::5", 443),
                          ("52.1.2.3", 10250), ("52.1.2.3", 6443), ("52.1.2.3", 2379)]:
        assert not egress_allows(policy, address, port), (address, port)
    assert egress_allows(policy, "52.1.2.3", 443) and egress_allows(policy, "2600::1", 80)
    minio = {**FULL_SPEC, "storage": {"endpointUrl": "http://minio.example.com:9000"}}
    listed = builders.build_network_policy(make_job(minio), OWNER, settings)
    assert egress_allows(listed, "52.1.2.3", 9000)  # a port from the admin's list


@pytest.mark.parametrize(("env", "words"), [
    ({"KUBETUNE_EGRESS_EXCEPT": "10.0.0.1/8"}, "KUBETUNE_EGRESS_EXCEPT: 10.0.0.1/8 has host bits"),
    ({"KUBETUNE_ENDPOINT_PORTS": "http"}, "KUBETUNE_ENDPOINT_PORTS: 'http' is not a port"),
])
def test_bad_egress_settings_stop_the_operator(env: dict[str, str], words: str) -> None:
    with pytest.raises(ValueError, match=words):
        Settings.from_env(env)


def test_network_policy_without_scrapers_or_gpus_and_switched_off() -> None:
    cpu_only = {**FULL_SPEC, "resources": {"gpusPerNode": 0}, "storage": {}}
    spec = builders.build_network_policy(make_job(cpu_only), OWNER, Settings())["spec"]
    assert spec["ingress"] == [{"from": [{"podSelector": {"matchLabels": {
        builders.LABEL_JOB: "llama"}}}]}]  # nobody else may reach the ranks
    assert spec["egress"][2]["ports"] == [{"protocol": "TCP", "port": 80},
                                          {"protocol": "TCP", "port": 443}]
    one_port = builders.build_network_policy(
        make_job(cpu_only), OWNER, Settings(metrics_from=(OPERATOR_PEER,)))["spec"]
    assert one_port["ingress"][1]["ports"] == [{"protocol": "TCP", "port": 9500}]
    kinds = [c["kind"] for c in builders.build_children(
        make_job(), OWNER, 1, Settings(network_policy=False))]
    assert "NetworkPolicy" not in kinds


@pytest.mark.parametrize(("env", "words"), [
    ({"KUBETUNE_NETWORK_POLICY": "maybe"}, "KUBETUNE_NETWORK_POLICY: expected true or false"),
    ({"KUBETUNE_METRICS_FROM": "{"}, "KUBETUNE_METRICS_FROM: not JSON"),
    ({"KUBETUNE_EXTRA_EGRESS": '{"to": []}'}, "KUBETUNE_EXTRA_EGRESS: expected a JSON list"),
])
def test_bad_network_settings_stop_the_operator(env: dict[str, str], words: str) -> None:
    with pytest.raises(ValueError, match=words):
        Settings.from_env(env)
    settings = Settings.from_env({"KUBETUNE_NETWORK_POLICY": "false",
                                  "KUBETUNE_METRICS_FROM": f"[{json.dumps(OPERATOR_PEER)}]"})
    assert settings.network_policy is False and settings.metrics_from == (OPERATOR_PEER,)
def test_trainer_gets_the_job_uid_and_the_pods_grace_period() -> None:
    env = env_of(trainer(make_job()))
    assert env[contract.JOB_UID_ENV] == "1234-5678"
    grace = pod_spec(make_job())["terminationGracePeriodSeconds"]
    timeout = int(env[contract.SHUTDOWN_TIMEOUT_ENV])
    assert timeout == contract.worker_shutdown_timeout(grace) and 0 < timeout < grace
    assert contract.worker_shutdown_timeout(300) == 270
    assert contract.worker_shutdown_timeout(30) == 25


def test_storage_secret_is_mounted_as_files_and_absent_without_one() -> None:
    minimal = {"model": {"name": "tiny://llama"}, "method": {"type": "lora"},
               "dataset": {"train": "data.jsonl"}, "output": {"uri": "out"},
               "storage": {"secretName": "team-s3"}}
    owner = Owner("llama", "ml", "uid", {})
    pod = builders.build_job(make_job(minimal), owner, 1, SETTINGS)["spec"]["template"]["spec"]
    volume = next(v for v in pod["volumes"] if v["name"] == "storage-credentials")
    assert volume == {"name": "storage-credentials",
                      "secret": {"secretName": "team-s3", "defaultMode": 0o440}}
    assert not any(k.startswith(("AWS_ACCESS", "AWS_SECRET")) for k in env_of(
        pod["containers"][0]))
    # No Secret anywhere: the service account's workload identity, no static key at all.
    no_secret = dataclasses.replace(SETTINGS, storage_secret=None)
    del minimal["storage"]
    bare = builders.build_job(make_job(minimal), owner, 1, no_secret)["spec"]["template"]["spec"]
    assert all(v["name"] != "storage-credentials" for v in bare["volumes"])
    assert contract.STORAGE_CREDENTIALS_DIR_ENV not in env_of(bare["containers"][0])


def test_credentials_in_the_storage_endpoint_are_refused() -> None:
    body = {"apiVersion": "kubetune.dev/v1alpha1", "kind": "FineTuneJob",
            "metadata": {"name": "llama", "namespace": "ml"},
            "spec": {**FULL_SPEC, "storage": {"endpointUrl": "https://AKIAX:Sup3r@minio:9000"}}}
    with pytest.raises(SpecError, match=r"spec.storage.endpointUrl.*credentials in the URL"):
        validate_job(body)


def test_the_admins_extra_uri_schemes_reach_the_trainer() -> None:
    """The trainer checks the URIs again before opening them: it must know what the admin
    enabled, and nothing more."""
    from kubetune_api import uris
    from kubetune_operator.policy import Policy

    def pod_env(settings: Settings) -> dict[str, Any]:
        job = builders.build_job(make_job(), OWNER, 1, settings)
        return env_of(job["spec"]["template"]["spec"]["containers"][0])

    assert uris.EXTRA_URI_SCHEMES_ENV not in pod_env(Settings())
    enabled = pod_env(Settings(policy=Policy(extra_uri_schemes=("abfs", "az"))))
    assert enabled[uris.EXTRA_URI_SCHEMES_ENV] == "abfs,az"


def test_registry_secret_is_mounted_as_files_and_its_directory_named() -> None:
    spec = {"model": {"name": "tiny://llama"}, "method": {"type": "lora"},
            "dataset": {"train": "data.jsonl"},
            "output": {"uri": "out", "oci": {"reference": "registry.example.com/team/a:v1",
                                             "secretName": "team-registry"}}}
    owner = Owner("llama", "ml", "uid", {})
    pod = builders.build_job(make_job(spec), owner, 1, SETTINGS)["spec"]["template"]["spec"]
    volume = next(v for v in pod["volumes"] if v["name"] == "oci-credentials")
    assert volume == {"name": "oci-credentials",
                      "secret": {"secretName": "team-registry", "defaultMode": 0o440}}
    container = pod["containers"][0]
    mount = next(m for m in container["volumeMounts"] if m["name"] == "oci-credentials")
    assert mount == {"name": "oci-credentials", "mountPath": contract.OCI_SECRET_DIR,
                     "readOnly": True}
    assert env_of(container)[contract.OCI_CREDENTIALS_DIR_ENV] == contract.OCI_SECRET_DIR
    del spec["output"]["oci"]["secretName"]  # type: ignore[attr-defined]
    bare = builders.build_job(make_job(spec), owner, 1, SETTINGS)["spec"]["template"]["spec"]
    assert all(v["name"] != "oci-credentials" for v in bare["volumes"])
    assert contract.OCI_CREDENTIALS_DIR_ENV not in env_of(bare["containers"][0])


def test_network_policy_opens_the_registry_port_the_admin_allows() -> None:
    def web_ports(reference: str, allowed: tuple[int, ...]) -> list[int]:
        spec = {"model": {"name": "tiny://llama"}, "method": {"type": "lora"},
                "dataset": {"train": "data.jsonl"},
                "output": {"uri": "out", "oci": {"reference": reference}}}
        settings = Settings(endpoint_ports=allowed)
        egress = builders.build_network_policy(make_job(spec), OWNER, settings)["spec"]["egress"]
        return [p["port"] for p in egress[2]["ports"]]

    assert web_ports("registry.example.com:5000/team/a:v1", (5000,)) == [80, 443, 5000]
    assert web_ports("registry.example.com:5000/team/a:v1", ()) == [80, 443]  # not allowed
    assert web_ports("registry.example.com/team/a:v1", (5000,)) == [80, 443]
