"""One rank of test_fsdp_cpu.py: FSDP2 (`fully_shard`) on the CPU with gloo, on the models the
trainer builds (modeling.load_model + make_trainable under `strategy: fsdp`, bf16). accelerate
turns FSDP on only for accelerators, so the Trainer cannot take this path on a CPU; the pieces
it relies on are exercised here directly. Rank 0 writes its findings to argv[2]/result.json.

    RANK=r WORLD_SIZE=2 MASTER_ADDR=... MASTER_PORT=... python fsdp_rank.py WORKDIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kubetune_trainer import modeling, strategies
from kubetune_trainer.tiny import build_tiny_model
from support.jobs import example_job

TEXTS = ["the quick brown fox jumps over the lazy dog", "a stitch in time saves nine"] * 10
PRECISION = modeling.Precision("bf16")
FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)
BROADCAST = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)


def trainer_model(work: Path, method: str, source: Path,
                  storage: torch.dtype | None = None) -> Any:
    lora = {"r": 8, "alpha": 16, "dropout": 0.0, "targetModules": ["q_proj", "v_proj"]}
    spec_method: dict[str, Any] = {"type": method, "lora": lora}
    if method == "qlora":
        spec_method["quantization"] = {"bits": 4}
    spec = example_job("tiny-lora", work / "out", method=spec_method,
                       training={"strategy": "fsdp", "precision": "bf16"}).spec
    tokenizer = modeling.load_tokenizer(str(source), None, "causal-lm")
    torch.manual_seed(0)  # the same adapter init on every rank and in every copy
    model = modeling.load_model(spec, str(source), tokenizer, PRECISION, None,
                                quant_storage=storage or strategies.quant_storage(spec, PRECISION))
    return modeling.make_trainable(model, spec), tokenizer


def shard(model: Any, mesh: Any) -> Any:
    """As accelerate's FSDP2 preparation wraps a decoder: each layer, then the root."""
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in model.base_model.model.model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def batch_of(tokenizer: Any) -> dict[str, torch.Tensor]:
    batch = tokenizer(TEXTS[:2], return_tensors="pt", padding=True)
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return dict(batch)


def step(model: Any, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor]) -> float:
    loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return float(loss)


def main() -> None:
    work = Path(sys.argv[1])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    source = work / "tiny-llama"
    if rank == 0:
        build_tiny_model("llama", TEXTS, source, max_positions=64, seed=1)
    dist.barrier()
    result: dict[str, Any] = {}

    # 1. QLoRA: the 4-bit weights stored in the training dtype shard with everything else.
    # (bitsandbytes' CPU backend repacks 4-bit weights at their first forward, so the sharded
    # copy must not run unsharded first: the reference is a second copy.)
    reference, tokenizer = trainer_model(work, "qlora", source)
    sharded, _ = trainer_model(work, "qlora", source)
    batch = batch_of(tokenizer)
    result["qlora_dtypes"] = sorted({str(p.dtype) for p in sharded.parameters()})
    shard(sharded, mesh)
    result["qlora_sharded_params"] = sum(
        type(p).__name__ == "DTensor" for p in sharded.parameters())
    with torch.no_grad():
        result["qlora_loss"] = [float(reference(**batch).loss), float(sharded(**batch).loss)]
    # The hazard the rule avoids: packed bytes stored as fp16 are cast to the bf16 compute
    # dtype by the mixed-precision policy, which changes the numbers they hold.
    fp16_stored, _ = trainer_model(work, "qlora", source, storage=torch.float16)
    shard(fp16_stored, mesh)
    with torch.no_grad():
        result["qlora_fp16_storage_loss"] = float(fp16_stored(**batch).loss)
    del reference, sharded, fp16_stored

    # 2. LoRA: train sharded, gather the full state on rank 0, save the adapter, reload it.
    model, _ = trainer_model(work, "lora", source)
    shard(model, mesh)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    result["lora_losses"] = [step(model, optimizer, batch) for _ in range(2)]
    full = get_model_state_dict(model, options=FULL)  # every rank joins; rank 0 gets it
    optim_full = get_optimizer_state_dict(model, optimizer, options=FULL)
    with torch.no_grad():
        sharded_logits = model(**batch).logits.float()
    if rank == 0:
        from peft import PeftModel

        model.save_pretrained(work / "adapter", state_dict=full)
        torch.save({"model": full, "optim": optim_full}, work / "resume.pt")
        base, _ = trainer_model(work, "lora", source)
        reloaded = PeftModel.from_pretrained(base.get_base_model(), work / "adapter")
        with torch.no_grad():
            logits = reloaded(**batch).logits.float()
        with torch.no_grad(), reloaded.disable_adapter():
            untrained = reloaded(**batch).logits.float()
        result["adapter_max_diff"] = float((logits - sharded_logits).abs().max())
        result["base_max_diff"] = float((untrained - sharded_logits).abs().max())
        result["adapter_b_nonzero"] = all(
            bool(v.abs().sum()) for k, v in full.items() if "lora_B" in k)
    dist.barrier()

    # 3. Resume: a fresh sharded model and optimizer from rank 0's full state, broadcast (as
    # accelerate loads a FULL_STATE_DICT checkpoint), takes the step the original takes.
    result["continued_loss"] = step(model, optimizer, batch)
    fresh, _ = trainer_model(work, "lora", source)
    shard(fresh, mesh)
    fresh_optimizer = torch.optim.AdamW([p for p in fresh.parameters() if p.requires_grad],
                                        lr=1e-2)
    saved = torch.load(work / "resume.pt", weights_only=False) if rank == 0 else {
        "model": {}, "optim": {}}
    set_model_state_dict(fresh, saved["model"], options=BROADCAST)
    set_optimizer_state_dict(fresh, fresh_optimizer, saved["optim"], options=BROADCAST)
    result["resumed_loss"] = step(fresh, fresh_optimizer, batch)
    if rank == 0:
        (work / "result.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
