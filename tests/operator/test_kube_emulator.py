"""The API-server semantics the operator tests rely on, checked over HTTP."""

from __future__ import annotations

import json
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from support.kube_emulator import EmulatorThread
from support.tools import tool_path

FTJ = "kubetune.dev/v1alpha1/finetunejobs"
CM_URL = "/api/v1/namespaces/ns/configmaps"
FTJ_URL = "/apis/kubetune.dev/v1alpha1/namespaces/ns/finetunejobs"
MERGE = {"Content-Type": "application/merge-patch+json"}


@pytest.fixture(scope="module")
def api() -> Iterator[EmulatorThread]:
    with EmulatorThread() as api:
        api.emulator.declare(FTJ, "FineTuneJob", shortnames=["ftj"])
        yield api


def call(api: EmulatorThread, method: str, path: str, body: Any = None,
         **kwargs: Any) -> requests.Response:
    headers = kwargs.pop("headers", {})
    data = json.dumps(body) if body is not None else None
    return requests.request(method, api.url + path, data=data, timeout=10,
                            headers={"Content-Type": "application/json", **headers}, **kwargs)


def test_create_sets_identity_and_rejects_duplicates(api: EmulatorThread) -> None:
    created = call(api, "POST", CM_URL, {"metadata": {"name": "a"}, "data": {"k": "v"}})
    assert created.status_code == 201
    meta = created.json()["metadata"]
    assert meta["uid"] and meta["resourceVersion"] and meta["creationTimestamp"]
    assert meta["namespace"] == "ns" and created.json()["kind"] == "ConfigMap"
    again = call(api, "POST", CM_URL, {"metadata": {"name": "a"}})
    assert again.status_code == 409 and again.json()["reason"] == "AlreadyExists"
    assert call(api, "GET", CM_URL + "/missing").status_code == 404


def test_label_and_field_selectors(api: EmulatorThread) -> None:
    for name, tier in (("s1", "gold"), ("s2", "silver"), ("s3", None)):
        labels = {"app": "sel"} | ({"tier": tier} if tier else {})
        call(api, "POST", CM_URL, {"metadata": {"name": name, "labels": labels}})

    def names(selector: str, field: str = "") -> list[str]:
        params = {"labelSelector": selector, "fieldSelector": field}
        items = call(api, "GET", CM_URL, params=params).json()["items"]
        return [i["metadata"]["name"] for i in items]
    assert names("app=sel") == ["s1", "s2", "s3"]
    assert names("app=sel,tier in (gold,silver)") == ["s1", "s2"]
    assert names("app=sel,tier!=gold") == ["s2", "s3"]
    assert names("app=sel,!tier") == ["s3"]
    assert names("app=sel,tier") == ["s1", "s2"]
    assert names("app=sel", "metadata.name=s2") == ["s2"]


def test_status_subresource_and_generation(api: EmulatorThread) -> None:
    body = {"apiVersion": "kubetune.dev/v1alpha1", "kind": "FineTuneJob",
            "metadata": {"name": "j"}, "spec": {"x": 1}, "status": {"phase": "Ignored"}}
    created = call(api, "POST", FTJ_URL, body).json()
    assert "status" not in created and created["metadata"]["generation"] == 1
    main = call(api, "PATCH", FTJ_URL + "/j", {"spec": {"x": 2}, "status": {"phase": "No"}},
                headers=MERGE).json()
    assert main["metadata"]["generation"] == 2 and "status" not in main
    status = call(api, "PATCH", FTJ_URL + "/j/status", {"spec": {"x": 3},
                                                         "status": {"phase": "Running"}},
                  headers=MERGE).json()
    assert status["status"] == {"phase": "Running"} and status["spec"] == {"x": 2}
    assert status["metadata"]["generation"] == 2
    rv = status["metadata"]["resourceVersion"]
    noop = call(api, "PATCH", FTJ_URL + "/j/status", {"status": {"phase": "Running"}},
                headers=MERGE).json()
    assert noop["metadata"]["resourceVersion"] == rv  # no change, no new version
    stale = dict(noop, metadata={**noop["metadata"], "resourceVersion": "1"})
    assert call(api, "PUT", FTJ_URL + "/j", stale).status_code == 409
    assert call(api, "PUT", FTJ_URL + "/j", noop).status_code == 200


def test_watch_replays_from_a_resource_version_and_filters(api: EmulatorThread) -> None:
    start = call(api, "GET", CM_URL).json()["metadata"]["resourceVersion"]
    call(api, "POST", CM_URL, {"metadata": {"name": "w1", "labels": {"watch": "me"}}})
    call(api, "POST", CM_URL, {"metadata": {"name": "w2"}})
    call(api, "PATCH", CM_URL + "/w1", {"metadata": {"labels": {"watch": None}}},
         headers=MERGE)
    response = call(api, "GET", CM_URL, params={
        "watch": "true", "resourceVersion": start, "labelSelector": "watch=me",
        "timeoutSeconds": "1"})
    events = [json.loads(line) for line in response.text.splitlines() if line.strip()]
    # w1 appears, then leaves the selection (a DELETED for this watcher); w2 never matches.
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == \
        [("ADDED", "w1"), ("DELETED", "w1")]


def test_finalizers_and_owner_garbage_collection(api: EmulatorThread) -> None:
    owner = call(api, "POST", FTJ_URL, {"metadata": {"name": "owner", "finalizers": ["x/y"]},
                                        "spec": {}}).json()
    ref = {"apiVersion": "kubetune.dev/v1alpha1", "kind": "FineTuneJob", "name": "owner",
           "uid": owner["metadata"]["uid"]}
    call(api, "POST", CM_URL, {"metadata": {"name": "child", "ownerReferences": [ref]}})
    deleting = call(api, "DELETE", FTJ_URL + "/owner").json()
    assert deleting["metadata"]["deletionTimestamp"]
    assert call(api, "GET", CM_URL + "/child").status_code == 200
    call(api, "PATCH", FTJ_URL + "/owner", {"metadata": {"finalizers": None}}, headers=MERGE)
    assert call(api, "GET", FTJ_URL + "/owner").status_code == 404
    assert call(api, "GET", CM_URL + "/child").status_code == 404


def test_orphan_propagation_keeps_dependents(api: EmulatorThread) -> None:
    owner = call(api, "POST", FTJ_URL, {"metadata": {"name": "o2"}, "spec": {}}).json()
    ref = {"apiVersion": "v1", "kind": "FineTuneJob", "name": "o2",
           "uid": owner["metadata"]["uid"]}
    call(api, "POST", CM_URL, {"metadata": {"name": "kept", "ownerReferences": [ref]}})
    call(api, "DELETE", FTJ_URL + "/o2", {"propagationPolicy": "Orphan"})
    kept = call(api, "GET", CM_URL + "/kept").json()
    assert "ownerReferences" not in kept["metadata"]


def test_user_reactions_preempt_and_change_nothing(api: EmulatorThread) -> None:
    api.emulator["post /api/v1/namespaces/ns/configmaps"] << 503
    try:
        assert call(api, "POST", CM_URL, {"metadata": {"name": "never"}}).status_code == 503
    finally:
        api.emulator._payloads.pop()  # kmock has no public "remove reaction"
    assert call(api, "GET", CM_URL + "/never").status_code == 404


def test_namespaces_resource_and_discovery(api: EmulatorThread) -> None:
    assert call(api, "POST", "/api/v1/namespaces", {"metadata": {"name": "team"}}).ok
    assert call(api, "GET", "/api/v1/namespaces/team").json()["metadata"]["name"] == "team"
    resources = call(api, "GET", "/apis/kubetune.dev/v1alpha1").json()["resources"]
    assert {"finetunejobs", "finetunejobs/status"} <= {r["name"] for r in resources}


@pytest.mark.skipif(tool_path("kubectl") is None,
                    reason="kubectl is not installed (`make kubectl` fetches it)")
def test_kubectl_apply_get_delete(api: EmulatorThread, tmp_path: Path) -> None:
    kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig", namespace="kubectl")

    def kubectl(*args: str) -> str:
        result = subprocess.run([tool_path("kubectl") or "kubectl", "--kubeconfig",
                                 str(kubeconfig), *args],
                                capture_output=True, text=True, timeout=60, check=False)
        assert result.returncode == 0, result.stderr
        return result.stdout + result.stderr

    example = Path(__file__).resolve().parents[2] / "examples" / "tiny-lora.yaml"
    assert "created" in kubectl("apply", "-f", str(example), "--validate=false")
    assert "tiny-lora" in kubectl("get", "ftj")
    assert "Warning" not in kubectl("get", "ftj")  # subresources carry no short names
    assert kubectl("get", "configmaps", "-l", "app!=x").startswith("No resources")
    assert "deleted" in kubectl("delete", "ftj", "tiny-lora")


def test_delete_preconditions_and_lost_pods(api: EmulatorThread) -> None:
    created = call(api, "POST", CM_URL, {"metadata": {"name": "pre"}}).json()
    stale = call(api, "DELETE", CM_URL + "/pre", {"preconditions": {"uid": "an-older-one"}})
    assert stale.status_code == 409 and api.get("v1/configmaps", "ns", "pre") is not None
    exact = call(api, "DELETE", CM_URL + "/pre",
                 {"preconditions": {"uid": created["metadata"]["uid"]}})
    assert exact.status_code == 200 and api.get("v1/configmaps", "ns", "pre") is None
    # A pod on a lost node: a graceful delete marks it (deadline = now + grace) for good.
    api.create("v1/pods", {"metadata": {"name": "stuck", "namespace": "ns"},
                           "spec": {"containers": [{"name": "c", "image": "x"}]}})
    api.emulator.lost_pods.add(("ns", "stuck"))
    api.delete("v1/pods", "ns", "stuck")
    marked = api.get("v1/pods", "ns", "stuck")
    assert marked is not None and marked["metadata"]["deletionTimestamp"]
    api.delete("v1/pods", "ns", "stuck", grace_seconds=0)  # force
    assert api.get("v1/pods", "ns", "stuck") is None


def test_namespace_deletion_empties_it_and_waits_for_finalizers() -> None:
    with EmulatorThread() as api:
        api.emulator.declare(FTJ, "FineTuneJob", shortnames=["ftj"])
        ns_url, cms = "/api/v1/namespaces/gone", "/api/v1/namespaces/gone/configmaps"
        ftjs = "/apis/kubetune.dev/v1alpha1/namespaces/gone/finetunejobs"
        assert call(api, "POST", "/api/v1/namespaces", {"metadata": {"name": "gone"}}).ok
        call(api, "POST", cms, {"metadata": {"name": "plain"}})
        call(api, "POST", ftjs, {"metadata": {"name": "held", "finalizers": ["x/y"]}})
        call(api, "POST", CM_URL, {"metadata": {"name": "elsewhere"}})
        terminating = call(api, "DELETE", ns_url).json()
        assert terminating["metadata"]["deletionTimestamp"]
        assert terminating["status"]["phase"] == "Terminating"
        assert call(api, "GET", cms + "/plain").status_code == 404
        assert call(api, "GET", ftjs + "/held").json()["metadata"]["deletionTimestamp"]
        assert call(api, "GET", ns_url).json()["status"]["phase"] == "Terminating"
        refused = call(api, "POST", cms, {"metadata": {"name": "late"}})
        assert refused.status_code == 403 and "being terminated" in refused.json()["message"]
        call(api, "PATCH", ftjs + "/held", {"metadata": {"finalizers": None}}, headers=MERGE)
        assert call(api, "GET", ns_url).status_code == 404  # empty: gone
        assert call(api, "GET", CM_URL + "/elsewhere").status_code == 200


def test_crd_deletion_removes_its_resources_then_stops_serving_them() -> None:
    crd = {"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
           "metadata": {"name": "widgets.example.dev"}, "spec": {
               "group": "example.dev", "scope": "Namespaced",
               "names": {"kind": "Widget", "plural": "widgets", "singular": "widget"},
               "versions": [{"name": "v1", "served": True, "storage": True}]}}
    crd_url = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"
    widgets = "/apis/example.dev/v1/namespaces/ns/widgets"
    with EmulatorThread() as api:
        assert call(api, "POST", crd_url, crd).status_code == 201  # registers the resource
        call(api, "POST", widgets, {"metadata": {"name": "w1"}})
        call(api, "POST", widgets, {"metadata": {"name": "w2", "finalizers": ["x/y"]}})
        terminating = call(api, "DELETE", f"{crd_url}/widgets.example.dev").json()
        assert terminating["status"]["conditions"][0]["type"] == "Terminating"
        assert call(api, "GET", widgets + "/w1").status_code == 404
        assert call(api, "POST", widgets, {"metadata": {"name": "w3"}}).status_code == 405
        assert call(api, "GET", f"{crd_url}/widgets.example.dev").ok  # w2 holds it
        call(api, "PATCH", widgets + "/w2", {"metadata": {"finalizers": None}}, headers=MERGE)
        assert call(api, "GET", f"{crd_url}/widgets.example.dev").status_code == 404
        assert call(api, "GET", widgets).status_code == 404  # no longer served


def test_lists_page_in_key_order_with_continue_tokens(api: EmulatorThread) -> None:
    # apiserver storage/continue.go: a page of `limit` in key order, a token to go on from
    # just after its last key, remainingItemCount; a token that is not one is a 400.
    for name in ("e3", "e1", "e5", "e2", "e4"):
        api.create("v1/configmaps", {"metadata": {"name": name, "namespace": "paging"}})
    url = f"{api.url}/api/v1/namespaces/paging/configmaps"
    first = requests.get(url, params={"limit": 2}, timeout=10).json()
    assert [o["metadata"]["name"] for o in first["items"]] == ["e1", "e2"]
    assert first["metadata"]["remainingItemCount"] == 3
    second = requests.get(url, params={"limit": 2, "continue": first["metadata"]["continue"]},
                          timeout=10).json()
    assert [o["metadata"]["name"] for o in second["items"]] == ["e3", "e4"]
    last = requests.get(url, params={"limit": 2, "continue": second["metadata"]["continue"]},
                        timeout=10).json()
    assert [o["metadata"]["name"] for o in last["items"]] == ["e5"]
    assert "continue" not in last["metadata"]
    assert len(requests.get(url, timeout=10).json()["items"]) == 5  # no limit: everything
    bad = requests.get(url, params={"limit": 2, "continue": "not-a-token"}, timeout=10)
    assert bad.status_code == 400


def test_a_partition_ends_watches_and_compaction_makes_resuming_410() -> None:
    # A watch that resumes from before an etcd compaction gets 410 Gone (reason Expired) and
    # must list again; during a partition new watches wait and open ones end.
    with EmulatorThread() as api:
        call(api, "POST", CM_URL, {"metadata": {"name": "kept"}})
        start = call(api, "GET", CM_URL).json()["metadata"]["resourceVersion"]
        call(api, "POST", CM_URL, {"metadata": {"name": "gap"}})
        api.emulator.partition_watches()
        answered: list[requests.Response] = []
        waiting = threading.Thread(target=lambda: answered.append(call(
            api, "GET", CM_URL, params={"watch": "true", "resourceVersion": start,
                                        "timeoutSeconds": "1"})))
        waiting.start()
        call(api, "DELETE", CM_URL + "/gap")  # deleted in the gap
        api.emulator.compact()
        assert waiting.is_alive() and not answered  # no answer while partitioned
        api.emulator.heal_watches()
        waiting.join(30)
        (event,) = [json.loads(line) for line in answered[0].text.splitlines() if line.strip()]
        assert (event["type"], event["object"]["code"], event["object"]["reason"]) == \
            ("ERROR", 410, "Expired")
        relisted = call(api, "GET", CM_URL).json()["items"]
        assert [o["metadata"]["name"] for o in relisted] == ["kept"]  # "gap" is gone
