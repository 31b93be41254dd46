"""`hf://datasets/<org>/<name>/<file>` dataset URIs through huggingface_hub's HfFileSystem,
against a local stand-in for the Hub (tests/support/hub.py, reached with HF_ENDPOINT). What the
stand-in does not emulate (auth for private/gated repos, xet/LFS storage) is listed in
docs/storage.md."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from support.hub import HubStandIn
from support.jobs import ROOT

DATA = ROOT / "examples" / "data"
LOAD = """
import json, sys
from kubetune_api.load import validate_job
from kubetune_trainer.data import DataError, load_records
import yaml
body = yaml.safe_load(open(sys.argv[1]))
body["spec"]["dataset"].update(train=sys.argv[2], eval=sys.argv[3])
job = validate_job(body)
try:
    data = load_records(job.spec.dataset, job.spec.model.task, 0)
except DataError as exc:
    print(json.dumps({"error": str(exc)}))
else:
    print(json.dumps({"train": len(data.train), "eval": len(data.eval), "digest": data.digest}))
"""


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[HubStandIn]:
    repo = tmp_path / "hub" / "acme" / "support"
    repo.mkdir(parents=True)
    shutil.copy(DATA / "support.jsonl", repo / "train.jsonl")
    (repo / "splits").mkdir()
    shutil.copy(DATA / "support-eval.jsonl", repo / "splits" / "eval.jsonl")
    with HubStandIn(tmp_path / "hub") as server:
        yield server


def load(hub: HubStandIn | None, train: str, evaluation: str) -> dict[str, object]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_HUB_OFFLINE")}
    if hub is not None:
        env |= {"HF_ENDPOINT": hub.endpoint, "HF_HUB_DISABLE_TELEMETRY": "1"}
    result = subprocess.run([sys.executable, "-c", LOAD, str(ROOT / "examples/tiny-lora.yaml"),
                             train, evaluation], capture_output=True, text=True, cwd=ROOT,
                            env=env, timeout=180, check=True)
    loaded: dict[str, object] = json.loads(result.stdout.strip().splitlines()[-1])
    return {**loaded, "log": result.stderr}


@pytest.mark.slow
def test_hf_dataset_files_load_like_the_local_ones(hub: HubStandIn) -> None:
    remote = load(hub, "hf://datasets/acme/support/train.jsonl",
                  "hf://datasets/acme/support/splits/eval.jsonl")
    local = load(None, str(DATA / "support.jsonl"), str(DATA / "support-eval.jsonl"))
    assert {**remote, "log": ""} == {**local, "log": ""} and remote["train"]
    assert "GET /datasets/acme/support/resolve/main/train.jsonl" in hub.requests


@pytest.mark.slow
def test_a_missing_hf_file_is_a_clear_error_at_once(hub: HubStandIn) -> None:
    loaded = load(hub, "hf://datasets/acme/support/nope.jsonl",
                  "hf://datasets/acme/support/splits/eval.jsonl")
    assert "hf://datasets/acme/support/nope.jsonl: cannot read dataset" in str(loaded["error"])
    assert "retrying" not in str(loaded["log"])  # not retried as if it were an outage
    assert hub.requests.count("GET /api/datasets/acme/support/tree/main") == 1
