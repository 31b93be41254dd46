"""What `recipe.setup` builds and every objective trains from (sft.py, preference.py).

Below both the recipe and the objectives, so neither imports the other's module for its types.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from datasets import Dataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase, TrainingArguments

from kubetune_api.spec import FineTuneJob
from kubetune_trainer import checkpoints
from kubetune_trainer.console import Console
from kubetune_trainer.data import LoadedData
from kubetune_trainer.metrics import TrainerMetrics
from kubetune_trainer.modeling import Precision


@dataclass
class Setup:
    """Everything the run needs, built and checked before training starts."""

    job: FineTuneJob
    output_uri: str
    workdir: Path
    precision: Precision
    data: LoadedData
    source: str  # model id or local directory (tiny mode)
    tokenizer: PreTrainedTokenizerBase
    args: TrainingArguments
    model: PreTrainedModel
    train_features: Dataset  # memory-mapped Arrow
    eval_features: Dataset | None
    metrics: TrainerMetrics
    tokens: TokenCounter = field(default_factory=lambda: TokenCounter())
    console: Console = field(default_factory=Console.from_env)

    @property
    def identity(self) -> str:
        """Whose checkpoints this run may resume and prune (checkpoints.job_identity)."""
        return checkpoints.job_identity(self.job, self.data.digest)


class TokenCounter:
    """Non-pad tokens fed to training (eval batches are not counted), and all positions."""

    def __init__(self) -> None:
        self.total = self._reported = self.positions = 0

    @property
    def nonpad_fraction(self) -> float | None:
        return round(self.total / self.positions, 4) if self.positions else None

    def take(self) -> int:
        """Tokens since the previous call (for per-step throughput)."""
        new, self._reported = self.total - self._reported, self.total
        return new
