"""Operator scale benchmark: N FineTuneJobs against the emulated API server.

For each N (default 50, 200, 1000) a fresh emulator and a fresh operator process start; after
a warm-up job, N FineTuneJobs are created at `--rate` per second (default 20, a client-go
client's default QPS; `--rate 0` sends them all at once). For each job the time from its
creation to the moment its last child (ConfigMap, Service, Job) exists is recorded inside the
emulator; the operator's peak RSS is its VmHWM from /proc. Prints p50/p99 per N; the last line is
`p99_ms=<p99 at 200> rss_mb=<peak RSS at 1000>` (targets: < 1000 ms, < 150 MB).

    .venv/bin/python bench/operator_scale.py [--sizes 50 200 1000] [--rate 20]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from support.kube_emulator import EmulatorThread, KubeEmulator, default_emulator  # noqa: E402
from support.operator_process import FTJ, OperatorProcess, wait_for  # noqa: E402

DEFAULT_RATE = 20.0  # jobs/s: the default QPS of a controller-runtime or client-go client
CHILD_KINDS = frozenset({"ConfigMap", "Service", "Job"})
NAMESPACE = "bench"


class TimedEmulator(KubeEmulator):
    """Records when each FineTuneJob is created and when each of its children appears."""

    created_at: dict[str, float]
    children_at: dict[str, dict[str, float]]

    def create_object(self, resource: Any, namespace: str | None, body: dict[str, Any]
                      ) -> dict[str, Any]:
        obj = super().create_object(resource, namespace, body)
        now = time.monotonic()
        if obj.get("kind") == "FineTuneJob":
            self.created_at[obj["metadata"]["name"]] = now
        elif obj.get("kind") in CHILD_KINDS:
            for ref in obj["metadata"].get("ownerReferences") or []:
                self.children_at.setdefault(ref["name"], {})[obj["kind"]] = now
        return obj


def make_emulator() -> TimedEmulator:
    emulator = default_emulator(TimedEmulator, keep_requests=False)
    assert isinstance(emulator, TimedEmulator)
    emulator.declare(FTJ, "FineTuneJob", shortnames=["ftj"])
    emulator.created_at, emulator.children_at = {}, {}
    return emulator


def finetunejob(name: str) -> dict[str, Any]:
    return {"apiVersion": "kubetune.dev/v1alpha1", "kind": "FineTuneJob",
            "metadata": {"name": name, "namespace": NAMESPACE},
            "spec": {"model": {"name": "tiny://llama"}, "method": {"type": "lora"},
                     "dataset": {"train": "s3://data/train.jsonl"},
                     "output": {"uri": f"s3://models/{name}"},
                     "resources": {"nodes": 2, "gpusPerNode": 1}}}


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc")


def all_children(emulator: TimedEmulator, names: list[str]) -> bool:
    return all(len(emulator.children_at.get(n, {})) == len(CHILD_KINDS) for n in names)


def run_size(count: int, timeout: float, rate: float) -> tuple[list[float], float]:
    emulator = make_emulator()
    with EmulatorThread(emulator) as api, tempfile.TemporaryDirectory() as tmp:
        operator = OperatorProcess(api, Path(tmp), KUBETUNE_PROGRESS_INTERVAL="60",
                                   KUBETUNE_LOG_LEVEL="WARNING")
        with operator:
            api.create(FTJ, finetunejob("warmup"))
            wait_for(lambda: all_children(emulator, ["warmup"]), 60, what="operator ready")
            names = [f"job-{i:04d}" for i in range(count)]
            start = time.monotonic()
            for i, name in enumerate(names):
                if rate:  # paced like a client with a QPS limit; 0 sends one burst
                    time.sleep(max(0.0, start + i / rate - time.monotonic()))
                api.create(FTJ, finetunejob(name))
            wait_for(lambda: all_children(emulator, names), timeout, interval=0.2,
                     what=f"children of {count} jobs")
            time.sleep(1.0)  # let status writes and timers settle before reading the peak
            assert operator.process is not None
            rss = peak_rss_mb(operator.process.pid)
    latencies = [(max(emulator.children_at[n].values()) - emulator.created_at[n]) * 1000
                 for n in names]
    return latencies, rss


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[50, 200, 1000])
    parser.add_argument("--rate", type=float, default=DEFAULT_RATE,
                        help="FineTuneJobs created per second (0: all at once)")
    parser.add_argument("--timeout", type=float, default=300.0)
    args = parser.parse_args()
    results: dict[int, tuple[float, float, float]] = {}
    for count in args.sizes:
        started = time.monotonic()
        latencies, rss = run_size(count, args.timeout, args.rate)
        p50, p99 = percentile(latencies, 50), percentile(latencies, 99)
        results[count] = (p50, p99, rss)
        print(f"N={count:5d} rate={args.rate or 'burst'}  create→children "
              f"p50={p50:7.1f} ms  p99={p99:7.1f} ms  max={max(latencies):7.1f} ms  "
              f"mean={statistics.fmean(latencies):7.1f} ms  "
              f"operator peak RSS={rss:6.1f} MB  ({time.monotonic() - started:.1f}s)",
              flush=True)
    p99_at = results.get(200, results[max(results)])[1]
    rss_at = results.get(1000, results[max(results)])[2]
    print(f"p99_ms={p99_at:.0f} rss_mb={rss_at:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
