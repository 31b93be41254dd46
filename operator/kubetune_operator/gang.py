"""Gang scheduling without Kueue: the PodGroup of Volcano or of the scheduler-plugins
coscheduling plugin, one per attempt. Pure functions; the reconciler creates and reads them.

When `spec.pod.schedulerName` is Volcano's (`volcano`) or the coscheduling plugin's scheduler
(`scheduler-plugins-scheduler`, the name its manifests deploy), the pods of an attempt carry
that scheduler's PodGroup reference and the operator creates the PodGroup, owned by the
attempt's Job (so it goes with the attempt): minMember = nodes, minResources = the ranks'
requests summed. Shapes as upstream defines them: volcano-sh/apis
pkg/apis/scheduling/v1beta1/types.go (PodGroupSpec, PodGroupStatus, condition Unschedulable,
annotation scheduling.k8s.io/group-name) and kubernetes-sigs/scheduler-plugins
apis/scheduling/v1alpha1 (PodGroupSpec minMember/minResources/scheduleTimeoutSeconds, status
phase, label scheduling.x-k8s.io/pod-group).
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from kubetune_api.crd import Condition, FineTuneJobStatus, Phase
from kubetune_operator.kube import Resource

Manifest = dict[str, Any]


@dataclass(frozen=True)
class GangApi:
    name: str  # "volcano" | "coscheduling"
    resource: Resource
    api_version: str
    pod_label: str | None = None
    pod_annotation: str | None = None
    # PodGroup phases in which the gang is not placed yet
    waiting_phases: frozenset[str] = frozenset()


VOLCANO = GangApi("volcano", Resource("scheduling.volcano.sh", "v1beta1", "podgroups"),
                  "scheduling.volcano.sh/v1beta1",
                  pod_annotation="scheduling.k8s.io/group-name",
                  waiting_phases=frozenset({"Pending", "Inqueue", "Unknown"}))
COSCHEDULING = GangApi("coscheduling", Resource("scheduling.x-k8s.io", "v1alpha1", "podgroups"),
                       "scheduling.x-k8s.io/v1alpha1",
                       pod_label="scheduling.x-k8s.io/pod-group",
                       waiting_phases=frozenset({"Pending", "PreScheduling", "Scheduling"}))
GANG_SCHEDULERS = {"volcano": VOLCANO, "scheduler-plugins-scheduler": COSCHEDULING}
REASON_GANG_PENDING = "GangPending"
# The Running=False reasons a stuck PodGroup explains better (the pods just wait).
WAITING_REASONS = frozenset({"WaitingForPods", "Unschedulable", "ContainerCreating"})


def gang_api(scheduler_name: str | None) -> GangApi | None:
    return GANG_SCHEDULERS.get(scheduler_name or "")


def mark_pods(job_manifest: Manifest, gang: GangApi, group: str) -> Manifest:
    """The attempt's Job with its pod template naming the PodGroup, as the scheduler reads it."""
    meta = job_manifest["spec"]["template"].setdefault("metadata", {})
    if gang.pod_label:
        meta.setdefault("labels", {})[gang.pod_label] = group
    if gang.pod_annotation:
        meta.setdefault("annotations", {})[gang.pod_annotation] = group
    return job_manifest


def min_resources(job_manifest: Manifest) -> dict[str, str]:
    """Every rank's container requests, times the ranks (the Job's completions)."""
    ranks = int(job_manifest["spec"]["completions"])
    totals: dict[str, Decimal] = {}
    for container in job_manifest["spec"]["template"]["spec"]["containers"]:
        for key, value in ((container.get("resources") or {}).get("requests") or {}).items():
            totals[key] = totals.get(key, Decimal(0)) + parse_quantity(str(value))
    return {key: format_quantity(value * ranks) for key, value in sorted(totals.items())}


SUFFIXES: dict[str, Decimal] = {
    "Ki": Decimal(2**10), "Mi": Decimal(2**20), "Gi": Decimal(2**30), "Ti": Decimal(2**40),
    "Pi": Decimal(2**50), "Ei": Decimal(2**60), "m": Decimal("0.001"), "k": Decimal(10**3),
    "M": Decimal(10**6), "G": Decimal(10**9), "T": Decimal(10**12), "P": Decimal(10**15),
    "E": Decimal(10**18)}


def parse_quantity(text: str) -> Decimal:
    for suffix in sorted(SUFFIXES, key=len, reverse=True):
        if text.endswith(suffix):
            return Decimal(text[: -len(suffix)]) * SUFFIXES[suffix]
    return Decimal(text)


def format_quantity(value: Decimal) -> str:
    """Whole numbers plainly (bytes stay bytes: 17179869184), fractions in milli-units."""
    if value == value.to_integral_value():
        return str(int(value))
    return f"{int(value * 1000)}m"


def build_pod_group(gang: GangApi, job_manifest: Manifest, job_uid: str) -> Manifest:
    """The attempt's PodGroup: named and labelled as its Job, owned by it. Volcano orders
    PodGroups by their own priorityClassName: the pods' is copied."""
    meta = job_manifest["metadata"]
    spec: Manifest = {"minMember": int(job_manifest["spec"]["completions"]),
                      "minResources": min_resources(job_manifest)}
    priority_class = job_manifest["spec"]["template"]["spec"].get("priorityClassName")
    if gang is VOLCANO and priority_class:
        spec["priorityClassName"] = priority_class
    return {"apiVersion": gang.api_version, "kind": "PodGroup", "metadata": {
        "name": meta["name"], "namespace": meta["namespace"], "labels": dict(meta["labels"]),
        "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": meta["name"],
                             "uid": job_uid, "controller": True, "blockOwnerDeletion": True}]},
        "spec": spec}


def pending_reason(gang: GangApi, pod_group: Manifest | None) -> str | None:
    """Why the gang is not placed, from the PodGroup's status; None once it is (or unknown)."""
    if pod_group is None:
        return None
    status = pod_group.get("status") or {}
    phase = status.get("phase")
    name = pod_group["metadata"]["name"]
    for cond in status.get("conditions") or []:
        if cond.get("type") == "Unschedulable" and cond.get("status") == "True":
            detail = ": ".join(p for p in (cond.get("reason"), cond.get("message")) if p)
            return f"PodGroup {name} ({gang.name}) {phase or 'Pending'}: {detail}"
    if phase in gang.waiting_phases:
        return (f"PodGroup {name} ({gang.name}) {phase}: waiting for all "
                f"{pod_group['spec'].get('minMember')} ranks to fit at once")
    return None


def explain_pending(status: FineTuneJobStatus, reason: str | None,
                    generation: int | None) -> FineTuneJobStatus:
    """While the job waits for its pods, name the PodGroup's reason in the Running=False
    condition instead of the generic one (still False: its transition time stays)."""
    if reason is None or status.phase != Phase.PENDING:
        return status
    conditions = list(status.conditions)
    for index, cond in enumerate(conditions):
        if cond.type == "Running" and cond.status == "False" and (
                cond.reason in WAITING_REASONS or cond.reason == REASON_GANG_PENDING):
            if (cond.reason, cond.message) == (REASON_GANG_PENDING, reason):
                return status
            conditions[index] = Condition(
                type="Running", status="False", reason=REASON_GANG_PENDING, message=reason,
                last_transition_time=cond.last_transition_time,
                observed_generation=generation)
            return status.model_copy(update={"conditions": conditions})
    return status
