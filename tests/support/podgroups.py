"""The gang schedulers' PodGroup CRDs as the emulated API serves them: group, version, kind,
plural, scope and subresources as upstream declares them (Volcano: volcano-sh/apis
pkg/apis/scheduling/v1beta1/types.go, kubebuilder markers `path=podgroups,shortName=pg` and no
status subresource; scheduler-plugins: apis/scheduling/v1alpha1, with a status subresource).
Schemas are left out: the emulator does no admission."""

from __future__ import annotations

from typing import Any

VOLCANO_PODGROUPS = "scheduling.volcano.sh/v1beta1/podgroups"
COSCHEDULING_PODGROUPS = "scheduling.x-k8s.io/v1alpha1/podgroups"


def pod_group_crd(group: str, version: str, short_names: list[str],
                  status_subresource: bool) -> dict[str, Any]:
    served: dict[str, Any] = {"name": version, "served": True, "storage": True,
                              "schema": {"openAPIV3Schema": {
                                  "type": "object", "x-kubernetes-preserve-unknown-fields": True}}}
    if status_subresource:
        served["subresources"] = {"status": {}}
    return {"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
            "metadata": {"name": f"podgroups.{group}"},
            "spec": {"group": group, "scope": "Namespaced", "versions": [served],
                     "names": {"kind": "PodGroup", "plural": "podgroups",
                               "singular": "podgroup", "shortNames": short_names}}}


POD_GROUP_CRDS = (
    pod_group_crd("scheduling.volcano.sh", "v1beta1", ["pg", "podgroup-v1beta1"], False),
    pod_group_crd("scheduling.x-k8s.io", "v1alpha1", ["pg", "pgs"], True),
)
