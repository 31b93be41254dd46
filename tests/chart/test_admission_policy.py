"""The chart's ValidatingAdmissionPolicy that scopes the operator's deletes to its own children
(docs/security.md): rendered with the real helm only where the cluster serves the v1 policy kinds,
and its CEL evaluated with cel-python the way the API server does on a DELETE (`oldObject` is the
object, `object` is null): the operator's deletes of labelled children pass, its deletes of
anything else are refused, and nobody else's deletes are matched at all."""

from __future__ import annotations

import copy
from typing import Any

import celpy
import pytest
from chartlib import NAMESPACE, Manifest, find, one, render

from kubetune_operator.builders import LABEL_JOB, MANAGED_BY
from kubetune_operator.rbac import RULES

SERVED = ("admissionregistration.k8s.io/v1/ValidatingAdmissionPolicy",
          "admissionregistration.k8s.io/v1/ValidatingAdmissionPolicyBinding")
OPERATOR = f"system:serviceaccount:{NAMESPACE}:kubetune-operator"
CHILD_LABELS = {LABEL_JOB: "llama", "app.kubernetes.io/managed-by": MANAGED_BY}
ENV = celpy.Environment()


def policy_objects(*sets: str) -> tuple[Manifest, Manifest]:
    objects = render(sets=tuple(sets), api_versions=SERVED)
    return (one(objects, "ValidatingAdmissionPolicy"),
            one(objects, "ValidatingAdmissionPolicyBinding"))


def evaluate(expression: str, activation: dict[str, Any]) -> bool:
    program = ENV.program(ENV.compile(expression))
    return bool(program.evaluate({k: celpy.json_to_cel(v) for k, v in activation.items()}))


def delete_request(kind: str, labels: dict[str, str] | None,
                   username: str = OPERATOR) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": "llama-config", "namespace": "ml"}
    if labels is not None:
        metadata["labels"] = labels
    return {"request": {"operation": "DELETE", "userInfo": {"username": username}},
            "oldObject": {"apiVersion": "v1", "kind": kind, "metadata": metadata}}


def admitted(policy: Manifest, request: dict[str, Any]) -> bool:
    """The API server's verdict: unmatched requests pass; matched ones need every validation."""
    if not all(evaluate(c["expression"], request) for c in policy["spec"]["matchConditions"]):
        return True
    return all(evaluate(v["expression"], request) for v in policy["spec"]["validations"])


def test_rendered_only_where_the_cluster_serves_the_policy_kinds() -> None:
    assert not find(render(), "ValidatingAdmissionPolicy")  # helm's default: no discovery
    assert not find(render(api_versions=SERVED[:1]), "ValidatingAdmissionPolicyBinding")
    policy, binding = policy_objects()
    assert binding["spec"] == {"policyName": policy["metadata"]["name"],
                               "validationActions": ["Deny"]}
    assert policy["spec"]["failurePolicy"] == "Fail"


@pytest.mark.parametrize("off", ["rbac.scopedDeletesPolicy=false", "rbac.create=false"])
def test_the_values_turn_it_off(off: str) -> None:
    assert not find(render(sets=(off,), api_versions=SERVED), "ValidatingAdmissionPolicy")


def test_it_matches_every_delete_of_a_child_the_rbac_grants() -> None:
    """configmaps, services, pods, NetworkPolicies: the children the operator may delete
    anywhere it watches (Jobs and FineTuneJobs are its own kinds, not a tenant's)."""
    policy, _ = policy_objects()
    matched = {(group, resource) for rule in policy["spec"]["matchConstraints"]["resourceRules"]
               for group in rule["apiGroups"] for resource in rule["resources"]
               if rule["operations"] == ["DELETE"]}
    children = {(group, resource) for rule in RULES if "delete" in rule["verbs"]
                for group in rule["apiGroups"] for resource in rule["resources"]
                if group in ("", "networking.k8s.io")}
    assert matched == children == {("", "configmaps"), ("", "services"), ("", "pods"),
                                   ("networking.k8s.io", "networkpolicies")}


@pytest.mark.parametrize("kind", ["ConfigMap", "Service", "Pod", "NetworkPolicy"])
def test_the_operator_deletes_its_labelled_children(kind: str) -> None:
    policy, _ = policy_objects()
    assert admitted(policy, delete_request(kind, {**CHILD_LABELS, "team": "a"}))


@pytest.mark.parametrize("labels", [
    None,
    {},
    {LABEL_JOB: "llama"},
    {"app.kubernetes.io/managed-by": MANAGED_BY},
    {LABEL_JOB: "llama", "app.kubernetes.io/managed-by": "helm"},
], ids=["no-labels", "empty", "job-label-only", "managed-by-only", "managed-by-other"])
@pytest.mark.parametrize("kind", ["ConfigMap", "Service", "Pod", "NetworkPolicy"])
def test_the_operator_is_refused_anything_else(kind: str, labels: dict[str, str] | None) -> None:
    policy, _ = policy_objects()
    assert not admitted(policy, delete_request(kind, labels))


def test_other_users_are_not_matched() -> None:
    policy, _ = policy_objects()
    for user in ("system:serviceaccount:ml:default", "alice",
                 "system:serviceaccount:other:kubetune-operator"):
        assert admitted(policy, delete_request("ConfigMap", None, username=user))


def test_the_service_account_name_follows_the_values() -> None:
    policy, _ = policy_objects("serviceAccount.name=tuner")
    request = delete_request("Pod", None, username=f"system:serviceaccount:{NAMESPACE}:tuner")
    assert not admitted(policy, request)
    assert admitted(policy, copy.deepcopy(delete_request("Pod", None)))
