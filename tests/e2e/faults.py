"""`make faults`: the fault table. Each scenario runs a tiny 2-node LoRA job through the e2e
harness (real operator process, real torchrun/trainer processes, moto S3, emulated API server
and kubelet; docs/e2e.md), injects one fault once training has a complete checkpoint, and
checks that the job ends as it must:

    scenario | runs | passed | restarts | preemptions | steps lost | artifacts lost
    ...
    faults: P/N passed

"steps lost" is rank 0's step when the fault hit minus the step the next attempt resumed
from (at most one checkpoint interval); "artifacts lost" counts succeeded runs whose artifact
is missing or does not match status.output's digest. Exit status 1 when any run failed.

    python tests/e2e/faults.py [--only NAME ...] [--list]
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TESTS = Path(__file__).resolve().parents[1]
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))
# As tests/conftest.py: one intra-op thread per process (every rank is a process here).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import requests  # noqa: E402
import s3fs  # noqa: E402

from kubetune_api import contract  # noqa: E402
from kubetune_operator.status import parse_progress  # noqa: E402
from support.e2e_cluster import NAMESPACE, LocalCluster, s3_example  # noqa: E402
from support.kueue import QUEUE_LABEL, KueueModel  # noqa: E402
from support.operator_process import JOBS  # noqa: E402
from support.s3 import ACCESS_KEY, SECRET_KEY, MotoServer, create_bucket  # noqa: E402

STEPS, EVERY = 60, 10  # a checkpoint every EVERY steps: at most that many may be lost
RUN_TIMEOUT = 420.0
STALL_TIMEOUT = 30  # runPolicy.stallTimeoutSeconds of the frozen-rank scenario


@dataclass
class Outcome:
    passed: bool
    restarts: int = 0
    preemptions: int = 0
    steps_lost: int = 0
    artifacts_lost: int = 0
    problem: str = ""


@dataclass
class Run:
    """One scenario run: its cluster, S3 and job name."""

    cluster: LocalCluster
    s3: s3fs.S3FileSystem
    endpoint: str
    bucket: str
    name: str
    manifest: dict[str, Any] = field(default_factory=dict)

    @property
    def output(self) -> str:
        return f"s3://{self.bucket}/{self.name}"

    def apply(self, labels: dict[str, str] | None = None,
              **sections: dict[str, Any]) -> None:
        sections = {"training": {"maxSteps": STEPS, "logEverySteps": 10},
                    "checkpoint": {"everySteps": EVERY, "keepLast": 2}, **sections}
        self.manifest = s3_example("tiny-lora", name=self.name, bucket=self.bucket,
                                   endpoint=self.endpoint, nodes=2, **sections)
        if labels:
            self.manifest["metadata"]["labels"] = labels
        self.cluster.apply(self.manifest)

    def rank0_step(self) -> int:
        port = self.manifest["spec"]["metrics"]["port"]
        try:
            text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text
        except requests.RequestException:
            return 0
        progress = parse_progress(text, datetime.datetime.now(datetime.UTC))
        return progress.step or 0 if progress is not None else 0

    def checkpointed(self) -> int:
        """Wait for a complete checkpoint of attempt 1; rank 0's step right then."""
        def complete() -> list[int]:
            self.s3.invalidate_cache()
            root = f"{self.output.removeprefix('s3://')}/{contract.CHECKPOINTS_SUBDIR}"
            return self.s3.glob(f"{root}/checkpoint-*/{contract.CHECKPOINT_MARKER_FILE}")
        self.cluster.wait(complete, "a complete checkpoint", RUN_TIMEOUT)
        return self.rank0_step()

    def pod(self, rank: int, attempt: int = 1) -> str:
        return f"{self.name}-a{attempt}-{rank}"

    def finish(self) -> dict[str, Any]:
        return self.cluster.wait_finished(self.name, RUN_TIMEOUT)

    def judge(self, status: dict[str, Any], step_at_fault: int | None, *,
              phase: str = "Succeeded", reason: str | None = None,
              min_restarts: int = 1, resumed: bool = False) -> Outcome:
        """`resumed`: the same attempt resumed from a checkpoint (no restart counted)."""
        outcome = Outcome(False, status.get("restarts", 0), status.get("preemptions", 0))
        if status.get("phase") != phase:
            failed: dict[str, Any] = next(
                (c for c in status.get("conditions", []) if c["type"] == "Failed"), {})
            outcome.problem = f"ended {status.get('phase')}: {failed.get('message', '')}"
            return outcome
        if reason is not None:
            got = next((c["reason"] for c in status["conditions"] if c["type"] == phase), None)
            if got != reason:
                outcome.problem = f"reason {got}, expected {reason}"
                return outcome
        if outcome.restarts < min_restarts:
            outcome.problem = f"{outcome.restarts} restarts, expected at least {min_restarts}"
            return outcome
        if phase == "Succeeded":
            manifest = self.artifact(status)
            if manifest is None:
                outcome.artifacts_lost = 1
                outcome.problem = "artifact missing or not the one status.output names"
                return outcome
            if step_at_fault is not None and (outcome.restarts or resumed):
                outcome.steps_lost = max(0, step_at_fault - manifest.get("resumedFromStep", 0))
            if manifest["metrics"]["steps"] != STEPS:
                outcome.problem = f"trained {manifest['metrics']['steps']} steps, not {STEPS}"
                return outcome
            if outcome.steps_lost > EVERY:
                outcome.problem = f"{outcome.steps_lost} steps lost (> {EVERY})"
                return outcome
        outcome.passed = True
        return outcome

    def artifact(self, status: dict[str, Any]) -> dict[str, Any] | None:
        import json

        output = status.get("output") or {}
        try:
            self.s3.invalidate_cache()
            data = self.s3.cat(f"{output['uri'].removeprefix('s3://')}/"
                               f"{contract.MANIFEST_FILE}")
        except (KeyError, FileNotFoundError):
            return None
        if hashlib.sha256(data).hexdigest() != output.get("manifestSha256"):
            return None
        manifest: dict[str, Any] = json.loads(data)
        return manifest


# --- scenarios ---------------------------------------------------------------------------------

def rank_killed(run: Run) -> Outcome:
    run.apply()
    step = run.checkpointed()
    assert run.cluster.runner is not None
    run.cluster.runner.crash(run.pod(1))
    return run.judge(run.finish(), step)


def node_lost(run: Run) -> Outcome:
    run.apply()
    step = run.checkpointed()
    assert run.cluster.runner is not None
    run.cluster.runner.lose_node(run.pod(1))  # its pod stays Terminating once deleted
    outcome = run.judge(run.finish(), step)
    if outcome.passed and run.cluster.api.get("v1/pods", "default", run.pod(1)) is not None:
        outcome.passed, outcome.problem = False, "the lost pod was never force-deleted"
    return outcome


def evicted(run: Run) -> Outcome:
    run.apply(runPolicy={"backoffLimit": 0})  # an eviction must not use it up
    step = run.checkpointed()
    assert run.cluster.runner is not None
    run.cluster.runner.evict(run.pod(0))
    outcome = run.judge(run.finish(), step)
    if outcome.passed and outcome.preemptions < 1:
        outcome.passed, outcome.problem = False, "the eviction was not counted a preemption"
    return outcome


def job_deleted(run: Run) -> Outcome:
    run.apply(runPolicy={"backoffLimit": 0})
    step = run.checkpointed()
    run.cluster.kubectl("delete", "job", f"{run.name}-a1", "--wait=false")
    outcome = run.judge(run.finish(), step)
    if outcome.passed and run.cluster.api.get(JOBS, "default", f"{run.name}-a1") is not None:
        outcome.passed, outcome.problem = False, "the deleted Job's name came back"
    return outcome


def recreated(run: Run) -> Outcome:
    run.apply()
    step = run.checkpointed()
    run.cluster.kubectl("delete", "ftj", run.name, "--wait=false")
    run.cluster.wait(lambda: not run.cluster.ftj(run.name), "the first object gone", 60)
    run.cluster.apply(run.manifest)  # the same name: a new object, the same output URI
    status = run.finish()
    return run.judge(status, step, min_restarts=0)


def foreign_job(run: Run) -> Outcome:
    foreign = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {
        "name": f"{run.name}-a1-foreign", "namespace": "default",
        "labels": {"kubetune.dev/finetunejob": run.name}},
        "spec": {"template": {"spec": {"restartPolicy": "Never", "containers": [
            {"name": "app", "image": "busybox"}]}}}}
    run.cluster.apply(foreign)
    run.apply()
    outcome = run.judge(run.finish(), None, min_restarts=0)
    if outcome.passed and run.cluster.api.get(JOBS, "default", f"{run.name}-a1-foreign") is None:
        outcome.passed, outcome.problem = False, "the foreign Job was deleted"
    return outcome


def rank0_frozen(run: Run) -> Outcome:
    run.apply(runPolicy={"stallTimeoutSeconds": STALL_TIMEOUT})
    step = run.checkpointed()
    assert run.cluster.runner is not None
    run.cluster.runner.pause(run.pod(0))  # SIGSTOP: a hang, not a crash
    outcome = run.judge(run.finish(), step)
    events = run.cluster.kubectl("get", "events", "--field-selector",
                                 f"involvedObject.name={run.name}", "-o",
                                 "jsonpath={.items[*].reason}")
    if outcome.passed and "Stalled" not in events.split():
        outcome.passed, outcome.problem = False, f"no Stalled event: {events}"
    return outcome


def permanent_exit(run: Run) -> Outcome:
    # A field the data does not have: every rank exits 2 (bad data), racing the Job's Failed.
    run.apply(dataset={"fields": {"text": "no_such_field"}})
    return run.judge(run.finish(), None, phase="Failed", reason="PermanentFailure",
                     min_restarts=0)


def operator_killed(run: Run) -> Outcome:
    """SIGKILL the operator after each kind of write: the status, the children, a restart."""
    cluster = run.cluster
    assert cluster.operator is not None and cluster.runner is not None
    run.apply()
    cluster.wait(lambda: cluster.status(run.name).get("phase"), "status written", 60)
    cluster.operator.kill()  # after the first status write (children maybe not created)
    cluster.operator.start()
    cluster.wait(lambda: cluster.api.get(JOBS, "default", f"{run.name}-a1"), "the Job", 60)
    cluster.operator.kill()  # after the Job's create
    cluster.operator.start()
    step = run.checkpointed()
    cluster.runner.crash(run.pod(1))
    cluster.wait(lambda: cluster.status(run.name).get("phase") == "Restarting", "Restarting", 120)
    cluster.operator.kill()  # after the restart was written, maybe before the Job's delete
    cluster.operator.start()
    return run.judge(run.finish(), step)


def kueue_preempted(run: Run) -> Outcome:
    """Kueue admits the queued gang, preempts it once it has a checkpoint (suspends the Job:
    the Job controller deletes the pods, the ranks checkpoint on SIGTERM and exit 75), and
    admits it again: the same attempt resumes (docs/operator.md, Kueue)."""
    cluster, kueue = run.cluster, KueueModel(run.cluster.api, quota=2)
    job = f"{run.name}-a1"
    # The Job is created suspended in the queue; a preemption must not use up backoffLimit.
    run.apply({QUEUE_LABEL: "team-a"}, runPolicy={"backoffLimit": 0})
    cluster.wait(lambda: kueue.admit() == [job], "Kueue to admit the gang", 60)
    step = run.checkpointed()
    kueue.preempt(job)
    cluster.wait(lambda: cluster.status(run.name).get("preemptions") == 1,
                 "the preemption counted", 120)
    assert cluster.runner is not None
    cluster.wait(lambda: not cluster.api.find("v1/pods", NAMESPACE, f"job-name={job}"),
                 "the preempted pods gone", 120)
    exits = [cluster.runner.exit_codes.get(run.pod(rank)) for rank in (0, 1)]
    status = cluster.status(run.name)
    if cluster.api.find("v1/pods", NAMESPACE, f"job-name={job}"):
        return Outcome(False, problem="pods came back while the Job was suspended")
    if status.get("phase") != "Pending" or status.get("attempt") != 1:
        return Outcome(False, problem=f"while preempted: {status.get('phase')}, attempt "
                       f"{status.get('attempt')} (expected Pending, attempt 1)")
    cluster.wait(lambda: kueue.admit() == [job], "Kueue to admit the gang again", 60)
    outcome = run.judge(run.finish(), step, min_restarts=0, resumed=True)
    final = cluster.status(run.name)
    problems = [
        f"{what}: {got}, expected {want}" for what, got, want in (
            ("restarts", final.get("restarts"), 0), ("preemptions", final.get("preemptions"), 1),
            ("attempt", final.get("attempt"), 1),
            ("ranks' exit codes on preemption", exits, [75, 75]))
        if got != want]
    if cluster.api.get(JOBS, NAMESPACE, f"{run.name}-a2") is not None:
        problems.append("a second attempt's Job was created")
    if outcome.passed and problems:
        outcome.passed, outcome.problem = False, "; ".join(problems)
    return outcome


SCENARIOS: list[tuple[str, int, Callable[[Run], Outcome]]] = [
    ("rank killed mid-run", 3, rank_killed),
    ("node lost (pod stuck Terminating)", 1, node_lost),
    ("eviction", 1, evicted),
    ("current Job deleted by a user", 1, job_deleted),
    ("delete + re-create with the same name", 1, recreated),
    ("a foreign labelled Job", 1, foreign_job),
    ("rank 0 frozen (SIGSTOP), watchdog on", 1, rank0_frozen),
    ("permanent exit code racing the Job's Failed", 1, permanent_exit),
    ("operator SIGKILLed after each kind of write", 1, operator_killed),
    ("Kueue preemption and re-admission", 1, kueue_preempted),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", help="scenario names (substrings) to run")
    parser.add_argument("--list", action="store_true")
    args = parser.parse_args(argv)
    chosen = [s for s in SCENARIOS if not args.only or any(o in s[0] for o in args.only)]
    if args.list:
        print("\n".join(s[0] for s in chosen))
        return 0
    rows, passed, total = [], 0, 0
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp, MotoServer() as moto:
        s3 = s3fs.S3FileSystem(key=ACCESS_KEY, secret=SECRET_KEY,
                               client_kwargs={"endpoint_url": moto.endpoint})
        for index, (title, runs, scenario) in enumerate(chosen):
            outcomes = []
            for attempt in range(runs):
                workdir = Path(tmp) / f"s{index}-{attempt}"
                workdir.mkdir()
                with LocalCluster(workdir) as cluster:
                    run = Run(cluster, s3, moto.endpoint, create_bucket(moto.endpoint),
                              f"fault{index}r{attempt}")
                    try:
                        outcome = scenario(run)
                    except Exception as exc:  # a scenario that breaks is a failed run
                        outcome = Outcome(False, problem=f"{type(exc).__name__}: "
                                          f"{str(exc)[:2000]}")
                        traceback.print_exc()
                outcomes.append(outcome)
                if not outcome.passed:
                    print(f"FAILED {title} (run {attempt + 1}): {outcome.problem}",
                          file=sys.stderr)
            ok = sum(o.passed for o in outcomes)
            passed, total = passed + ok, total + runs
            rows.append((title, runs, ok, sum(o.restarts for o in outcomes),
                         sum(o.preemptions for o in outcomes),
                         max(o.steps_lost for o in outcomes),
                         sum(o.artifacts_lost for o in outcomes)))
            print(f"... {title}: {ok}/{runs} ({time.monotonic() - started:.0f}s)",
                  file=sys.stderr, flush=True)
    header = ("scenario", "runs", "passed", "restarts", "preemptions", "steps lost",
              "artifacts lost")
    width = max(len(r[0]) for r in [header, *rows])
    print(" | ".join([header[0].ljust(width), *header[1:]]))
    for row in rows:
        cells = [row[0].ljust(width), *(str(c).rjust(len(h)) for c, h in zip(
            row[1:], header[1:], strict=True))]
        print(" | ".join(cells))
    print(f"(took {time.monotonic() - started:.0f}s)", file=sys.stderr)
    print(f"faults: {passed}/{total} passed")
    return 0 if passed == total else 1


if __name__ == "__main__":
    sys.exit(main())
