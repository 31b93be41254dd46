"""Supervised fine-tuning (`training.objective: sft`), the objective the recipe runs unless
the spec asks for preference tuning (preference.py); objectives.py chooses between them.

- `features`: the records tokenized per task (features.py), memory-mapped Arrow, shared with
  the feature store next to the checkpoints;
- `build_trainer`: the HF Trainer with the task's collator, loss and metrics.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from transformers import PreTrainedTokenizerBase, Trainer

from kubetune_api.spec import FineTuneJobSpec, Task
from kubetune_trainer import evaluation
from kubetune_trainer.data import LoadedData, training_texts
from kubetune_trainer.features import (
    Tokenization,
    collator_for,
    count_input_tokens,
    padding_multiple,
    prepare_features,
)
from kubetune_trainer.losses import loss_function_for
from kubetune_trainer.prepared import Setup
from kubetune_trainer.ranks import global_rank
from kubetune_trainer.trainers import FrozenHeapTrainer


def texts(data: LoadedData, spec: FineTuneJobSpec) -> Iterator[str]:
    """All text the model will see (to train a tiny model's tokenizer)."""
    return training_texts(data, spec.dataset)


def features(spec: FineTuneJobSpec, data: LoadedData, tokenizer: PreTrainedTokenizerBase,
             cache: Path, store: str | None) -> tuple[Dataset, Dataset | None]:
    """Train and eval features, tokenized once per node into `cache` (or fetched from the
    feature `store` URI, when the job keeps checkpoints)."""
    how = Tokenization(spec.dataset, spec.model.task, tokenizer, data.label_names,
                       spec.model.num_labels)
    return prepare_features(data, how, cache, store=store)


def build_trainer(ready: Setup, callbacks: list[Any]) -> Trainer:
    """The HF Trainer on tokenized features, with the task's collator, loss and metrics."""
    spec, cuda = ready.job.spec, torch.cuda.is_available()
    # Each rank masks differently (one shared seed would mask every rank's batch alike).
    collate = collator_for(spec.model.task, ready.tokenizer, ready.model,
                           spec.training.seed + global_rank(),
                           pad_to_multiple_of=padding_multiple(spec, cuda))

    def counting_collator(batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        collated = collate(batch)
        if ready.model.training:
            ready.tokens.total += count_input_tokens(batch)
            ready.tokens.positions += int(collated["input_ids"].numel())
        return collated

    classify = spec.model.task == Task.SEQUENCE_CLASSIFICATION
    trainer = FrozenHeapTrainer(
        model=ready.model, args=ready.args, train_dataset=ready.train_features,
        eval_dataset=ready.eval_features, data_collator=counting_collator,
        processing_class=ready.tokenizer, callbacks=callbacks,
        compute_loss_func=loss_function_for(spec.model.task),
        compute_metrics=evaluation.classification_metrics if classify else None,
        preprocess_logits_for_metrics=evaluation.predicted_classes if classify else None)
    trainer.perplexity = spec.model.task != Task.SEQUENCE_CLASSIFICATION
    trainer.label_task = spec.model.task
    return trainer
