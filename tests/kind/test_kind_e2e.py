"""The tiny LoRA example on a real Kubernetes: kind, the images built from this tree, the Helm
chart, an in-cluster MinIO (tests/support/kind_cluster.py). Needs Docker and kind
(`make kind-e2e`, .github/workflows/e2e-kind.yaml). Without them it skips, unless
KIND_E2E_REQUIRED is set (the workflow sets it): then it fails. Its own timeout covers the
set-up steps and the job; logs (helm status, describe, operator and rank logs, events, kind's
node logs, disk) go to $KIND_E2E_LOGS (default: the test's tmp dir) on any failure.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from support.e2e_cluster import s3_example
from support.kind_cluster import MINIO_MANIFEST, TEST_TIMEOUT, Kind, missing_tools, required
from support.s3 import REGION

pytestmark = [pytest.mark.kind, pytest.mark.slow, pytest.mark.timeout(TEST_TIMEOUT)]

MINIO = list(yaml.safe_load_all(MINIO_MANIFEST.read_text()))
MINIO_SECRET = next(d for d in MINIO if d["kind"] == "Secret")["stringData"]
MINIO_ENDPOINT = "http://minio.default.svc.cluster.local:9000"
JOB = "tiny-lora"


@pytest.fixture(scope="module")
def kind(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kind]:
    if reason := missing_tools():
        if required():
            pytest.fail(f"KIND_E2E_REQUIRED is set but {reason}", pytrace=False)
        pytest.skip(reason)
    cluster = Kind(tmp_path_factory.mktemp("kind"))
    try:
        cluster.create()
        yield cluster
    finally:
        cluster.delete()


def test_tiny_lora_on_kind_to_minio(kind: Kind, tmp_path: Path) -> None:
    import s3fs

    bucket = "kubetune"
    manifest = s3_example("tiny-lora", name=JOB, bucket=bucket, endpoint=MINIO_ENDPOINT,
                          nodes=2, training={"maxSteps": 40})
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(manifest))
    try:
        with kind.port_forward("svc/minio", 9000) as endpoint:
            s3 = s3fs.S3FileSystem(key=MINIO_SECRET["AWS_ACCESS_KEY_ID"],
                                   secret=MINIO_SECRET["AWS_SECRET_ACCESS_KEY"],
                                   client_kwargs={"endpoint_url": endpoint,
                                                  "region_name": REGION})
            s3.mkdir(bucket)
            kind.kubectl("apply", "-f", str(tmp_path / "job.yaml"))
            kind.wait_for_phase(JOB, "Succeeded")
            started = time.monotonic()
            s3.get(f"{bucket}/{JOB}/", str(tmp_path / "adapter"), recursive=True)
            assert time.monotonic() - started < 120
    except BaseException as exc:
        kind.collect_logs(f"the job failed: {exc}", JOB)
        raise
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    local = tmp_path / "adapter"
    adapted = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(local / "base_model"), local)
    assert any("lora_B" in name for name, _ in adapted.named_parameters())
    assert "Succeeded" in kind.kubectl("get", "ftj", JOB)
