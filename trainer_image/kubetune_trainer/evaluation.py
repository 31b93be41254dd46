"""Evaluation metrics beyond the loss: accuracy and macro-F1 for sequence classification,
perplexity for language modelling. The Trainer calls these on rank 0's gathered predictions."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

REPORTED = ("loss", "perplexity", "accuracy", "f1")  # eval_<name> keys kept in the manifest


def predicted_classes(logits: Any, labels: Any) -> torch.Tensor:
    """Keep the argmax only, so evaluation does not hold every logit of the eval set."""
    if isinstance(logits, tuple):  # models that also return hidden states
        logits = logits[0]
    return logits.argmax(dim=-1)


def classification_metrics(prediction: Any) -> dict[str, float]:
    """Accuracy and macro-F1 (the unweighted mean of per-class F1 over the classes present in
    labels or predictions, as scikit-learn's f1_score(average='macro') computes it)."""
    predicted = np.asarray(prediction.predictions).reshape(-1)
    labels = np.asarray(prediction.label_ids).reshape(-1)
    keep = labels != -100
    predicted, labels = predicted[keep], labels[keep]
    if labels.size == 0:
        return {}
    return {"accuracy": float((predicted == labels).mean()),
            "f1": macro_f1(predicted, labels)}


def macro_f1(predicted: np.ndarray, labels: np.ndarray) -> float:
    scores = []
    for cls in np.union1d(predicted, labels):
        true_pos = int(np.sum((predicted == cls) & (labels == cls)))
        false_pos = int(np.sum((predicted == cls) & (labels != cls)))
        false_neg = int(np.sum((predicted != cls) & (labels == cls)))
        denominator = 2 * true_pos + false_pos + false_neg
        scores.append(2 * true_pos / denominator if denominator else 0.0)
    return float(np.mean(scores))


def add_perplexity(metrics: dict[str, float], prefix: str = "eval") -> None:
    """exp(mean token loss); inf where the loss overflows (a diverged run, not an error; the
    manifest then leaves it out)."""
    loss = metrics.get(f"{prefix}_loss")
    if loss is not None:
        metrics[f"{prefix}_perplexity"] = math.exp(loss) if loss < 700 else math.inf
