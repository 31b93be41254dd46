"""Distribution strategies as TrainingArguments: DDP, FSDP, DeepSpeed ZeRO-2/3.

Configs are generated from the spec and deep-merged with `training.strategyConfig`, so the
defaults are right for the common case and every knob stays reachable.
"""

from __future__ import annotations

import copy
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from kubetune_api.load import SpecError
from kubetune_api.spec import FineTuneJobSpec, MethodType, Strategy
from kubetune_trainer.modeling import Precision
from kubetune_trainer.ranks import world_size


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
    if _offloads_optimizer(merged):
        return _with_offload_optimizer(merged)
    return merged


def _with_offload_optimizer(config: dict[str, Any]) -> dict[str, Any]:
    """The optimizer ZeRO-Offload steps on the CPU. DeepSpeed's CPU Adam (what an `optimizer`
    block selects) is a C++ op compiled on first use, unless the DeepSpeed install prebuilt it
    (DS_BUILD_CPU_ADAM=1): the GPU image's runtime base has no compiler, so there the
    Trainer's torch optimizer (training.optimizer) steps on the CPU instead, which DeepSpeed
    accepts with zero_force_ds_cpu_optimizer off (slower per step, but no build)."""
    if "optimizer" in config:  # the user's choice: refused where it cannot be built
        if not can_build_cpu_adam():
            raise SpecError(
                "spec.training.strategyConfig.optimizer: under ZeRO-Offload it selects "
                "DeepSpeed's CPU Adam, a C++ op this image has neither prebuilt nor a "
                f"compiler ({os.environ.get('CXX', 'c++')}) to build; remove the optimizer "
                "block to step training.optimizer on the CPU, or build the image with "
                "BASE_FLAVOR=devel")
        return config
    if cpu_adam_prebuilt():
        # "auto" values come from the training settings.
        return {**config, "optimizer": {"type": "AdamW", "params": {
            "lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}}}
    return {**config, "zero_force_ds_cpu_optimizer": False}


def cpu_adam_prebuilt() -> bool:
    from deepspeed.git_version_info import installed_ops

    return bool(installed_ops.get("cpu_adam"))


def can_build_cpu_adam() -> bool:
    """Prebuilt, or a C++ compiler for torch's JIT build (it compiles with $CXX, else c++)."""
    return cpu_adam_prebuilt() or shutil.which(os.environ.get("CXX", "c++")) is not None


def _offloads_optimizer(config: dict[str, Any]) -> bool:
    offload = config.get("zero_optimization", {}).get("offload_optimizer") or {}
    return isinstance(offload, dict) and offload.get("device") in ("cpu", "nvme")


# What transformers' from_pretrained reads (transformers.distributed.fsdp.is_fsdp_enabled) to
# load real weights on each node's first rank only and empty (meta) ones on the others;
# accelerate's FSDP2 preparation then broadcasts them. Nothing else sets ACCELERATE_USE_FSDP
# outside `accelerate launch`, so without these every rank loaded the whole model into RAM.
FSDP_LOADING_ENV = {"ACCELERATE_USE_FSDP": "true", "FSDP_CPU_RAM_EFFICIENT_LOADING": "true"}


def fsdp_arguments(spec: FineTuneJobSpec) -> dict[str, Any]:
    """FSDP2 (`fully_shard`), named rather than left to transformers' default. FSDP1's
    use_orig_params and sync_module_states do not exist there: FSDP2 shards each parameter
    itself (frozen and trainable mix freely) and cpu_ram_efficient_loading broadcasts rank 0's
    weights."""
    config = {
        "version": 2,
        "reshard_after_forward": True,  # full shard (ZeRO-3 like)
        "cpu_ram_efficient_loading": True,
        "state_dict_type": "FULL_STATE_DICT",  # a plain HF-loadable file at save time
        # Never accelerate's: its checkpoint wrapper recomputes with preserve_rng_state=False,
        # so LoRA dropout draws other masks in the backward than in the forward (wrong
        # gradients, no error). make_trainable checkpoints through transformers instead
        # (torch.utils.checkpoint, which restores the RNG state for the recompute).
        "activation_checkpointing": False,
    }
    return {"fsdp": True,  # the sharding lives in fsdp_config (strings are deprecated)
            "fsdp_config": deep_merge(config, spec.training.strategy_config)}


def prepare_loading(spec: FineTuneJobSpec) -> None:
    """Before the model loads: under FSDP, only each node's first rank reads the weights."""
    if spec.training.strategy == Strategy.FSDP:
        os.environ.update(FSDP_LOADING_ENV)


@contextmanager
def unsharded_loading() -> Iterator[None]:
    """from_pretrained as in a single process, for the reloads after training (samples, merge)
    that rank 0 does alone: no ZeRO-3 sharded init (it broadcasts to ranks that have already
    left: gloo "Connection closed by peer", NCCL a hang until the collective timeout; with a
    device_map it refuses outright) and no FSDP rank-0 loading."""
    from transformers.integrations import deepspeed as hf_deepspeed

    zero3 = hf_deepspeed._hf_deepspeed_config_weak_ref
    saved = {name: os.environ.pop(name) for name in FSDP_LOADING_ENV if name in os.environ}
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = zero3
        os.environ.update(saved)


def join_process_group(spec: FineTuneJobSpec, cuda: bool) -> None:
    """On CPU, the gloo process group with the spec's collective timeout, before the
    TrainingArguments would create it: transformers passes `ddp_timeout` to accelerate (and
    DeepSpeed) only on GPUs, so CPU runs had torch's 30-minute default whatever was asked.
    On GPUs the TrainingArguments create the group (accelerate picks the backends FSDP needs)
    with `ddp_timeout`; DeepSpeed on CPU reuses the group found here."""
    if cuda or world_size() < 2 or dist.is_initialized():
        return
    dist.init_process_group(
        "gloo", timeout=timedelta(seconds=spec.training.collective_timeout_seconds))


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


def reads_every_partition(spec: FineTuneJobSpec) -> bool:
    """Whether each rank reads every rank's checkpoint partitions on resume (DeepSpeed's
    elastic or universal checkpoints), so each node must fetch them all."""
    config = spec.training.strategy_config

    def flag(section: str, key: str) -> bool:
        value = config.get(section)
        return isinstance(value, dict) and bool(value.get(key))

    return flag("zero_optimization", "elastic_checkpoint") or flag("checkpoint", "load_universal")


def shards_parameters(spec: FineTuneJobSpec) -> bool:
    return spec.training.strategy in (Strategy.FSDP, Strategy.DEEPSPEED_ZERO3)


def quant_storage(spec: FineTuneJobSpec, precision: Precision) -> torch.dtype | None:
    """QLoRA under ZeRO-3/FSDP stores packed 4-bit weights in the training precision's dtype so
    they flatten with the other parameters (peft#2016, peft#1432); other strategies keep uint8.

    Not the compute dtype: DeepSpeed and FSDP2 cast every parameter to the mixed-precision
    dtype, and a cast of packed bytes destroys them (fp16 storage under bf16 FSDP2 changed the
    loss; fp32 storage under ZeRO-3 crashed reshaping the weights)."""
    if spec.method.type == MethodType.QLORA and shards_parameters(spec):
        return precision.dtype
    return None


def check_precision(spec: FineTuneJobSpec, precision: Precision) -> None:
    """Combinations that cannot train, refused before anything starts (exit 2)."""
    if (spec.method.type == MethodType.QLORA and shards_parameters(spec)
            and precision.name == "fp32"):
        raise SpecError(f"spec.training.precision: qlora under {spec.training.strategy} needs "
                        f"bf16 (or fp16 on GPUs): the sharded 4-bit weights are stored in the "
                        f"training dtype, and fp32 storage breaks their unpacking (resolved "
                        f"precision here: fp32); set precision bf16 or use strategy ddp")


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
