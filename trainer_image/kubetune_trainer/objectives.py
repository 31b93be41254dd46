"""The one place where supervised fine-tuning and preference tuning differ, as factories.py is
for full, LoRA and QLoRA: the recipe calls these and never looks at `training.objective`.

    sft        -> sft.py         (tokenized features, the HF Trainer)
    dpo | orpo -> preference.py  (checked pairs, TRL's DPOTrainer / ORPOTrainer)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase, Trainer, TrainingArguments

from kubetune_api.spec import FineTuneJobSpec, Objective
from kubetune_trainer import preference, sft
from kubetune_trainer.data import DataError, LoadedData
from kubetune_trainer.prepared import Setup


def is_preference(spec: FineTuneJobSpec) -> bool:
    return spec.training.objective != Objective.SFT


def arguments_class(spec: FineTuneJobSpec) -> Callable[..., TrainingArguments]:
    """The objective's TrainingArguments class (TRL's DPOConfig / ORPOConfig for pairs)."""
    return preference.arguments_class(spec) if is_preference(spec) else TrainingArguments


def texts(data: LoadedData, spec: FineTuneJobSpec) -> Iterable[str]:
    """All text the model will see (to train a tiny model's tokenizer)."""
    if is_preference(spec):
        return preference.texts(data, spec.dataset.fields)
    return sft.texts(data, spec)


def features(spec: FineTuneJobSpec, data: LoadedData, tokenizer: PreTrainedTokenizerBase,
             cache: Path, store: str | None) -> tuple[Any, Any]:
    """Train and eval examples in the form the objective's trainer takes: tokenized Arrow
    features for sft, checked preference pairs (TRL tokenizes them) for dpo and orpo. Eval is
    None without eval data. Raises DataError naming the file and line of bad records."""
    if not is_preference(spec):
        return sft.features(spec, data, tokenizer, cache, store)
    check = partial(preference.checked_pairs, fields=spec.dataset.fields, tokenizer=tokenizer)
    train, evaluation = check(data.records("train")), check(data.records("eval"))
    if not train:
        raise DataError(f"{spec.dataset.train_name}: no preference pair to learn from")
    return train, evaluation or None


def build_trainer(ready: Setup, callbacks: list[Any]) -> Trainer:
    """The objective's trainer, with the recipe's callbacks."""
    if is_preference(ready.job.spec):
        return preference.build_trainer(ready, callbacks)
    return sft.build_trainer(ready, callbacks)


def manifest_facts(spec: FineTuneJobSpec, log_history: list[dict[str, Any]]) -> dict[str, Any]:
    """What the objective adds to the manifest's metrics (reward accuracy and margin)."""
    return preference.reward_facts(log_history) if is_preference(spec) else {}
