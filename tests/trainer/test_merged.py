"""Whole models as serving engines load them: merged/ under mergeAdapter, and full fine-tuning's
output — full config, tokenizer, generation_config.json, safetensors shards of
output.maxShardSize with model.safetensors.index.json. Real training on CPU, tiny models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from kubetune_api.load import SpecError, parse_job
from kubetune_api.spec import shard_size_bytes
from kubetune_trainer import recipe
from kubetune_trainer.artifacts import (
    BASE_MODEL_DIR,
    GENERATION_CONFIG,
    MERGED_DIR,
    SAFE_INDEX,
    SAFE_WEIGHTS,
    tensor_sizes,
)
from support.jobs import MINIMAL_JOB_YAML, example_job

PROMPT = "Customer: How do I reset my password?\nAgent:"


def int8_dequantized(layer: torch.nn.Module) -> torch.Tensor:
    """An 8-bit layer's weights: bitsandbytes keeps the int8 rows (CB) and their scales (SCB)
    on the parameter until the first forward pass moves them to the layer's state."""
    import bitsandbytes.functional as bnb_f

    packed, state = layer.weight, layer.state
    rows = packed.CB if packed.CB is not None else state.CB
    scales = packed.SCB if packed.SCB is not None else state.SCB
    return bnb_f.int8_vectorwise_dequant(rows, scales)


def check_sharded(directory: Path, limit: int) -> None:
    """Several shards named as transformers names them, each within the limit, and an index
    that maps every tensor to the shard holding it."""
    assert not (directory / SAFE_WEIGHTS).exists()
    index = json.loads((directory / SAFE_INDEX).read_text())
    shards = sorted(p.name for p in directory.glob("model-*.safetensors"))
    assert len(shards) >= 2
    assert shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                      for i in range(1, len(shards) + 1)]
    assert set(index["weight_map"].values()) == set(shards)
    total = 0
    for shard in shards:
        sizes = tensor_sizes(directory / shard)
        assert sum(size for _, size in sizes) <= limit or len(sizes) == 1
        total += sum(size for _, size in sizes)
        with safe_open(str(directory / shard), framework="pt") as weights:
            assert {name for name, file in index["weight_map"].items() if file == shard} == \
                set(weights.keys())
    assert index["metadata"]["total_size"] == total


def check_serving_files(directory: Path) -> None:
    for name in ("config.json", GENERATION_CONFIG, "tokenizer.json", "tokenizer_config.json"):
        assert (directory / name).is_file(), name
    generation = json.loads((directory / GENERATION_CONFIG).read_text())
    config = json.loads((directory / "config.json").read_text())
    assert generation.get("eos_token_id") == config.get("eos_token_id")


@pytest.mark.slow
def test_a_merged_lora_model_is_sharded_and_loads_with_the_adapters_logits(
        tmp_path: Path) -> None:
    output = tmp_path / "out"
    recipe.run(example_job("tiny-lora", output, training={"maxSteps": 3},
                           output={"mergeAdapter": True, "maxShardSize": "300KB"}))
    merged_dir = output / MERGED_DIR
    check_sharded(merged_dir, shard_size_bytes("300KB"))
    check_serving_files(merged_dir)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    adapted = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(output / BASE_MODEL_DIR), output).eval()
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    batch = tokenizer([PROMPT], return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(merged(**batch).logits, adapted(**batch).logits, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("bits", [4, 8])
def test_qlora_merges_into_the_dequantized_base_it_trained_on(tmp_path: Path, bits: int) -> None:
    """merged/ = the quantized base the adapter trained on, dequantized by bitsandbytes, plus
    the adapter's delta: layer by layer, as built here from the trained model itself."""
    import bitsandbytes.functional as bnb_f

    output = tmp_path / "out"
    job = example_job("tiny-qlora", output, training={"maxSteps": 3},
                      output={"mergeAdapter": True})
    job.spec.method.quantization.bits = bits  # type: ignore[union-attr]
    ready = recipe.setup(job, str(output), tmp_path / "work")
    trainer = recipe.build_trainer(ready)
    trainer.train()
    recipe.save(ready, trainer, recipe.summarize(ready, trainer, None, 1.0))
    merged = AutoModelForCausalLM.from_pretrained(output / MERGED_DIR).eval()
    config = json.loads((output / MERGED_DIR / "config.json").read_text())
    assert "quantization_config" not in config
    assert (output / MERGED_DIR / SAFE_WEIGHTS).is_file()  # 5GB default: one file
    check_serving_files(output / MERGED_DIR)

    merged_layers = dict(merged.named_modules())
    original = AutoModelForCausalLM.from_pretrained(output / BASE_MODEL_DIR)
    original_layers = dict(original.named_modules())
    checked = 0
    for name, layer in ready.model.named_modules():
        if not isinstance(layer, LoraLayer):
            continue
        plain_name = name.removeprefix("base_model.model.")
        target = merged_layers[plain_name]
        assert type(target) is torch.nn.Linear  # no bitsandbytes layer left
        packed = layer.base_layer.weight
        base = (bnb_f.dequantize_4bit(packed.data, packed.quant_state) if bits == 4
                else int8_dequantized(layer.base_layer))
        delta = layer.get_delta_weight("default").float()
        assert torch.allclose(target.weight, base.float() + delta, atol=1e-6)
        # Not the original full-precision base: that is not what the adapter trained on.
        assert not torch.allclose(target.weight, original_layers[plain_name].weight + delta,
                                  atol=1e-6)
        checked += 1
    assert checked == 2 * 7  # q, k, v, o, gate, up, down in each of 2 layers


@pytest.mark.slow
def test_a_full_fine_tune_is_sharded_with_its_generation_config(tmp_path: Path) -> None:
    output = tmp_path / "out"
    job = example_job("tiny-pretrain", output, training={"maxSteps": 3},
                      output={"maxShardSize": "200KiB"})
    ready = recipe.setup(job, str(output), tmp_path / "work")
    trainer = recipe.build_trainer(ready)
    trainer.train()
    recipe.save(ready, trainer, recipe.summarize(ready, trainer, None, 1.0))
    check_sharded(output, shard_size_bytes("200KiB"))
    check_serving_files(output)
    manifest = json.loads((output / "kubetune-manifest.json").read_text())
    assert SAFE_INDEX in manifest["files"] and SAFE_WEIGHTS not in manifest["files"]
    loaded = AutoModelForCausalLM.from_pretrained(output).eval()
    ids = torch.tensor([[1, 5, 9, 13, 2]])
    ready.model.eval()
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, ready.model(ids).logits, atol=1e-5)


@pytest.mark.parametrize("size", ["5 GB", "0GB", "5gb", "1.5GB", "5TB", "5G"])
def test_a_bad_shard_size_names_the_field(size: str) -> None:
    text = MINIMAL_JOB_YAML.replace("output: {uri: out}",
                                    f"output: {{uri: out, maxShardSize: '{size}'}}")
    with pytest.raises(SpecError, match=r"job\.yaml:9: spec\.output\.maxShardSize"):
        parse_job(text, "job.yaml")


def test_shard_sizes_are_decimal_or_binary() -> None:
    assert shard_size_bytes("5GB") == 5 * 10**9
    assert shard_size_bytes("2GiB") == 2 * 2**30
    assert shard_size_bytes("300KB") == 300_000
    assert parse_job(MINIMAL_JOB_YAML).spec.output.max_shard_bytes == 5 * 10**9
