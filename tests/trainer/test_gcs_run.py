"""gs:// end to end against a GCS emulator (gcp-storage-emulator from PyPI): the dataset is
read from a bucket, the artifact and checkpoints are written to one, and the adapter loads
back from what is there."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from peft import PeftModel
from transformers import AutoModelForCausalLM

from kubetune_api import contract
from kubetune_trainer import recipe, storage
from support.gcs import GcsEmulator
from support.jobs import ROOT, example_job

pytestmark = pytest.mark.slow


@pytest.fixture
def gcs(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    with GcsEmulator() as server:
        monkeypatch.setenv(storage.GCS_EMULATOR_ENV, server.endpoint)
        yield server.create_bucket("tuning")


def test_dataset_artifact_and_checkpoints_on_gcs(gcs: str, tmp_path: Path) -> None:
    data = ROOT / "examples" / "data"
    for name in ("support.jsonl", "support-eval.jsonl"):
        storage.write_text(f"{gcs}/data/{name}", (data / name).read_text())
    output = f"{gcs}/runs/tiny-lora"
    job = example_job("tiny-lora", output, training={"maxSteps": 6},
                      checkpoint={"everySteps": 3, "keepLast": 1},
                      dataset={"train": f"{gcs}/data/support.jsonl",
                               "eval": f"{gcs}/data/support-eval.jsonl"})
    result = recipe.run(job, workdir=str(tmp_path / "work"))
    assert result is not None and result.output_uri == output

    manifest = json.loads(storage.read_text(f"{output}/{contract.MANIFEST_FILE}"))
    assert manifest["metrics"]["steps"] == 6
    marker = contract.CHECKPOINT_MARKER_FILE
    assert storage.exists(f"{output}/{contract.CHECKPOINTS_SUBDIR}/checkpoint-6/{marker}")
    assert not storage.exists(f"{output}/{contract.CHECKPOINTS_SUBDIR}/checkpoint-3")
    local = tmp_path / "artifact"
    storage.download_dir(output, local)
    adapted = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(local / "base_model"), local)
    assert any("lora_B" in name for name, _ in adapted.named_parameters())


def test_a_missing_gcs_dataset_is_a_clear_error(gcs: str) -> None:
    from kubetune_trainer.data import DataError, load_records

    job = example_job("tiny-lora", f"{gcs}/out", dataset={"train": f"{gcs}/none.jsonl"})
    with pytest.raises(DataError, match=rf"{gcs}/none.jsonl: cannot read dataset"):
        load_records(job.spec.dataset, job.spec.model.task, 0)
