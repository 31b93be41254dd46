"""The SDK's notebook example (docs/sdk.md) and the lifecycle verbs through `kubectl kubetune`
against the local cluster: the real operator, real training in the pod runner, S3 on moto."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from support.e2e_cluster import NAMESPACE, LocalCluster, kubectl_binary, s3_example
from support.net import free_port
from support.operator_process import PODS
from support.pod_runner import ROOT
from support.s3 import create_bucket

pytestmark = [pytest.mark.e2e, pytest.mark.slow,
              pytest.mark.skipif(kubectl_binary() is None, reason="kubectl is not installed")]

RUN_TIMEOUT = 300  # bounds a failing wait only: one tiny run on two busy cores
VENV_BIN = Path(sys.executable).parent
DOC_ENDPOINT = "http://minio.storage:9000"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    with LocalCluster(tmp_path_factory.mktemp("cluster")) as local:
        yield local


def notebook_example() -> str:
    text = (ROOT / "docs" / "sdk.md").read_text()
    match = re.search(r"## A notebook's worth\n\n```python\n(.*?)```", text, re.S)
    assert match, "docs/sdk.md lost its notebook example"
    return match.group(1)


def test_notebook_example_trains_follows_waits_and_reads_the_artifact(
        cluster: LocalCluster, s3_env: str, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    bucket = create_bucket(s3_env)
    code = (notebook_example().replace(DOC_ENDPOINT, s3_env)
            .replace("s3://models/", f"s3://{bucket}/")
            .replace("    output=", f'    metrics={{"port": {free_port()}}},\n    output=', 1))
    monkeypatch.setenv("KUBECONFIG", str(cluster.kubeconfig))
    try:
        exec(compile(code, "docs/sdk.md", "exec"), {})
    except Exception:
        print(cluster.diagnostics())
        raise
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == "support-bot Pending"
    followed = [line for line in printed if " loss " in line]
    log = cluster.runner.log("support-bot-a1-0") if cluster.runner else ""
    assert followed and followed == [line for line in log.splitlines() if " loss " in line]
    # Followed to the end of the rank's run: the last step, then the final summary.
    assert any("step 12/12" in line for line in followed)
    assert followed[-1].strip().startswith("train loss")
    assert f"Succeeded s3://{bucket}/support-bot" in printed
    assert any(line.startswith("lora [") for line in printed)  # the manifest, read and checked
    assert any("FineTuneJob/support-bot" in line for line in printed)  # its events


def kubectl_kubetune(cluster: LocalCluster, *args: str) -> subprocess.CompletedProcess[str]:
    """`kubectl kubetune ARGS` through the real kubectl, the plugin found on PATH."""
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run([kubectl_binary() or "kubectl", "kubetune", *args, "--kubeconfig",
                           str(cluster.kubeconfig)], capture_output=True, text=True, env=env,
                          timeout=RUN_TIMEOUT)


def test_verbs_suspend_resume_follow_wait_and_cancel(cluster: LocalCluster, s3_env: str,
                                                     tmp_path: Path) -> None:
    """s3_env: the verbs' processes read the artifact with the AWS_* variables it sets."""
    assert cluster.runner is not None
    bucket = create_bucket(s3_env)
    manifest = s3_example("tiny-lora", name="verbs", bucket=bucket, endpoint=s3_env,
                          training={"maxSteps": 30, "logEverySteps": 5})
    path = tmp_path / "verbs.yaml"
    path.write_text(yaml.safe_dump(manifest))
    submitted = kubectl_kubetune(cluster, "submit", str(path))
    assert submitted.stdout.strip() == "finetunejob.kubetune.dev/verbs created", submitted.stderr

    def pod_phase(name: str) -> str | None:
        pod = cluster.api.get(PODS, NAMESPACE, name)
        return (pod or {}).get("status", {}).get("phase")

    cluster.wait(lambda: pod_phase("verbs-a1-0") == "Running", "rank 0 running", RUN_TIMEOUT)
    suspended = kubectl_kubetune(cluster, "suspend", "verbs")
    assert suspended.returncode == 0, suspended.stderr
    cluster.wait(lambda: cluster.status("verbs").get("phase") == "Suspended", "Suspended",
                 RUN_TIMEOUT)
    got = kubectl_kubetune(cluster, "get", "verbs")
    assert got.stdout.splitlines()[1].split()[:2] == ["verbs", "Suspended"]
    assert kubectl_kubetune(cluster, "resume", "verbs").returncode == 0

    # Follow the resumed rank 0 from while it is held mid-run to the end of its container.
    pods = lambda: [p["metadata"]["name"] for p in cluster.api.find(  # noqa: E731
        PODS, NAMESPACE) if p["metadata"]["name"].startswith("verbs-")
        and p.get("status", {}).get("phase") == "Running"]
    rank0 = cluster.wait(lambda: pods()[0] if pods() else None, "the resumed rank 0",
                         RUN_TIMEOUT)
    cluster.wait(lambda: cluster.runner and cluster.runner.log(rank0), "rank 0's output",
                 RUN_TIMEOUT)
    cluster.runner.pause(rank0)
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}"}
    follower = subprocess.Popen([kubectl_binary() or "kubectl", "kubetune", "logs", "-f",
                                 "verbs", "--rank", "0", "--kubeconfig", str(cluster.kubeconfig)],
                                stdout=subprocess.PIPE, text=True, env=env)
    assert follower.stdout is not None
    first = follower.stdout.readline()
    assert first and follower.poll() is None  # following a container that still runs
    cluster.runner.unpause(rank0)
    rest = follower.stdout.read()
    assert follower.wait(RUN_TIMEOUT) == 0
    assert pod_phase(rank0) in ("Succeeded", None)  # it ended with the container
    assert first + rest == cluster.runner.log(rank0)

    waited = kubectl_kubetune(cluster, "wait", "verbs", "--for", "Succeeded", "--timeout",
                              str(RUN_TIMEOUT))
    assert waited.returncode == 0, f"{waited.stderr}\n{cluster.diagnostics()}"
    listed = kubectl_kubetune(cluster, "list", "-o", "json")
    job = next(o for o in json.loads(listed.stdout)["items"]
               if o["metadata"]["name"] == "verbs")
    assert job["status"]["phase"] == "Succeeded"
    described = kubectl_kubetune(cluster, "describe", "verbs").stdout
    assert "Phase:        Succeeded" in described and "Suspended" in described
    events = kubectl_kubetune(cluster, "events", "verbs", "-o", "json")
    assert {"Suspended", "Resumed"} <= {e["reason"] for e in json.loads(events.stdout)}
    artifact = kubectl_kubetune(cluster, "artifact", "verbs", "-o", "json")
    assert artifact.returncode == 0, artifact.stderr
    assert json.loads(artifact.stdout)["manifest"]["metrics"]["steps"] == 30

    assert kubectl_kubetune(cluster, "cancel", "verbs").returncode == 0
    cluster.wait(lambda: not cluster.ftj("verbs"), "the job gone", RUN_TIMEOUT)
    gone = kubectl_kubetune(cluster, "get", "verbs")
    assert gone.returncode == 1 and '"verbs" not found' in gone.stderr
