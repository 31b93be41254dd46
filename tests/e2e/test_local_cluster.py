"""End to end without a cluster: `kubectl apply` a FineTuneJob → the real operator process →
the pod runner starts the real pod command (torchrun node launcher → trainer) → the artifact in
S3 (moto). Only the API server and kubelet are stand-ins (docs/e2e.md)."""

from __future__ import annotations

import datetime
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import s3fs

from kubetune_api import contract
from kubetune_operator.status import parse_progress
from support.e2e_cluster import LocalCluster, kubectl_binary, s3_example
from support.operator_process import JOBS, PODS
from support.s3 import ACCESS_KEY, SECRET_KEY, MotoServer, create_bucket

pytestmark = [pytest.mark.e2e, pytest.mark.slow,
              pytest.mark.skipif(kubectl_binary() is None, reason="kubectl is not installed")]

RUN_TIMEOUT = 240  # one tiny run: ~15 s of imports per process on 2 busy cores, then seconds


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    with LocalCluster(tmp_path_factory.mktemp("cluster")) as local:
        yield local


@pytest.fixture
def bucket(s3_server: MotoServer) -> str:
    return create_bucket(s3_server.endpoint)


@pytest.fixture
def s3(s3_server: MotoServer) -> s3fs.S3FileSystem:
    return s3fs.S3FileSystem(key=ACCESS_KEY, secret=SECRET_KEY,
                             client_kwargs={"endpoint_url": s3_server.endpoint})


def apply_example(cluster: LocalCluster, s3_server: MotoServer, example: str, name: str,
                  bucket: str, **overrides: Any) -> dict[str, Any]:
    manifest = s3_example(example, name=name, bucket=bucket, endpoint=s3_server.endpoint,
                          **overrides)
    assert "created" in cluster.apply(manifest)
    return manifest


def assert_succeeded_with_manifest(cluster: LocalCluster, s3: s3fs.S3FileSystem, name: str,
                                   status: dict[str, Any]) -> dict[str, Any]:
    """Succeeded, and status.output names the artifact whose manifest digest it quotes."""
    assert status["phase"] == "Succeeded", cluster.diagnostics()
    output = status["output"]
    manifest_bytes = s3.cat(f"{output['uri'].removeprefix('s3://')}/{contract.MANIFEST_FILE}")
    assert output["manifestSha256"] == hashlib.sha256(manifest_bytes).hexdigest()
    manifest: dict[str, Any] = json.loads(manifest_bytes)
    return manifest


def children(cluster: LocalCluster, resource: str, name: str) -> list[dict[str, Any]]:
    return cluster.api.find(resource, "default", labels=f"kubetune.dev/finetunejob={name}")


def rank0_step(port: int) -> int | None:
    """The step rank 0's /metrics report now (None while it does not answer)."""
    try:
        text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text
    except requests.RequestException:
        return None
    progress = parse_progress(text, datetime.datetime.now(datetime.UTC))
    return progress.step if progress is not None else None


def observe_progress_while_paced(cluster: LocalCluster, name: str, port: int,
                                 observations: int) -> list[dict[str, Any]]:
    """status.progress at `observations` distinct mid-run steps, whatever the machine's speed.

    The test paces the run instead of racing it: once rank 0 has moved past the last step
    seen, rank 1 is frozen (SIGSTOP), so rank 0 blocks in its next gradient all-reduce and its
    step holds still until status.progress shows it; then rank 1 runs on."""
    assert cluster.runner is not None
    seen: list[dict[str, Any]] = []

    def moved_on() -> str | None:
        if (rank0_step(port) or 0) > (seen[-1]["step"] if seen else 0):
            return "stepped"
        return "ended" if cluster.status(name).get("phase") in ("Succeeded", "Failed") else None

    def status_shows_rank0() -> dict[str, Any] | None:
        step = rank0_step(port)
        shown = cluster.status(name).get("progress") or {}
        return shown if step is not None and shown.get("step") == step else None

    while len(seen) < observations:
        assert cluster.wait(moved_on, "rank 0 to take a step", RUN_TIMEOUT) == "stepped", \
            f"the run ended before {observations} paced observations: {seen}"
        cluster.runner.pause(f"{name}-a1-1")
        try:
            seen.append(cluster.wait(status_shows_rank0, "status.progress at rank 0's step",
                                     RUN_TIMEOUT))
        finally:
            cluster.runner.unpause(f"{name}-a1-1")
    return seen


def test_tiny_lora_on_two_nodes_to_s3(cluster: LocalCluster, s3_server: MotoServer,
                                      bucket: str, s3: s3fs.S3FileSystem,
                                      tmp_path: Path) -> None:
    manifest = apply_example(cluster, s3_server, "tiny-lora", "lora", bucket, nodes=2,
                             training={"maxSteps": 60, "logEverySteps": 10})
    seen = observe_progress_while_paced(cluster, "lora", manifest["spec"]["metrics"]["port"], 2)
    assert 0 < seen[0]["step"] < seen[1]["step"] < 60, seen
    for progress in seen:
        assert progress["totalSteps"] == 60, progress
        assert progress["percent"] == round(100 * progress["step"] / 60, 1), progress

    status = cluster.wait_finished("lora", RUN_TIMEOUT)
    manifest = assert_succeeded_with_manifest(cluster, s3, "lora", status)
    assert manifest["worldSize"] == 2 and manifest["metrics"]["steps"] == 60
    pods = {p["metadata"]["name"] for p in children(cluster, PODS, "lora")}
    assert pods == {"lora-a1-0", "lora-a1-1"}

    table = cluster.kubectl("get", "ftj").splitlines()
    assert table[0].split() == ["NAME", "PHASE", "METHOD", "MODEL", "NODES", "PROGRESS", "LOSS",
                                "ETA", "RESTARTS", "AGE"]
    row = next(line.split() for line in table if line.startswith("lora "))
    assert row[1:6] == ["Succeeded", "lora", "tiny://llama", "2", "100"]

    local = tmp_path / "adapter"
    s3.get(f"{status['output']['uri'].removeprefix('s3://')}/", str(local), recursive=True)
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapted = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(local / "base_model"), local)
    assert any("lora_B" in name for name, _ in adapted.named_parameters())


def complete_checkpoints(s3: s3fs.S3FileSystem, output_uri: str) -> list[int]:
    s3.invalidate_cache()
    root = f"{output_uri.removeprefix('s3://')}/{contract.CHECKPOINTS_SUBDIR}"
    markers = s3.glob(f"{root}/checkpoint-*/{contract.CHECKPOINT_MARKER_FILE}")
    return sorted(int(m.split("/")[-2].removeprefix("checkpoint-")) for m in markers)


def test_killed_rank_restarts_the_gang_from_the_last_checkpoint(
        cluster: LocalCluster, s3_server: MotoServer, bucket: str,
        s3: s3fs.S3FileSystem) -> None:
    apply_example(cluster, s3_server, "tiny-lora", "gang", bucket, nodes=2,
                  training={"maxSteps": 100, "logEverySteps": 10},
                  checkpoint={"everySteps": 10, "keepLast": 2})
    output_uri = f"s3://{bucket}/gang"
    saved = cluster.wait(lambda: complete_checkpoints(s3, output_uri), "a complete checkpoint",
                         RUN_TIMEOUT)
    assert cluster.runner is not None
    cluster.runner.crash("gang-a1-1")  # rank 1's whole container dies mid-run

    status = cluster.wait_finished("gang", 2 * RUN_TIMEOUT)
    manifest = assert_succeeded_with_manifest(cluster, s3, "gang", status)
    assert (status["attempt"], status["restarts"]) == (2, 1)
    resumed = manifest["resumedFromStep"]
    assert resumed >= saved[-1]
    resumed_log = f"resuming from {output_uri}/{contract.CHECKPOINTS_SUBDIR} step {resumed}"
    assert resumed_log in cluster.runner.log("gang-a2-0")
    assert manifest["metrics"]["steps"] == 100
    steps = [step for step, _ in manifest["metrics"]["lossCurve"]]
    assert steps == sorted(set(steps)) and steps[-1] == 100  # continued, nothing repeated
    assert cluster.api.get(JOBS, "default", "gang-a1") is None
    assert {p["metadata"]["name"] for p in children(cluster, PODS, "gang")} == {
        "gang-a2-0", "gang-a2-1"}


@pytest.mark.parametrize(("example", "artifact_file"), [
    ("tiny-qlora", "adapter_config.json"),
    ("tiny-full-classification", "config.json"),
])
def test_other_methods_succeed(cluster: LocalCluster, s3_server: MotoServer, bucket: str,
                               s3: s3fs.S3FileSystem, example: str, artifact_file: str) -> None:
    name = example.removeprefix("tiny-")
    apply_example(cluster, s3_server, example, name, bucket, training={"maxSteps": 20})
    status = cluster.wait_finished(name, RUN_TIMEOUT)
    manifest = assert_succeeded_with_manifest(cluster, s3, name, status)
    assert manifest["metrics"]["steps"] == 20
    assert s3.exists(f"{bucket}/{name}/{artifact_file}")


def test_invalid_spec_fails_without_pods(cluster: LocalCluster, s3_server: MotoServer,
                                         bucket: str) -> None:
    manifest = s3_example("tiny-qlora", name="invalid", bucket=bucket,
                          endpoint=s3_server.endpoint)
    del manifest["spec"]["method"]["quantization"]  # the CRD's CEL rule would reject it
    assert "created" in cluster.apply(manifest)
    status = cluster.wait_finished("invalid", 30)
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert (status["phase"], failed["reason"]) == ("Failed", "InvalidSpec")
    assert "quantization" in failed["message"]
    assert not children(cluster, JOBS, "invalid") and not children(cluster, PODS, "invalid")
    assert "Failed" in next(line for line in cluster.kubectl("get", "ftj", "invalid").splitlines()
                            if line.startswith("invalid "))
