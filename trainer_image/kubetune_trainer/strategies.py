"""Distribution strategies as TrainingArguments: DDP, FSDP, DeepSpeed ZeRO-2/3.

Configs are generated from the spec and deep-merged with `training.strategyConfig`, so the
defaults are right for the common case and every knob stays reachable.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from kubetune_api.load import SpecError
from kubetune_api.spec import FineTuneJobSpec, MethodType, Strategy
from kubetune_trainer.modeling import Precision


def deep_merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def deepspeed_config(spec: FineTuneJobSpec, precision: Precision) -> dict[str, Any]:
    """ZeRO stage 2 or 3; "auto" values are filled in by the HF Trainer from its arguments."""
    stage = 3 if spec.training.strategy == Strategy.DEEPSPEED_ZERO3 else 2
    zero: dict[str, Any] = {"stage": stage, "overlap_comm": True, "contiguous_gradients": True,
                            "reduce_bucket_size": "auto"}
    if stage == 3:
        zero.update({
            # Gather the sharded weights into one file at save time: without it, adapters and
            # models saved under ZeRO-3 come out empty (trl#4416, peft#2892).
            "stage3_gather_16bit_weights_on_model_save": True,
            "stage3_prefetch_bucket_size": "auto",
            "stage3_param_persistence_threshold": "auto",
        })
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "bf16": {"enabled": precision.name == "bf16"},
        "fp16": {"enabled": precision.name == "fp16"},
        "zero_optimization": zero,
    }
    merged = deep_merge(config, spec.training.strategy_config)
    if _offloads_optimizer(merged) and "optimizer" not in merged:
        # ZeRO-Offload refuses a torch optimizer built by the Trainer; it runs its own CPU Adam
        # when the config names the optimizer ("auto" values come from the training settings).
        merged["optimizer"] = {"type": "AdamW", "params": {
            "lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}}
    return merged


def _offloads_optimizer(config: dict[str, Any]) -> bool:
    offload = config.get("zero_optimization", {}).get("offload_optimizer") or {}
    return isinstance(offload, dict) and offload.get("device") in ("cpu", "nvme")


def fsdp_arguments(spec: FineTuneJobSpec) -> dict[str, Any]:
    config = {
        "use_orig_params": True,  # LoRA mixes frozen and trainable params in one wrapped unit
        "sync_module_states": True,
        "cpu_ram_efficient_loading": True,
        "state_dict_type": "FULL_STATE_DICT",  # a plain HF-loadable file at save time
        "activation_checkpointing": spec.training.gradient_checkpointing,
    }
    return {"fsdp": "full_shard auto_wrap",
            "fsdp_config": deep_merge(config, spec.training.strategy_config)}


def strategy_arguments(spec: FineTuneJobSpec, precision: Precision,
                       cuda: bool) -> dict[str, Any]:
    """Extra TrainingArguments for the strategy (none for DDP)."""
    strategy = spec.training.strategy
    if strategy in (Strategy.DEEPSPEED_ZERO2, Strategy.DEEPSPEED_ZERO3):
        return {"deepspeed": deepspeed_config(spec, precision)}
    if strategy == Strategy.FSDP:
        if not cuda:
            # accelerate enables FSDP only on accelerators: on CPU the run would silently be DDP.
            raise SpecError("spec.training.strategy: fsdp needs CUDA GPUs (on CPU the HF "
                            "Trainer silently falls back to DDP); use ddp or deepspeed-zero2")
        return fsdp_arguments(spec)
    return {}


def shards_parameters(spec: FineTuneJobSpec) -> bool:
    return spec.training.strategy in (Strategy.FSDP, Strategy.DEEPSPEED_ZERO3)


def quant_storage(spec: FineTuneJobSpec, compute: torch.dtype) -> torch.dtype | None:
    """QLoRA under ZeRO-3/FSDP stores packed 4-bit weights in the compute dtype so they flatten
    with the other parameters (peft#2016, peft#1432); other strategies keep uint8."""
    if spec.method.type == MethodType.QLORA and shards_parameters(spec):
        return compute
    return None


def device_map(spec: FineTuneJobSpec, local_device: str | int) -> dict[str, Any] | None:
    """Where each rank loads its weights. DDP/ZeRO-2 on GPUs: straight onto the rank's own GPU,
    not first into CPU RAM on every rank (8 ranks x a 7B model otherwise); QLoRA also needs it
    to train at all (accelerate#1515). Sharded strategies place parameters themselves (ZeRO-3
    loads sharded, FSDP loads on rank 0's CPU and broadcasts). CPU runs load in place."""
    if shards_parameters(spec):
        return None
    if spec.method.type == MethodType.QLORA or isinstance(local_device, int):
        return {"": local_device}
    return None
