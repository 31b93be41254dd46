"""Admin policy for shared clusters: rules a cluster admin sets in the operator's settings
(Helm values `policy`, environment KUBETUNE_POLICY as JSON) that no FineTuneJob can override.

Checked before every attempt (the first one before any child exists): a violating job ends
Failed with reason PolicyViolation, naming the field and the rule. Every attempt is built from
the FineTuneJob itself; the spec the first attempt admitted is pinned by its hash in
status.admittedSpecHash (only the operator writes status), so a spec changed behind the API
server's back, or labels a tenant changed later, are caught before the next attempt instead of
being trained. A running attempt is never stopped by a policy change. Pure: no I/O.

For every list rule, null (the default) means "no restriction" and a list means "only these"
(an empty list: none at all).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic.alias_generators import to_camel

from kubetune_api import uris
from kubetune_api.spec import FineTuneJobSpec
from kubetune_api.uris import URI_SCHEMES
from kubetune_operator.gang import SUFFIXES, parse_quantity

REASON_POLICY_VIOLATION = "PolicyViolation"
POLICY_ENV = "KUBETUNE_POLICY"
# builders.LABEL_KUEUE_QUEUE/_PRIORITY (settings import this module, builders import settings).
LABEL_KUEUE_QUEUE = "kueue.x-k8s.io/queue-name"
LABEL_KUEUE_PRIORITY = "kueue.x-k8s.io/priority-class"
# Extended resources that are GPUs (or slices of one) unless the admin lists others; a name
# ending in * is a prefix (every MIG profile).
DEFAULT_GPU_RESOURCES = ("nvidia.com/gpu", "nvidia.com/mig-*", "amd.com/gpu", "habana.ai/gaudi",
                         "gpu.intel.com/*")


class PolicyModel(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid",
                              frozen=True)


class TolerationRule(PolicyModel):
    """A toleration a job may carry: every field given here must match; missing ones match
    anything (e.g. {key: nvidia.com/gpu, effect: NoSchedule})."""

    key: str | None = None
    operator: str | None = None
    value: str | None = None
    effect: str | None = None

    def matches(self, toleration: Mapping[str, Any]) -> bool:
        wanted = self.model_dump(exclude_none=True)
        return all(toleration.get(name) == value for name, value in wanted.items())


class Policy(PolicyModel):
    allowed_image_prefixes: tuple[str, ...] | None = Field(
        None, description="spec.pod.image must start with one of these (the operator's own "
        "trainer image is always allowed).")
    allowed_priority_classes: tuple[str, ...] | None = Field(
        None, description="Allowed spec.pod.priorityClassName values (unset is allowed).")
    allowed_schedulers: tuple[str, ...] | None = Field(
        None, description="Allowed spec.pod.schedulerName values (unset is allowed).")
    allowed_tolerations: tuple[TolerationRule, ...] | None = Field(
        None, description="Every spec.pod.tolerations entry must match one rule.")
    require_queue: bool = Field(False, description="Every job must carry the Kueue label "
                                f"{LABEL_KUEUE_QUEUE} (after defaultQueue applied).")
    default_queue: str | None = Field(None, description="Kueue queue for jobs without the "
                                      "label.")
    allowed_queues: tuple[str, ...] | None = Field(None, description="Allowed Kueue queues.")
    allowed_kueue_priority_classes: tuple[str, ...] | None = Field(
        None, description=f"Allowed values of the FineTuneJob label {LABEL_KUEUE_PRIORITY} "
        "(unset is allowed).")
    max_gpus_per_job: int | None = Field(None, ge=0, description="Cap on resources.nodes x "
                                         "(gpusPerNode + every gpuResources entry of "
                                         "extraResources).")
    gpu_resources: tuple[str, ...] = Field(
        DEFAULT_GPU_RESOURCES, description="Extended resources counted as GPUs by "
        "maxGpusPerJob when a job asks for them in extraResources (a trailing * matches a "
        "prefix).")
    max_nodes_per_job: int | None = Field(None, ge=1, description="Cap on resources.nodes.")
    allowed_extra_resources: tuple[str, ...] | None = Field(
        None, description="Allowed resources.extraResources names (a trailing * matches a "
        "prefix).")
    extra_uri_schemes: tuple[str, ...] = Field(
        (), description=f"fsspec schemes allowed for dataset, output and checkpoint URIs "
        f"besides {', '.join(URI_SCHEMES)} (e.g. az, abfs).")
    allow_service_account_tokens: bool = Field(
        False, description="Admit projected volumes with a serviceAccountToken source (the "
        "trainer pods mount no API token otherwise).")
    allowed_volume_types: tuple[str, ...] | None = Field(
        None, description="Allowed spec.pod.volumes sources (persistentVolumeClaim, "
        "configMap, secret, emptyDir, csi, ephemeral, projected, downwardAPI).")
    allowed_csi_drivers: tuple[str, ...] | None = Field(
        None, description="Allowed drivers of inline csi volumes.")
    allowed_storage_classes: tuple[str, ...] | None = Field(
        None, description="Allowed storageClassName of ephemeral volume claims (one that "
        "names none is refused when this is set: the cluster default is not the admin's "
        "choice).")
    max_ephemeral_claim_size: str | None = Field(
        None, description="Cap on resources.requests.storage of ephemeral volume claims (a "
        "quantity such as 500Gi; a claim without a storage request is refused when set).")
    denied_metadata_prefixes: tuple[str, ...] | None = Field(
        None, description="spec.pod.labels and spec.pod.annotations keys that start with one "
        "of these are refused (Volcano's queue, AppArmor, the cluster autoscaler, ...).")

    @field_validator("max_ephemeral_claim_size")
    @classmethod
    def _a_quantity(cls, value: str | None) -> str | None:
        if value is not None and quantity(value) is None:
            raise ValueError(f"not a quantity: {value}")
        return value

    @property
    def is_empty(self) -> bool:
        return self == Policy()


# A Kubernetes resource quantity (apimachinery's resource.Quantity): a decimal number and one
# binary or decimal suffix, or an exponent. Stricter than Decimal(), which accepts "5 " and "NaN".
_QUANTITY = re.compile(r"[+]?(\d+\.?\d*|\.\d+)(" + "|".join(SUFFIXES) + r"|[eE][+-]?\d+)?")


def quantity(text: str) -> Decimal | None:
    """text's value (512Mi: 536870912), or None when it is not a quantity."""
    return parse_quantity(text) if _QUANTITY.fullmatch(text) else None


class PolicyError(ValueError):
    """The admin's policy itself is malformed: the operator refuses to start."""


def parse_policy(text: str) -> Policy:
    if not text.strip():
        return Policy()
    try:
        return Policy.model_validate(json.loads(text))
    except json.JSONDecodeError as exc:
        raise PolicyError(f"{POLICY_ENV}: not JSON: {exc}") from None
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}"
                             for e in exc.errors())
        raise PolicyError(f"{POLICY_ENV}: {problems}") from None


def with_default_queue(labels: Mapping[str, str], policy: Policy) -> dict[str, str]:
    """A FineTuneJob's labels as its children see them: the admin's default Kueue queue when
    it has none, so a job that leaves the label out still goes through quota."""
    if policy.default_queue and LABEL_KUEUE_QUEUE not in labels:
        return {**labels, LABEL_KUEUE_QUEUE: policy.default_queue}
    return dict(labels)


def _under(image: str, prefix: str) -> bool:
    """registry.corp/ml admits registry.corp/ml/x and registry.corp/ml:1, never
    registry.corp/ml-evil/x: a prefix ends at a path, tag or digest boundary."""
    if not image.startswith(prefix):
        return False
    return prefix.endswith(("/", ":", "@")) or image[len(prefix):][:1] in ("", "/", ":", "@")


def _one_of(values: tuple[str, ...]) -> str:
    return ", ".join(values) if values else "none"


def violations(spec: FineTuneJobSpec, labels: Mapping[str, str], policy: Policy,
               operator_image: str | None = None) -> list[str]:
    """Every rule the job breaks, as '<field>: <what> (<rule>: <allowed>)'. The operator's
    own trainer image is allowed whether the job leaves spec.pod.image empty or names it."""
    pod, problems = spec.pod, []
    prefixes = policy.allowed_image_prefixes
    if prefixes is not None and pod.image and pod.image != operator_image \
            and not any(_under(pod.image, prefix) for prefix in prefixes):
        problems.append(f"spec.pod.image: {pod.image} is not allowed "
                        f"(allowedImagePrefixes: {_one_of(prefixes)})")
    classes = policy.allowed_priority_classes
    if classes is not None and pod.priority_class_name \
            and pod.priority_class_name not in classes:
        problems.append(f"spec.pod.priorityClassName: {pod.priority_class_name} is not allowed "
                        f"(allowedPriorityClasses: {_one_of(classes)})")
    schedulers = policy.allowed_schedulers
    if schedulers is not None and pod.scheduler_name and pod.scheduler_name not in schedulers:
        problems.append(f"spec.pod.schedulerName: {pod.scheduler_name} is not allowed "
                        f"(allowedSchedulers: {_one_of(schedulers)})")
    if policy.allowed_tolerations is not None:
        for index, toleration in enumerate(pod.tolerations):
            if not any(rule.matches(toleration) for rule in policy.allowed_tolerations):
                problems.append(f"spec.pod.tolerations[{index}]: {json.dumps(toleration)} "
                                "matches no allowed toleration (allowedTolerations: "
                                f"{_describe_tolerations(policy.allowed_tolerations)})")
    problems += _queue_violations(labels, policy)
    problems += _kueue_priority_violations(labels, policy)
    problems += _metadata_violations(pod.labels, "labels", policy)
    problems += _metadata_violations(pod.annotations, "annotations", policy)
    problems += _resource_violations(spec, policy)
    problems += _uri_violations(spec, policy)
    problems += _volume_violations(spec, policy)
    return problems


def _volume_violations(spec: FineTuneJobSpec, policy: Policy) -> list[str]:
    problems = []
    for index, volume in enumerate(spec.pod.volumes):
        field = f"spec.pod.volumes[{index}]"
        [(kind, source)] = volume.sources().items()
        types = policy.allowed_volume_types
        if types is not None and kind not in types:
            problems.append(f"{field}: {kind} is not allowed (allowedVolumeTypes: "
                            f"{_one_of(types)})")
        if kind == "projected" and not policy.allow_service_account_tokens and any(
                "serviceAccountToken" in item for item in source.get("sources") or []):
            problems.append(f"{field}: a projected serviceAccountToken is not allowed "
                            "(allowServiceAccountTokens: false)")
        drivers = policy.allowed_csi_drivers
        if kind == "csi" and drivers is not None and source.get("driver") not in drivers:
            problems.append(f"{field}: csi driver {source.get('driver')} is not allowed "
                            f"(allowedCsiDrivers: {_one_of(drivers)})")
        classes = policy.allowed_storage_classes
        if kind == "ephemeral" and classes is not None:
            claim = (source.get("volumeClaimTemplate") or {}).get("spec") or {}
            name = claim.get("storageClassName")
            if name not in classes:
                problems.append(f"{field}: storageClassName {name or '(cluster default)'} is "
                                f"not allowed (allowedStorageClasses: {_one_of(classes)})")
        if kind == "ephemeral" and policy.max_ephemeral_claim_size is not None:
            problems += _claim_size_violations(field, source, policy.max_ephemeral_claim_size)
    return problems


def _claim_size_violations(field: str, source: dict[str, Any], cap: str) -> list[str]:
    """The claim's storage request against the cap; the request is what the provisioner sizes
    the volume by (a claim's limits do not bound it)."""
    claim = (source.get("volumeClaimTemplate") or {}).get("spec") or {}
    size = ((claim.get("resources") or {}).get("requests") or {}).get("storage")
    rule = f"(maxEphemeralClaimSize: {cap})"
    if size is None:
        return [f"{field}: ephemeral claim without resources.requests.storage is not allowed "
                f"{rule}"]
    value = quantity(str(size))
    if value is None:
        return [f"{field}: ephemeral claim size {size} is not a quantity {rule}"]
    if value > parse_quantity(cap):
        return [f"{field}: ephemeral claim of {size} is over the cap {rule}"]
    return []


def _uri_violations(spec: FineTuneJobSpec, policy: Policy) -> list[str]:
    return uris.scheme_violations(spec, policy.extra_uri_schemes)


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(name.startswith(p[:-1]) if p.endswith("*") else name == p for p in patterns)


def _resource_violations(spec: FineTuneJobSpec, policy: Policy) -> list[str]:
    resources, problems = spec.resources, []
    if policy.max_nodes_per_job is not None and resources.nodes > policy.max_nodes_per_job:
        problems.append(f"spec.resources.nodes: {resources.nodes} "
                        f"(maxNodesPerJob: {policy.max_nodes_per_job})")
    allowed = policy.allowed_extra_resources
    for name in resources.extra_resources:
        if allowed is not None and not _matches(name, allowed):
            problems.append(f"spec.resources.extraResources.{name}: not allowed "
                            f"(allowedExtraResources: {_one_of(allowed)})")
    extra_gpus = {name: count for name, count in resources.extra_resources.items()
                  if _matches(name, policy.gpu_resources)}
    per_node = resources.gpus_per_node + sum(extra_gpus.values())
    gpus = resources.nodes * per_node
    if policy.max_gpus_per_job is not None and gpus > policy.max_gpus_per_job:
        asked = f"{resources.gpus_per_node} GPUs"
        if extra_gpus:
            asked = "(" + " + ".join([f"{resources.gpus_per_node} {resources.gpu_resource}",
                                      *(f"{n} {name}" for name, n in extra_gpus.items())]) + ")"
        problems.append(f"spec.resources: {resources.nodes} nodes x {asked} = {gpus} GPUs "
                        f"(maxGpusPerJob: {policy.max_gpus_per_job})")
    return problems


def _kueue_priority_violations(labels: Mapping[str, str], policy: Policy) -> list[str]:
    value, allowed = labels.get(LABEL_KUEUE_PRIORITY), policy.allowed_kueue_priority_classes
    if value is None or allowed is None or value in allowed:
        return []
    return [f"metadata.labels[{LABEL_KUEUE_PRIORITY}]: {value} is not allowed "
            f"(allowedKueuePriorityClasses: {_one_of(allowed)})"]


def _metadata_violations(entries: Mapping[str, str], kind: str, policy: Policy) -> list[str]:
    denied = policy.denied_metadata_prefixes
    if not denied:
        return []
    return [f"spec.pod.{kind}[{key}]: denied (deniedMetadataPrefixes: {_one_of(denied)})"
            for key in entries if key.startswith(denied)]


SPEC_HASH_PREFIX = "sha256:"


def spec_hash(spec: FineTuneJobSpec) -> str:
    """What an attempt trains, as one comparable value: the spec without runPolicy (the only
    part a running job may change: suspend, TTL)."""
    admitted = spec.model_dump(by_alias=True, mode="json", exclude={"run_policy"})
    text = json.dumps(admitted, sort_keys=True, separators=(",", ":"))
    return SPEC_HASH_PREFIX + hashlib.sha256(text.encode()).hexdigest()


def attempt_violations(spec: FineTuneJobSpec, labels: Mapping[str, str], policy: Policy,
                       operator_image: str | None, admitted_hash: str | None) -> list[str]:
    """violations() before any attempt, plus, once a first attempt was admitted, a spec that
    is not the admitted one (immutable while active; an API server without CEL lets it
    change)."""
    problems = violations(spec, labels, policy, operator_image)
    if admitted_hash is not None and spec_hash(spec) != admitted_hash:
        problems.append(f"spec: changed after its first attempt was admitted (admittedSpecHash: "
                        f"{admitted_hash}); only runPolicy may change while a job is active")
    return problems


MAX_MESSAGE = 1000  # characters of a PolicyViolation condition and event


def summary(problems: list[str]) -> str:
    """The violations as one condition message, capped (a job may list many tolerations)."""
    text = "; ".join(problems)
    if len(text) <= MAX_MESSAGE:
        return text
    return text[:MAX_MESSAGE].rsplit("; ", 1)[0] + f"; … ({len(problems)} violations in all)"


def _queue_violations(labels: Mapping[str, str], policy: Policy) -> list[str]:
    queue = with_default_queue(labels, policy).get(LABEL_KUEUE_QUEUE)
    field = f"metadata.labels[{LABEL_KUEUE_QUEUE}]"
    if queue is None:
        return [f"{field}: missing (requireQueue: a Kueue queue is required)"] \
            if policy.require_queue else []
    if policy.allowed_queues is not None and queue not in policy.allowed_queues:
        return [f"{field}: {queue} is not allowed "
                f"(allowedQueues: {_one_of(policy.allowed_queues)})"]
    return []


def _describe_tolerations(rules: tuple[TolerationRule, ...]) -> str:
    if not rules:
        return "none"
    return ", ".join(json.dumps(rule.model_dump(exclude_none=True)) for rule in rules)
