"""`Client(backend="local")`: the same spec trained in this process as `kubetune run` does."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

import kubetune
from kubetune_api import contract
from kubetune_trainer.env import PROGRESS_ENV, SUMMARY_ENV
from support.jobs import example_dict

pytestmark = pytest.mark.slow


def test_local_backend_trains_and_reads_the_artifact(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (PROGRESS_ENV, SUMMARY_ENV):  # the notebook's own settings, unset
        monkeypatch.delenv(name, raising=False)
    client = kubetune.Client(backend="local", workdir=str(tmp_path / "work"))
    spec = example_dict("tiny-lora")["spec"]
    output = tmp_path / "out"
    job = client.train(spec, name="local", training={"maxSteps": 3, "epochs": 1},
                       output={"uri": str(output)})
    assert job.phase == "Succeeded" and job.status.output is not None
    # The quiet in-process run leaves the caller's console settings as they were: a later
    # `kubetune run` in the same process still shows its progress.
    assert PROGRESS_ENV not in os.environ and SUMMARY_ENV not in os.environ
    manifest_bytes = (output / contract.MANIFEST_FILE).read_bytes()
    assert job.status.output.manifest_sha256 == hashlib.sha256(manifest_bytes).hexdigest()
    artifact = client.artifact("local")
    assert artifact.manifest is not None and artifact.manifest["method"] == "lora"
    assert artifact.manifest["metrics"]["steps"] == 3
    assert client.wait("local").phase == "Succeeded"
    assert [j.name for j in client.list()] == ["local"]
    assert (tmp_path / "work" / "local.yaml").exists()  # workdir: where the spec ran from
    with pytest.raises(kubetune.LogsUnavailable):
        list(client.logs("local"))
    with pytest.raises(kubetune.KubetuneError, match="only a cluster job"):
        client.suspend("local")
    with pytest.raises(kubetune.AlreadyExists):
        client.train(spec, name="local", output={"uri": str(output)})

    spec["dataset"]["train"] = str(tmp_path / "missing.jsonl")
    failed = client.train(spec, name="no-data", output={"uri": str(tmp_path / "none")})
    assert failed.phase == "Failed" and failed.status.output is None
    with pytest.raises(kubetune.JobFailed, match="no-data ended Failed"):
        client.wait("no-data")
    client.cancel("no-data")
    with pytest.raises(kubetune.NotFound):
        client.get("no-data")
