"""Real training on CPU with tiny models (no mocks of the ML stack)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from kubetune_api.contract import EXIT_INVALID_SPEC, MANIFEST_FILE
from kubetune_trainer import recipe
from kubetune_trainer.artifacts import BASE_MODEL_DIR, MERGED_DIR
from kubetune_trainer.data import DataError
from support.jobs import ROOT, example_job

pytestmark = pytest.mark.slow

TINY_EXAMPLES = ["tiny-lora", "tiny-qlora", "tiny-full-classification", "tiny-mlm",
                 "tiny-pretrain", "tiny-seq2seq-lora", "tiny-sharegpt", "tiny-alpaca",
                 "tiny-mixture"]


def check_artifact(output: Path) -> dict:
    """The manifest is present, lists every other file, and its digests match."""
    manifest = json.loads((output / MANIFEST_FILE).read_text())
    on_disk = {p.relative_to(output).as_posix() for p in output.rglob("*") if p.is_file()}
    assert on_disk - {MANIFEST_FILE} == set(manifest["files"])
    for name, entry in manifest["files"].items():
        assert hashlib.sha256((output / name).read_bytes()).hexdigest() == entry["sha256"]
    return manifest


def check_model_card(output: Path, manifest: dict) -> None:
    """The card is written from the run's facts: base, method, data digests, metrics."""
    card = (output / "README.md").read_text()
    assert "More Information Needed" not in card
    base = str(output / BASE_MODEL_DIR) if manifest["method"] != "full" else "tiny://"
    assert f"base_model: \"{base}" in card
    assert f"kubetune {manifest['kubetuneVersion']}" in card
    assert manifest["dataset"]["sha256"] in card
    for source in manifest["dataset"]["sources"]:
        assert f"`{source['path']}` ({source['type']}): {source['records']} records" in card
        assert source["sha256"] in card
    metrics = manifest["metrics"]
    assert f"| trainLoss | {metrics['trainLoss']:.4f} |" in card
    assert f"| steps | {metrics['steps']} |" in card
    if metrics["evalLoss"] is not None:
        assert f"| evalLoss | {metrics['evalLoss']:.4f} |" in card


@pytest.mark.parametrize("example", TINY_EXAMPLES)
def test_example_trains_with_falling_loss(example: str, tmp_path: Path) -> None:
    output = tmp_path / "out"
    result = recipe.run(example_job(example, output))
    assert result is not None and result.output_uri == str(output)
    manifest = check_artifact(output)
    metrics = manifest["metrics"]
    assert metrics["trainLoss"] < 0.85 * metrics["firstTrainLoss"], metrics
    assert manifest["method"] == example_job(example, output).spec.method.type
    assert manifest["precision"] == "fp32"  # auto on CPU
    assert len(manifest["dataset"]["sha256"]) == 64
    check_model_card(output, manifest)
    if example == "tiny-mixture":  # 80 sharegpt x2, 30 of 40 alpaca, 40 of 80 chat
        sources = manifest["dataset"]["sources"]
        assert [(s["type"], s["records"], s["examples"]) for s in sources] == [
            ("sharegpt", 80, 160), ("alpaca", 40, 30), ("openai", 80, 40)]
        assert all(len(s["sha256"]) == 64 for s in sources)
        assert manifest["dataset"]["trainRecords"] + manifest["dataset"]["evalRecords"] == 230
    nonpad = metrics["nonPadFraction"]
    if example == "tiny-pretrain":  # packed: padding only in the short last block
        assert nonpad > 0.95, metrics
    else:
        assert 0 < nonpad <= 1, metrics
    assert result.manifest_sha256 == hashlib.sha256(
        (output / MANIFEST_FILE).read_bytes()).hexdigest()
    if manifest["method"] == "full":
        assert {"config.json", "model.safetensors"} <= set(manifest["files"])
        assert manifest["parameters"]["trainable"] == manifest["parameters"]["total"]
    else:
        assert {"adapter_config.json", "adapter_model.safetensors"} <= set(manifest["files"])
        assert f"{BASE_MODEL_DIR}/config.json" in manifest["files"]
        assert 0 < manifest["parameters"]["trainable"] < manifest["parameters"]["total"] / 3


def test_lora_trains_only_adapters_and_reloads_identically(tmp_path: Path) -> None:
    job = example_job("tiny-lora", tmp_path / "out", training={"epochs": 2})
    ready = recipe.setup(job, str(tmp_path / "out"), tmp_path / "work")
    before = {n: p.detach().clone() for n, p in ready.model.named_parameters()}
    trainer = recipe.build_trainer(ready)
    trainer.train()
    after = dict(ready.model.named_parameters())
    base = [n for n in before if "lora_" not in n]
    assert base and all(torch.equal(before[n], after[n]) for n in base)
    lora_b = [n for n in before if "lora_B" in n]
    assert lora_b and all(not torch.any(before[n]) for n in lora_b)  # B starts at zero
    assert all(torch.any(after[n]) for n in lora_b)
    recipe.save(ready, trainer, recipe.summarize(ready, trainer, None, 1.0))

    batch = ready.tokenizer(["Customer: How do I reset my password?\nAgent:"],
                            return_tensors="pt")
    ready.model.eval()
    with torch.no_grad():
        expected = ready.model(**batch).logits
        output = tmp_path / "out"
        # adapter_config.json names the published base_model/, not the deleted temporary one
        config = json.loads((output / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == str(output / BASE_MODEL_DIR)
        base_model = AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"])
        reloaded = PeftModel.from_pretrained(base_model, output).eval()
        assert torch.allclose(reloaded(**batch).logits, expected, atol=1e-5)


def test_qlora_quantizes_the_base_and_keeps_head_in_full_precision(tmp_path: Path) -> None:
    import bitsandbytes as bnb

    job = example_job("tiny-qlora", tmp_path / "out", training={"maxSteps": 3})
    ready = recipe.setup(job, str(tmp_path / "out"), tmp_path / "work")
    model = ready.model
    four_bit = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(four_bit) == 2 * 7  # q, k, v, o, gate, up, down in each of 2 layers
    weight = four_bit[0].weight
    assert weight.quant_state.quant_type == "nf4" and weight.quant_state.nested  # double quant
    assert model.get_output_embeddings().weight.dtype == torch.float32
    assert model.get_input_embeddings().weight.dtype == torch.float32
    full = AutoModelForCausalLM.from_pretrained(ready.source)
    assert model.get_memory_footprint() < 0.6 * full.get_memory_footprint()
    recipe.build_trainer(ready).train()


def test_qlora_8bit_option(tmp_path: Path) -> None:
    job = example_job("tiny-qlora", tmp_path / "out", training={"maxSteps": 2})
    job.spec.method.quantization.bits = 8  # type: ignore[union-attr]
    ready = recipe.setup(job, str(tmp_path / "out"), tmp_path / "work")
    import bitsandbytes as bnb

    assert any(isinstance(m, bnb.nn.Linear8bitLt) for m in ready.model.modules())


def test_full_classification_has_a_new_head(tmp_path: Path) -> None:
    output = tmp_path / "out"
    recipe.run(example_job("tiny-full-classification", output, training={"epochs": 2}))
    model = AutoModelForSequenceClassification.from_pretrained(output)
    assert model.config.num_labels == 2
    assert model.config.id2label == {0: "negative", 1: "positive"}
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(output)
    logits = model(**tok(["the meal was great", "the hotel was awful"], return_tensors="pt",
                         padding=True)).logits
    assert logits.shape == (2, 2)


def test_merge_adapter_writes_an_equivalent_plain_model(tmp_path: Path) -> None:
    output = tmp_path / "out"
    recipe.run(example_job("tiny-lora", output, training={"maxSteps": 4},
                           output={"mergeAdapter": True}))
    manifest = check_artifact(output)
    assert f"{MERGED_DIR}/model.safetensors" in manifest["files"]
    merged = AutoModelForCausalLM.from_pretrained(output / MERGED_DIR).eval()
    base = AutoModelForCausalLM.from_pretrained(output / BASE_MODEL_DIR)
    adapted = PeftModel.from_pretrained(base, output).eval()
    ids = torch.tensor([[1, 5, 9, 13, 2]])
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, adapted(ids).logits, atol=1e-4)


def test_bad_data_stops_before_training_and_writes_nothing(tmp_path: Path) -> None:
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c"}\n')
    output = tmp_path / "out"
    job = example_job("tiny-lora", output, dataset={"train": str(data), "eval": None})
    with pytest.raises(DataError, match=f"{data}:2: missing field 'completion'"):
        recipe.run(job)
    assert not output.exists()


def test_cli_bad_input_exits_2_and_writes_nothing(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    config = tmp_path / "job.yaml"
    text = (ROOT / "examples/tiny-lora.yaml").read_text()
    config.write_text(text.replace("examples/data/support.jsonl", str(empty))
                      .replace("out/tiny-lora", str(tmp_path / "out")))
    proc = subprocess.run([sys.executable, "-m", "kubetune", "run", str(config)],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == EXIT_INVALID_SPEC, proc.stderr[-2000:]
    assert f"error: {empty}: no records (the file is empty)" in proc.stderr
    assert not (tmp_path / "out").exists()
