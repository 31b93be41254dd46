"""The operator started exactly as README.md and docs/operator.md say: the CRD applied, then
`kubetune operator` or `python -m kubetune_operator` with a kubeconfig, and nothing else.

The process gets the test's own environment without any KUBETUNE_* variable (a user's shell
has none), plus `KUBECONFIG`: so the defaults are what a new user gets, the documented ports
8000 (/metrics) and 8081 (/healthz) included. A named peering whose object is missing must end
the process with a message that says what to do, never a silent pause.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from support.cluster_api import cluster_emulator
from support.e2e_cluster import CRD_FILE
from support.jobs import ftj_body as finetunejob
from support.kube_emulator import EmulatorThread
from support.net import private_network
from support.operator_process import FTJ, JOBS, wait_for

pytestmark = pytest.mark.slow

DOCUMENTED_COMMANDS = {
    "kubetune operator": [str(Path(sys.executable).parent / "kubetune"), "operator"],
    "python -m kubetune_operator": [sys.executable, "-m", "kubetune_operator"],
}
DEFAULT_METRICS_PORT, DEFAULT_HEALTH_PORT = 8000, 8081
EXIT_CONFIG_ERROR = 2


def user_env(kubeconfig: Path, **documented: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KUBETUNE_")}
    return {**env, "KUBECONFIG": str(kubeconfig), **documented}


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[EmulatorThread, Path]]:
    """The emulated API with the CRD applied, nothing else, in a network namespace of the test's
    own: the operator started in it gets its documented fixed ports whatever else this machine
    listens on."""
    with private_network(), EmulatorThread(cluster_emulator(CRD_FILE)) as api:
        yield api, api.write_kubeconfig(tmp_path / "kubeconfig")


def start(command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.mark.parametrize("how", list(DOCUMENTED_COMMANDS))
def test_documented_start_reconciles_out_of_the_box(
        cluster: tuple[EmulatorThread, Path], tmp_path: Path, how: str) -> None:
    api, kubeconfig = cluster
    log = tmp_path / "operator.log"
    process = start(DOCUMENTED_COMMANDS[how], user_env(kubeconfig), log)
    try:
        api.create(FTJ, finetunejob("first"))
        wait_for(lambda: api.get(JOBS, "default", "first-a1") or process.poll() is not None,
                 60, interval=0.2, what=f"{how}: the first attempt's Job")
        assert process.poll() is None, log.read_text()
        status = wait_for(lambda: (api.get(FTJ, "default", "first") or {}).get("status"),
                          30, interval=0.2, what="status written")
        assert status["phase"] == "Pending"
        metrics = requests.get(f"http://127.0.0.1:{DEFAULT_METRICS_PORT}/metrics", timeout=5)
        assert "kubetune_operator_jobs_created_total 1.0" in metrics.text
        health = requests.get(f"http://127.0.0.1:{DEFAULT_HEALTH_PORT}/healthz", timeout=5)
        assert health.status_code == 200
        assert "peering=standalone" in log.read_text()
    finally:
        stop(process)


@pytest.mark.parametrize(("namespaces", "missing"), [
    ("", "no ClusterKopfPeering 'kubetune'"),
    ("default,team-b", "no KopfPeering 'kubetune' in namespace 'default', no KopfPeering "
                       "'kubetune' in namespace 'team-b'"),
])
def test_named_peering_without_its_object_is_a_startup_error(
        cluster: tuple[EmulatorThread, Path], tmp_path: Path, namespaces: str,
        missing: str) -> None:
    _, kubeconfig = cluster
    log = tmp_path / "operator.log"
    env = user_env(kubeconfig, KUBETUNE_PEERING="kubetune",
                   KUBETUNE_WATCH_NAMESPACES=namespaces,
                   KUBETUNE_OPERATOR_METRICS_PORT="0", KUBETUNE_HEALTH_PORT="0")
    process = start(DOCUMENTED_COMMANDS["kubetune operator"], env, log)
    try:
        code = process.wait(120)
    finally:
        stop(process)
    text = log.read_text()
    assert code == EXIT_CONFIG_ERROR, text
    assert missing in text and "unset KUBETUNE_PEERING" in text, text
    assert "Traceback" not in text


def test_named_peering_with_its_object_runs(cluster: tuple[EmulatorThread, Path],
                                            tmp_path: Path) -> None:
    api, kubeconfig = cluster
    api.create("kopf.dev/v1/clusterkopfpeerings",
               {"apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering",
                "metadata": {"name": "kubetune"}})
    log = tmp_path / "operator.log"
    env = user_env(kubeconfig, KUBETUNE_PEERING="kubetune",
                   KUBETUNE_OPERATOR_METRICS_PORT="0", KUBETUNE_HEALTH_PORT="0")
    process = start(DOCUMENTED_COMMANDS["kubetune operator"], env, log)
    try:
        api.create(FTJ, finetunejob("peered"))
        wait_for(lambda: api.get(JOBS, "default", "peered-a1") or process.poll() is not None,
                 60, interval=0.2, what="the Job of a peered operator")
        assert process.poll() is None, log.read_text()
    finally:
        stop(process)
