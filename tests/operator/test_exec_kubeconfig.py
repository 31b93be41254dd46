"""A kubeconfig whose user is an exec plugin (as EKS, GKE and AKS write them): the operator
logs in by running it, uses the token it prints for kopf's watches and its own writes, and
after a 401 logs in again, running the plugin for a fresh token."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from support.kube_emulator import EmulatorThread, default_emulator
from support.operator_process import FTJ, JOBS, OperatorProcess, wait_for
from support.strict_emulator import StrictEmulator

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
PLUGIN = '''
import json, pathlib, sys
calls = pathlib.Path(sys.argv[1])
n = len(calls.read_text().splitlines()) + 1 if calls.exists() else 1
with calls.open("a") as out:
    out.write(f"{n}\\n")
print(json.dumps({"apiVersion": "client.authentication.k8s.io/v1beta1",
                  "kind": "ExecCredential", "status": {"token": f"exec-token-{n}"}}))
'''


def exec_kubeconfig(path: Path, server: str, plugin: Path, calls: Path) -> None:
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "cloud",
        "clusters": [{"name": "cloud", "cluster": {"server": server}}],
        "users": [{"name": "cloud", "user": {"exec": {
            "apiVersion": "client.authentication.k8s.io/v1beta1",
            "command": sys.executable, "args": [str(plugin), str(calls)],
            "interactiveMode": "Never"}}}],
        "contexts": [{"name": "cloud", "context": {"cluster": "cloud", "user": "cloud",
                                                    "namespace": "default"}}]}))


@pytest.fixture
def cloud(tmp_path: Path) -> Iterator[tuple[EmulatorThread, OperatorProcess, Path]]:
    with EmulatorThread(default_emulator(StrictEmulator)) as api:
        api.emulator.declare(FTJ, "FineTuneJob", shortnames=["ftj"])
        plugin, calls = tmp_path / "plugin.py", tmp_path / "calls.txt"
        plugin.write_text(PLUGIN)
        operator = OperatorProcess(api, tmp_path)
        exec_kubeconfig(operator.kubeconfig, api.url, plugin, calls)
        with operator:
            yield api, operator, calls


def job(name: str) -> dict[str, Any]:
    body: dict[str, Any] = yaml.safe_load((ROOT / "examples" / "tiny-lora.yaml").read_text())
    body["metadata"] = {"name": name, "namespace": "default"}
    return body


def tokens(api: EmulatorThread, since: int = 0) -> set[str]:
    return {r.headers.get("Authorization", "") for r in list(api.emulator._requests)[since:]
            if r.resource is not None and r.resource.plural}


def test_exec_plugin_login_and_relogin_after_401(
        cloud: tuple[EmulatorThread, OperatorProcess, Path]) -> None:
    api, operator, calls = cloud
    emulator = api.emulator
    assert isinstance(emulator, StrictEmulator)
    api.create(FTJ, job("first"))
    wait_for(lambda: api.get(JOBS, "default", "first-a1"), 60,
             what=f"first Job\n{operator.logs()[-3000:]}")
    # kopf and the operator's own client each logged in through the plugin; nothing else.
    before = tokens(api)
    assert before and all(t.startswith("Bearer exec-token-") for t in before), before
    # The token expires: the API server answers the next write 401.
    seen, runs_before = len(emulator._requests), len(calls.read_text().splitlines())
    api.call(emulator.inject, "POST", "configmaps", 401)
    api.create(FTJ, job("second"))
    wait_for(lambda: api.get(JOBS, "default", "second-a1"), 60,
             what=f"second Job\n{operator.logs()[-3000:]}")
    assert emulator.pending_faults() == 0
    runs = len(calls.read_text().splitlines())
    assert runs > runs_before, "the exec plugin was not run again after the 401"
    fresh = f"Bearer exec-token-{runs}"
    assert fresh not in before and fresh in tokens(api, seen)
    created = [r for r in list(emulator._requests)[seen:] if r.method.value == "POST"
               and r.resource is not None and r.resource.plural == "jobs"]
    assert created and created[-1].headers["Authorization"] == fresh
