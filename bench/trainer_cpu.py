"""The kubetune trainer against a plain HF/PEFT script on CPU: same model, data and steps.

    .venv/bin/python bench/trainer_cpu.py [--steps 60] [--repeats 3] [--example tiny-lora]
                                          [--seq-len N] [--threads 1] [--objective sft|dpo]

Both runners train one tiny model directory (built once with kubetune_trainer.tiny from the
example's data) for the same number of optimizer steps, batch size and learning rate. Only
`trainer.train()` is timed (model loading and tokenization are not); runs alternate
reference/kubetune and the median over the repeats is reported. The non-pad token fraction is
measured over one epoch of each runner's own training dataloader (its sampler, its collator).
The last line is `ratio=<kubetune steps/s / reference steps/s>`. See docs/benchmarks.md.

`--objective dpo` (example tiny-dpo by default) compares kubetune's DPO against a plain TRL
`DPOTrainer` script on the same tiny model and chosen/rejected pairs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
WARMUP_STEPS = 5  # one untimed run per runner first: lazy imports, allocator, thread pool
NO_LOGGING = 10**6  # log interval beyond the run: no loss logging inside the timed window


@dataclass(frozen=True)
class Workload:
    """What both runners train, in plain values: the reference needs no kubetune code."""

    example: str
    model_dir: str
    train_file: str
    text_fields: tuple[str, ...]  # joined per record: (prompt, completion) or (text,)
    seq_len: int
    batch_size: int
    learning_rate: float
    seed: int
    lora: dict[str, Any]  # r, lora_alpha, lora_dropout, target_modules
    workdir: Path
    objective: str = "sft"
    beta: float = 0.1


@dataclass(frozen=True)
class Run:
    """One timed `trainer.train()`."""

    steps: int
    seconds: float  # wall clock

    @property
    def steps_per_s(self) -> float:
        return self.steps / self.seconds


@dataclass(frozen=True)
class BatchStats:
    """Over one epoch of a training dataloader."""

    nonpad_fraction: float
    tokens_per_batch: float  # non-pad


# --- the reference: no kubetune code ----------------------------------------------------------

def reference_trainer(w: Workload, steps: int) -> Any:
    """A LoRA fine-tuning script as the HF causal-LM guide and the PEFT LoRA guide write it.

    Auto classes load the model and tokenizer (pad = eos, as the guides do for Llama/GPT-2),
    `get_peft_model` wraps it with the same LoRA settings, each record's prompt + completion is
    joined and tokenized with `truncation=True, max_length`, and `Trainer` trains it with
    `DataCollatorForLanguageModeling(mlm=False)` padding each batch and copying input_ids to
    labels (pad positions -100). The guides map a `datasets.Dataset`; `datasets` is no
    dependency here, so the same per-row encodings are kept in a list (the Trainer takes any
    sequence). No EOS is appended: the guides do not append one.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForLanguageModeling,
        Trainer,
        TrainingArguments,
        set_seed,
    )

    set_seed(w.seed)
    tokenizer = AutoTokenizer.from_pretrained(w.model_dir)
    tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(w.model_dir)
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **w.lora))
    records = [json.loads(line) for line in Path(w.train_file).read_text().splitlines()
               if line.strip()]
    train_dataset = [
        tokenizer("".join(r[f] for f in w.text_fields), truncation=True, max_length=w.seq_len)
        for r in records
    ]
    args = TrainingArguments(
        output_dir=str(w.workdir / "reference"),
        use_cpu=True,
        max_steps=steps,
        per_device_train_batch_size=w.batch_size,
        learning_rate=w.learning_rate,
        seed=w.seed,
        logging_steps=NO_LOGGING,
        save_strategy="no",
        report_to=[],
    )
    return Trainer(model=model, args=args, train_dataset=train_dataset,
                   data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
                   processing_class=tokenizer)


def reference_dpo_trainer(w: Workload, steps: int) -> Any:
    """A DPO script as TRL's DPOTrainer docs write it: the pairs file loaded with `datasets`,
    the model and tokenizer from the directory, `peft_config` handed to the trainer (so the
    reference is the base with the adapter disabled), `DPOConfig` with the same beta, length,
    batch, learning rate and seed, and checkpointing off like the example."""
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
    from trl import DPOConfig, DPOTrainer

    set_seed(w.seed)
    tokenizer = AutoTokenizer.from_pretrained(w.model_dir)
    tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(w.model_dir)
    pairs = load_dataset("json", data_files=w.train_file, split="train")
    args = DPOConfig(
        output_dir=str(w.workdir / "reference"), use_cpu=True, max_steps=steps,
        per_device_train_batch_size=w.batch_size, learning_rate=w.learning_rate, seed=w.seed,
        beta=w.beta, max_length=w.seq_len, logging_steps=NO_LOGGING, save_strategy="no",
        report_to=[],
        # TRL defaults to activation checkpointing on; the example's spec has it off, so the
        # two runners do the same compute.
        activation_checkpointing=False)
    return DPOTrainer(model=model, args=args, train_dataset=pairs, processing_class=tokenizer,
                      peft_config=LoraConfig(task_type="CAUSAL_LM", **w.lora))


# --- kubetune ---------------------------------------------------------------------------------

def kubetune_job(example: str, workdir: Path, **overrides: dict[str, Any]) -> Any:
    """The shipped example as a validated FineTuneJob, with spec-section overrides."""
    if str(ROOT / "tests") not in sys.path:
        sys.path.insert(0, str(ROOT / "tests"))
    from support.jobs import example_job

    return example_job(example, workdir / "out", **overrides)


def kubetune_trainer(w: Workload, steps: int, *, packing: bool = False) -> Any:
    """The real recipe: `setup` (data checks, tokenization, model, LoRA) and `build_trainer`."""
    from kubetune_trainer.recipe import build_trainer, setup

    job = kubetune_job(w.example, w.workdir, model={"name": w.model_dir},
                       dataset={"maxSeqLength": w.seq_len, "packing": packing},
                       training={"maxSteps": steps, "logEverySteps": NO_LOGGING})
    return build_trainer(setup(job, str(w.workdir / "out"), w.workdir))


def prepare(example: str, seq_len: int | None, workdir: Path) -> Workload:
    """Build the example's tiny model once (same data texts and seed as kubetune's tiny://)."""
    from kubetune_api.spec import TINY_SCHEME, MethodType, Objective, Task
    from kubetune_trainer import preference
    from kubetune_trainer.data import load_records, training_texts
    from kubetune_trainer.tiny import build_tiny_model

    spec = kubetune_job(example, workdir).spec
    lora = spec.method.lora
    if not (spec.model.name.startswith(TINY_SCHEME) and spec.model.task == Task.CAUSAL_LM
            and spec.method.type == MethodType.LORA and lora is not None
            and spec.dataset.train.endswith(".jsonl")
            and spec.training.gradient_accumulation_steps == 1):
        raise SystemExit(f"{example}: the reference covers tiny:// causal-lm LoRA examples "
                         f"with jsonl data and no gradient accumulation")
    seq_len = seq_len or spec.dataset.max_seq_length
    data = load_records(spec.dataset, spec.model.task, spec.training.seed, workdir / "records")
    objective = spec.training.objective
    texts = (training_texts(data, spec.dataset) if objective == Objective.SFT
             else preference.texts(data, spec.dataset.fields))
    model_dir = build_tiny_model(spec.model.name.removeprefix(TINY_SCHEME), texts,
                                 workdir / "model", max_positions=seq_len,
                                 seed=spec.training.seed)
    fields = spec.dataset.fields
    return Workload(
        example=example, model_dir=str(model_dir), train_file=spec.dataset.train,
        text_fields=tuple(f for f in (fields.prompt, fields.completion, fields.text) if f),
        seq_len=seq_len, batch_size=spec.training.per_device_batch_size,
        learning_rate=spec.training.learning_rate, seed=spec.training.seed,
        lora={"r": lora.r, "lora_alpha": lora.alpha, "lora_dropout": lora.dropout,
              "target_modules": lora.target_modules},
        workdir=workdir, objective=objective,
        beta=spec.training.preference.beta if spec.training.preference else 0.1,
    )


# --- measuring --------------------------------------------------------------------------------

def batch_stats(trainer: Any) -> BatchStats:
    """Collate one epoch exactly as training does (the trainer's sampler and collator)."""
    real = total = batches = 0
    collate, counted = trainer.data_collator, []

    def counting(features: list[dict[str, Any]]) -> Any:
        # Packed batches have no attention mask: their real tokens are counted on the features.
        counted.append(sum(len(f.get("input_ids", ())) for f in features))
        return collate(features)

    trainer.data_collator = counting
    try:
        for batch in trainer.get_train_dataloader():
            mask = batch.get("attention_mask")
            in_batch = counted.pop()
            if mask is not None:
                real, total = real + int(mask.sum()), total + mask.numel()
            else:
                real, total = real + in_batch, total + batch["input_ids"].numel()
            batches += 1
    finally:
        trainer.data_collator = collate
    return BatchStats(real / total, real / batches)


def timed_train(trainer: Any, steps: int) -> Run:
    started = time.perf_counter()
    trainer.train()
    run = Run(steps, time.perf_counter() - started)
    if trainer.state.global_step != steps:
        raise RuntimeError(f"trained {trainer.state.global_step} steps, expected {steps}")
    return run


def measure(runners: dict[str, Callable[[int], Any]], steps: int,
            repeats: int) -> dict[str, list[Run]]:
    """Each runner `repeats` times, interleaved (A/B/A/B) so load drifts hit both."""
    for build in runners.values():
        timed_train(build(WARMUP_STEPS), WARMUP_STEPS)
    runs: dict[str, list[Run]] = {name: [] for name in runners}
    for _ in range(repeats):
        for name, build in runners.items():
            runs[name].append(timed_train(build(steps), steps))
    return runs


# --- report -----------------------------------------------------------------------------------

def versions() -> str:
    import peft
    import torch
    import transformers

    return (f"torch {torch.__version__} (threads {torch.get_num_threads()}), "
            f"transformers {transformers.__version__}, peft {peft.__version__}, "
            f"{os.cpu_count()} CPUs")


def median_rate(runs: list[Run]) -> float:
    return statistics.median(r.steps_per_s for r in runs)


def print_report(w: Workload, steps: int, runs: dict[str, list[Run]],
                 stats: dict[str, BatchStats]) -> None:
    repeats = len(runs["kubetune"])
    print(f"\n{w.example}: {steps} steps, batch {w.batch_size}, maxSeqLength {w.seq_len}, "
          f"median of {repeats} runs; {versions()}")
    print(f"{'runner':<16}{'steps/s':>8}{'tokens/s':>9}{'non-pad':>8}{'tok/batch':>10}"
          f"  steps/s per run")
    for name, stat in stats.items():
        cells = f"{'-':>8}{'-':>9}"
        per_run = "(batches only)"
        if name in runs:
            rate = median_rate(runs[name])
            cells = f"{rate:>8.2f}{rate * stat.tokens_per_batch:>9.0f}"
            per_run = " ".join(f"{r.steps_per_s:.2f}" for r in runs[name])
        print(f"{name:<16}{cells}{stat.nonpad_fraction:>8.3f}{stat.tokens_per_batch:>10.1f}"
              f"  {per_run}")
    print(f"ratio={median_rate(runs['kubetune']) / median_rate(runs['reference']):.2f}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per timed run")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per runner")
    parser.add_argument("--example", help="examples/<name>.yaml (default: tiny-lora, or "
                        "tiny-dpo with --objective dpo)")
    parser.add_argument("--objective", choices=("sft", "dpo"), default="sft",
                        help="dpo: kubetune's DPO against a plain TRL DPOTrainer script")
    parser.add_argument("--seq-len", type=int, help="maxSeqLength (default: the example's)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a shared box a 2-thread run stalls "
                        "whenever either core is busy elsewhere)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    example = args.example or ("tiny-dpo" if args.objective == "dpo" else "tiny-lora")
    os.environ.setdefault("TQDM_DISABLE", "1")  # no progress bars, for both runners alike
    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="kubetune-bench-") as tmp:
        w = prepare(example, args.seq_len, Path(tmp))
        if w.objective != args.objective:
            raise SystemExit(f"{example}: its training.objective is {w.objective}, "
                             f"not {args.objective}")
        reference = reference_dpo_trainer if w.objective == "dpo" else reference_trainer
        runners: dict[str, Callable[[int], Any]] = {
            "reference": lambda steps: reference(w, steps),
            "kubetune": lambda steps: kubetune_trainer(w, steps),
        }
        stats = {name: batch_stats(build(args.steps)) for name, build in runners.items()}
        if w.objective == "sft":  # pairs are never packed
            stats["kubetune packed"] = batch_stats(kubetune_trainer(w, args.steps, packing=True))
        runs = measure(runners, args.steps, args.repeats)
        print_report(w, args.steps, runs, stats)


if __name__ == "__main__":
    main()
