"""`kubetune` command line. Heavy stacks (torch, kopf) are imported only by the command that
needs them, so `kubetune validate` answers in well under a second."""

from __future__ import annotations

import argparse
import sys

from kubetune_api import contract
from kubetune_api.load import SpecError, load_job


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kubetune", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run a FineTuneJob YAML locally")
    run.add_argument("file", help="FineTuneJob YAML (the same file kubectl apply takes)")
    run.add_argument("--output", help="write the result here (replaces spec.output.uri; the "
                     "file then needs no spec.output)")
    run.add_argument("--nodes", type=int, help="torchrun node processes on loopback "
                     "(default: spec.resources.nodes when > 1, else in-process)")
    run.add_argument("--nproc-per-node", type=int, default=1, help="ranks per node process")
    run.add_argument("--workdir", help="local scratch directory (default: a temp dir)")
    run.add_argument("--quiet", "-q", action="store_true",
                     help="no progress and no summary (errors still go to stderr)")
    run.add_argument("--json", action="store_true", dest="json_summary",
                     help="print the summary as one JSON object on stdout (progress stays on "
                     "stderr)")

    validate = commands.add_parser("validate", help="check a FineTuneJob YAML and exit")
    validate.add_argument("file")
    validate.add_argument("--output", help="as for run: stands in for spec.output.uri")

    commands.add_parser("operator", help="run the operator (kubeconfig or in-cluster)")

    args = parser.parse_args(argv)
    try:
        if args.command == "validate":
            job = load_job(args.file, output_uri=args.output)
            print(f"{args.file}: valid {job.kind} {job.name!r} "
                  f"({job.spec.method.type}, {job.spec.model.task}, "
                  f"{job.spec.training.objective}, {job.spec.model.name})")
            return 0
        if args.command == "operator":
            from kubetune_operator.main import run_operator

            return run_operator()
        from kubetune_trainer.launch import run_local

        return run_local(args.file, output=args.output, nodes=args.nodes,
                         nproc_per_node=args.nproc_per_node, workdir=args.workdir,
                         quiet=args.quiet, json_summary=args.json_summary)
    except SpecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return contract.EXIT_INVALID_SPEC


if __name__ == "__main__":
    sys.exit(main())
