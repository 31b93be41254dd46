"""Resolve a FineTuneJob's spec.runtimeRef and merge the runtime into the job. Pure: the
reconciler does the one GET; everything here is tested without a cluster.

Precedence (docs/runtimes.md): a runtime field left out constrains nothing; a field set is
what the job gets, and the job may only repeat it (image, affinity, scheduler, PriorityClass,
queue), add to it without changing it (nodeSelector, labels, annotations, env, pull secrets),
pick from it (tolerations) or override a default (cpu, memory). Anything else, and a job that
breaks the runtime's policy, is a PolicyViolation naming the rule. The operator-wide policy
(policy.py) is then checked on the merged job: it stays the floor.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from kubetune_api.crd import Runtime
from kubetune_api.load import SpecError, validate_job
from kubetune_api.runtime import KUEUE_QUEUE_LABEL, RUNTIME_KINDS, FineTuneRuntimeSpec
from kubetune_api.spec import GROUP, RUNTIME_KIND, VERSION, FineTuneJob, RuntimeRef
from kubetune_operator.kube import Resource

REASON_RUNTIME_NOT_FOUND = "RuntimeNotFound"
REASON_INVALID_RUNTIME = "InvalidRuntime"


class RuntimeUnusable(Exception):
    """The named runtime is missing or malformed; `reason` is the condition's reason."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class Resolved:
    ref: RuntimeRef
    uid: str | None
    generation: int | None
    spec: FineTuneRuntimeSpec

    @property
    def label(self) -> str:
        return f"{self.ref.kind} {self.ref.name}"


def resource(kind: str) -> Resource:
    return Resource(GROUP, VERSION, RUNTIME_KINDS[kind], namespaced=kind == RUNTIME_KIND)


def resolve(ref: RuntimeRef, job_namespace: str, body: Mapping[str, Any] | None) -> Resolved:
    """The runtime object as read from the API (None: not found)."""
    where = f" in namespace {job_namespace}" if ref.kind == RUNTIME_KIND else ""
    if body is None:
        raise RuntimeUnusable(REASON_RUNTIME_NOT_FOUND,
                              f"spec.runtimeRef: {ref.kind} {ref.name} not found{where}")
    try:
        spec = FineTuneRuntimeSpec.model_validate(body.get("spec") or {})
    except ValidationError as exc:
        problems = "; ".join(f"spec.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}"
                             for e in exc.errors())
        raise RuntimeUnusable(REASON_INVALID_RUNTIME,
                              f"{ref.kind} {ref.name}: {problems}") from None
    meta = body.get("metadata") or {}
    return Resolved(ref, meta.get("uid"), meta.get("generation"), spec)


def pinned(ref: RuntimeRef, recorded: Runtime | None) -> Resolved | None:
    """The runtime status.runtime recorded for this ref (the first attempt's), if any: later
    attempts train under it even if an admin edited or deleted the runtime since."""
    if recorded is None or recorded.ref != ref or recorded.spec is None:
        return None
    return Resolved(ref, recorded.uid, recorded.generation,
                    FineTuneRuntimeSpec.model_validate(recorded.spec))


def record(runtime: Runtime, resolved: Resolved) -> Runtime:
    """status.runtime with the resolved runtime added: its ServiceAccount, where it names one,
    replaces the operator's default for every attempt (workload identity per team)."""
    account = resolved.spec.service_account_name or runtime.service_account
    return runtime.model_copy(update={
        "ref": resolved.ref, "uid": resolved.uid, "generation": resolved.generation,
        "service_account": account,
        "spec": resolved.spec.model_dump(by_alias=True, exclude_none=True, mode="json")})


def merge(job: FineTuneJob, resolved: Resolved) -> tuple[FineTuneJob, list[str]]:
    """The job as it runs under the runtime, and every rule it breaks."""
    runtime, pod = resolved.spec, job.spec.pod
    problems: list[str] = []
    rule = f"({resolved.label}: "

    def only_repeat(field: str, wanted: Any, given: Any) -> Any:
        if wanted is None:
            return given
        if given not in (None, wanted):
            problems.append(f"spec.pod.{field}: {_text(given)} differs from the runtime's "
                            f"{_text(wanted)} {rule}{field} is set by the runtime)")
        return wanted

    def add_to(field: str, wanted: Mapping[str, Any], given: Mapping[str, Any]) -> dict[str, Any]:
        for key, value in wanted.items():
            if key in given and given[key] != value:
                problems.append(f"spec.pod.{field}.{key}: {_text(given[key])} differs from the "
                                f"runtime's {_text(value)} {rule}{field} are set by the "
                                "runtime)")
        return {**given, **wanted}

    merged_pod: dict[str, Any] = {
        "image": only_repeat("image", runtime.image, pod.image),
        "affinity": only_repeat("affinity", runtime.affinity, pod.affinity),
        "schedulerName": only_repeat("schedulerName", runtime.scheduler_name,
                                     pod.scheduler_name),
        "priorityClassName": only_repeat("priorityClassName", runtime.priority_class_name,
                                         pod.priority_class_name),
        "cpu": pod.cpu or runtime.cpu,
        "memory": pod.memory or runtime.memory,
        "imagePullSecrets": list(dict.fromkeys([*runtime.image_pull_secrets,
                                                *pod.image_pull_secrets])),
        "nodeSelector": add_to("nodeSelector", runtime.node_selector, pod.node_selector),
        "labels": add_to("labels", runtime.labels, pod.labels),
        "annotations": add_to("annotations", runtime.annotations, pod.annotations),
        "env": add_to("env", runtime.env, _env(job)),
        "tolerations": _tolerations(pod.tolerations, runtime.tolerations, problems, rule),
    }
    problems += policy_violations(job, resolved)
    return _with_pod(job, merged_pod, resolved), problems


def policy_violations(job: FineTuneJob, resolved: Resolved) -> list[str]:
    """The runtime's policy: methods, GPUs per job, storage prefixes."""
    policy, spec, problems = resolved.spec.policy, job.spec, []
    rule = f"({resolved.label}: "
    methods = policy.allowed_methods
    if methods is not None and spec.method.type not in methods:
        problems.append(f"spec.method.type: {spec.method.type} is not allowed {rule}"
                        f"allowedMethods: {_one_of(methods)})")
    gpus = spec.resources.nodes * spec.resources.gpus_per_node
    if policy.max_gpus_per_job is not None and gpus > policy.max_gpus_per_job:
        problems.append(f"spec.resources: {spec.resources.nodes} nodes x "
                        f"{spec.resources.gpus_per_node} GPUs = {gpus} GPUs {rule}"
                        f"maxGpusPerJob: {policy.max_gpus_per_job})")
    prefixes = policy.allowed_storage_prefixes
    if prefixes is not None:
        for field, uri in (("spec.output.uri", spec.output.uri),
                           ("spec.checkpoint.uri", spec.checkpoint.uri)):
            if uri is not None and not uri.startswith(tuple(prefixes)):
                problems.append(f"{field}: {uri} is not allowed {rule}"
                                f"allowedStoragePrefixes: {_one_of(prefixes)})")
    return problems


def queue_labels(labels: Mapping[str, str], resolved: Resolved) -> tuple[dict[str, str],
                                                                          list[str]]:
    """The job's labels with the runtime's Kueue queue, and a problem if it names another."""
    queue = resolved.spec.queue
    if queue is None:
        return dict(labels), []
    given = labels.get(KUEUE_QUEUE_LABEL)
    if given not in (None, queue):
        return dict(labels), [f"metadata.labels[{KUEUE_QUEUE_LABEL}]: {given} differs from the "
                              f"runtime's {queue} ({resolved.label}: queue is set by the "
                              "runtime)"]
    return {**labels, KUEUE_QUEUE_LABEL: queue}, []


def _tolerations(given: list[dict[str, Any]], allowed: list[dict[str, Any]] | None,
                 problems: list[str], rule: str) -> list[dict[str, Any]]:
    if allowed is None:
        return given
    for index, toleration in enumerate(given):
        if toleration not in allowed:
            problems.append(f"spec.pod.tolerations[{index}]: {_text(toleration)} is not one of "
                            f"the runtime's {rule}tolerations: {_text(allowed)})")
    return given or allowed


def _env(job: FineTuneJob) -> dict[str, Any]:
    dumped = job.spec.pod.model_dump(by_alias=True, exclude_none=True, mode="json")
    return dict(dumped.get("env") or {})


def _with_pod(job: FineTuneJob, merged_pod: Mapping[str, Any], resolved: Resolved
              ) -> FineTuneJob:
    """The merged pod section, validated as a job's (reserved labels, env names ...): a
    runtime that breaks the contract is refused, naming the runtime."""
    data = job.model_dump(by_alias=True, exclude_none=True, mode="json")
    pod = {**data["spec"].get("pod", {}), **{k: v for k, v in merged_pod.items()
                                              if v is not None}}
    data["spec"]["pod"] = pod
    try:
        return validate_job(data, source=resolved.label)
    except SpecError as exc:
        raise RuntimeUnusable(REASON_INVALID_RUNTIME, str(exc)) from None


def _one_of(values: Any) -> str:
    return ", ".join(str(v) for v in values) if values else "none"


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)
