"""FSDP2 where the CPU allows: `fully_shard` over gloo with `init_device_mesh("cpu")`, two
ranks, on the models the trainer builds for `strategy: fsdp` (fsdp_rank.py). The HF Trainer
cannot run FSDP on a CPU (accelerate enables it only on accelerators), so these are the pieces
the trainer relies on, exercised directly; what only CUDA can show is listed in
docs/trainer.md#fsdp-on-cpu."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

from support.jobs import ROOT
from support.ranks import run_two_ranks

pytestmark = pytest.mark.slow
RANK_SCRIPT = Path(__file__).with_name("fsdp_rank.py")


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    work = tmp_path_factory.mktemp("fsdp")
    run_two_ranks([sys.executable, str(RANK_SCRIPT), str(work)], ROOT, 900)
    return json.loads((work / "result.json").read_text())


def test_qlora_weights_stored_in_the_training_dtype_shard_and_compute_alike(
        fsdp_run: dict) -> None:
    """strategies.quant_storage: under fsdp the packed 4-bit weights are bf16 like every
    other parameter, so FSDP2 shards them all (uniform dtype), and the sharded model computes
    the unsharded model's loss."""
    assert fsdp_run["qlora_dtypes"] == ["torch.bfloat16"]
    assert fsdp_run["qlora_sharded_params"] > 20  # every weight of the tiny llama
    unsharded, sharded = fsdp_run["qlora_loss"]
    assert math.isclose(unsharded, sharded, rel_tol=1e-6), fsdp_run["qlora_loss"]
    # Stored as fp16 under bf16 mixed precision, the cast rewrites the packed bytes.
    assert not math.isclose(unsharded, fsdp_run["qlora_fp16_storage_loss"], rel_tol=1e-4)


def test_a_lora_adapter_saved_from_sharded_state_reloads_to_the_trained_model(
        fsdp_run: dict) -> None:
    """The full state dict gathered on rank 0 (FULL_STATE_DICT, as the trainer's fsdp_config
    says) saves an adapter whose reload on the unsharded base gives the sharded model's
    logits: within bf16 rounding, far closer than the untrained base."""
    first, second = fsdp_run["lora_losses"]
    assert second < first  # it trained
    assert fsdp_run["adapter_b_nonzero"]
    assert fsdp_run["adapter_max_diff"] < fsdp_run["base_max_diff"] / 10, fsdp_run


def test_resume_from_the_gathered_state_takes_the_same_next_step(fsdp_run: dict) -> None:
    """A fresh sharded model and optimizer loaded from rank 0's full model and optimizer
    state (broadcast, as accelerate loads a FULL_STATE_DICT checkpoint) take the very step the
    uninterrupted run takes."""
    assert math.isclose(fsdp_run["resumed_loss"], fsdp_run["continued_loss"], rel_tol=1e-6)
