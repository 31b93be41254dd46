"""The HF Trainer as every objective uses it (sft.py, preference.py build on FrozenHeapTrainer):
the garbage collector kept off the imported stack, SIGTERM checkpoints, perplexity with every
evaluation, and a length-grouped order that a resumed run repeats."""

from __future__ import annotations

import gc
from typing import Any

import numpy as np
import torch
from datasets import Dataset
from transformers import Trainer
from transformers.trainer_pt_utils import LengthGroupedSampler

from kubetune_trainer import evaluation
from kubetune_trainer.features import arrow_lengths
from kubetune_trainer.losses import example_losses, mean_label_loss
from kubetune_trainer.preemption import PreemptionCallback, StopTraining


class EpochSeededLengthSampler(LengthGroupedSampler):
    """Length-grouped order that depends only on (seed, epoch). HF's sampler draws from the
    global RNG, so a run resumed inside epoch 2+ would skip other batches than it trained."""

    def __init__(self, batch_size: int, lengths: Any, seed: int):
        super().__init__(batch_size, lengths=lengths, generator=torch.Generator())
        self.seed = seed
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:  # accelerate calls it at every epoch start
        assert self.generator is not None
        self.generator.manual_seed(self.seed + epoch)

    def __iter__(self) -> Any:
        """HF's grouping (random mega-batches of 50 batches, each sorted longest first, the
        longest batch first overall) on numpy arrays: HF builds it from Python lists, ~100
        bytes a record, which made the sampler grow with the data size."""
        lengths = np.asarray(self.lengths)
        count = len(lengths)
        size = max(1, min(count // (self.batch_size * 4), 50)) * self.batch_size
        order = torch.randperm(count, generator=self.generator).numpy()
        for start in range(0, count, size):
            chunk = order[start:start + size]
            order[start:start + size] = chunk[np.argsort(-lengths[chunk], kind="stable")]
        longest = int(np.argmax(lengths[order[::size]])) * size
        order[0], order[longest] = order[longest], order[0]
        return map(int, order)


class FrozenHeapTrainer(Trainer):
    """The HF Trainer, with the garbage collector ignoring what existed before training.

    The imported ML stack is ~0.5M long-lived objects: the Trainer's gc.collect() at the start
    of train() (0.4 s on these cores) and later full collections would rescan them all for
    nothing. Unfrozen afterwards, so nothing this run leaves behind escapes collection.
    """

    def _get_train_sampler(self, train_dataset: Any = None) -> Any:
        dataset = self.train_dataset if train_dataset is None else train_dataset
        if (self.args.train_sampling_strategy == "group_by_length"
                and isinstance(dataset, Dataset)):
            # Lengths straight from Arrow: HF's sampler would read every row in Python.
            seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
            return EpochSeededLengthSampler(
                self.args.train_batch_size * self.args.gradient_accumulation_steps,
                arrow_lengths(dataset), seed)
        sampler = super()._get_train_sampler(train_dataset)
        if isinstance(sampler, LengthGroupedSampler):
            seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
            return EpochSeededLengthSampler(sampler.batch_size, sampler.lengths, seed)
        return sampler

    perplexity = False  # language modelling: report exp(eval loss) with every evaluation

    def training_step(self, model: Any, inputs: Any, num_items_in_batch: Any = None) -> Any:
        preemption = self._preemption()
        if preemption is not None and preemption.stop_requested(self.args.device):
            raise StopTraining
        return super().training_step(model, inputs, num_items_in_batch)

    def train(self, *args: Any, **kwargs: Any) -> Any:
        gc.freeze()
        try:
            return super().train(*args, **kwargs)
        except StopTraining:
            self._checkpoint_and_stop()
            return None
        finally:
            gc.unfreeze()

    # The task whose eval_loss is the mean per label of the whole eval set (losses.py); None
    # (the preference trainers) keeps the Trainer's own.
    label_task: str | None = None
    _eval_parts: list[torch.Tensor] | None = None

    def compute_loss(self, model: Any, inputs: Any, return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        if self._eval_parts is None or model.training or "labels" not in inputs:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        labels = inputs["labels"]  # the Trainer pops it when it computes the loss itself
        loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
        if outputs.get("logits") is None:  # a fused loss (Liger) keeps no logits: every rank
            self._eval_parts = None  # alike, so the Trainer's mean is reported
        else:
            parts = example_losses(str(self.label_task), outputs["logits"], labels)
            # Every rank gets every rank's examples, less those accelerate repeated to give
            # the ranks equal batch counts.
            self._eval_parts.append(self.accelerator.gather_for_metrics(parts).cpu())
        return (loss, outputs) if return_outputs else loss

    def evaluation_loop(self, *args: Any, **kwargs: Any) -> Any:
        self._eval_parts = [] if self.label_task else None
        try:
            output = super().evaluation_loop(*args, **kwargs)
            exact = mean_label_loss(self._eval_parts or [])
        finally:
            self._eval_parts = None
        if exact is not None and output.metrics is not None:  # before it is logged and compared
            output.metrics[f"{kwargs.get('metric_key_prefix', 'eval')}_loss"] = exact
        if self.perplexity and output.metrics is not None:
            evaluation.add_perplexity(output.metrics, kwargs.get("metric_key_prefix", "eval"))
        return output

    def _preemption(self) -> PreemptionCallback | None:
        return next((c for c in self.callback_handler.callbacks
                     if isinstance(c, PreemptionCallback)), None)

    def _checkpoint_and_stop(self) -> None:
        """Save the last complete optimizer step (the partial accumulation is dropped: a
        resumed run redoes that step from its first micro-batch) and tell the callbacks."""
        preemption = self._preemption()
        assert preemption is not None
        preemption.stopped_at = self.state.global_step
        if self.state.global_step > 0:
            self._save_checkpoint(self.model_wrapped, trial=None)
            self.control = self.callback_handler.on_save(self.args, self.state, self.control)
        self.control = self.callback_handler.on_train_end(self.args, self.state, self.control)
