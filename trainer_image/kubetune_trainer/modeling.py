"""Load the tokenizer and model for a job, and make it trainable for its method."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from peft import get_peft_model, prepare_model_for_kbit_training
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import is_flash_attn_2_available

from kubetune_api.load import SpecError
from kubetune_api.spec import FineTuneJobSpec, MethodType, Strategy, Task
from kubetune_trainer.factories import peft_config, quantization_config

AUTO_CLASSES: dict[str, Any] = {
    Task.CAUSAL_LM: AutoModelForCausalLM,
    Task.MASKED_LM: AutoModelForMaskedLM,
    Task.SEQ2SEQ_LM: AutoModelForSeq2SeqLM,
    Task.SEQUENCE_CLASSIFICATION: AutoModelForSequenceClassification,
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32,
          "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
NON_REENTRANT = {"use_reentrant": False}  # reentrant checkpointing made LoRA 2x slower (peft#1142)


@dataclass(frozen=True)
class Precision:
    """Mixed-precision mode of the run and the dtype adapters compute in."""

    name: str  # bf16 | fp16 | fp32

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.name]


def resolve_precision(requested: str, cuda: bool) -> Precision:
    """auto: bf16 where the GPU has it natively (Ampere and later), fp16 on older GPUs, fp32 on
    CPU.

    `is_bf16_supported()` alone also says yes on T4/V100, where bf16 is only emulated (much
    slower than fp16): emulation does not count. Never bf16 on CPU by default: with gradient
    checkpointing that combination trained a tiny model 21x slower than fp32 here (TRL's CPU
    defaults).
    """
    if requested == "auto":
        if not cuda:
            return Precision("fp32")
        native = torch.cuda.is_bf16_supported(including_emulation=False)
        return Precision("bf16" if native else "fp16")
    if requested == "fp16" and not cuda:
        raise SpecError("spec.training.precision: fp16 needs a CUDA GPU; use auto, fp32 or bf16")
    return Precision(requested)


def compute_dtype(spec: FineTuneJobSpec, precision: Precision) -> torch.dtype:
    q = spec.method.quantization
    if q is None or q.compute_dtype == "auto":
        return precision.dtype
    return DTYPES[q.compute_dtype]


def load_tokenizer(source: str, revision: str | None, task: str,
                   add_special_tokens: list[str] | None = None) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(source, revision=revision)
    if add_special_tokens:
        # Never split, never normalized; load_model grows the embeddings to match.
        tokenizer.add_special_tokens({"extra_special_tokens": list(add_special_tokens)},
                                     replace_extra_special_tokens=False)
    if tokenizer.pad_token is None:
        # Safe only because labels mask padding by position, not by token id: EOS stays learned.
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.pad_token is None:
        raise SpecError(f"spec.model.name: tokenizer of {source!r} has neither a pad nor an "
                        f"EOS token")
    if task == Task.MASKED_LM and tokenizer.mask_token is None:
        raise SpecError(f"spec.model.task: masked-lm needs a tokenizer with a mask token; "
                        f"{source!r} has none")
    return tokenizer


def load_model(spec: FineTuneJobSpec, source: str, tokenizer: PreTrainedTokenizerBase,
               precision: Precision, label_names: list[str] | None,
               device_map: Any = None, quant_storage: torch.dtype | None = None,
               cuda: bool = False) -> PreTrainedModel:
    """The base model for the task: pretrained weights, or a random init from its config."""
    auto_class = AUTO_CLASSES[spec.model.task]
    kwargs: dict[str, Any] = {"revision": spec.model.revision}
    attention = attention_implementation(spec.model.attention, cuda, precision)
    if spec.model.task == Task.SEQUENCE_CLASSIFICATION:
        names = list(label_names or [str(i) for i in range(spec.model.num_labels or 0)])
        names += [str(i) for i in range(len(names), spec.model.num_labels or 0)]
        kwargs.update(num_labels=spec.model.num_labels, id2label=dict(enumerate(names)),
                      label2id={n: i for i, n in enumerate(names)})

    def load(attn: str | None) -> PreTrainedModel:
        if spec.training.pretrain:
            return auto_class.from_config(AutoConfig.from_pretrained(source, **kwargs),
                                          attn_implementation=attn)
        quant = quantization_config(spec.method, compute_dtype(spec, precision), quant_storage)
        loaded, info = auto_class.from_pretrained(
            source, dtype=_load_dtype(spec, precision), quantization_config=quant,
            device_map=device_map, attn_implementation=attn, output_loading_info=True, **kwargs)
        loaded.kubetune_new_modules = new_modules(info["missing_keys"])
        return loaded

    try:
        model = load(attention)
    except (ValueError, ImportError) as exc:
        if not _about_attention(exc):
            raise  # e.g. DeepSpeed without a process group: not the attention's fault
        if spec.model.attention == "auto" and attention is not None:
            model = load(None)  # FlashAttention-2 not supported by this model: SDPA or eager
        elif attention is not None:
            raise SpecError(f"spec.model.attention: {attention} is not available for "
                            f"{spec.model.name!r}: {exc}") from None
        else:
            raise
    if spec.dataset.add_special_tokens:
        model.resize_token_embeddings(len(tokenizer))
    for config in (model.config, getattr(model, "generation_config", None)):
        if config is not None and config.pad_token_id is None:
            config.pad_token_id = tokenizer.pad_token_id
    return model


def _about_attention(exc: BaseException) -> bool:
    text = str(exc).lower()
    return any(word in text for word in ("attn", "attention", "flash", "sdpa"))


def new_modules(missing_keys: Any) -> list[str]:
    """Modules the checkpoint lacks, initialized at random by from_pretrained: a task head,
    or e.g. BERT's pooler when the checkpoint was saved without one (an MLM checkpoint).
    Under an adapter they must train and be saved with it (modules_to_save): frozen and
    unsaved, the published adapter would reload onto different random weights."""
    return sorted({key.rsplit(".", 1)[0] for key in missing_keys if "." in key})


def attention_implementation(requested: str, cuda: bool, precision: Precision) -> str | None:
    """attn_implementation for from_pretrained; None lets transformers choose SDPA where the
    model supports it and eager where it does not."""
    if requested == "flash_attention_2":
        if not cuda:
            raise SpecError("spec.model.attention: flash_attention_2 needs a CUDA GPU; use auto "
                            "or sdpa on CPU")
        if not is_flash_attn_2_available():
            raise SpecError("spec.model.attention: flash_attention_2 needs the flash-attn "
                            "package in the trainer image")
        return requested
    if requested == "auto":
        half = precision.name in ("bf16", "fp16")  # FlashAttention-2 has no fp32 kernels
        return "flash_attention_2" if cuda and half and is_flash_attn_2_available() else None
    return requested


def attention_note(model: PreTrainedModel, requested: str, cuda: bool,
                   precision: Precision) -> str:
    """The log line saying which attention the model runs, and why auto chose it."""
    used = getattr(model.config, "_attn_implementation", None) or "eager"
    if requested != "auto":
        return f"attention: {used} (model.attention: {requested})"
    if used == "flash_attention_2":
        why = "CUDA, half precision and flash-attn present"
    elif not cuda:
        why = "FlashAttention-2 needs CUDA"
    elif precision.name not in ("bf16", "fp16"):
        why = f"FlashAttention-2 has no {precision.name} kernels"
    elif not is_flash_attn_2_available():
        why = "the flash-attn package is not in this image"
    else:
        why = "the model does not support FlashAttention-2"
    return f"attention: {used} (model.attention: auto; {why})"


def _load_dtype(spec: FineTuneJobSpec, precision: Precision) -> torch.dtype:
    """Frozen weights load in the training precision; trained full weights stay fp32 (AMP)."""
    if spec.method.type == MethodType.FULL:
        return torch.float32
    return precision.dtype


def make_trainable(model: PreTrainedModel, spec: FineTuneJobSpec) -> PreTrainedModel:
    """Gradient checkpointing, k-bit preparation and the adapter, per method."""
    checkpointing = spec.training.gradient_checkpointing
    # No KV cache in training: useless there, and with one the model ignores the position ids
    # that keep packed documents apart (transformers detects packing only without a cache).
    model.config.use_cache = False
    sharded = spec.training.strategy in (Strategy.FSDP, Strategy.DEEPSPEED_ZERO3)
    if spec.method.type == MethodType.QLORA and not sharded:
        # Casts norms to fp32, keeps lm_head/embeddings full precision, enables input grads.
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=checkpointing,
            gradient_checkpointing_kwargs=NON_REENTRANT)
    elif checkpointing:
        # Under FSDP too (not its config's activation_checkpointing: strategies.py).
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=NON_REENTRANT)
        if spec.method.type in (MethodType.LORA, MethodType.QLORA):
            # Without it the frozen embeddings cut the graph and lora_B never trains (peft#137).
            # Sharded QLoRA lands here too: prepare_model_for_kbit_training would upcast the
            # norms and embeddings out of the storage dtype FSDP/ZeRO-3 flatten together (TRL
            # skips it for sharded QLoRA).
            model.enable_input_require_grads()
    adapter = peft_config(spec.method, spec.model.task)
    if adapter is None:
        return model
    _check_new_tokens_train(model, spec)
    fresh = getattr(model, "kubetune_new_modules", [])
    if fresh:  # with peft's per-task defaults (the classification head) kept
        adapter.modules_to_save = sorted({*(adapter.modules_to_save or []), *fresh})
    if sharded:
        # Adapters and trained copies (modules_to_save) stay in the base's dtype: ZeRO-3 and
        # FSDP flatten them with the base weights, which needs one dtype (peft#2016), and keep
        # fp32 master copies in the optimizer themselves. An fp32 head beside a bf16 base made
        # ZeRO-3's first step fail ("mat1 and mat2 must have the same dtype").
        return get_peft_model(model, adapter,  # type: ignore[return-value]
                              autocast_adapter_dtype=False)
    model = get_peft_model(model, adapter)  # type: ignore[assignment]
    return upcast_trainable(model)


def upcast_trainable(model: PreTrainedModel) -> PreTrainedModel:
    """Trainable weights in fp32 (AMP keeps master weights there), frozen ones as loaded.

    peft upcasts adapter layers only; a new head (modules_to_save) loaded in fp16 would make
    the fp16 grad scaler fail and train in bf16 otherwise. Not under ZeRO-3/FSDP (see
    make_trainable)."""
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
    return model


def _check_new_tokens_train(model: PreTrainedModel, spec: FineTuneJobSpec) -> None:
    """New tokens under an adapter: their embedding rows are random and frozen unless the
    embedding module is trained in full (modulesToSave)."""
    if not spec.dataset.add_special_tokens or spec.method.lora is None:
        return
    embeddings = model.get_input_embeddings()
    name = next(n for n, m in model.named_modules() if m is embeddings).rsplit(".", 1)[-1]
    if name not in spec.method.lora.modules_to_save:
        raise SpecError(f"spec.dataset.addSpecialTokens: the new tokens' embeddings would stay "
                        f"random under {spec.method.type}; add {name!r} (and the output head, "
                        f"e.g. 'lm_head') to spec.method.lora.modulesToSave")


def parameter_counts(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total); 4-bit weights count their logical size, not their packed one.

    Under ZeRO-3 a parameter is an empty placeholder on every rank (numel() is 0) and its
    whole size is DeepSpeed's `ds_numel`."""
    trainable = total = 0
    for param in model.parameters():
        n = getattr(param, "ds_numel", None) or param.numel()
        if param.__class__.__name__ == "Params4bit":  # two 4-bit values per storage byte
            n *= param.element_size() * 2
        total += n
        if param.requires_grad:
            trainable += n
    return trainable, total

