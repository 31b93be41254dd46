"""Operator scale benchmark: N FineTuneJobs against the emulated API server.

For each N (default 50, 200, 1000) a fresh emulator and a fresh operator process start; after
a warm-up job, N FineTuneJobs are created at `--rate` per second (default 20, a client-go
client's default QPS; `--rate 0` sends them all at once). For each job the time from its
creation to the moment its last child (ConfigMap, Service, Job) exists is recorded inside the
emulator; the operator's peak RSS is its VmHWM from /proc. Prints p50/p99 per N; the last line is
`p99_ms=<p99 at 200> rss_mb=<peak RSS at 1000> pods=<trainer pods at the end>` (targets:
< 1000 ms, < 150 MB).

With `--pods-per-job K` each job is a gang of K nodes and an emulated Job controller creates
the K pods of every Job it sees and moves them Pending → Running → Succeeded (rank 0 with its
success summary), so the operator watches, indexes and follows real pod counts (1000 jobs x 8
= 8,000 pods). `--unrelated-pods U` first fills another namespace with U pods that are not the
operator's (a busy shared cluster); the server-side label selector keeps them away from it, so
compare the RSS with and without.

    .venv/bin/python bench/operator_scale.py [--sizes 50 200 1000] [--rate 20]
    .venv/bin/python bench/operator_scale.py --jobs 1000 --pods-per-job 8 [--unrelated-pods 10000]

`--heap-top K` runs the operator under tracemalloc (slower, more memory: its figures are not
the benchmark's) and prints the K largest allocation sites left at the end.
"""

from __future__ import annotations

import argparse
import heapq
import os
import queue
import signal
import statistics
import sys
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from support.kube_emulator import EmulatorThread, KubeEmulator, default_emulator  # noqa: E402
from support.operator_process import (  # noqa: E402
    FTJ,
    PODS,
    OperatorProcess,
    job_pod,
    set_pod_state,
    wait_for,
)

DEFAULT_RATE = 20.0  # jobs/s: the default QPS of a controller-runtime or client-go client
CHILD_KINDS = frozenset({"ConfigMap", "Service", "NetworkPolicy", "Job"})
POD_START_SECONDS = 0.5  # Pending → Running
POD_RUN_SECONDS = 5.0  # Running → Succeeded
UNRELATED_NAMESPACE = "other-team"
NAMESPACE = "bench"


class TimedEmulator(KubeEmulator):
    """Records when each FineTuneJob is created and when each of its children appears."""

    created_at: dict[str, float]
    children_at: dict[str, dict[str, float]]
    new_jobs: queue.Queue[dict[str, Any]] | None

    def create_object(self, resource: Any, namespace: str | None, body: dict[str, Any]
                      ) -> dict[str, Any]:
        obj = super().create_object(resource, namespace, body)
        now = time.monotonic()
        if obj.get("kind") == "FineTuneJob":
            self.created_at[obj["metadata"]["name"]] = now
        elif obj.get("kind") in CHILD_KINDS:
            for ref in obj["metadata"].get("ownerReferences") or []:
                self.children_at.setdefault(ref["name"], {})[obj["kind"]] = now
        if obj.get("kind") == "Job" and self.new_jobs is not None:
            self.new_jobs.put(obj)
        return obj


class JobController(threading.Thread):
    """Plays the Job controller and kubelets: pods for every new Job, then their lifecycle."""

    def __init__(self, api: EmulatorThread, jobs: queue.Queue[dict[str, Any]]) -> None:
        super().__init__(daemon=True)
        self.api, self.jobs, self.pods = api, jobs, 0
        self.due: list[tuple[float, str, str, str, int]] = []  # (when, phase, ns, pod, rank)
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                job = self.jobs.get(timeout=0.05)
            except queue.Empty:
                job = None
            if job is not None and not job["spec"].get("suspend"):
                self.start_pods(job)
            self.advance()

    def start_pods(self, job: dict[str, Any]) -> None:
        now = time.monotonic()
        for index in range(job["spec"]["completions"]):
            pod = self.api.create(PODS, job_pod(job, index))
            self.pods += 1
            name, ns = pod["metadata"]["name"], pod["metadata"]["namespace"]
            heapq.heappush(self.due, (now + POD_START_SECONDS, "Running", ns, name, index))

    def advance(self) -> None:
        while self.due and self.due[0][0] <= time.monotonic():
            _, phase, ns, name, rank = heapq.heappop(self.due)
            if phase == "Running":
                set_pod_state(self.api, ns, name, "Running")
                heapq.heappush(self.due, (time.monotonic() + POD_RUN_SECONDS, "Succeeded",
                                          ns, name, rank))
            else:
                summary = '{"uri": "s3://models/x", "manifestSha256": "00"}' if rank == 0 \
                    else ""
                set_pod_state(self.api, ns, name, "Succeeded", exit_code=0, message=summary)


def make_emulator(pods_per_job: int) -> TimedEmulator:
    emulator = default_emulator(TimedEmulator, keep_requests=False)
    assert isinstance(emulator, TimedEmulator)
    emulator.declare(FTJ, "FineTuneJob", shortnames=["ftj"])
    emulator.created_at, emulator.children_at = {}, {}
    emulator.new_jobs = queue.Queue() if pods_per_job else None
    return emulator


def unrelated_pod(index: int) -> dict[str, Any]:
    """Somebody else's pod, about the size of a real one."""
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {
        "name": f"web-{index:05d}", "namespace": UNRELATED_NAMESPACE,
        "labels": {"app": "web", "pod-template-hash": "5d4f8b7c9"}},
        "spec": {"containers": [{"name": "web", "image": "nginx:1.27", "env": [
            {"name": f"SETTING_{i}", "value": "x" * 40} for i in range(20)],
            "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}}}]},
        "status": {"phase": "Running", "podIP": "10.0.0.1"}}


def finetunejob(name: str, nodes: int = 2) -> dict[str, Any]:
    return {"apiVersion": "kubetune.dev/v1alpha1", "kind": "FineTuneJob",
            "metadata": {"name": name, "namespace": NAMESPACE},
            "spec": {"model": {"name": "tiny://llama"}, "method": {"type": "lora"},
                     "dataset": {"train": "s3://data/train.jsonl"},
                     "output": {"uri": f"s3://models/{name}"},
                     "resources": {"nodes": nodes, "gpusPerNode": 1}}}


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc")


def all_children(emulator: TimedEmulator, names: list[str]) -> bool:
    return all(len(emulator.children_at.get(n, {})) == len(CHILD_KINDS) for n in names)


def heap_top(pid: int, snapshot: Path, count: int) -> None:
    """Where the operator's Python memory is at the end (tracemalloc, by file and line)."""
    os.kill(pid, signal.SIGUSR1)
    wait_for(snapshot.exists, 300, interval=0.5, what="heap snapshot")
    stats = tracemalloc.Snapshot.load(str(snapshot)).statistics("lineno")
    total = sum(s.size for s in stats)
    print(f"  traced Python heap {total / 2**20:.1f} MB; top {count} allocation sites:")
    for stat in stats[:count]:
        frame = stat.traceback[0]
        where = "/".join(Path(frame.filename).parts[-3:])
        print(f"  {stat.size / 2**20:7.1f} MB {stat.count:8d} blocks  {where}:{frame.lineno}")


def run_size(count: int, timeout: float, rate: float, pods_per_job: int = 0,
             unrelated: int = 0, heap: int = 0) -> tuple[list[float], float, int]:
    emulator = make_emulator(pods_per_job)
    nodes = pods_per_job or 2
    with EmulatorThread(emulator) as api, tempfile.TemporaryDirectory() as tmp:
        for index in range(unrelated):
            api.create(PODS, unrelated_pod(index))
        controller = None
        if emulator.new_jobs is not None:
            controller = JobController(api, emulator.new_jobs)
            controller.start()
        snapshot = Path(tmp) / "heap.snapshot"
        profiling = {"KUBETUNE_HEAP_SNAPSHOT": str(snapshot), "PYTHONPATH": os.pathsep.join(
            [str(ROOT / "bench" / "heapprobe"), os.environ.get("PYTHONPATH", "")])} \
            if heap else {}
        operator = OperatorProcess(api, Path(tmp), KUBETUNE_PROGRESS_INTERVAL="60",
                                   KUBETUNE_LOG_LEVEL="WARNING", **profiling)
        with operator:
            api.create(FTJ, finetunejob("warmup", nodes))
            wait_for(lambda: all_children(emulator, ["warmup"]), 120, what="operator ready")
            names = [f"job-{i:04d}" for i in range(count)]
            start = time.monotonic()
            for i, name in enumerate(names):
                if rate:  # paced like a client with a QPS limit; 0 sends one burst
                    time.sleep(max(0.0, start + i / rate - time.monotonic()))
                api.create(FTJ, finetunejob(name, nodes))
            wait_for(lambda: all_children(emulator, names), timeout, interval=0.2,
                     what=f"children of {count} jobs")
            if controller is not None:  # every pod through its lifecycle, every job done
                wait_for(lambda: not controller.due and emulator.new_jobs.empty()
                         and succeeded(api) >= count, timeout, interval=0.5,
                         what="all pods finished and jobs succeeded")
            time.sleep(1.0)  # let status writes settle before reading the peak
            assert operator.process is not None
            rss = peak_rss_mb(operator.process.pid)
            if heap:
                heap_top(operator.process.pid, snapshot, heap)
        pods = controller.pods if controller is not None else 0
        if controller is not None:
            controller.stop.set()
    latencies = [(max(emulator.children_at[n].values()) - emulator.created_at[n]) * 1000
                 for n in names]
    return latencies, rss, pods


def succeeded(api: EmulatorThread) -> int:
    return sum(1 for job in api.find(FTJ, NAMESPACE)
               if (job.get("status") or {}).get("phase") == "Succeeded")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[50, 200, 1000])
    parser.add_argument("--jobs", type=int, help="one size (same as --sizes N)")
    parser.add_argument("--rate", type=float, default=DEFAULT_RATE,
                        help="FineTuneJobs created per second (0: all at once)")
    parser.add_argument("--pods-per-job", type=int, default=0,
                        help="nodes per job, with emulated pods (0: no pods, 2-node jobs)")
    parser.add_argument("--unrelated-pods", type=int, default=0,
                        help="pods of another team created first; also runs without them")
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--heap-top", type=int, default=0, metavar="K",
                        help="trace the operator's allocations (tracemalloc: slower, more "
                        "memory) and print its K largest allocation sites at the end")
    args = parser.parse_args()
    sizes = [args.jobs] if args.jobs else args.sizes
    results: dict[int, tuple[float, float, float, int]] = {}
    for count in sizes:
        for unrelated in sorted({0, args.unrelated_pods}):
            started = time.monotonic()
            latencies, rss, pods = run_size(count, args.timeout, args.rate, args.pods_per_job,
                                            unrelated, args.heap_top)
            p50, p99 = percentile(latencies, 50), percentile(latencies, 99)
            if unrelated == 0:
                results[count] = (p50, p99, rss, pods)
            else:
                print(f"  with {unrelated} unrelated pods: peak RSS={rss:6.1f} MB "
                      f"({rss - results[count][2]:+.1f} MB)", flush=True)
                continue
            print(f"N={count:5d} rate={args.rate or 'burst'}  create→children "
                  f"p50={p50:7.1f} ms  p99={p99:7.1f} ms  max={max(latencies):7.1f} ms  "
                  f"mean={statistics.fmean(latencies):7.1f} ms  "
                  f"operator peak RSS={rss:6.1f} MB  pods={pods}  "
                  f"({time.monotonic() - started:.1f}s)", flush=True)
    p99_at = results.get(200, results[max(results)])[1]
    rss_at = results.get(1000, results[max(results)])[2]
    pods_at = results[max(results)][3]
    print(f"p99_ms={p99_at:.0f} rss_mb={rss_at:.0f} pods={pods_at}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
