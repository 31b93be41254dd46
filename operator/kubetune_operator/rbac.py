"""Every API call the operator makes, as RBAC rules: the one place the Helm chart's
ClusterRole is checked against. Keep it in step with kube.py / handlers.py / kopf's needs."""

from __future__ import annotations

from typing import Any

from kubetune_api.runtime import CLUSTER_RUNTIME_PLURAL, RUNTIME_PLURAL
from kubetune_api.spec import GROUP, PLURAL

WATCH = ["get", "list", "watch"]

RULES: list[dict[str, Any]] = [
    # The custom resource: watched by kopf, status written by the reconciler, annotations and
    # a finalizer patched by kopf, deleted when its ttlSecondsAfterFinished passes.
    {"apiGroups": [GROUP], "resources": [PLURAL], "verbs": [*WATCH, "patch", "delete"]},
    {"apiGroups": [GROUP], "resources": [f"{PLURAL}/status"], "verbs": ["get", "patch"]},
    # Never called: children carry blockOwnerDeletion, and clusters that enforce owner
    # reference permissions (OwnerReferencesPermissionEnforcement, on in OpenShift) require
    # update on the owner's finalizers to create them.
    {"apiGroups": [GROUP], "resources": [f"{PLURAL}/finalizers"], "verbs": ["update"]},
    # Children: created once, Jobs suspended/resumed and deleted between attempts.
    {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": [*WATCH, "create", "patch",
                                                              "delete"]},
    # ConfigMap, Service, NetworkPolicy: one left by an earlier FineTuneJob of the same name
    # is replaced.
    {"apiGroups": [""], "resources": ["configmaps", "services"],
     "verbs": ["get", "create", "delete"]},
    {"apiGroups": ["networking.k8s.io"], "resources": ["networkpolicies"],
     "verbs": ["get", "create", "delete"]},
    # Gang scheduling without Kueue (gang.py): the attempt's PodGroup, created and read while
    # the job is Pending; deleted with its Job by the garbage collector.
    {"apiGroups": ["scheduling.volcano.sh", "scheduling.x-k8s.io"], "resources": ["podgroups"],
     "verbs": ["get", "create"]},
    # Curated runtimes (runtimes.py): each job's one read before its first attempt; the
    # operator never lists or watches them (a job pins the runtime it started with).
    {"apiGroups": [GROUP], "resources": [RUNTIME_PLURAL], "verbs": ["get"]},
    {"apiGroups": [GROUP], "resources": [CLUSTER_RUNTIME_PLURAL], "verbs": ["get"]},
    # Pods: read; a finished attempt's pods deleted, force-deleted when their node is gone.
    {"apiGroups": [""], "resources": ["pods"], "verbs": [*WATCH, "delete"]},
    # Events for every transition (kopf posts them); the Job controller's FailedCreate events
    # of a Job short of pods are listed (quota, missing PriorityClass: the Pending condition).
    {"apiGroups": [""], "resources": ["events"], "verbs": ["create", "list"]},
    # kopf: peering between replicas, CRD discovery, namespaces when watching patterns.
    {"apiGroups": ["kopf.dev"], "resources": ["clusterkopfpeerings", "kopfpeerings"],
     "verbs": [*WATCH, "patch"]},
    {"apiGroups": ["apiextensions.k8s.io"], "resources": ["customresourcedefinitions"],
     "verbs": WATCH},
    {"apiGroups": [""], "resources": ["namespaces"], "verbs": WATCH},
]


CLUSTER_PEERINGS = ("kopf.dev", "clusterkopfpeerings")
NAMESPACED_PEERINGS = ("kopf.dev", "kopfpeerings")
NAMESPACES = ("", "namespaces")
NETWORK_POLICIES = ("networking.k8s.io", "networkpolicies")
CLUSTER_RUNTIMES = (GROUP, CLUSTER_RUNTIME_PLURAL)


def rules_for(clusterwide: bool, peering: bool,
              network_policy: bool = True) -> list[dict[str, Any]]:
    """RULES less the resources this install mode never touches: peering objects without
    peering (and the other scope's kind with it), namespaces when watching all of them (kopf
    lists namespaces only to resolve a namespace list), NetworkPolicies when the operator
    creates none (KUBETUNE_NETWORK_POLICY=false)."""
    unused = {NAMESPACED_PEERINGS if clusterwide else CLUSTER_PEERINGS}
    if not network_policy:
        unused.add(NETWORK_POLICIES)
    if not peering:
        unused |= {NAMESPACED_PEERINGS, CLUSTER_PEERINGS}
    if clusterwide:
        unused.add(NAMESPACES)
    rules = []
    for rule in RULES:
        resources = [r for r in rule["resources"]
                     if not any((group, r) in unused for group in rule["apiGroups"])]
        if resources:
            rules.append({**rule, "resources": resources})
    return rules


def allows(api_group: str, resource: str, verb: str) -> bool:
    return any(api_group in rule["apiGroups"] and resource in rule["resources"]
               and verb in rule["verbs"] for rule in RULES)


def cluster_role(name: str = "kubetune-operator") -> dict[str, Any]:
    return {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
            "metadata": {"name": name}, "rules": RULES}
