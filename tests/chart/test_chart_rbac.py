"""The chart's RBAC is operator/kubetune_operator/rbac.py (RULES), per install mode, and RULES
is exactly what the operator's code calls: kopf's watches, patches and events, and every
request the reconciler sends (found in its source)."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path
from typing import Any

import pytest
from chartlib import NAMESPACE, SCENARIOS, Manifest, find, render, values_of

from kubetune_api.spec import GROUP, PLURAL
from kubetune_operator import builders, handlers, kube, rbac, reconciler
from kubetune_operator.main import build
from kubetune_operator.settings import Settings

Triple = tuple[str, str, str]  # (apiGroup, resource, verb)
SCENARIO_IDS = [name for name, _ in SCENARIOS]

CLUSTER_PEERINGS, NAMESPACED_PEERINGS = rbac.CLUSTER_PEERINGS, rbac.NAMESPACED_PEERINGS
NAMESPACES = rbac.NAMESPACES
CRDS = ("apiextensions.k8s.io", "customresourcedefinitions")
CLUSTER_SCOPED = {CLUSTER_PEERINGS, NAMESPACES, CRDS, rbac.CLUSTER_RUNTIMES}


def triples(rules: list[dict[str, Any]]) -> set[Triple]:
    return {(group, resource, verb) for rule in rules for group in rule["apiGroups"]
            for resource in rule["resources"] for verb in rule["verbs"]}


def expected_grants(clusterwide: bool, peering: bool,
                    network_policy: bool = True) -> set[Triple]:
    return triples(rbac.rules_for(clusterwide, peering, network_policy))


def granted(objects: tuple[Manifest, ...], kind: str) -> dict[str, set[Triple]]:
    """Rules of every Role/ClusterRole, keyed by namespace ("" for cluster roles)."""
    out: dict[str, set[Triple]] = {}
    for role in find(objects, kind):
        if is_aggregated(role):
            continue  # for the cluster's users, not the operator (test_aggregated_roles)
        for rule in role["rules"]:
            for field in ("apiGroups", "resources", "verbs"):
                assert "*" not in rule[field], f"wildcard in {kind} {rule}"
            assert not rule.get("resourceNames") and not rule.get("nonResourceURLs")
        ns = role["metadata"].get("namespace", "")
        out.setdefault(ns, set()).update(triples(role["rules"]))
    return out


def is_aggregated(role: Manifest) -> bool:
    labels = role["metadata"].get("labels") or {}
    return any(k.startswith("rbac.authorization.k8s.io/aggregate-to-") for k in labels)


def check_binding(binding: Manifest, role: Manifest, service_account: str) -> None:
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": role["kind"],
                                  "name": role["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": service_account,
                                    "namespace": NAMESPACE}]


@pytest.mark.parametrize(("scenario", "values"), SCENARIOS, ids=SCENARIO_IDS)
def test_rendered_rbac_is_rbac_py_for_the_mode(scenario: str, values: Path | None) -> None:
    objects, config = render(values), values_of(values)
    clusterwide, peering = not config["watchNamespaces"], config["replicas"] > 1
    service_account = find(objects, "Deployment")[0]["spec"]["template"]["spec"][
        "serviceAccountName"]
    assert [sa["metadata"]["name"] for sa in find(objects, "ServiceAccount")] == [service_account]
    cluster = granted(objects, "ClusterRole").get("", set())
    namespaced = granted(objects, "Role")
    expected = expected_grants(clusterwide, peering,
                               config["trainer"]["networkPolicy"]["enabled"])
    if clusterwide:
        assert not namespaced
        assert cluster == expected
    else:
        assert set(namespaced) == set(config["watchNamespaces"])
        in_cluster_role = {t for t in expected if (t[0], t[1]) in CLUSTER_SCOPED}
        assert cluster == in_cluster_role  # only cluster-scoped reads, nothing namespaced
        for ns, rules in namespaced.items():
            assert rules == expected - in_cluster_role, ns
    for kind, binding_kind in (("ClusterRole", "ClusterRoleBinding"), ("Role", "RoleBinding")):
        for role in find(objects, kind):
            if is_aggregated(role):
                continue  # bound by Kubernetes' own admin/edit/view roles
            matching = [b for b in find(objects, binding_kind)
                        if b["metadata"]["name"] == role["metadata"]["name"]
                        and b["metadata"].get("namespace") == role["metadata"].get("namespace")]
            assert len(matching) == 1, role["metadata"]
            check_binding(matching[0], role, service_account)


def test_rbac_can_be_left_to_the_cluster_admin() -> None:
    objects = render(None, ("rbac.create=false",))
    for kind in ("ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"):
        assert not find(objects, kind)


# --- RULES against the calls the operator's code makes --------------------------------------

VERBS = {"get": "get", "list": "list", "create": "create", "patch": "patch",
         "delete": "delete"}


def resources_of(node: ast.expr, namespace: dict[str, Any]) -> list[kube.Resource]:
    """The kube.Resource(s) an argument expression of the reconciler refers to."""
    if isinstance(node, ast.Name) and isinstance(namespace.get(node.id), kube.Resource):
        return [namespace[node.id]]
    if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name) \
            and isinstance(namespace.get(node.value.id), dict):
        values = list(namespace[node.value.id].values())
        if values and all(isinstance(v, kube.Resource) for v in values):
            return values
    raise AssertionError(f"cannot tell which resource `{ast.unparse(node)}` is: keep API calls "
                         "in the reconciler on module-level kube.Resource constants")


# Reconciler methods that wrap one API verb, their resource passed through as an argument:
# the audit reads the resource where they are called (and not inside them).
WRAPPERS = {"_delete": ("delete", 1)}


def reconciler_calls() -> set[Triple]:
    """Every `self.api.<verb>(RESOURCE, ...)` call in the reconciler's source, and every call of
    a WRAPPERS method."""
    calls: set[Triple] = set()
    namespace = vars(reconciler)
    tree = ast.parse(inspect.getsource(reconciler))
    # The wrappers' own bodies pass their resource through: audited where they are called.
    wrappers = [f for f in ast.walk(tree)
                if isinstance(f, ast.FunctionDef | ast.AsyncFunctionDef) and f.name in WRAPPERS]
    inside_wrappers = {id(n) for f in wrappers for n in ast.walk(f)}
    for node in ast.walk(tree):
        if id(node) in inside_wrappers:
            continue
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and node.func.attr in WRAPPERS:
            verb, position = WRAPPERS[node.func.attr]
            for resource in resources_of(node.args[position], namespace):
                calls.add((resource.group, resource.plural, verb))
            continue
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and isinstance(node.func.value, ast.Attribute)
                and node.func.value.attr == "api"):
            continue
        method = node.func.attr
        if method == "plain_session":  # rank 0's /metrics (scrape.py): not the API server
            continue
        assert method in VERBS, f"unaudited API call self.api.{method} in reconciler.py"
        subresource = next((k.value.value for k in node.keywords if k.arg == "subresource"
                            and isinstance(k.value, ast.Constant)), None)
        for resource in resources_of(node.args[0], namespace):
            plural = f"{resource.plural}/{subresource}" if subresource else resource.plural
            calls.add((resource.group, plural, VERBS[method]))
    return calls


def test_only_the_reconciler_sends_api_requests() -> None:
    package = Path(inspect.getfile(reconciler)).parent
    for path in package.glob("*.py"):
        if path.name in ("reconciler.py", "kube.py"):
            continue
        if path.name == "informer.py":
            assert_informer_only_lists_and_watches(ast.parse(path.read_text()))
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) \
                    and node.value.attr == "api" and node.attr in (*VERBS, "request"):
                raise AssertionError(f"{path.name} calls the API directly: audit it here")


def assert_informer_only_lists_and_watches(tree: ast.AST) -> None:
    """informer.py's requests: GETs of a collection (lists, `request`) and watches
    (`stream`); informer_calls() grants them."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) \
                and node.value.attr == "api":
            assert node.attr in ("request", "stream"), f"informer.py: api.{node.attr}"
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and node.func.attr == "request":
            assert isinstance(node.args[0], ast.Constant) and node.args[0].value == "GET", \
                "informer.py sends more than GET: audit it here"


def informer_calls() -> set[Triple]:
    """The operator's own informers (informer.py: a paged list, then a watch) of the
    resources handlers.py builds them for."""
    tree = ast.parse(Path(inspect.getfile(handlers)).read_text())
    names = {node.args[1].id for node in ast.walk(tree) if isinstance(node, ast.Call)
             and isinstance(node.func, ast.Name) and node.func.id == "Informer"
             and isinstance(node.args[1], ast.Name)}
    assert names, "handlers.py builds no Informer: audit its watches here"
    resources = [getattr(handlers, name) for name in names]
    return {(r.group, r.plural, verb) for r in resources for verb in ("list", "watch")}


def kopf_calls(clusterwide: bool, peering: bool) -> set[Triple]:
    """What kopf itself does for the operator's registry in this mode."""
    registry, _, _ = build(Settings())
    calls: set[Triple] = set()
    for kind in ("_indexing", "_watching", "_changing", "_spawning"):
        for handler in getattr(registry, kind).get_all_handlers():
            selector = handler.selector
            resource = (selector.group or "", selector.plural or selector.any_name)
            calls |= {(*resource, "list"), (*resource, "watch")}
            if kind in ("_changing", "_spawning"):  # finalizers, progress annotations
                calls.add((*resource, "patch"))
    calls.add(("", "events", "create"))  # kopf's event poster (core v1 events)
    calls |= {(*CRDS, "list"), (*CRDS, "watch")}  # resource observer
    if not clusterwide:
        calls |= {(*NAMESPACES, "list"), (*NAMESPACES, "watch")}  # namespace observer
    if peering:
        peerings = CLUSTER_PEERINGS if clusterwide else NAMESPACED_PEERINGS
        calls |= {(*peerings, "list"), (*peerings, "watch"), (*peerings, "patch")}
    return calls


def admission_calls() -> set[Triple]:
    """Permissions admission checks without a call of their own: creating a child whose owner
    reference has blockOwnerDeletion needs update on the owner's finalizers where the
    OwnerReferencesPermissionEnforcement plugin runs (OpenShift)."""
    owner = builders.owner_reference(builders.Owner("x", "ns", "uid-1", {}))
    assert owner["blockOwnerDeletion"] is True
    return {(GROUP, f"{PLURAL}/finalizers", "update")}


MODES = [(True, False), (True, True), (False, False), (False, True)]


@pytest.mark.parametrize(("clusterwide", "peering"), MODES,
                         ids=["all-namespaces", "all-namespaces-ha", "namespaced",
                              "namespaced-ha"])
def test_rules_grant_every_call_and_nothing_unused(clusterwide: bool, peering: bool) -> None:
    calls = kopf_calls(clusterwide, peering) | informer_calls() | reconciler_calls() \
        | admission_calls()
    grants = expected_grants(clusterwide, peering)
    assert calls - grants == set(), "calls the chart/rbac.py would forbid"
    for call in calls:
        assert rbac.allows(*call), call
    # Nothing granted on a resource the operator never touches in this mode; read access
    # comes as get/list/watch together.
    touched = {(g, r) for g, r, _ in calls}
    assert {(g, r) for g, r, _ in grants} - touched == set()
    assert grants - calls <= {(g, r, "get") for g, r in touched}


def test_reconciler_audit_sees_the_operators_writes() -> None:
    calls = reconciler_calls()
    assert ("batch", "jobs", "create") in calls and ("", "configmaps", "create") in calls
    assert ("kubetune.dev", "finetunejobs/status", "patch") in calls
    assert ("", "events", "list") in calls  # the Job controller's FailedCreate events


def test_aggregated_roles_give_namespace_users_finetunejobs() -> None:
    roles = {r["metadata"]["name"]: r for r in find(render(), "ClusterRole") if is_aggregated(r)}
    edit, view = roles["kubetune-edit"], roles["kubetune-view"]
    assert {k: v for k, v in edit["metadata"]["labels"].items() if "aggregate" in k} == {
        "rbac.authorization.k8s.io/aggregate-to-admin": "true",
        "rbac.authorization.k8s.io/aggregate-to-edit": "true"}
    assert {k for k in view["metadata"]["labels"] if "aggregate" in k} == {
        "rbac.authorization.k8s.io/aggregate-to-view"}
    writes = triples(edit["rules"])
    assert ("kubetune.dev", "finetunejobs", "create") in writes
    assert ("kubetune.dev", "finetunejobs", "delete") in writes
    # Status is the operator's: users read it, never write it.
    assert {v for g, r, v in writes if r == "finetunejobs/status"} == {"get", "list", "watch"}
    assert {v for _, _, v in triples(view["rules"])} == {"get", "list", "watch"}
    assert {r for _, r, _ in triples(view["rules"])} == {"finetunejobs", "finetunejobs/status"}
    off = render(sets=("rbac.aggregateToDefaultRoles=false",))
    assert not [r for r in find(off, "ClusterRole") if is_aggregated(r)]


def test_no_networkpolicy_rights_when_the_trainer_policy_is_off() -> None:
    objects = render(None, ("trainer.networkPolicy.enabled=false",))
    cluster = granted(objects, "ClusterRole")[""]
    assert not {t for t in cluster if t[1] == "networkpolicies"}
    assert cluster == expected_grants(True, False, network_policy=False)
    assert {t for t in granted(render(), "ClusterRole")[""] if t[1] == "networkpolicies"}


def test_the_rbac_table_in_docs_helm_md_is_rbac_py() -> None:
    """docs/helm.md's table lists every (resource, verb) RULES grants, and nothing else."""
    text = (Path(__file__).resolve().parents[2] / "docs" / "helm.md").read_text()
    table = text.split("**RBAC: least privilege.**", 1)[1].split("\n\n", 2)[1]
    documented: set[tuple[str, str]] = set()
    for row in table.splitlines()[2:]:
        resources_cell, verbs_cell = row.split("|")[1:3]
        resources = [r.strip(" `") for r in resources_cell.split("(")[0].split(",")]
        verbs = {v.strip() for v in verbs_cell.split("(")[0].replace(";", ",").split(",")
                 if v.strip() in {"get", "list", "watch", "create", "update", "patch",
                                  "delete"}}
        documented |= {(r, v) for r in resources for v in verbs}
    granted_pairs = {(resource, verb) for _, resource, verb in triples(rbac.RULES)}
    assert documented == granted_pairs
