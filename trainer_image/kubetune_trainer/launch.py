"""Process entry points: one rank (`python -m kubetune_trainer`) and the local launcher
(`kubetune run`), which runs in-process or as torchrun "nodes" on loopback."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

from kubetune_api import contract
from kubetune_api.load import SpecError, load_job


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
        job = load_job(config)
        from kubetune_trainer.recipe import run  # torch & co. only after the spec is valid

        result = run(job, output_uri=output, workdir=workdir)
    except SpecError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return contract.EXIT_INVALID_SPEC
    if result is not None:
        write_termination_message({"uri": result.output_uri,
                                   "manifestSha256": result.manifest_sha256})
    return contract.EXIT_OK


def write_termination_message(summary: dict[str, str]) -> None:
    """Kubernetes copies this file into the container status, where the operator reads it."""
    path = Path(os.environ.get(contract.TERMINATION_LOG_ENV, contract.DEFAULT_TERMINATION_LOG))
    with contextlib.suppress(OSError):  # not in a pod: there is nobody to report to
        path.write_text(json.dumps(summary))


def run_local(file: str, *, output: str | None = None, nodes: int | None = None,
              nproc_per_node: int = 1, workdir: str | None = None) -> int:
    """`kubetune run`: validate first (fast, no torch), then train."""
    job = load_job(file)
    nodes = nodes or job.spec.resources.nodes
    if nodes == 1 and nproc_per_node == 1:
        return train_rank(file, output=output, workdir=workdir)
    raise SpecError(f"{file}: multi-process local runs (--nodes {nodes}) are not supported yet")
