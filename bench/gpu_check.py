"""`make gpu-check`: what only a GPU can show, on one GPU, in under 8 minutes.

    .venv/bin/python bench/gpu_check.py [--steps 8] [--cases lora-sdpa,...] [--tiny]

1. The `gpu` tests (`pytest -m gpu tests/trainer/test_gpu.py`).
2. Training cases on a Llama-3-8B architecture (its config, random bf16 weights written once
   to a local model directory, a tokenizer trained here: nothing is downloaded), sequence
   length 2048, packed, batch 1, gradient checkpointing, bf16, through `kubetune run` exactly
   as a pod trains:

   | case | method | attention | strategy |
   |---|---|---|---|
   | lora-sdpa | lora r=16 all-linear | sdpa | ddp |
   | lora-flash | lora | flash_attention_2 | ddp |
   | qlora-sdpa | qlora nf4 | sdpa | ddp |
   | qlora-flash | qlora nf4 | flash_attention_2 | ddp |
   | zero3-lora | lora | sdpa | deepspeed-zero3 (one rank) |

Each case prints one line: tokens/s (the manifest's `tokensPerSecond`: non-pad tokens over
train seconds), MFU and peak GPU memory (the highest `memory.used` nvidia-smi reported while the
case ran, polled every 0.5 s). MFU = tokens/s x FLOPs per token / the GPU's peak dense bf16
FLOP/s, with FLOPs per token = 6 N + 12 L d s (the PaLM paper's count, N the model's
parameters, L layers, d hidden size, s sequence length) whatever the method: adapters save
the weight gradients but recompute under checkpointing, so the figure compares cases, not
methods against full fine-tuning. Peak FLOP/s come from PEAK_FLOPS by device name, or
`--peak-tflops`.

A case that cannot run says why (e.g. an image built without flash-attn: exit 2 naming
spec.model.attention) and the check goes on; the exit code is 1 if any case failed.

`--tiny` runs the same cases on the CPU with the tiny Llama (the script's own smoke test; the
flash-attention cases and the gpu tests are left out there).
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
SEQ_LEN = 2048
# Peak dense bf16 tensor FLOP/s (no sparsity), from the vendors' data sheets.
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12,
              "L4": 121e12}
LLAMA3_8B = {  # meta-llama/Meta-Llama-3-8B's config.json, vocabulary aside (trained here)
    "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "rope_theta": 500000.0,
    "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
}


@dataclass(frozen=True)
class Case:
    name: str
    method: str
    attention: str
    strategy: str = "ddp"


CASES = [
    Case("lora-sdpa", "lora", "sdpa"),
    Case("lora-flash", "lora", "flash_attention_2"),
    Case("qlora-sdpa", "qlora", "sdpa"),
    Case("qlora-flash", "qlora", "flash_attention_2"),
    Case("zero3-lora", "lora", "sdpa", "deepspeed-zero3"),
]


def words(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    vocab = [f"{rng.choice('bcdfglmnprst')}{rng.choice('aeiou')}{rng.choice('nrst')}"
             for _ in range(400)]
    return [" ".join(rng.choice(vocab) for _ in range(200)) for _ in range(count)]


def build_model(directory: Path, tiny: bool) -> dict[str, int]:
    """A random Llama-3-8B (or the tiny Llama) with a tokenizer trained on the data; returns
    the shape numbers MFU needs."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from kubetune_trainer.tiny import build_tiny_model, train_tokenizer

    texts = words(200)
    if tiny:
        build_tiny_model("llama", texts, directory, max_positions=SEQ_LEN, seed=0)
        config = LlamaConfig.from_pretrained(directory)
    else:
        tokenizer = train_tokenizer("llama", texts)
        config = LlamaConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                             bos_token_id=tokenizer.bos_token_id,
                             eos_token_id=tokenizer.eos_token_id, **LLAMA3_8B)
        torch.manual_seed(0)
        with torch.device("cuda"):  # random init on the GPU: minutes faster than on CPU
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        model.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
        del model
        torch.cuda.empty_cache()
    # Parameters of the 8B architecture itself (the real vocabulary's embeddings included):
    # the FLOPs of the model being benchmarked, not of the smaller trained vocabulary.
    vocab = 128256 if not tiny else config.vocab_size
    d, layers, ff = config.hidden_size, config.num_hidden_layers, config.intermediate_size
    kv = d * config.num_key_value_heads // config.num_attention_heads
    per_layer = 2 * d * d + 2 * d * kv + 3 * d * ff + 2 * d
    return {"params": layers * per_layer + 2 * vocab * d + d, "layers": layers, "hidden": d}


def job_yaml(case: Case, model: Path, data: Path, output: Path, steps: int, tiny: bool) -> str:
    method: dict[str, Any] = {"type": case.method, "lora": {
        "r": 16, "alpha": 32, "dropout": 0.0, "targetModules": "all-linear"}}
    if case.method == "qlora":
        method["quantization"] = {"bits": 4, "quantType": "nf4", "doubleQuant": True}
    seq = 64 if tiny else SEQ_LEN
    job = {"apiVersion": "kubetune.dev/v1alpha1", "kind": "FineTuneJob",
           "metadata": {"name": f"gpu-check-{case.name}"},
           "spec": {"model": {"name": str(model), "task": "causal-lm",
                              "attention": case.attention},
                    "method": method,
                    "dataset": {"train": str(data), "fields": {"text": "text"},
                                "maxSeqLength": seq, "packing": True},
                    "training": {"maxSteps": steps, "perDeviceBatchSize": 1,
                                 "learningRate": 1e-4, "gradientCheckpointing": True,
                                 "precision": "fp32" if tiny else "bf16",
                                 "strategy": case.strategy, "logEverySteps": 1},
                    "resources": {"nodes": 1, "gpusPerNode": 0 if tiny else 1},
                    "output": {"uri": str(output)}}}
    return yaml.safe_dump(job)


class PeakMemory:
    """The highest GPU memory in use while the case runs (nvidia-smi sees the torchrun
    worker, which this process cannot ask torch about)."""

    def __init__(self) -> None:
        self.peak_mib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.wait(0.5):
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used",
                                      "--format=csv,noheader,nounits"], capture_output=True,
                                     text=True, timeout=10).stdout
                self.peak_mib = max([self.peak_mib, *(int(x) for x in out.split())])
            except (OSError, ValueError, subprocess.TimeoutExpired):
                return

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def peak_flops(override: float | None) -> float | None:
    if override:
        return override * 1e12
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((flops for key, flops in PEAK_FLOPS.items() if key in name), None)


def run_case(case: Case, work: Path, model: Path, data: Path, shape: dict[str, int],
             args: argparse.Namespace, peak: float | None) -> bool:
    output = work / f"out-{case.name}"
    config = work / f"{case.name}.yaml"
    config.write_text(job_yaml(case, model, data, output, args.steps, args.tiny))
    started = time.monotonic()
    with PeakMemory() as memory:
        proc = subprocess.run([sys.executable, "-m", "kubetune", "run", str(config)],
                              cwd=ROOT, capture_output=True, text=True)
    wall = time.monotonic() - started
    if proc.returncode != 0:
        reason = (proc.stderr.strip().splitlines() or ["?"])[-1]
        print(f"{case.name:12s} FAILED exit {proc.returncode} after {wall:.0f}s: {reason}",
              flush=True)
        return False
    manifest = json.loads((output / "kubetune-manifest.json").read_text())
    tokens_per_s = manifest["metrics"]["tokensPerSecond"]
    seq = 64 if args.tiny else SEQ_LEN
    flops_per_token = 6 * shape["params"] + 12 * shape["layers"] * shape["hidden"] * seq
    mfu = f"{tokens_per_s * flops_per_token / peak:.1%}" if peak else "n/a"
    print(f"{case.name:12s} tokens/s {tokens_per_s:9.1f}  MFU {mfu:>6s}  "
          f"peak memory {memory.peak_mib / 1024:5.1f} GiB  ({wall:.0f}s wall, "
          f"{manifest['metrics']['steps']} steps, loss {manifest['metrics']['trainLoss']})",
          flush=True)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--cases", default=",".join(c.name for c in CASES))
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run, tiny Llama")
    parser.add_argument("--peak-tflops", type=float, help="the GPU's peak dense bf16 TFLOP/s")
    args = parser.parse_args(argv)
    chosen = [c for c in CASES if c.name in args.cases.split(",")]
    if args.tiny:
        chosen = [c for c in chosen if c.attention != "flash_attention_2"]
    ok = True
    if not args.tiny:
        tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu",
                                "tests/trainer/test_gpu.py"], cwd=ROOT)
        print(f"gpu tests: exit {tests.returncode}", flush=True)
        ok = tests.returncode == 0
    with tempfile.TemporaryDirectory(prefix="kubetune-gpu-check-") as scratch:
        work = Path(scratch)
        data = work / "train.jsonl"
        data.write_text("".join(json.dumps({"text": t}) + "\n" for t in words(2000, seed=1)))
        started = time.monotonic()
        shape = build_model(work / "model", args.tiny)
        print(f"model: {shape['params'] / 1e9:.2f} B parameters, built in "
              f"{time.monotonic() - started:.0f}s", flush=True)
        peak = peak_flops(args.peak_tflops)
        for case in chosen:
            ok = run_case(case, work, work / "model", data, shape, args, peak) and ok
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
