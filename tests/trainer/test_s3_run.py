"""A real run writing its artifact and checkpoints to a real S3-protocol server (moto), through
an outage of the server in the middle of a checkpoint upload."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import s3fs
from peft import PeftModel
from transformers import AutoModelForCausalLM

from kubetune_api import contract
from kubetune_trainer import recipe, storage
from support.jobs import example_job
from support.s3 import FlakyProxy, MotoServer, create_bucket

pytestmark = pytest.mark.slow


def test_artifact_and_checkpoints_round_trip_through_an_outage(
        s3_server: MotoServer, s3_env: str, monkeypatch: pytest.MonkeyPatch,
        tmp_path: Path) -> None:
    bucket = create_bucket(s3_env)
    port = int(s3_env.rsplit(":", 1)[1])
    with FlakyProxy(port) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        outages: list[Any] = []
        real_upload = storage.upload_dir

        def upload_during_an_outage(local: Any, uri: str, **kwargs: Any) -> int:
            # The first checkpoint upload (not the features' publication) meets a 1.5 s outage.
            if not outages and "/checkpoint-" in uri:
                outages.append(proxy.outage(1.5))
            return real_upload(local, uri, **kwargs)

        monkeypatch.setattr(storage, "upload_dir", upload_during_an_outage)
        output = f"s3://{bucket}/runs/tiny-lora"
        job = example_job("tiny-lora", output, training={"maxSteps": 20},
                          checkpoint={"everySteps": 10, "keepLast": 1})
        result = recipe.run(job)
        assert outages and result is not None

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_env})
    prefix = f"{bucket}/runs/tiny-lora"
    manifest = json.loads(fs.cat(f"{prefix}/{contract.MANIFEST_FILE}"))
    assert manifest["metrics"]["steps"] == 20
    assert fs.exists(f"{prefix}/checkpoints/checkpoint-20/{contract.CHECKPOINT_MARKER_FILE}")
    assert not fs.exists(f"{prefix}/checkpoints/checkpoint-10")  # keepLast: 1
    assert fs.exists(f"{prefix}/checkpoints/checkpoint-20/optimizer.pt")
    # A job that keeps checkpoints shares its features next to them (a restart fetches them).
    assert fs.glob(f"{prefix}/checkpoints/features/features-*/READY")

    local = tmp_path / "artifact"
    fs.get(f"{prefix}/", str(local), recursive=True)
    base = AutoModelForCausalLM.from_pretrained(local / "base_model")
    adapted = PeftModel.from_pretrained(base, local)
    assert any("lora_B" in name for name, _ in adapted.named_parameters())
