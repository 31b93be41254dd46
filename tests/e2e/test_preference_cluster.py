"""DPO end to end: `kubectl apply` the tiny-dpo example on 2 nodes → operator → pods → S3, with
rank 1 killed mid-run: the gang restarts from the last complete checkpoint and succeeds."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from typing import Any

import pytest
import s3fs

from kubetune_api import contract
from support.e2e_cluster import LocalCluster, kubectl_binary, s3_example
from support.s3 import ACCESS_KEY, SECRET_KEY, MotoServer, create_bucket

pytestmark = [pytest.mark.e2e, pytest.mark.slow,
              pytest.mark.skipif(kubectl_binary() is None, reason="kubectl is not installed")]

RUN_TIMEOUT = 300  # imports of TRL on top of the usual ~15 s per process on 2 busy cores


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    with LocalCluster(tmp_path_factory.mktemp("cluster")) as local:
        yield local


def complete_checkpoints(s3: s3fs.S3FileSystem, output_uri: str) -> list[int]:
    s3.invalidate_cache()
    root = f"{output_uri.removeprefix('s3://')}/{contract.CHECKPOINTS_SUBDIR}"
    markers = s3.glob(f"{root}/checkpoint-*/{contract.CHECKPOINT_MARKER_FILE}")
    return sorted(int(m.split("/")[-2].removeprefix("checkpoint-")) for m in markers)


def test_two_node_dpo_survives_a_killed_rank(cluster: LocalCluster,
                                             s3_server: MotoServer) -> None:
    bucket = create_bucket(s3_server.endpoint)
    s3 = s3fs.S3FileSystem(key=ACCESS_KEY, secret=SECRET_KEY,
                           client_kwargs={"endpoint_url": s3_server.endpoint})
    manifest = s3_example("tiny-dpo", name="dpo", bucket=bucket, endpoint=s3_server.endpoint,
                          nodes=2, training={"maxSteps": 100, "logEverySteps": 10},
                          checkpoint={"everySteps": 10, "keepLast": 2})
    assert "created" in cluster.apply(manifest)
    output_uri = f"s3://{bucket}/dpo"
    saved = cluster.wait(lambda: complete_checkpoints(s3, output_uri), "a complete checkpoint",
                         RUN_TIMEOUT)
    assert cluster.runner is not None
    cluster.runner.crash("dpo-a1-1")  # rank 1's whole container dies mid-run

    status: dict[str, Any] = cluster.wait_finished("dpo", 2 * RUN_TIMEOUT)
    assert status["phase"] == "Succeeded", cluster.diagnostics()
    assert (status["attempt"], status["restarts"]) == (2, 1)
    raw = s3.cat(f"{status['output']['uri'].removeprefix('s3://')}/{contract.MANIFEST_FILE}")
    assert status["output"]["manifestSha256"] == hashlib.sha256(raw).hexdigest()
    result = json.loads(raw)
    assert result["objective"] == "dpo" and result["worldSize"] == 2
    assert result["resumedFromStep"] >= saved[-1]
    assert result["metrics"]["steps"] == 100
    steps = [step for step, _ in result["metrics"]["lossCurve"]]
    assert steps == sorted(set(steps)) and steps[-1] == 100  # continued, nothing repeated
    assert result["metrics"]["rewardAccuracy"]["final"] > 0.5
