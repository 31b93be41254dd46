"""The only two places where full, LoRA and QLoRA differ."""

from __future__ import annotations

import torch
from peft import LoraConfig, TaskType
from transformers import BitsAndBytesConfig

from kubetune_api.spec import MethodSpec, MethodType, Task

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
    )
