"""Process entry points: one rank (`python -m kubetune_trainer`) and the local launcher
(`kubetune run`), which trains in-process or starts torchrun "nodes" on loopback with exactly
the environment the operator gives pods (docs/contract.md)."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from kubetune_api import contract, uris
from kubetune_api.load import SpecError, load_job
from kubetune_api.spec import FineTuneJob, FineTuneJobSpec, Strategy
from kubetune_trainer.env import METRICS_PORT_ENV, PROGRESS_ENV, SUMMARY_ENV

if TYPE_CHECKING:
    from kubetune_trainer.recipe import RunResult


GRACE_SECONDS = 30  # as torchrun gives its workers after SIGTERM


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kubetune_trainer")
    parser.add_argument("--config", required=True, help="FineTuneJob YAML")
    parser.add_argument("--output", help="override spec.output.uri")
    parser.add_argument("--workdir", help="local scratch directory")
    args = parser.parse_args(argv)
    return train_rank(args.config, output=args.output, workdir=args.workdir)


def train_rank(config: str, *, output: str | None = None, workdir: str | None = None) -> int:
    """Run this process's rank of the job; map failures to the documented exit codes."""
    try:
        job = load_job(config, output_uri=output)
        refuse_other_schemes(job.spec)
        use_cpu_accelerator_without_cuda()
        quiet_library_noise()
        from kubetune_trainer.preemption import Preempted
        from kubetune_trainer.recipe import run  # torch & co. only after the spec is valid

        try:
            result = run(job, output_uri=output, workdir=workdir)
        except Preempted as stop:
            print(f"kubetune: {stop}", file=sys.stderr, flush=True)
            return contract.EXIT_PREEMPTED
    except SpecError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return contract.EXIT_INVALID_SPEC
    if result is not None:
        write_termination_message(termination_summary(result))
    return contract.EXIT_OK


def refuse_other_schemes(spec: FineTuneJobSpec) -> None:
    """The operator admitted these URIs against the admin's policy; checking again here, before
    anything is opened, keeps a spec that reached the trainer some other way (a ConfigMap
    edited by a tenant, `kubetune run`) from reaching the metadata address or an internal
    service over http."""
    extra = uris.extra_schemes_from(os.environ.get(uris.EXTRA_URI_SCHEMES_ENV))
    problems = uris.scheme_violations(spec, extra)
    if problems:
        raise SpecError("; ".join(problems))


def use_cpu_accelerator_without_cuda() -> None:
    """DeepSpeed guesses its accelerator (and warns) unless told; on a CPU-only host, say so."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def quiet_library_noise() -> None:
    """bitsandbytes' CPU backend warns on import that an optional Hub-downloaded kernel is
    missing; kubetune never downloads kernels at run time, so the line only confuses."""
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def termination_summary(result: RunResult) -> dict[str, object]:
    """What the operator copies into status.output (observe.success_output)."""
    summary: dict[str, object] = {"uri": result.output_uri,
                                  "manifestSha256": result.manifest_sha256}
    if result.oci is not None:
        summary["oci"] = {"reference": result.oci.reference, "digest": result.oci.digest}
    return summary


def write_termination_message(summary: dict[str, object]) -> None:
    """Kubernetes copies this file into the container status, where the operator reads it."""
    path = Path(os.environ.get(contract.TERMINATION_LOG_ENV, contract.DEFAULT_TERMINATION_LOG))
    with contextlib.suppress(OSError):  # not in a pod: there is nobody to report to
        path.write_text(json.dumps(summary))


def run_local(file: str, *, output: str | None = None, nodes: int | None = None,
              nproc_per_node: int = 1, workdir: str | None = None, quiet: bool = False,
              json_summary: bool = False) -> int:
    """`kubetune run`: validate first (fast, no torch), then train.

    `quiet`: no progress and no text summary; `json_summary`: the summary as one JSON object
    on stdout. Every rank (in-process or torchrun child) reads them from the environment.
    """
    job = load_job(file, output_uri=output)
    with console_env(quiet=quiet, json_summary=json_summary):
        return _run_local(file, job, output=output, nodes=nodes,
                          nproc_per_node=nproc_per_node, workdir=workdir)


@contextlib.contextmanager
def console_env(*, quiet: bool, json_summary: bool) -> Iterator[None]:
    """The console settings every rank reads, for this run only: an in-process caller (the
    SDK's local backend, a notebook) gets its environment back afterwards, so a quiet run
    does not silence the next one."""
    saved = {name: os.environ.get(name) for name in (PROGRESS_ENV, SUMMARY_ENV)}
    os.environ[PROGRESS_ENV] = "none" if quiet else os.environ.get(PROGRESS_ENV, "auto")
    os.environ[SUMMARY_ENV] = "json" if json_summary else "none" if quiet else "text"
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _run_local(file: str, job: FineTuneJob, *, output: str | None, nodes: int | None,
               nproc_per_node: int, workdir: str | None) -> int:
    nodes = nodes or job.spec.resources.nodes
    # DeepSpeed and FSDP need a process group even for one rank (in-process, DeepSpeed went
    # looking for MPI): they go through torchrun like a pod.
    if nodes == 1 and nproc_per_node == 1 and job.spec.training.strategy == Strategy.DDP:
        return train_rank(file, output=output, workdir=workdir)
    scratch = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="kubetune-nodes-"))
    try:
        return run_nodes(file, nodes, nproc_per_node, scratch, output=output,
                         metrics_port=job.spec.metrics.port)
    finally:
        if workdir is None:
            shutil.rmtree(scratch, ignore_errors=True)


def node_env(node_rank: int, nodes: int, nproc: int, master_port: int,
             metrics_port: int, workdir: Path) -> dict[str, str]:
    """The pod environment of node `node_rank`, on loopback."""
    return {
        contract.PET_NNODES: str(nodes),
        contract.PET_NPROC_PER_NODE: str(nproc),
        contract.PET_NODE_RANK: str(node_rank),
        contract.PET_MASTER_ADDR: "127.0.0.1",
        contract.PET_MASTER_PORT: str(master_port),
        "GLOO_SOCKET_IFNAME": "lo",
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS") or threads_per_rank(nodes * nproc),
        # Pods each have the port to themselves; nodes sharing this machine must not collide.
        METRICS_PORT_ENV: str(metrics_port + node_rank * nproc),
        contract.TERMINATION_LOG_ENV: str(workdir / "termination-log"),
    }


def threads_per_rank(ranks: int) -> str:
    """CPU threads for each of `ranks` processes sharing this machine: an even share of the
    cores this process may run on, at least 1 (torch would give each rank every core, and
    oversubscribed ranks crawl)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") \
        else os.cpu_count() or 1
    return str(max(1, cores // max(1, ranks)))


def run_nodes(file: str, nodes: int, nproc: int, scratch: Path, *, output: str | None,
              metrics_port: int) -> int:
    """Start one node process per node; the first failure stops the whole gang."""
    master_port = free_port()
    procs = []
    for rank in range(nodes):
        workdir = scratch / f"node-{rank}"
        workdir.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", contract.NODE_LAUNCHER_MODULE,
                   "-m", contract.TRAINER_MODULE, "--config", file, "--workdir", str(workdir)]
        command += ["--output", output] if output else []
        env = os.environ | node_env(rank, nodes, nproc, master_port, metrics_port, workdir)
        procs.append(subprocess.Popen(command, env=env))
    return wait_for_gang(procs)


def wait_for_gang(procs: list[subprocess.Popen[bytes]]) -> int:
    """0 when every node succeeds; else the first failing node's code after stopping the rest
    (a dead rank must not leave the others hanging in a collective)."""
    stop = {"signal": False}
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.update(signal=True))
    try:
        while True:
            codes = [p.poll() for p in procs]
            failed = next((c for c in codes if c not in (None, 0)), None)
            if failed is not None or stop["signal"]:
                terminate(procs)
                if stop["signal"]:
                    return contract.EXIT_PREEMPTED
                return failed if failed and failed > 0 else 1
            if all(c == 0 for c in codes):
                return contract.EXIT_OK
            time.sleep(0.2)
    except KeyboardInterrupt:
        terminate(procs)
        return contract.EXIT_PREEMPTED
    finally:
        signal.signal(signal.SIGTERM, previous)


def terminate(procs: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM (workers checkpoint), then SIGKILL after the grace period."""
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    deadline = time.monotonic() + GRACE_SECONDS + 5
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
