"""Trainer memory and time to first step against data size: the same job on 30 MB and 300 MB.

    .venv/bin/python bench/data_scale.py [--sizes-mb 30 300] [--steps 2]

Generates prompt/completion JSONL of each size, then per size, each in its own processes:
- the job as a rank runs it: `recipe.setup` (read and check every record into Arrow, tokenize
  in shards on every core into the cache, publish the features next to the checkpoints, load
  the model), `build_trainer`, a few optimizer steps; its peak RSS (its own and its tokenizer
  workers'), the seconds reading and tokenizing, and the seconds to the first step;
- a restart of it: an empty workdir (new pods), the same checkpoint root (its features there);
- the bare backend rate: `encode_batch_fast` over every core on the same texts;
- on the largest size, the features step of 2 node processes (one CPU each, sharing a store)
  against 1 on one CPU.
The model is a tiny Llama whose tokenizer was trained on a sample of the data once. The last
line is

    rss_ratio=<peak RSS largest / smallest> tokenize_mb_per_s=<largest: MB / tokenize s>
    raw_mb_per_s=<largest: MB / encode s> restart_ratio=<restart / first time to first step>
    nodes2_ratio=<2 nodes / 1 node>

Targets: rss_ratio <= 1.3, tokenize_mb_per_s >= 0.9 x raw_mb_per_s, restart_ratio <= 0.1,
nodes2_ratio <= 0.6. Each size prints the load average beside its figures: on a shared machine
only the ratios of one run mean anything. See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VOCABULARY = ("the cat sees a ball capital of France is Paris reset my password open settings "
              "now customer asks how to export data from the dashboard answer with the menu path")
WORDS = VOCABULARY.split()
BATCH_ROWS = 1000  # = kubetune_trainer.data.WRITE_BATCH_ROWS: records per tokenizer call


def load() -> str:
    """The 1-minute load average: figures on a shared machine mean little without it."""
    return f"{os.getloadavg()[0]:.2f}"


def generate(path: Path, size_mb: int, seed: int = 0) -> int:
    """Prompt/completion JSONL of about `size_mb` MB; returns the record count."""
    rng = random.Random(seed)
    target, written, rows = size_mb * 1_000_000, 0, 0
    with path.open("w") as out:
        while written < target:
            prompt = " ".join(rng.choices(WORDS, k=rng.randint(8, 40)))
            completion = " ".join(rng.choices(WORDS, k=rng.randint(4, 30)))
            line = json.dumps({"prompt": prompt, "completion": " " + completion}) + "\n"
            out.write(line)
            written += len(line)
            rows += 1
    return rows


def build_model(directory: Path, sample: Path) -> None:
    from kubetune_trainer.tiny import build_tiny_model

    with sample.open() as handle:
        texts = [t for line, _ in zip(handle, range(5000), strict=False)
                 for t in json.loads(line).values()]
    build_tiny_model("llama", texts, directory, max_positions=256, seed=0)


def job_yaml(model_dir: Path, data: Path, out: Path, steps: int) -> str:
    return json.dumps({
        "apiVersion": "kubetune.dev/v1alpha1", "kind": "FineTuneJob",
        "metadata": {"name": "data-scale"},
        "spec": {
            "model": {"name": str(model_dir)},
            "method": {"type": "lora", "lora": {"r": 4, "alpha": 8}},
            "dataset": {"train": str(data), "fields": {"prompt": "prompt",
                                                       "completion": "completion"},
                        "maxSeqLength": 128},
            "training": {"maxSteps": steps, "perDeviceBatchSize": 4, "logEverySteps": 1},
            # Checkpoints on (none is due within the run): a job that can restart keeps them,
            # and its features are published beside them.
            "checkpoint": {"everySteps": 1000},
            "output": {"uri": str(out)},
        },
    })


def child(config: str, workdir: str, output: str) -> None:
    """One run: setup (timed in its data parts), a few steps, then print the figures as JSON.
    `first_step_s`: from the start of setup to the end of the first optimizer step."""
    import datasets
    from transformers import TrainerCallback

    from kubetune_api.load import load_job
    from kubetune_trainer import data, features, recipe, sft

    datasets.disable_progress_bars()
    timings: dict[str, float] = {}

    def timed(name: str, fn):  # type: ignore[no-untyped-def]
        def wrapper(*args, **kwargs):  # type: ignore[no-untyped-def]
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                timings[name] = timings.get(name, 0.0) + time.perf_counter() - started
        return wrapper

    recipe.read_data = timed("read", data.read_data)  # type: ignore[attr-defined]
    sft.prepare_features = timed("tokenize", features.prepare_features)  # type: ignore[attr-defined]
    class FirstStep(TrainerCallback):  # type: ignore[misc]
        def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
            timings.setdefault("first_step", time.perf_counter() - started)

    job = load_job(config)
    work = Path(workdir)
    started = time.perf_counter()
    ready = recipe.setup(job, output, work)
    trainer = recipe.build_trainer(ready)
    trainer.add_callback(FirstStep())
    trainer.train()
    peak_kb = max(resource.getrusage(who).ru_maxrss
                  for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    print(json.dumps({"peak_rss_mb": round(peak_kb / 1024, 1), "rows": ready.data.counts["train"],
                      "read_s": round(timings["read"], 2),
                      "tokenize_s": round(timings["tokenize"], 2),
                      "first_step_s": round(timings["first_step"], 2),
                      "steps": trainer.state.global_step}))


def raw_child(config: str, data_path: str) -> None:
    """The bare backend rate: `encode_batch_fast` (the tokenizer's Rust batch call, on its own
    thread pool over every core) on the same texts kubetune tokenizes, prompt and completion
    apart, in batches of the same size. Only the encode calls are timed (not JSON parsing)."""
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    from transformers import AutoTokenizer

    from kubetune_api.load import load_job

    job = load_job(config)
    backend = AutoTokenizer.from_pretrained(job.spec.model.name).backend_tokenizer
    seconds = 0.0

    def encode(prompts: list[str], completions: list[str]) -> float:
        started = time.perf_counter()
        backend.encode_batch_fast(prompts, add_special_tokens=True)
        backend.encode_batch_fast(completions, add_special_tokens=False)
        return time.perf_counter() - started

    prompts: list[str] = []
    completions: list[str] = []
    with open(data_path) as handle:
        for line in handle:
            record = json.loads(line)
            prompts.append(record["prompt"])
            completions.append(record["completion"])
            if len(prompts) == BATCH_ROWS:
                seconds += encode(prompts, completions)
                prompts, completions = [], []
    if prompts:
        seconds += encode(prompts, completions)
    print(json.dumps({"raw_s": round(seconds, 2)}))


def node_child(config: str, node: str, nodes: str, cpu: str, cache: str, store: str) -> None:
    """One node's first rank of a `nodes`-node gang, on one CPU of this machine: read the
    records, then the features (this node's share of the shards, the rest swapped through the
    store). Prints the seconds of the features step."""
    os.sched_setaffinity(0, {int(cpu)})
    os.environ.update({"GROUP_RANK": node, "WORLD_SIZE": nodes, "LOCAL_WORLD_SIZE": "1",
                       "LOCAL_RANK": "0", "RANK": node})
    import datasets

    from kubetune_api.load import load_job
    from kubetune_trainer.data import read_data
    from kubetune_trainer.features import Tokenization, prepare_features
    from kubetune_trainer.modeling import load_tokenizer

    datasets.disable_progress_bars()
    spec = load_job(config).spec
    data = read_data(spec.dataset, spec.model.task, spec.training.seed, Path(cache))
    tokenizer = load_tokenizer(spec.model.name, None, spec.model.task)
    # Every node starts tokenizing at once (as after a gang's common start): a node whose
    # read finished first would otherwise count its wait for a slower peer's read.
    gang = Path(store).with_name(Path(store).name + "-started")
    gang.mkdir(parents=True, exist_ok=True)
    (gang / node).touch()
    while len(list(gang.iterdir())) < int(nodes):
        time.sleep(0.05)
    started = time.perf_counter()
    prepare_features(data, Tokenization(spec.dataset, spec.model.task, tokenizer), Path(cache),
                     store=store)
    print(json.dumps({"features_s": round(time.perf_counter() - started, 2)}))


def nodes_ratio(config: Path, root: Path) -> float:
    """Features time of 2 node processes (one CPU each, sharing a store) ÷ 1 node process on
    one CPU, on the same data: what splitting the work across nodes buys."""
    def gang(nodes: int) -> float:
        runs = [subprocess.Popen(
            [sys.executable, __file__, "--node-child", str(config), str(node), str(nodes),
             str(node), str(root / f"nodes{nodes}-cache-{node}"),
             str(root / f"nodes{nodes}-store")],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
            for node in range(nodes)]
        seconds = []
        for run in runs:
            out, err = run.communicate()
            if run.returncode != 0:
                sys.exit(f"{nodes}-node run failed:\n{err[-4000:]}")
            seconds.append(json.loads(out.strip().splitlines()[-1])["features_s"])
        return max(seconds)  # the gang starts training when its slowest node is ready

    one, two = gang(1), gang(2)
    print(f"features on 1 node {one:.1f} s, on 2 nodes {two:.1f} s, load {load()}", flush=True)
    return two / one


def run_child(*args: str) -> dict[str, float]:
    run = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True,
                         cwd=ROOT, check=False)
    if run.returncode != 0:
        sys.exit(f"{args[0]} {args[1:]} failed:\n{run.stderr[-4000:]}")
    return dict(json.loads(run.stdout.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes-mb", type=int, nargs="+", default=[30, 300])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--raw-child", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--node-child", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    if args.raw_child:
        raw_child(*args.raw_child)
        return
    if args.node_child:
        node_child(*args.node_child)
        return
    results = []
    with tempfile.TemporaryDirectory(prefix="kubetune-data-scale-") as tmp:
        root = Path(tmp)
        for size in args.sizes_mb:
            data = root / f"train-{size}mb.jsonl"
            started = time.perf_counter()
            rows = generate(data, size)
            print(f"{size} MB: {rows:,} records generated in "
                  f"{time.perf_counter() - started:.0f} s", flush=True)
            if not (root / "model").exists():
                build_model(root / "model", data)
            config = root / f"job-{size}.yaml"
            config.write_text(job_yaml(root / "model", data, root / f"out-{size}", args.steps))
            output = root / f"out-{size}"
            figures = run_child("--child", str(config), str(root / f"work-{size}"), str(output))
            figures.update(run_child("--raw-child", str(config), str(data)))
            # A restarted gang: new pods (an empty workdir), the same checkpoint root, where the
            # first run published its features.
            restart = run_child("--child", str(config), str(root / f"restart-{size}"),
                                str(output))
            figures["restart_first_step_s"] = restart["first_step_s"]
            figures["mb"] = data.stat().st_size / 1e6
            results.append(figures)
            print(f"{size} MB: peak RSS {figures['peak_rss_mb']:.0f} MB, "
                  f"{figures['rows']:,} records, read+check {figures['read_s']:.1f} s, "
                  f"tokenize {figures['tokenize_s']:.1f} s "
                  f"({figures['mb'] / figures['tokenize_s']:.1f} MB/s), bare backend "
                  f"{figures['raw_s']:.1f} s ({figures['mb'] / figures['raw_s']:.1f} MB/s), "
                  f"first step after {figures['first_step_s']:.1f} s, after a restart "
                  f"{figures['restart_first_step_s']:.1f} s, load {load()}", flush=True)
            if size == args.sizes_mb[-1]:
                figures["nodes2_ratio"] = nodes_ratio(config, root)
            data.unlink()
    small, large = results[0], results[-1]
    print(f"rss_ratio={large['peak_rss_mb'] / small['peak_rss_mb']:.2f} "
          f"tokenize_mb_per_s={large['mb'] / large['tokenize_s']:.1f} "
          f"raw_mb_per_s={large['mb'] / large['raw_s']:.1f} "
          f"restart_ratio={large['restart_first_step_s'] / large['first_step_s']:.2f} "
          f"nodes2_ratio={large['nodes2_ratio']:.2f}")


if __name__ == "__main__":
    main()
