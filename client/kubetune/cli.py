"""`kubetune` command line, also installed as the kubectl plugin `kubectl-kubetune`.

Local: `run`, `validate`; the operator: `operator`; FineTuneJobs on a cluster: `submit`,
`list`, `get`, `describe`, `logs`, `events`, `wait`, `artifact`, `suspend`, `resume`,
`cancel`. Heavy stacks (torch, kopf, the Kubernetes client) are imported only by the command
that needs them, so `kubetune validate` answers in well under a second.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import yaml

from kubetune.errors import InvalidSpec, JobFailed, KubetuneError, WaitTimeout
from kubetune.output import describe, event_rows, job_rows, table
from kubetune.sdk import Client, Job
from kubetune_api import contract
from kubetune_api.crd import Phase
from kubetune_api.load import SpecError, load_job

EXIT_ERROR = 1
EXIT_WAIT_TIMEOUT = 124  # as timeout(1)
LIFECYCLE = ("submit", "list", "get", "describe", "logs", "events", "wait", "artifact",
             "suspend", "resume", "cancel")


def program_name() -> str:
    """kubectl runs plugins as kubectl-<name>; say `kubectl kubetune` in help then."""
    return "kubectl kubetune" if os.path.basename(sys.argv[0]).startswith("kubectl-") \
        else "kubetune"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=program_name(), description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    _local_commands(commands)
    _lifecycle_commands(commands)
    return parser


def _local_commands(commands: Any) -> None:
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


def _lifecycle_commands(commands: Any) -> None:
    cluster = argparse.ArgumentParser(add_help=False)
    cluster.add_argument("-n", "--namespace", help="default: the kubeconfig context's")
    cluster.add_argument("--kubeconfig", help="default: $KUBECONFIG, ~/.kube/config, or "
                         "in-cluster")
    cluster.add_argument("--context", help="kubeconfig context (default: the current one)")
    printed = argparse.ArgumentParser(add_help=False)
    printed.add_argument("-o", "--output", choices=("table", "json", "yaml"), default="table",
                         help="table (default) or the objects as JSON or YAML")

    def verb(name: str, text: str, *parents: argparse.ArgumentParser) -> Any:
        return commands.add_parser(name, help=text, parents=[cluster, *parents])

    submit = verb("submit", "create a FineTuneJob from a YAML file (validated first)", printed)
    submit.add_argument("file")
    listing = verb("list", "FineTuneJobs of the namespace", printed)
    listing.add_argument("-A", "--all-namespaces", action="store_true")
    listing.add_argument("-l", "--selector", help="label selector, e.g. team=a")
    get = verb("get", "one FineTuneJob", printed)
    get.add_argument("name")
    verb("describe", "a FineTuneJob's spec, status, conditions and events").add_argument("name")
    logs = verb("logs", "a rank's trainer log (its current attempt)")
    logs.add_argument("name")
    logs.add_argument("-f", "--follow", action="store_true",
                      help="stream until the rank's container ends (waits for it to start)")
    logs.add_argument("--rank", type=int, default=0, help="node rank (default 0)")
    logs.add_argument("--tail", type=int, help="only the last N lines")
    verb("events", "events of the FineTuneJob, its Jobs and pods", printed).add_argument("name")
    wait = verb("wait", "until the job reaches a phase; exit 1 if it ends otherwise", printed)
    wait.add_argument("name")
    wait.add_argument("--for", dest="until", default=Phase.SUCCEEDED.value,
                      choices=[p.value for p in Phase], help="phase (default Succeeded)")
    wait.add_argument("--timeout", type=float, help="seconds (default: no limit); exit 124")
    artifact = verb("artifact", "a succeeded job's output URI and manifest", printed)
    artifact.add_argument("name")
    for name, text in (("suspend", "stop the ranks (checkpointed); resume continues"),
                       ("resume", "continue a suspended job from its checkpoint"),
                       ("cancel", "delete the job, its Jobs and pods (its output stays)")):
        verb(name, text).add_argument("name")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command in LIFECYCLE:
            return lifecycle(args)
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
    except (SpecError, InvalidSpec) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return contract.EXIT_INVALID_SPEC
    except WaitTimeout as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_WAIT_TIMEOUT
    except KubetuneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130


def lifecycle(args: argparse.Namespace) -> int:
    client = Client(namespace=args.namespace, kubeconfig=args.kubeconfig, context=args.context)
    handlers: dict[str, Callable[[Client, argparse.Namespace], int]] = {
        "submit": _submit, "list": _list, "get": _get, "describe": _describe, "logs": _logs,
        "events": _events, "wait": _wait, "artifact": _artifact, "suspend": _suspend,
        "resume": _resume, "cancel": _cancel}
    return handlers[args.command](client, args)


def _submit(client: Client, args: argparse.Namespace) -> int:
    job = client.train(load_job(args.file))
    return _print_jobs([job], args.output, single=True, verb="created")


def _list(client: Client, args: argparse.Namespace) -> int:
    jobs = client.list(label_selector=args.selector, all_namespaces=args.all_namespaces)
    if not jobs and args.output == "table":
        where = "any namespace" if args.all_namespaces else f"{client.namespace} namespace"
        print(f"No FineTuneJobs found in {where}.", file=sys.stderr)
        return 0
    return _print_jobs(jobs, args.output, namespaces=args.all_namespaces)


def _get(client: Client, args: argparse.Namespace) -> int:
    return _print_jobs([client.get(args.name)], args.output, single=True)


def _describe(client: Client, args: argparse.Namespace) -> int:
    print(describe(client.get(args.name), client.events(args.name)))
    return 0


def _logs(client: Client, args: argparse.Namespace) -> int:
    for line in client.logs(args.name, rank=args.rank, follow=args.follow, tail=args.tail):
        print(line, flush=True)
    return 0


def _events(client: Client, args: argparse.Namespace) -> int:
    events = client.events(args.name)
    if args.output != "table":
        _dump([vars(e) for e in events], args.output)
    elif events:
        print(table(*event_rows(events)))
    else:
        print(f"No events found for {args.name}.", file=sys.stderr)
    return 0


def _wait(client: Client, args: argparse.Namespace) -> int:
    try:
        job = client.wait(args.name, until=args.until, timeout=args.timeout)
    except JobFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    return _print_jobs([job], args.output, single=True, verb=f"condition met ({job.phase})")


def _artifact(client: Client, args: argparse.Namespace) -> int:
    artifact = client.artifact(args.name)
    if args.output != "table":
        _dump({"uri": artifact.uri, "manifestSha256": artifact.manifest_sha256,
               "manifest": artifact.manifest}, args.output)
        return 0
    manifest = artifact.manifest or {}
    files = manifest.get("files") or {}
    print(f"URI:       {artifact.uri}\nManifest:  sha256 {artifact.manifest_sha256} "
          f"(verified)\nMethod:    {manifest.get('method')}\nBase:      "
          f"{(manifest.get('baseModel') or {}).get('name')}\nFiles:     {len(files)}")
    return 0


def _suspend(client: Client, args: argparse.Namespace) -> int:
    client.suspend(args.name)
    print(f"finetunejob.kubetune.dev/{args.name} suspended")
    return 0


def _resume(client: Client, args: argparse.Namespace) -> int:
    client.resume(args.name)
    print(f"finetunejob.kubetune.dev/{args.name} resumed")
    return 0


def _cancel(client: Client, args: argparse.Namespace) -> int:
    client.cancel(args.name)
    print(f"finetunejob.kubetune.dev/{args.name} cancelled (deleted)")
    return 0


def _print_jobs(jobs: list[Job], output: str, *, single: bool = False,
                namespaces: bool = False, verb: str | None = None) -> int:
    if output != "table":
        objects = [j.to_dict() for j in jobs]
        _dump(objects[0] if single else {"apiVersion": "v1", "kind": "List",
                                         "items": objects}, output)
    elif verb is not None:
        for job in jobs:
            print(f"finetunejob.kubetune.dev/{job.name} {verb}")
    else:
        print(table(*job_rows(jobs, namespaces=namespaces)))
    return 0


def _dump(data: Any, output: str) -> None:
    if output == "json":
        print(json.dumps(data, indent=2))
    else:
        print(yaml.safe_dump(data, sort_keys=False), end="")


if __name__ == "__main__":
    sys.exit(main())
