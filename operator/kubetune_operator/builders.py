"""Pure builders: a validated FineTuneJob → the manifests of its children. No I/O.

Every child has a deterministic name and an owner reference to the FineTuneJob, so creating
one twice answers 409 (never a duplicate) and deleting the FineTuneJob deletes them all.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
import urllib.parse
from dataclasses import dataclass
from typing import Any

import yaml

from kubetune_api import contract, uris
from kubetune_api.oci import parse_reference
from kubetune_api.spec import API_VERSION, KIND, FineTuneJob
from kubetune_operator.settings import Settings

Manifest = dict[str, Any]

LABEL_JOB = "kubetune.dev/finetunejob"  # value: base_name(FineTuneJob name)
LABEL_ATTEMPT = contract.POD_LABEL_ATTEMPT
# The owning FineTuneJob's uid on Jobs and pods: children are matched by it (and by owner
# references), so a labelled object of another owner is never taken for one of ours, and the
# pods of a Job already deleted are still known as ours until they are gone.
LABEL_OWNER_UID = contract.POD_LABEL_JOB_UID
LABEL_KUEUE_QUEUE = "kueue.x-k8s.io/queue-name"
LABEL_KUEUE_PRIORITY = "kueue.x-k8s.io/priority-class"
KUEUE_LABELS = (LABEL_KUEUE_QUEUE, LABEL_KUEUE_PRIORITY)
ANNOTATION_COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"
# On a Job the operator suspended itself (runPolicy.suspend): only such a Job is ever
# unsuspended by the operator. Anyone else's suspension (Kueue) is theirs to lift.
ANNOTATION_SUSPENDED_BY_OPERATOR = "kubetune.dev/suspended-by-operator"
TRAINER_CONTAINER = contract.TRAINER_CONTAINER
MANAGED_BY = "kubetune-operator"
GPU_RESOURCE = "nvidia.com/gpu"  # spec.resources.gpuResource's default
SHM_PATH = contract.SHM_DIR
HF_TOKEN_FILE = "token"  # the Hub token's file name under contract.HF_TOKEN_DIR
TORCHRUN_PORT_NAME = "torchrun"
METRICS_PORT_NAME = "metrics"
NON_ROOT_UID = 1000

# Pod hostnames are "<job>-<index>" and must stay DNS labels (63 chars): keep room for
# "-a<attempt>-<index>".
MAX_BASE_LENGTH = 40


def base_name(name: str) -> str:
    """A DNS-1035 label derived from a FineTuneJob name: the name itself when it fits,
    else a cut of it plus a hash (so long names still map to distinct children)."""
    clean = re.sub(r"[^a-z0-9-]", "-", name.lower()).strip("-")
    if clean and clean[0].isalpha() and clean == name and len(clean) <= MAX_BASE_LENGTH:
        return clean
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    head = clean[:MAX_BASE_LENGTH - 9].rstrip("-") or "ftj"
    head = head if head[0].isalpha() else f"j{head}"[:MAX_BASE_LENGTH - 9]
    return f"{head}-{digest}"


def config_map_name(job_name: str) -> str:
    return f"{base_name(job_name)}-config"


def service_name(job_name: str) -> str:
    return base_name(job_name)


def attempt_job_name(job_name: str, attempt: int) -> str:
    return f"{base_name(job_name)}-a{attempt}"


def master_address(job_name: str, attempt: int) -> str:
    """Rank 0's stable DNS name: <job>-0.<headless service>."""
    return f"{attempt_job_name(job_name, attempt)}-0.{service_name(job_name)}"


@dataclass(frozen=True)
class Owner:
    """What children need to know about their FineTuneJob object."""

    name: str
    namespace: str
    uid: str
    labels: dict[str, str]

    @classmethod
    def from_body(cls, body: Manifest) -> Owner:
        meta = body["metadata"]
        return cls(meta["name"], meta["namespace"], meta["uid"], dict(meta.get("labels") or {}))


def owner_reference(owner: Owner) -> Manifest:
    return {"apiVersion": API_VERSION, "kind": KIND, "name": owner.name, "uid": owner.uid,
            "controller": True, "blockOwnerDeletion": True}


def common_labels(owner: Owner) -> dict[str, str]:
    return {"app.kubernetes.io/name": "kubetune", "app.kubernetes.io/component": "trainer",
            "app.kubernetes.io/instance": base_name(owner.name),
            "app.kubernetes.io/managed-by": MANAGED_BY, LABEL_JOB: base_name(owner.name)}


def _metadata(name: str, owner: Owner, labels: dict[str, str] | None = None) -> Manifest:
    return {"name": name, "namespace": owner.namespace,
            "labels": {**common_labels(owner), **(labels or {})},
            "ownerReferences": [owner_reference(owner)]}


# libyaml when present: the pure-Python emitter is most of the cost of creating a job.
_YamlDumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


# --- ConfigMap ----------------------------------------------------------------------------------

def render_config(job: FineTuneJob, owner: Owner) -> str:
    """The FineTuneJob as the trainer reads it from CONFIG_PATH (defaults made explicit)."""
    document = {"apiVersion": API_VERSION, "kind": KIND,
                "metadata": {"name": owner.name, "namespace": owner.namespace},
                "spec": job.spec.model_dump(by_alias=True, mode="json", exclude_none=True)}
    return yaml.dump(document, Dumper=_YamlDumper, sort_keys=False)


def build_config_map(job: FineTuneJob, owner: Owner) -> Manifest:
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": _metadata(config_map_name(owner.name), owner),
            "data": {contract.CONFIG_FILE: render_config(job, owner)}}


# --- Service ------------------------------------------------------------------------------------

def build_service(job: FineTuneJob, owner: Owner) -> Manifest:
    """Headless, and publishing not-ready pods: rank 0's DNS name must resolve while the
    other ranks start, before any of them is ready."""
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": _metadata(service_name(owner.name), owner),
            "spec": {"clusterIP": "None", "publishNotReadyAddresses": True,
                     "selector": {LABEL_JOB: base_name(owner.name)},
                     "ports": [
                         {"name": TORCHRUN_PORT_NAME, "port": contract.DEFAULT_MASTER_PORT,
                          "targetPort": contract.DEFAULT_MASTER_PORT, "protocol": "TCP"},
                         {"name": METRICS_PORT_NAME, "port": job.spec.metrics.port,
                          "targetPort": job.spec.metrics.port, "protocol": "TCP"}]}}


# --- Job ----------------------------------------------------------------------------------------

def is_queue_managed(owner: Owner) -> bool:
    """Kueue admits the gang by unsuspending the Job; the operator must not do it itself."""
    return LABEL_KUEUE_QUEUE in owner.labels


def build_job(job: FineTuneJob, owner: Owner, attempt: int, settings: Settings) -> Manifest:
    """One attempt of the gang: an Indexed Job, one pod per node, no retries of its own
    (backoffLimit 0: any rank failing fails the attempt; the operator restarts the gang)."""
    nodes = job.spec.resources.nodes
    labels = {LABEL_ATTEMPT: str(attempt), LABEL_OWNER_UID: owner.uid}
    queue_labels = {k: v for k, v in owner.labels.items() if k in KUEUE_LABELS}
    suspended = job.spec.run_policy.suspend or is_queue_managed(owner)
    metadata = _metadata(attempt_job_name(owner.name, attempt), owner,
                         {**labels, **queue_labels})
    if job.spec.run_policy.suspend and not is_queue_managed(owner):
        metadata["annotations"] = {ANNOTATION_SUSPENDED_BY_OPERATOR: "true"}
    return {
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": metadata,
        "spec": {
            "completionMode": "Indexed", "completions": nodes, "parallelism": nodes,
            "backoffLimit": 0, "suspend": suspended,
            "podReplacementPolicy": "Failed",
            "template": {
                # The spec's own labels and annotations first: the contract refuses reserved
                # keys, and the operator's win regardless.
                "metadata": {"labels": {**job.spec.pod.labels, **common_labels(owner),
                                        **labels},
                             "annotations": {**job.spec.pod.annotations,
                                             "kubectl.kubernetes.io/default-container":
                                             TRAINER_CONTAINER}},
                "spec": build_pod_spec(job, owner, attempt, settings),
            },
        },
    }


def pod_security_context(settings: Settings) -> Manifest:
    """The image's uid (NON_ROOT_UID); none where the platform assigns one (OpenShift)."""
    context: Manifest = {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}
    if not settings.platform_assigns_uids:
        context.update(runAsUser=NON_ROOT_UID, runAsGroup=NON_ROOT_UID, fsGroup=NON_ROOT_UID)
    return context


def build_pod_spec(job: FineTuneJob, owner: Owner, attempt: int,
                   settings: Settings) -> Manifest:
    pod = job.spec.pod
    spec: Manifest = {
        "restartPolicy": "Never",
        "subdomain": service_name(owner.name),  # Indexed Jobs set hostname <job>-<index>
        "automountServiceAccountToken": False,  # the trainer never talks to the API
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": settings.termination_grace_seconds,
        "securityContext": pod_security_context(settings),
        "containers": [build_trainer_container(job, owner, attempt, settings)],
        "volumes": [*operator_volumes(job, owner), *storage_volumes(job, settings),
                    *(v.manifest() for v in pod.volumes)],
    }
    if settings.service_account:
        spec["serviceAccountName"] = settings.service_account
    pull_secrets = list(dict.fromkeys([*pod.image_pull_secrets, *settings.image_pull_secrets]))
    optional = {
        "nodeSelector": pod.node_selector or None,
        "tolerations": pod.tolerations or None,
        "affinity": pod.affinity,
        "priorityClassName": pod.priority_class_name,
        "schedulerName": pod.scheduler_name,
        "imagePullSecrets": [{"name": s} for s in pull_secrets] or None,
    }
    spec.update({k: v for k, v in optional.items() if v is not None})
    return spec


def build_trainer_container(job: FineTuneJob, owner: Owner, attempt: int,
                            settings: Settings) -> Manifest:
    spec = job.spec
    container: Manifest = {
        "name": TRAINER_CONTAINER,
        "image": spec.pod.image or settings.trainer_image,
        # torchrun behind a wrapper that keeps the trainer's exit codes (docs/contract.md).
        "command": list(contract.POD_COMMAND),
        "env": trainer_env(job, owner, attempt, settings.termination_grace_seconds),
        "ports": [{"name": TORCHRUN_PORT_NAME, "containerPort": contract.DEFAULT_MASTER_PORT},
                  {"name": METRICS_PORT_NAME, "containerPort": spec.metrics.port}],
        "resources": container_resources(job, settings),
        "volumeMounts": [*operator_mounts(job), *storage_mounts(job, settings),
                         *(m.manifest() for m in spec.pod.volume_mounts)],
        # Rank 0 writes {"uri", "manifestSha256"} there on success; a failing rank's last log
        # lines land in the same place, so a Failed condition can quote them.
        "terminationMessagePath": contract.DEFAULT_TERMINATION_LOG,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        # Writable paths are volumes (operator_mounts): the image itself stays untouched. An
        # admin whose custom images write elsewhere turns it off (settings).
        "securityContext": {"allowPrivilegeEscalation": False, "runAsNonRoot": True,
                            "readOnlyRootFilesystem": settings.read_only_root_filesystem,
                            "capabilities": {"drop": ["ALL"]},
                            "seccompProfile": {"type": "RuntimeDefault"}},
    }
    if storage_secret(job, settings):
        container["env"].append({"name": contract.STORAGE_CREDENTIALS_DIR_ENV,
                                 "value": contract.STORAGE_SECRET_DIR})
    if oci_secret(job):
        container["env"].append({"name": contract.OCI_CREDENTIALS_DIR_ENV,
                                 "value": contract.OCI_SECRET_DIR})
    if settings.policy.extra_uri_schemes:  # the trainer re-checks the URIs it opens
        container["env"].append({"name": uris.EXTRA_URI_SCHEMES_ENV,
                                 "value": ",".join(settings.policy.extra_uri_schemes)})
    env_from = [source.manifest() for source in spec.pod.env_from]
    if env_from:
        container["envFrom"] = env_from
    return container


def storage_secret(job: FineTuneJob, settings: Settings) -> str | None:
    """The storage Secret, if any. Without one the pods use their service account's
    workload identity (IRSA, GKE Workload Identity): no static key at all."""
    return job.spec.storage.secret_name or settings.storage_secret


def oci_secret(job: FineTuneJob) -> str | None:
    oci = job.spec.output.oci
    return oci.secret_name if oci else None


def storage_volumes(job: FineTuneJob, settings: Settings) -> list[Manifest]:
    """The storage Secret and the registry Secret (spec.output.oci.secretName) as files (never
    environment variables: checkov CKV_K8S_35), readable by the pod's group only."""
    volumes = [{"name": "storage-credentials",
                "secret": {"secretName": secret, "defaultMode": 0o440}}
               for secret in [storage_secret(job, settings)] if secret]
    if registry := oci_secret(job):
        volumes.append({"name": "oci-credentials",
                        "secret": {"secretName": registry, "defaultMode": 0o440}})
    return volumes


def storage_mounts(job: FineTuneJob, settings: Settings) -> list[Manifest]:
    mounts = [{"name": "storage-credentials", "mountPath": contract.STORAGE_SECRET_DIR,
               "readOnly": True}] if storage_secret(job, settings) else []
    if oci_secret(job):
        mounts.append({"name": "oci-credentials", "mountPath": contract.OCI_SECRET_DIR,
                       "readOnly": True})
    return mounts


def operator_volumes(job: FineTuneJob, owner: Owner) -> list[Manifest]:
    """The volumes every trainer pod gets: its config, shared memory, and the writable
    scratch and cache directories a read-only root filesystem needs."""
    pod, model = job.spec.pod, job.spec.model
    volumes: list[Manifest] = [
        {"name": "config", "configMap": {"name": config_map_name(owner.name)}},
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": pod.shm_size}},
        {"name": "tmp", "emptyDir": {}},
        {"name": "hf-home", "emptyDir": {}},
        {"name": "image-output", "emptyDir": {}},
        # ~/.cache only: packages a derived image installed with `pip --user` (~/.local)
        # stay visible.
        {"name": "home-cache", "emptyDir": {}},
    ]
    if model.cache is not None:
        volumes.append({"name": "hf-cache", "persistentVolumeClaim": {
            "claimName": model.cache.pvc, "readOnly": model.cache.read_only}})
    if model.token_secret is not None:
        # Only the token's key, as a file readable by the pod's group (fsGroup), nobody else.
        volumes.append({"name": "hf-token", "secret": {
            "secretName": model.token_secret.name, "defaultMode": 0o440,
            "items": [{"key": model.token_secret.key, "path": model.token_secret.key}]}})
    if (push := job.spec.output.push_to_hub) and push.token_secret is not None:
        volumes.append({"name": "hub-push-token", "secret": {
            "secretName": push.token_secret.name, "defaultMode": 0o440,
            "items": [{"key": push.token_secret.key, "path": push.token_secret.key}]}})
    return volumes


def operator_mounts(job: FineTuneJob) -> list[Manifest]:
    model = job.spec.model
    mounts: list[Manifest] = [
        {"name": "config", "mountPath": contract.CONFIG_DIR, "readOnly": True},
        {"name": "dshm", "mountPath": SHM_PATH},
        {"name": "tmp", "mountPath": contract.SCRATCH_DIR},
        {"name": "hf-home", "mountPath": contract.HF_HOME_DIR},
        {"name": "image-output", "mountPath": contract.IMAGE_OUTPUT_DIR},
        {"name": "home-cache", "mountPath": contract.HOME_CACHE_DIR},
    ]
    if model.cache is not None:
        mounts.append({"name": "hf-cache", "mountPath": contract.HF_HUB_CACHE_DIR,
                       "readOnly": model.cache.read_only})
    if model.token_secret is not None:
        mounts.append({"name": "hf-token", "mountPath": contract.HF_TOKEN_DIR,
                       "readOnly": True})
    if (push := job.spec.output.push_to_hub) and push.token_secret is not None:
        mounts.append({"name": "hub-push-token", "mountPath": contract.HUB_PUSH_TOKEN_DIR,
                       "readOnly": True})
    return mounts


def hf_env(job: FineTuneJob) -> list[Manifest]:
    """Where the Hub client keeps its files and finds its token (never the token itself)."""
    model = job.spec.model
    env: list[Manifest] = [{"name": "HF_HOME", "value": contract.HF_HOME_DIR},
                           {"name": "HF_HUB_CACHE", "value": contract.HF_HUB_CACHE_DIR}]
    if model.cache is not None and model.cache.read_only:
        env.append({"name": "HF_HUB_OFFLINE", "value": "1"})  # nothing may be written there
    if model.token_secret is not None:
        env.append({"name": "HF_TOKEN_PATH",
                    "value": f"{contract.HF_TOKEN_DIR}/{model.token_secret.key}"})
    if (push := job.spec.output.push_to_hub) and push.token_secret is not None:
        env.append({"name": contract.HUB_PUSH_TOKEN_PATH_ENV,
                    "value": f"{contract.HUB_PUSH_TOKEN_DIR}/{push.token_secret.key}"})
    return env


def trainer_env(job: FineTuneJob, owner: Owner, attempt: int,
                grace_seconds: int | None = None) -> list[Manifest]:
    spec = job.spec
    env: list[Manifest] = [
        # Checkpoints carry the job's identity: another job's (or an earlier object's of the
        # same name) under the same URI are never resumed or pruned.
        {"name": contract.JOB_UID_ENV, "value": owner.uid},
        {"name": contract.PET_NNODES, "value": str(spec.resources.nodes)},
        # gpusPerNode 0 means one CPU process per pod.
        {"name": contract.PET_NPROC_PER_NODE, "value": str(max(1, spec.resources.gpus_per_node))},
        {"name": contract.PET_NODE_RANK, "valueFrom": {"fieldRef": {
            "fieldPath": f"metadata.annotations['{ANNOTATION_COMPLETION_INDEX}']"}}},
        {"name": contract.PET_MASTER_ADDR, "value": master_address(owner.name, attempt)},
        {"name": contract.PET_MASTER_PORT, "value": str(contract.DEFAULT_MASTER_PORT)},
    ]
    if grace_seconds is not None:
        # torchrun SIGKILLs its workers this long after SIGTERM (default 30 s, whatever the
        # pod's grace period): let them use the pod's grace, less a margin to exit.
        env.append({"name": contract.SHUTDOWN_TIMEOUT_ENV,
                    "value": str(contract.worker_shutdown_timeout(grace_seconds))})
    if spec.storage.endpoint_url:
        env.append({"name": "AWS_ENDPOINT_URL", "value": spec.storage.endpoint_url})
    if spec.storage.region:
        env.append({"name": "AWS_DEFAULT_REGION", "value": spec.storage.region})
    env += hf_env(job)
    # The contract refuses reserved names; the check here only guards the launch variables
    # against a spec that skipped validation.
    reserved = {e["name"] for e in env}
    for name, value in sorted(spec.pod.env.items()):
        if name in reserved:
            continue
        if isinstance(value, str):
            env.append({"name": name, "value": value})
        else:
            env.append({"name": name, **value.model_dump(by_alias=True, exclude_defaults=True)})
    return env


def container_resources(job: FineTuneJob, settings: Settings) -> Manifest:
    """Requests equal limits: a gang rank that gets less than it asked for only slows the
    others down. Without spec.pod.cpu/memory the operator's defaults, scaled by the GPU
    count, are requested, and the memory default is also the limit (a rank that grows past
    it is OOM-killed alone instead of starving its node's other tenants). A default CPU limit
    is left out on purpose: CFS throttling stalls data loaders and NCCL's progress threads."""
    pod, resources = job.spec.pod, job.spec.resources
    gpus = resources.gpus_per_node
    limits: dict[str, str] = {name: str(count) for name, count
                              in sorted(resources.extra_resources.items())}
    if gpus:
        limits[resources.gpu_resource] = str(gpus)
    if pod.cpu:
        limits["cpu"] = pod.cpu
    if pod.memory:
        limits["memory"] = pod.memory
    requests = dict(limits)
    default_cpu = _times(settings.cpu_per_gpu, gpus) if gpus else settings.cpu_without_gpu
    default_memory = _times(settings.memory_per_gpu, gpus) if gpus \
        else settings.memory_without_gpu
    if not pod.cpu and default_cpu:
        requests["cpu"] = default_cpu
    if not pod.memory and default_memory:
        requests["memory"] = limits["memory"] = default_memory
    out: Manifest = {}
    if limits:
        out["limits"] = limits
    if requests:
        out["requests"] = requests
    return out


_QUANTITY = re.compile(r"^(\d+(?:\.\d+)?)([a-zA-Z]*)$")


def _times(quantity: str, factor: int) -> str:
    """'4' x 8 = '32', '32Gi' x 2 = '64Gi', '500m' x 3 = '1500m' (settings check the form)."""
    match = _QUANTITY.match(quantity)
    if match is None or factor == 1:
        return quantity
    number, unit = float(match.group(1)) * factor, match.group(2)
    return f"{number:g}{unit}" if not number.is_integer() else f"{int(number)}{unit}"


# --- NetworkPolicy ------------------------------------------------------------------------------

DNS_PORT = 53
WEB_PORTS = (443, 80)  # object stores and the Hugging Face Hub
# Never reachable on the web ports: cloud metadata endpoints (169.254.169.254, fd00:ec2::254
# is behind IMDS on link-local too) and node-local services.
LINK_LOCAL = ("169.254.0.0/16", "fe80::/10")


def network_policy_name(job_name: str) -> str:
    return base_name(job_name)


def build_network_policy(job: FineTuneJob, owner: Owner, settings: Settings) -> Manifest:
    """What a gang needs on the network, nothing more: its ranks reach each other on every
    port (rendezvous, NCCL/gloo pick ports at run time); the operator and Prometheus reach the
    metrics ports; the ranks reach DNS, the object store and the Hub. Anything else (a proxy,
    an experiment tracker) is the admin's settings.extra_egress."""
    ranks = [{"podSelector": {"matchLabels": {LABEL_JOB: base_name(owner.name)}}}]
    ingress: list[Manifest] = [{"from": ranks}]
    if settings.metrics_from:
        first = job.spec.metrics.port
        last = first + max(1, job.spec.resources.gpus_per_node) - 1  # one port per local rank
        port: Manifest = {"protocol": "TCP", "port": first}
        if last > first:
            port["endPort"] = last
        ingress.append({"from": list(settings.metrics_from), "ports": [port]})
    endpoint = [p for p in (*_endpoint_port(job.spec.storage.endpoint_url), *_registry_port(job))
                if p in settings.endpoint_ports]  # the admin's list only
    web = sorted({*WEB_PORTS, *endpoint})
    egress: list[Manifest] = [
        {"to": ranks},
        {"ports": [{"protocol": proto, "port": DNS_PORT} for proto in ("UDP", "TCP")]},
        {"to": _outside(settings), "ports": [{"protocol": "TCP", "port": p} for p in web]},
        *settings.extra_egress,
    ]
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": _metadata(network_policy_name(owner.name), owner),
            "spec": {"podSelector": {"matchLabels": {LABEL_JOB: base_name(owner.name)}},
                     "policyTypes": ["Ingress", "Egress"],
                     "ingress": ingress, "egress": egress}}


def _outside(settings: Settings) -> list[Manifest]:
    """Every address but link-local and the admin's CIDRs (nodes, pods, the API server): the
    operator creates this policy, so it must not open what a default-deny egress closed."""
    blocks = []
    for everything in ("0.0.0.0/0", "::/0"):
        version = ipaddress.ip_network(everything).version
        excluded = [c for c in (*LINK_LOCAL, *settings.egress_except)
                    if ipaddress.ip_network(c).version == version]
        blocks.append({"ipBlock": {"cidr": everything, "except": sorted(set(excluded))}})
    return blocks


def _endpoint_port(url: str | None) -> list[int]:
    """The port of spec.storage.endpointUrl (a MinIO on :9000), when it names one."""
    if not url:
        return []
    try:
        port = urllib.parse.urlsplit(url).port
    except ValueError:
        return []
    return [port] if port else []


def _registry_port(job: FineTuneJob) -> list[int]:
    """The port of spec.output.oci's registry (registry.example.com:5000), when it names one."""
    oci = job.spec.output.oci
    if oci is None:
        return []
    host = parse_reference(oci.reference).registry
    port = host.rsplit(":", 1)[1] if ":" in host and not host.endswith("]") else ""
    return [int(port)] if port else []


def build_children(job: FineTuneJob, owner: Owner, attempt: int,
                   settings: Settings) -> list[Manifest]:
    """In creation order: the pods of the Job mount the ConfigMap, resolve the Service and
    start behind their NetworkPolicy."""
    children = [build_config_map(job, owner), build_service(job, owner)]
    if settings.network_policy:
        children.append(build_network_policy(job, owner, settings))
    return [*children, build_job(job, owner, attempt, settings)]
