"""The namespaced install (charts/kubetune/ci/namespaced-values.yaml) for real: the operator
process with the chart's environment, against an API server that enforces the chart's RBAC
(a Role per watched namespace, cluster-wide reads only) and refuses everything else."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from chartlib import CHART, Manifest, find, operator_env, render

from support.kube_emulator import EmulatorThread, default_emulator
from support.operator_process import FTJ, JOBS, OperatorProcess, start_job_pods, wait_for
from support.strict_emulator import Grants, StrictEmulator

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
VALUES = CHART / "ci" / "namespaced-values.yaml"
TOKEN = "kubetune-operator-token"
# Set by the harness, not the chart: its own free ports and kubeconfig.
HARNESS_ENV = {"KUBETUNE_OPERATOR_METRICS_PORT", "KUBETUNE_HEALTH_PORT", "POD_ID"}


def operator_grants(objects: tuple[Manifest, ...]) -> Grants:
    """The rules bound to the operator's service account, as the RBAC authorizer sees them."""
    deployment = find(objects, "Deployment")[0]
    account = deployment["spec"]["template"]["spec"]["serviceAccountName"]
    namespace = deployment["metadata"]["namespace"]

    def bound(binding: Manifest) -> bool:
        return any(s["kind"] == "ServiceAccount" and s["name"] == account
                   and s["namespace"] == namespace for s in binding["subjects"])

    roles = {(r["kind"], r["metadata"].get("namespace"), r["metadata"]["name"]): r["rules"]
             for r in find(objects, "Role") + find(objects, "ClusterRole")}
    grants = Grants()
    for binding in find(objects, "ClusterRoleBinding"):
        if bound(binding):
            grants.cluster += roles[("ClusterRole", None, binding["roleRef"]["name"])]
    for binding in find(objects, "RoleBinding"):
        if bound(binding):
            ns = binding["metadata"]["namespace"]
            ref = binding["roleRef"]
            key = (ref["kind"], ns if ref["kind"] == "Role" else None, ref["name"])
            grants.namespaced.setdefault(ns, []).extend(roles[key])
    return grants


def job_in(namespace: str, name: str) -> dict[str, Any]:
    body: dict[str, Any] = yaml.safe_load((ROOT / "examples" / "tiny-lora.yaml").read_text())
    body["metadata"] = {"name": name, "namespace": namespace}
    return body


@pytest.fixture(scope="module")
def namespaced(tmp_path_factory: pytest.TempPathFactory) -> Iterator[
        tuple[EmulatorThread, OperatorProcess, Grants]]:
    objects = render(VALUES)
    grants = operator_grants(objects)
    assert set(grants.namespaced) == {"team-a", "team-b"} and grants.cluster
    env = {k: str(v) for k, v in operator_env(objects).items()
           if k not in HARNESS_ENV and isinstance(v, str | int)}
    with EmulatorThread(default_emulator(StrictEmulator)) as api:
        api.emulator.declare(FTJ, "FineTuneJob", shortnames=["ftj"])
        for ns in ("team-a", "team-b", "team-c"):
            api.create("v1/namespaces", {"metadata": {"name": ns}})
        assert isinstance(api.emulator, StrictEmulator)
        api.emulator.authorize(TOKEN, grants)
        operator = OperatorProcess(api, tmp_path_factory.mktemp("operator"), token=TOKEN,
                                   **env)
        with operator:
            yield api, operator, grants


def test_the_chart_env_is_namespaced(namespaced: tuple[EmulatorThread, OperatorProcess,
                                                       Grants]) -> None:
    _, operator, _ = namespaced
    assert operator.env["KUBETUNE_WATCH_NAMESPACES"] == "team-a,team-b"
    assert operator.env["KUBETUNE_PEERING"] == "standalone"


def test_jobs_in_watched_namespaces_run_with_role_only_rbac(
        namespaced: tuple[EmulatorThread, OperatorProcess, Grants]) -> None:
    api, operator, _ = namespaced
    emulator = api.emulator
    assert isinstance(emulator, StrictEmulator)
    api.create(FTJ, job_in("team-c", "elsewhere"))
    for ns in ("team-a", "team-b"):
        api.create(FTJ, job_in(ns, "tuned"))

    def status(ns: str, name: str) -> dict[str, Any]:
        return (api.get(FTJ, ns, name) or {}).get("status", {})

    for ns in ("team-a", "team-b"):
        job = wait_for(lambda ns=ns: api.get(JOBS, ns, "tuned-a1"), 30,
                       what=f"{ns}: Job\n{operator.logs()[-3000:]}")
        assert job["metadata"]["namespace"] == ns
        start_job_pods(api, job)
        wait_for(lambda ns=ns: status(ns, "tuned").get("phase") == "Running", 30,
                 what=f"{ns}: Running\n{operator.logs()[-3000:]}")
    # team-c is not watched: its job is never touched (the others prove the operator acted).
    assert status("team-c", "elsewhere") == {}
    assert api.find(JOBS, "team-c") == []
    assert emulator.denied == [], emulator.denied
    assert "Forbidden" not in operator.logs() and "403" not in operator.logs()


def test_the_emulator_enforces_the_roles(
        namespaced: tuple[EmulatorThread, OperatorProcess, Grants]) -> None:
    """So the test above could fail: outside its Roles the operator's token is refused."""
    api, _, grants = namespaced
    headers = {"Authorization": f"Bearer {TOKEN}"}
    allowed = requests.get(f"{api.url}/apis/batch/v1/namespaces/team-a/jobs", headers=headers,
                           timeout=10)
    assert allowed.status_code == 200
    for path in ("/apis/batch/v1/namespaces/team-c/jobs", "/apis/batch/v1/jobs",
                 "/api/v1/namespaces/team-a/secrets"):
        refused = requests.get(f"{api.url}{path}", headers=headers, timeout=10)
        assert refused.status_code == 403, path
        assert "cannot list resource" in refused.json()["message"]
    assert grants.allows("batch", "jobs", "create", "team-a")
    assert not grants.allows("batch", "jobs", "create", None)
