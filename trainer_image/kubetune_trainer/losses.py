"""The loss, normalized right under gradient accumulation and data parallelism, for every task.

transformers 5 decides from a model's `forward(**kwargs)` that the model divides its loss by
`num_items_in_batch` (the label count of the whole optimizer step across ranks) itself; the
Trainer then skips the division by the accumulation steps and multiplies by the world size.
Causal-LM models do use it. Sequence-classification, masked-LM and seq2seq models take
`**kwargs` but average over their own micro-batch, so their gradients and logged loss came out
`gradient_accumulation_steps x world_size` too large. For them the Trainer is given this loss
instead: a sum over the labels of the micro-batch divided by the step's label count.

Evaluation reports the loss per label of the whole eval set, each example counted once
(`example_losses`, summed across ranks by `mean_label_loss`): the Trainer's own eval loss is a
mean of batch means, weighted by the first batch's size, and under data parallelism it counts
the examples accelerate repeats to give every rank the same number of batches; so it moved
with the batch size and the number of ranks (0.990 on 2 ranks for a model whose loss is
1.023), and so did the best checkpoint chosen by it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from kubetune_api.spec import Task
from kubetune_trainer.data import IGNORE_INDEX

LossFunction = Callable[..., torch.Tensor]


def summed_label_loss(outputs: Any, labels: torch.Tensor,
                      num_items_in_batch: torch.Tensor | int | None = None) -> torch.Tensor:
    """Cross-entropy summed over the labels (classes or tokens, -100 ignored), divided by the
    labels of the whole step (the Trainer's count across accumulation and ranks), or of this
    batch when there is no such count (evaluation)."""
    logits = outputs["logits"]
    labels = labels.to(logits.device)
    total = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), labels.reshape(-1),
                            ignore_index=IGNORE_INDEX, reduction="sum")
    count = num_items_in_batch if num_items_in_batch is not None else (labels != IGNORE_INDEX).sum()
    if isinstance(count, torch.Tensor):
        return total / count.to(total.device).clamp(min=1)
    return total / max(int(count), 1)


def loss_function_for(task: str) -> LossFunction | None:
    """None where the model normalizes by `num_items_in_batch` itself (causal LM)."""
    return None if task == Task.CAUSAL_LM else summed_label_loss


def example_losses(task: str, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[batch, 2]: each example's cross-entropy summed over its labels, and its label count
    (-100 ignored). Causal LMs predict the next token: logits at t are scored against the label
    at t + 1, as the models' own loss does."""
    logits = logits.float()
    labels = labels.to(logits.device)
    if task == Task.CAUSAL_LM:
        logits, labels = logits[:, :-1], labels[:, 1:]
    per_label = F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1),
                                ignore_index=IGNORE_INDEX, reduction="none")
    per_label = per_label.reshape(labels.size(0), -1)
    counts = (labels != IGNORE_INDEX).reshape(labels.size(0), -1)
    return torch.stack([per_label.sum(1), counts.sum(1).float()], dim=1)


def mean_label_loss(parts: list[torch.Tensor]) -> float | None:
    """The eval set's loss per label from the [examples, 2] parts of example_losses; None when
    no example carried a label."""
    if not parts:
        return None
    total, count = torch.cat(parts).double().sum(0).tolist()
    return total / count if count > 0 else None
