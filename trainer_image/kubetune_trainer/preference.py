"""Preference tuning (`training.objective: dpo | orpo`) with TRL, behind the same recipe.

The recipe stays the one readable path (setup → train → save); objectives.py calls this module
for the things that differ from SFT (sft.py):

- `pairs`: chosen/rejected records, read by `data.load_records` (which keeps each record's
  `file:line`), checked here and normalized to TRL's preference format;
- `build_trainer`: TRL's `DPOTrainer` or `ORPOTrainer` with the recipe's own callbacks
  (metrics, checkpoints with the complete marker, SIGTERM), collator and arguments;
- `reward_facts`: reward accuracy and margin, first and final, for the manifest.

Reference model (dpo): with LoRA/QLoRA, TRL's reference is the same network with the adapter
disabled, so no second copy is held; with full weights a frozen copy of the base is loaded
(TRL's precomputed reference log-probabilities are not offered: their cache file is written
by rank 0 and read back by every rank, which needs a disk that kubetune's pods do not share).
ORPO has no reference model.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase, TrainingArguments

from kubetune_api.spec import FieldsSpec, FineTuneJobSpec, MethodType, Objective
from kubetune_trainer.data import (
    DataError,
    LoadedData,
    Record,
    bad_records,
    message_list_problem,
)
from kubetune_trainer.features import padding_multiple
from kubetune_trainer.prepared import Setup
from kubetune_trainer.ranks import is_rank0
from kubetune_trainer.trainers import FrozenHeapTrainer

if TYPE_CHECKING:
    from transformers import Trainer

Pair = dict[str, Any]
# TRL toggles checkpointing around every reference pass through the deprecated names.
warnings.filterwarnings("ignore", message=".*gradient_checkpointing_(enable|disable).* is "
                        "deprecated", category=FutureWarning)
# ORPO lives in trl.experimental; TRL is pinned and the docs say so, so its import warning
# would only worry users.
warnings.filterwarnings("ignore", message="You are importing from 'trl.experimental'")
# TRL's logged keys for the manifest (metrics.py reads these and rewards/chosen|rejected too).
REWARD_ACCURACY = "rewards/accuracies"  # share of pairs whose chosen reward beats rejected
REWARD_MARGIN = "rewards/margins"  # mean (chosen - rejected) reward


# --- data ------------------------------------------------------------------------------------


def pairs(records: Sequence[Record], fields: FieldsSpec) -> list[Pair]:
    """{prompt, chosen, rejected} per record, in TRL's standard (strings) or conversational
    (messages) form. Raises DataError naming `file:line` for every bad record (up to 5)."""
    out: list[Pair] = []
    errors: list[str] = []
    for record in records:
        try:
            out.append(_pair(record.values, fields))
        except ValueError as exc:
            errors.append(f"{record.where}: {exc}")
    if errors:
        raise bad_records(errors)
    return out


def _pair(values: dict[str, Any], fields: FieldsSpec) -> Pair:
    chosen_key, rejected_key = fields.chosen or "", fields.rejected or ""
    for role, key in (("chosen", chosen_key), ("rejected", rejected_key)):
        if values.get(key) in (None, "", []):
            raise ValueError(f"missing field {key!r} (dataset.fields.{role})")
    chosen, rejected = values[chosen_key], values[rejected_key]
    if fields.prompt:  # data.py has checked the prompt is a non-empty string
        for role, key, value in (("chosen", chosen_key, chosen),
                                 ("rejected", rejected_key, rejected)):
            if not isinstance(value, str):
                raise ValueError(f"field {key!r} (dataset.fields.{role}) must be a string, got "
                                 f"{type(value).__name__}")
        if chosen.strip() == rejected.strip():
            raise ValueError(f"chosen and rejected are identical ({chosen_key!r}, "
                             f"{rejected_key!r}); a pair must differ to carry a preference")
        return {"prompt": values[fields.prompt], "chosen": chosen, "rejected": rejected}
    return _conversational_pair(chosen, rejected, chosen_key, rejected_key)


def _conversational_pair(chosen: Any, rejected: Any, chosen_key: str,
                         rejected_key: str) -> Pair:
    """Split two conversations into their shared prompt turns and differing answers."""
    for key, messages in ((chosen_key, chosen), (rejected_key, rejected)):
        problem = message_list_problem(messages)
        if problem:
            raise ValueError(f"field {key!r}: {problem}")
    if chosen == rejected:
        raise ValueError(f"chosen and rejected are identical ({chosen_key!r}, "
                         f"{rejected_key!r}); a pair must differ to carry a preference")
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    if shared == 0:
        raise ValueError(f"{chosen_key!r} and {rejected_key!r} must start with the same "
                         f"prompt turns (their first messages differ)")
    for key, messages in ((chosen_key, chosen), (rejected_key, rejected)):
        answer = messages[shared:]
        if not answer:
            raise ValueError(f"field {key!r} has no turn after the prompt it shares with the "
                             f"other response")
        if answer[0]["role"] != "assistant":
            raise ValueError(f"field {key!r}: the first turn after the shared prompt must be "
                             f"the assistant's, got {answer[0]['role']!r}")
    return {"prompt": chosen[:shared], "chosen": chosen[shared:],
            "rejected": rejected[shared:]}


def texts(data: LoadedData, fields: FieldsSpec) -> Iterator[str]:
    """All text the model will see (to train a tiny model's tokenizer)."""
    for record in data.records("train") + data.records("eval"):
        values = record.values
        if fields.prompt:
            yield str(values.get(fields.prompt, ""))
        for key in (fields.chosen, fields.rejected):
            value = values.get(key or "")
            if isinstance(value, list):
                yield from (str(m.get("content", "")) for m in value if isinstance(m, dict))
            elif value is not None:
                yield str(value)


def checked_pairs(records: Sequence[Record], fields: FieldsSpec,
                  tokenizer: PreTrainedTokenizerBase) -> list[Pair]:
    """`pairs`, and conversations only with a tokenizer that can render them (checked before
    the model loads, not after)."""
    checked = pairs(records, fields)
    if checked and not isinstance(checked[0]["prompt"], str) and not tokenizer.chat_template:
        raise DataError("dataset.fields chosen/rejected hold messages, which need a tokenizer "
                        "with a chat template; this model's tokenizer has none")
    return checked


# --- training --------------------------------------------------------------------------------


def arguments_class(spec: FineTuneJobSpec) -> Callable[..., TrainingArguments]:
    """The TrainingArguments subclass of the objective, with its preference settings bound."""
    training, pref = spec.training, spec.training.preference
    assert pref is not None  # the contract sets the defaults for dpo and orpo
    # TRL's configs default to activation checkpointing on; kubetune applies the spec's choice
    # itself (make_trainable: non-reentrant, input grads for LoRA; FSDP through its config).
    common: dict[str, Any] = {"beta": pref.beta, "max_length": spec.dataset.max_seq_length,
                              "activation_checkpointing": False}
    if training.objective == Objective.ORPO:
        from trl.experimental.orpo import ORPOConfig

        return partial(ORPOConfig, **common)
    from trl import DPOConfig

    return partial(DPOConfig, loss_type=[pref.loss], precompute_ref_log_probs=False, **common)


def build_trainer(ready: Setup, callbacks: list[Any]) -> Trainer:
    """TRL's trainer for the objective, with the recipe's callbacks and token counting."""
    from datasets import Dataset, disable_progress_bars

    disable_progress_bars()  # TRL maps the small in-memory datasets; their bars are noise
    spec = ready.job.spec
    train = Dataset.from_list(ready.train_features)
    evaluation = Dataset.from_list(ready.eval_features) if ready.eval_features else None
    trainer_class, collate = _trainer_and_collator(spec, ready.tokenizer)

    def counting_collator(batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        collated = collate(batch)
        if ready.model.training:
            ready.tokens.total += count_pair_tokens(collated)
        return collated

    kwargs: dict[str, Any] = {}
    if spec.training.objective == Objective.DPO:
        kwargs["ref_model"] = reference_model(ready)
    trainer = trainer_class(model=ready.model, args=ready.args, train_dataset=train,
                            eval_dataset=evaluation, processing_class=ready.tokenizer,
                            data_collator=counting_collator, callbacks=callbacks, **kwargs)
    _check_not_truncated_away(len(train), len(trainer.train_dataset), spec)
    return trainer


def _check_not_truncated_away(given: int, kept: int, spec: FineTuneJobSpec) -> None:
    """TRL's DPO drops pairs whose prompt alone fills max_length (no answer token would be
    left): all of them dropped is a data error, some of them is worth saying."""
    if kept == 0:
        raise DataError(f"{spec.dataset.train_name}: every pair's prompt fills "
                        f"dataset.maxSeqLength ({spec.dataset.max_seq_length} tokens), so no "
                        f"answer token is left to compare; raise maxSeqLength")
    if kept < given and is_rank0():
        print(f"kubetune: {given - kept} of {given} pairs dropped: their prompt alone fills "
              f"dataset.maxSeqLength ({spec.dataset.max_seq_length} tokens)", flush=True)


def _trainer_and_collator(spec: FineTuneJobSpec,
                          tokenizer: PreTrainedTokenizerBase) -> tuple[type, Any]:
    # Under training.compile, one shape: every batch padded to maxSeqLength (features.py).
    pad_to = padding_multiple(spec, torch.cuda.is_available())
    if spec.training.objective == Objective.ORPO:
        from trl.experimental.orpo import ORPOTrainer
        from trl.experimental.utils import DPODataCollatorWithPadding

        class KubetuneORPOTrainer(FrozenHeapTrainer, ORPOTrainer):
            def _send_telemetry(self) -> None:  # pods never phone home
                pass

        return KubetuneORPOTrainer, DPODataCollatorWithPadding(
            pad_token_id=tokenizer.pad_token_id, is_encoder_decoder=False)

    from trl import DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    class KubetuneDPOTrainer(FrozenHeapTrainer, DPOTrainer):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            chosen = trainable_dtypes(kwargs["model"])
            super().__init__(*args, **kwargs)
            drop_reference_adapter(self.model)
            assert self.model is not None
            restore_dtypes(self.model, chosen)

        def _send_telemetry(self) -> None:  # pods never phone home
            pass

    return KubetuneDPOTrainer, DataCollatorForPreference(
        pad_token_id=tokenizer.pad_token_id, max_length=spec.dataset.max_seq_length,
        pad_to_multiple_of=pad_to)


def reference_model(ready: Setup) -> PreTrainedModel | None:
    """None with adapters (TRL disables the adapter for reference passes: no second copy);
    a frozen copy of the base, in the training precision, for full fine-tuning."""
    spec = ready.job.spec
    if spec.method.type != MethodType.FULL:
        return None
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(
        ready.source, revision=spec.model.revision, dtype=ready.precision.dtype)
    reference.requires_grad_(False)
    return reference.eval()


def trainable_dtypes(model: torch.nn.Module) -> dict[str, torch.dtype]:
    return {name: p.dtype for name, p in model.named_parameters() if p.requires_grad}


def restore_dtypes(model: torch.nn.Module, dtypes: dict[str, torch.dtype]) -> None:
    """Trainable weights back in the dtype make_trainable chose. TRL's DPOTrainer casts the
    adapters of a quantized model to bf16 whatever the training precision (trl#2889's
    workaround): fp32 AMP masters became bf16, and under fp16 the grad scaler refuses bf16
    grads. Done before the optimizer exists, so it optimizes these very tensors."""
    for name, param in model.named_parameters():
        wanted = dtypes.get(name)
        if wanted is not None and param.dtype != wanted:
            param.data = param.data.to(wanted)


def drop_reference_adapter(model: Any) -> None:
    """TRL copies a PeftModel's adapter into a frozen "ref" adapter and runs the reference
    passes through it. Ours is freshly initialized (lora_B = 0), so the copy equals the base:
    dropping it makes TRL disable the adapter instead, with no second adapter in memory, in
    checkpoints or in the artifact (no `ref/` folder)."""
    if "ref" in getattr(model, "peft_config", {}):
        model.delete_adapter("ref")
        model.set_adapter("default")


def count_pair_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Non-pad tokens of both responses (DPO: one stacked mask; ORPO: one mask per side)."""
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    return sum(int(batch[k].sum()) for k in ("chosen_attention_mask", "rejected_attention_mask")
               if k in batch)


# --- results ---------------------------------------------------------------------------------


def reward_facts(log_history: list[dict[str, Any]]) -> dict[str, Any]:
    """The manifest's rewardAccuracy and rewardMargin (first and final logged training values)
    and evalRewardAccuracy (of the last evaluation; None without eval data)."""
    def values(key: str) -> list[float]:
        return [float(e[key]) for e in log_history if key in e]

    def first_and_final(key: str) -> dict[str, float | None]:
        logged = values(key)
        return {"first": logged[0] if logged else None, "final": logged[-1] if logged else None}

    evaluated = values(f"eval_{REWARD_ACCURACY}")
    return {"rewardAccuracy": first_and_final(REWARD_ACCURACY),
            "rewardMargin": first_and_final(REWARD_MARGIN),
            "evalRewardAccuracy": evaluated[-1] if evaluated else None}
