"""The only two places where full, LoRA and QLoRA differ, and the spec's training options
in the Trainer's terms (optimizer, schedule floor, NEFTune, Liger, compile, trackers, best
model), each checked against the hardware and the installed packages first."""

from __future__ import annotations

import importlib.util
from typing import Any

import torch
from peft import LoraConfig, TaskType
from transformers import BitsAndBytesConfig

from kubetune_api.load import SpecError
from kubetune_api.spec import MethodSpec, MethodType, Task, TrainingSpec

# spec.training.optimizer -> TrainingArguments.optim
OPTIMIZERS = {
    "adamw": "adamw_torch",
    "adamw_fused": "adamw_torch_fused",
    "adamw_8bit": "adamw_bnb_8bit",
    "paged_adamw_8bit": "paged_adamw_8bit",
    "paged_adamw_32bit": "paged_adamw_32bit",
    "adafactor": "adafactor",
    "lion": "lion_32bit",
}
# Paging moves optimizer states to host memory through CUDA unified memory; on CPU bitsandbytes
# silently runs the plain optimizer, which is not what the user asked for.
CUDA_ONLY_OPTIMIZERS = ("paged_adamw_8bit", "paged_adamw_32bit")
# reportTo entry -> the module its Trainer integration imports (tensorboard: via torch).
TRACKER_MODULES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}

PEFT_TASK_TYPES: dict[str, TaskType | None] = {
    Task.CAUSAL_LM: TaskType.CAUSAL_LM,
    Task.SEQ2SEQ_LM: TaskType.SEQ_2_SEQ_LM,
    Task.SEQUENCE_CLASSIFICATION: TaskType.SEQ_CLS,  # also trains the new head (modules_to_save)
    Task.MASKED_LM: None,
}


def quantization_config(method: MethodSpec, compute_dtype: torch.dtype,
                        quant_storage: torch.dtype | None = None) -> BitsAndBytesConfig | None:
    """bitsandbytes settings for the frozen base (qlora), None for full and lora.

    `quant_storage` matters for sharded strategies (ZeRO-3, FSDP): the packed 4-bit weights must
    share the dtype of the other parameters to be flattened together (peft#2016, peft#1432).
    """
    q = method.quantization
    if method.type != MethodType.QLORA or q is None:
        return None
    if q.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.quant_type,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_storage=quant_storage or torch.uint8,
    )


def peft_config(method: MethodSpec, task: str) -> LoraConfig | None:
    """Adapter settings (lora, qlora), None for full fine-tuning."""
    lora = method.lora
    if method.type == MethodType.FULL or lora is None:
        return None
    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,  # type: ignore[arg-type]  # peft accepts floats
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        task_type=PEFT_TASK_TYPES[task],
        use_dora=lora.use_dora,
        use_rslora=lora.use_rslora,
        # None keeps peft's per-task default (a classification head is always saved).
        modules_to_save=list(lora.modules_to_save) or None,
    )


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def option_arguments(t: TrainingSpec, *, cuda: bool) -> dict[str, Any]:
    """TrainingArguments for optimizer, schedule, NEFTune, Liger, compile and trackers.

    Raises SpecError (naming the field) for what cannot run here, before any model loads.
    """
    if t.optimizer in CUDA_ONLY_OPTIMIZERS and not cuda:
        raise SpecError(f"spec.training.optimizer: {t.optimizer} pages optimizer states "
                        f"through CUDA memory and needs a GPU; use adamw or adamw_8bit on CPU")
    if t.liger_kernels and not cuda:
        raise SpecError("spec.training.ligerKernels: Liger's kernels are Triton GPU kernels "
                        "and need a CUDA GPU")
    if t.liger_kernels and not _installed("liger_kernel"):
        raise SpecError("spec.training.ligerKernels: the liger-kernel package is not "
                        "installed in the trainer image")
    for tracker in t.report_to:
        if not _installed(TRACKER_MODULES[tracker]):
            raise SpecError(f"spec.training.reportTo: {tracker} is not installed in the "
                            f"trainer image (pip install {tracker})")
    args: dict[str, Any] = {
        "optim": OPTIMIZERS[t.optimizer],
        "lr_scheduler_type": t.lr_scheduler,
        "neftune_noise_alpha": t.neftune_noise_alpha,
        "use_liger_kernel": t.liger_kernels,
        "torch_compile": t.compile,
        "report_to": list(t.report_to),
    }
    if t.optimizer == "adafactor":
        # The spec's learning rate is the learning rate: no Adafactor relative-step schedule.
        args["optim_args"] = "scale_parameter=False,relative_step=False,warmup_init=False"
    if t.min_learning_rate_ratio is not None:
        args["lr_scheduler_type"] = "cosine_with_min_lr"
        args["lr_scheduler_kwargs"] = {"min_lr_rate": t.min_learning_rate_ratio}
    return args


def best_model_arguments(t: TrainingSpec, *, has_eval: bool) -> dict[str, Any]:
    """metric_for_best_model & co. for earlyStopping and loadBestAtEnd (none without them)."""
    if not (t.early_stopping or t.load_best_at_end):
        return {}
    if not has_eval:
        raise SpecError("spec.training: earlyStopping and loadBestAtEnd need eval data "
                        "(dataset.eval or dataset.evalFraction)")
    return {
        "metric_for_best_model": f"eval_{t.best_metric}",
        "greater_is_better": t.best_metric in ("accuracy", "f1"),
        "load_best_model_at_end": t.load_best_at_end,
    }
