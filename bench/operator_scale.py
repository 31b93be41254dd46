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
the benchmark's) and prints the K largest allocation sites left at the end. `--profile-top K`
runs its event loop under cProfile (bench/cpuprobe) and prints the K functions with the most
cumulative and own time.

Each run also prints `cpu_s`: the operator process's user + system CPU seconds (/proc/<pid>/stat)
from the end of the warm-up job to the end of the run, i.e. the CPU the N jobs cost it.
CPU seconds depend less on outside load than latency does, but not nothing (cache misses,
more batching under load), so compare them within one run:

    .venv/bin/python bench/operator_scale.py --jobs 1000 --pods-per-job 8 --hog --compare main

`--hog` runs a one-core busy loop beside the operator for the whole run (a noisy neighbour on
the node). `--compare REV` checks REV out in a scratch `git worktree` and runs its operator
(operator/ and api/ of REV first on PYTHONPATH; the bench, emulator and Job controller stay
this tree's) before this tree's, for every size and `--rounds` times, then prints both and the
ratios. `uptime` is printed at the start and the end: the load the figures were taken under.
"""

from __future__ import annotations

import argparse
import heapq
import os
import queue
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
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
            if self.api.get(PODS, ns, name) is None:
                continue  # the operator deleted it (a restart): a kubelet has nothing to report
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


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of the process so far (its threads included)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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


def profile_top(pid: int, stats_path: Path, count: int) -> None:
    """Where the operator's event loop spent its CPU (cProfile, from bench/cpuprobe)."""
    import pstats
    os.kill(pid, signal.SIGUSR2)
    wait_for(stats_path.exists, 300, interval=0.5, what="profile")
    kept = Path(tempfile.gettempdir()) / f"operator-cpu-{pid}.pstats"
    kept.write_bytes(stats_path.read_bytes())
    print(f"  profile kept in {kept} (python -m pstats {kept})")
    stats = pstats.Stats(str(kept))
    for key in ("cumulative", "tottime"):
        print(f"  operator event loop, top {count} by {key}:")
        stats.sort_stats(key).print_stats(count)


@dataclass
class Run:
    latencies: list[float]
    rss_mb: float
    pods: int
    cpu_s: float


def run_size(count: int, timeout: float, rate: float, pods_per_job: int = 0,
             unrelated: int = 0, heap: int = 0, profile: int = 0,
             operator_path: list[str] | None = None) -> Run:
    emulator = make_emulator(pods_per_job)
    nodes = pods_per_job or 2
    with EmulatorThread(emulator) as api, tempfile.TemporaryDirectory() as tmp:
        for index in range(unrelated):
            api.create(PODS, unrelated_pod(index))
        controller = None
        if emulator.new_jobs is not None:
            controller = JobController(api, emulator.new_jobs)
            controller.start()
        snapshot, profile_path = Path(tmp) / "heap.snapshot", Path(tmp) / "cpu.pstats"
        path = list(operator_path or [])
        if heap:
            path.append(str(ROOT / "bench" / "heapprobe"))
        if profile:
            path.append(str(ROOT / "bench" / "cpuprobe"))
        env = {"KUBETUNE_HEAP_SNAPSHOT": str(snapshot) if heap else "",
               "KUBETUNE_CPU_PROFILE": str(profile_path) if profile else "",
               "PYTHONPATH": os.pathsep.join([*path, os.environ.get("PYTHONPATH", "")])}
        operator = OperatorProcess(api, Path(tmp), KUBETUNE_PROGRESS_INTERVAL="60",
                                   KUBETUNE_LOG_LEVEL="WARNING", **env)
        with operator:
            assert operator.process is not None
            api.create(FTJ, finetunejob("warmup", nodes))
            wait_for(lambda: all_children(emulator, ["warmup"]), 120, what="operator ready")
            cpu_before = cpu_seconds(operator.process.pid)
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
            rss = peak_rss_mb(operator.process.pid)
            cpu = cpu_seconds(operator.process.pid) - cpu_before
            if heap:
                heap_top(operator.process.pid, snapshot, heap)
            if profile:
                profile_top(operator.process.pid, profile_path, profile)
        pods = controller.pods if controller is not None else 0
        if controller is not None:
            controller.stop.set()
    latencies = [(max(emulator.children_at[n].values()) - emulator.created_at[n]) * 1000
                 for n in names]
    return Run(latencies, rss, pods, cpu)


def succeeded(api: EmulatorThread) -> int:
    return sum(1 for job in api.find(FTJ, NAMESPACE)
               if (job.get("status") or {}).get("phase") == "Succeeded")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


class CpuHog:
    """A one-core busy loop beside the operator for the whole run (a noisy neighbour)."""

    def __init__(self, enabled: bool) -> None:
        self.process = subprocess.Popen([sys.executable, "-c", "while True: pass"]) \
            if enabled else None

    def state(self) -> str:
        """What the hog did: a run whose hog died (someone killed it) is not a run with one."""
        if self.process is None:
            return "none"
        if self.process.poll() is not None:
            return f"DIED during the run (exit {self.process.returncode}): figures are not " \
                "with a hog"
        return "one core, alive to the end"

    def __enter__(self) -> CpuHog:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@contextmanager
def checkout(rev: str | None) -> Iterator[list[str] | None]:
    """REV's operator and API packages, in a scratch git worktree (removed afterwards)."""
    if rev is None:
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="operator-scale-") as tmp:
        tree = Path(tmp) / "tree"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "--quiet",
                        str(tree), rev], check=True)
        try:
            yield [str(tree / "operator"), str(tree / "api")]
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force",
                            str(tree)], check=False)


def load() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def summary(label: str, count: int, rate: float, run: Run, seconds: float) -> str:
    p50, p99 = percentile(run.latencies, 50), percentile(run.latencies, 99)
    return (f"{label}N={count:5d} rate={rate or 'burst'}  create→children "
            f"p50={p50:7.1f} ms  p99={p99:7.1f} ms  max={max(run.latencies):7.1f} ms  "
            f"mean={statistics.fmean(run.latencies):7.1f} ms  "
            f"operator peak RSS={run.rss_mb:6.1f} MB  cpu={run.cpu_s:6.1f} s  "
            f"pods={run.pods}  ({seconds:.1f}s)")


def headline(results: dict[int, list[Run]]) -> tuple[float, float, float, int]:
    """p99 at 200 jobs (else the largest N), RSS and CPU at 1000 (else the largest), pods:
    medians over the rounds."""
    at_200 = results.get(200, results[max(results)])
    at_1000 = results.get(1000, results[max(results)])
    return (statistics.median(percentile(r.latencies, 99) for r in at_200),
            statistics.median(r.rss_mb for r in at_1000),
            statistics.median(r.cpu_s for r in at_1000), results[max(results)][0].pods)


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
    parser.add_argument("--profile-top", type=int, default=0, metavar="K",
                        help="profile the operator's event loop (cProfile: slower) and print "
                        "its K costliest functions at the end")
    parser.add_argument("--hog", action="store_true",
                        help="run a one-core busy loop beside the operator")
    parser.add_argument("--compare", metavar="REV",
                        help="also run REV's operator (a scratch git worktree), side by side")
    parser.add_argument("--rounds", type=int, default=1,
                        help="runs per size (and per operator with --compare); medians")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    sizes = [args.jobs] if args.jobs else args.sizes
    print(f"load at start: {load()}", flush=True)
    results: dict[str | None, dict[int, list[Run]]] = {}
    with CpuHog(args.hog) as hog, checkout(args.compare) as base_path:
        operators = [(args.compare, base_path)] if args.compare else []
        operators.append((None, None))  # this tree's
        for count in sizes:
            for _ in range(args.rounds):
                for rev, path in operators:
                    label = f"[{rev}] " if rev else ("[this tree] " if args.compare else "")
                    for unrelated in sorted({0, args.unrelated_pods}):
                        started = time.monotonic()
                        run = run_size(count, args.timeout, args.rate, args.pods_per_job,
                                       unrelated, args.heap_top, args.profile_top, path)
                        if unrelated:
                            base = results[rev][count][-1].rss_mb
                            print(f"  {label}with {unrelated} unrelated pods: peak RSS="
                                  f"{run.rss_mb:6.1f} MB ({run.rss_mb - base:+.1f} MB)",
                                  flush=True)
                            continue
                        results.setdefault(rev, {}).setdefault(count, []).append(run)
                        print(summary(label, count, args.rate, run,
                                      time.monotonic() - started), flush=True)
        print(f"load at end: {load()}; cpu hog: {hog.state()}", flush=True)
    p99, rss, cpu, pods = headline(results[None])
    line = f"p99_ms={p99:.0f} rss_mb={rss:.0f} cpu_s={cpu:.1f} pods={pods}"
    if args.compare:
        base_p99, base_rss, base_cpu, _ = headline(results[args.compare])
        line += (f" base_p99_ms={base_p99:.0f} base_rss_mb={base_rss:.0f} "
                 f"base_cpu_s={base_cpu:.1f} cpu_ratio={cpu / base_cpu:.2f}")
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
