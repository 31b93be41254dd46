"""`make faults`: the fault table. Each scenario runs a tiny 2-node LoRA job through the e2e
harness (real operator process, real torchrun/trainer processes, moto S3, emulated API server
and kubelet; docs/e2e.md). Paced rows hold every rank after step HOLD (the trainer's hold seam),
inject their fault there and release the ranks; every row then compares the job's end with its
exact expected outcome (phase, reason, restarts, preemptions, attempt, resumedFromStep, Warning
event reasons):

    scenario | runs | passed | restarts | preemptions | steps lost | artifacts lost
    ...
    faults: P/N passed

"steps lost" is the held step minus the artifact's resumedFromStep; "artifacts lost" counts
succeeded runs whose artifact is missing or does not match status.output's digest. Exit status
1 when any run failed. `make fault-mutations` (tests/faults/mutate.py) runs each row once more
without the handling it proves: every row must then fail.

    python tests/e2e/faults.py [--only NAME ...] [--runs N] [--list]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import json
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

TESTS = Path(__file__).resolve().parents[1]
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))
# As tests/conftest.py: one intra-op thread per process (every rank is a process here).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import s3fs  # noqa: E402

from kubetune_api import contract  # noqa: E402
from support.e2e_cluster import NAMESPACE, LocalCluster, s3_example  # noqa: E402
from support.kueue import QUEUE_LABEL, KueueModel  # noqa: E402
from support.operator_process import JOBS  # noqa: E402
from support.pod_runner import PodRunner  # noqa: E402
from support.s3 import ACCESS_KEY, SECRET_KEY, MotoServer, create_bucket  # noqa: E402

STEPS, EVERY = 60, 10  # a checkpoint every EVERY steps: at most that many may be lost
HOLD = 15  # the step every paced fault lands at (kubetune_trainer/hold.py)
RUN_TIMEOUT = 420.0
EVENT_GRACE = 30.0  # seconds the expected events may follow the status that ends a row
T = TypeVar("T")
STALL_TIMEOUT = 30  # runPolicy.stallTimeoutSeconds of the frozen-rank scenario
SCHEDULING_TIMEOUT = 10  # runPolicy.schedulingTimeoutSeconds of the long-queue-wait scenario
# The operator's word for a Job Kueue admitted that the Job controller has not resumed yet.
UNSUSPENDED = "unsuspended; waiting for the Job controller to resume it"


@dataclass
class Outcome:
    passed: bool
    restarts: int = 0
    preemptions: int = 0
    steps_lost: int = 0
    artifacts_lost: int = 0
    problem: str = ""


@dataclass(frozen=True)
class Expected:
    """The exact end of a row: every field is compared, none is a lower bound."""

    phase: str = "Succeeded"
    reason: str = "TrainingComplete"  # of the terminal (Succeeded/Failed) condition
    restarts: int = 0
    preemptions: int = 0
    attempt: int = 1
    resumed_from: int | None = None  # the artifact's resumedFromStep (None: trained afresh)
    warnings: frozenset[str] = frozenset()  # the reasons of the job's Warning events


class RowFailed(Exception):
    """The job ended Failed while the row still waited for something else."""


@dataclass
class Run:
    """One scenario run: its cluster, S3 and job name."""

    cluster: LocalCluster
    s3: s3fs.S3FileSystem
    endpoint: str
    bucket: str
    name: str
    manifest: dict[str, Any] = field(default_factory=dict)
    expect_failed: bool = False  # a row that ends Failed on purpose waits through it

    @property
    def output(self) -> str:
        return f"s3://{self.bucket}/{self.name}"

    @property
    def runner(self) -> PodRunner:
        assert self.cluster.runner is not None
        return self.cluster.runner

    def apply(self, labels: dict[str, str] | None = None,
              **sections: dict[str, Any]) -> None:
        sections = {"training": {"maxSteps": STEPS, "logEverySteps": 10},
                    "checkpoint": {"everySteps": EVERY, "keepLast": 2}, **sections}
        self.manifest = s3_example("tiny-lora", name=self.name, bucket=self.bucket,
                                   endpoint=self.endpoint, nodes=2, **sections)
        if labels:
            self.manifest["metadata"]["labels"] = labels
        self.cluster.apply(self.manifest)

    def wait(self, probe: Callable[[], T | None], what: str, timeout: float = RUN_TIMEOUT) -> T:
        """`cluster.wait`, but a job that ended Failed stops the row at once."""
        def probe_or_fail() -> T | None:
            status = self.cluster.status(self.name)
            if status.get("phase") == "Failed" and not self.expect_failed:
                raise RowFailed(f"ended Failed while waiting for {what}: "
                                f"{terminal_condition(status).get('message', '')}")
            return probe()
        return self.cluster.wait(probe_or_fail, what, timeout)

    def complete_checkpoints(self) -> list[int]:
        self.s3.invalidate_cache()
        root = f"{self.output.removeprefix('s3://')}/{contract.CHECKPOINTS_SUBDIR}"
        markers = self.s3.glob(f"{root}/checkpoint-*/{contract.CHECKPOINT_MARKER_FILE}")
        return sorted(int(m.split("/")[-2].removeprefix("checkpoint-")) for m in markers)

    def held(self) -> int:
        """Every rank stopped after step HOLD, with the checkpoint before it complete: the
        fault lands at a known step. Returns HOLD; `release()` lets the ranks go on."""
        ranks = self.manifest["spec"]["resources"]["nodes"]
        self.wait(lambda: self.runner.held_ranks() == dict.fromkeys(range(ranks), str(HOLD)),
                  f"every rank held at step {HOLD}")
        newest = self.complete_checkpoints()
        if newest[-1:] != [HOLD - HOLD % EVERY]:
            raise AssertionError(f"held at step {HOLD} with complete checkpoints {newest}")
        return HOLD

    def release(self, after_sigterm: tuple[int, ...] = ()) -> None:
        """Let the held ranks go on; first wait for SIGTERM to reach `after_sigterm` (torchrun
        forwards it to its workers on its next monitor tick), or they would train on."""
        self.wait(lambda: all(self.runner.held_ranks().get(r, "").endswith(" sigterm")
                              for r in after_sigterm), f"SIGTERM to reach ranks {after_sigterm}")
        self.runner.release()

    def pod(self, rank: int, attempt: int = 1) -> str:
        return f"{self.name}-a{attempt}-{rank}"

    def finish(self) -> dict[str, Any]:
        self.expect_failed = True
        return self.wait(lambda: ((s := self.cluster.status(self.name)).get("phase") in
                         ("Succeeded", "Failed") and s) or None, f"{self.name} to finish")

    def warnings(self) -> set[str]:
        return {e.get("reason", "") for e in self.cluster.api.find("v1/events", NAMESPACE)
                if e.get("involvedObject", {}).get("name") == self.name
                and e.get("type") == "Warning"}

    def judge(self, status: dict[str, Any], expected: Expected,
              step_at_fault: int | None = None) -> Outcome:
        outcome = Outcome(False, status.get("restarts", 0), status.get("preemptions", 0))
        problems = []
        ended = terminal_condition(status)
        # The operator posts an event after the status write that carries the same words.
        with contextlib.suppress(AssertionError):
            self.cluster.wait(lambda: expected.warnings <= self.warnings(),
                              "the expected Warning events", EVENT_GRACE)
        got: dict[str, Any] = {"phase": status.get("phase"), "reason": ended.get("reason"),
               "restarts": outcome.restarts, "preemptions": outcome.preemptions,
               "attempt": status.get("attempt"), "warnings": frozenset(self.warnings())}
        if expected.phase == "Succeeded":
            manifest = self.artifact(status)
            if manifest is None:
                outcome.artifacts_lost = 1
                problems.append("artifact missing or not the one status.output names")
            else:
                resumed = got["resumed_from"] = manifest.get("resumedFromStep")
                if manifest["metrics"]["steps"] != STEPS:
                    problems.append(f"trained {manifest['metrics']['steps']} steps, "
                                    f"not {STEPS}")
                if step_at_fault is not None and resumed is not None:
                    outcome.steps_lost = step_at_fault - int(resumed)
        for what, value in got.items():
            want = getattr(expected, what)
            if value != want:
                problems.append(f"{what} {shown(value)}, expected {shown(want)}")
        if ended.get("message") and problems:
            problems.append(f"({ended['message'][:300]})")
        outcome.problem = "; ".join(problems)
        outcome.passed = not problems
        return outcome

    def artifact(self, status: dict[str, Any]) -> dict[str, Any] | None:
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


def shown(value: object) -> str:
    return repr(sorted(value)) if isinstance(value, frozenset) else repr(value)


def terminal_condition(status: dict[str, Any]) -> dict[str, Any]:
    phase = status.get("phase")
    return next((c for c in status.get("conditions", []) if c["type"] == phase
                 and phase in ("Succeeded", "Failed")), {})


# --- scenarios ---------------------------------------------------------------------------------
# Each paced row holds every rank after step HOLD (the checkpoint of step 10 complete, the one
# of step 20 not begun), injects its fault there, then releases the ranks. A crash resumes from
# step 10 (5 steps lost); a SIGTERM checkpoints step 15 first (none lost).

CRASHED = HOLD - HOLD % EVERY  # the checkpoint a crash at HOLD resumes from


def rank_killed(run: Run) -> Outcome:
    run.runner.hold_at(HOLD)
    run.apply()
    step = run.held()
    run.runner.crash(run.pod(1))
    run.release()
    return run.judge(run.finish(), Expected(restarts=1, attempt=2, resumed_from=CRASHED,
                                            warnings=frozenset({"RankFailed"})), step)


def node_lost(run: Run) -> Outcome:
    run.runner.hold_at(HOLD)
    run.apply(runPolicy={"backoffLimit": 0})  # a node loss must not use it up
    step = run.held()
    run.runner.lose_node(run.pod(1))  # its pod stays Terminating once deleted
    run.release()
    outcome = run.judge(run.finish(), Expected(
        restarts=1, preemptions=1, attempt=2, resumed_from=CRASHED,
        warnings=frozenset({"NodeLost", "ForceDeletedPods"})), step)
    if outcome.passed and run.cluster.api.get("v1/pods", "default", run.pod(1)) is not None:
        outcome.passed, outcome.problem = False, "the lost pod was never force-deleted"
    return outcome


def evicted(run: Run) -> Outcome:
    run.runner.hold_at(HOLD)
    run.apply(runPolicy={"backoffLimit": 0})  # an eviction must not use it up
    step = run.held()
    run.runner.evict(run.pod(0))
    run.release(after_sigterm=(0,))
    return run.judge(run.finish(), Expected(
        restarts=1, preemptions=1, attempt=2, resumed_from=HOLD,
        warnings=frozenset({"Evicted"})), step)


def job_deleted(run: Run) -> Outcome:
    run.runner.hold_at(HOLD)
    run.apply(runPolicy={"backoffLimit": 0})
    step = run.held()
    run.cluster.kubectl("delete", "job", f"{run.name}-a1", "--wait=false")
    run.release(after_sigterm=(0, 1))
    outcome = run.judge(run.finish(), Expected(
        restarts=1, preemptions=1, attempt=2, resumed_from=HOLD,
        warnings=frozenset({"JobDeleted"})), step)
    if outcome.passed and run.cluster.api.get(JOBS, "default", f"{run.name}-a1") is not None:
        outcome.passed, outcome.problem = False, "the deleted Job's name came back"
    return outcome


def recreated(run: Run) -> Outcome:
    """The new object of the same name trains afresh: the deleted object's checkpoints
    (step 10, and the one its SIGTERM saved at step 15) are not its own."""
    run.runner.hold_at(HOLD)
    run.apply()
    run.held()
    run.cluster.kubectl("delete", "ftj", run.name, "--wait=false")
    run.release(after_sigterm=(0, 1))
    run.cluster.wait(lambda: not run.cluster.ftj(run.name), "the first object gone", 60)
    run.cluster.apply(run.manifest)  # the same name: a new object, the same output URI
    return run.judge(run.finish(), Expected(resumed_from=None))


def foreign_job(run: Run) -> Outcome:
    foreign = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {
        "name": f"{run.name}-a1-foreign", "namespace": "default",
        "labels": {"kubetune.dev/finetunejob": run.name}},
        "spec": {"template": {"spec": {"restartPolicy": "Never", "containers": [
            {"name": "app", "image": "busybox"}]}}}}
    run.cluster.apply(foreign)
    run.apply()
    outcome = run.judge(run.finish(), Expected())
    if outcome.passed and run.cluster.api.get(JOBS, "default", f"{run.name}-a1-foreign") is None:
        outcome.passed, outcome.problem = False, "the foreign Job was deleted"
    return outcome


def rank0_frozen(run: Run) -> Outcome:
    run.runner.hold_at(HOLD)
    run.apply(runPolicy={"stallTimeoutSeconds": STALL_TIMEOUT})
    step = run.held()
    run.runner.pause(run.pod(0))  # SIGSTOP: a hang, not a crash
    run.release()
    return run.judge(run.finish(), Expected(restarts=1, attempt=2, resumed_from=CRASHED,
                                            warnings=frozenset({"Stalled"})), step)


def permanent_exit(run: Run) -> Outcome:
    # A field the data does not have: every rank exits 2 (bad data); never retried.
    run.apply(dataset={"fields": {"text": "no_such_field"}})
    return run.judge(run.finish(), Expected(
        phase="Failed", reason="PermanentFailure",
        warnings=frozenset({"PermanentFailure"})))


def operator_killed(run: Run) -> Outcome:
    """SIGKILL the operator after each kind of write: the status, the children, a restart.
    The restart is counted exactly once, whichever write the last kill follows."""
    cluster = run.cluster
    assert cluster.operator is not None
    run.runner.hold_at(HOLD)
    run.apply()
    run.wait(lambda: cluster.status(run.name).get("phase"), "status written", 60)
    cluster.operator.kill()  # after the first status write (children maybe not created)
    cluster.operator.start()
    run.wait(lambda: cluster.api.get(JOBS, "default", f"{run.name}-a1"), "the Job", 60)
    cluster.operator.kill()  # after the Job's create
    cluster.operator.start()
    step = run.held()
    run.runner.crash(run.pod(1))
    run.release()
    run.wait(lambda: cluster.status(run.name).get("phase") == "Restarting", "Restarting", 120)
    cluster.operator.kill()  # after the restart was written, maybe before the Job's delete
    cluster.operator.start()
    return run.judge(run.finish(), Expected(restarts=1, attempt=2, resumed_from=CRASHED,
                                            warnings=frozenset({"RankFailed"})), step)


def kueue_preempted(run: Run) -> Outcome:
    """Kueue admits the queued gang, preempts it at step HOLD (suspends the Job: the Job
    controller deletes the pods, the ranks checkpoint on SIGTERM and exit 75), and admits it
    again: the same attempt resumes from that checkpoint (docs/operator.md, Kueue)."""
    cluster, kueue = run.cluster, KueueModel(run.cluster.api, quota=2)
    job = f"{run.name}-a1"
    run.runner.hold_at(HOLD)
    # The Job is created suspended in the queue; a preemption must not use up backoffLimit.
    run.apply({QUEUE_LABEL: "team-a"}, runPolicy={"backoffLimit": 0})
    run.wait(lambda: kueue.admit() == [job], "Kueue to admit the gang", 60)
    step = run.held()
    kueue.preempt(job)
    run.release(after_sigterm=(0, 1))
    run.wait(lambda: cluster.status(run.name).get("preemptions") == 1,
             "the preemption counted", 120)
    run.wait(lambda: not cluster.api.find("v1/pods", NAMESPACE, f"job-name={job}"),
             "the preempted pods gone", 120)
    exits = [run.runner.exit_codes.get(run.pod(rank)) for rank in (0, 1)]
    status = cluster.status(run.name)
    if cluster.api.find("v1/pods", NAMESPACE, f"job-name={job}"):
        return Outcome(False, problem="pods came back while the Job was suspended")
    if status.get("phase") != "Pending" or status.get("attempt") != 1:
        return Outcome(False, problem=f"while preempted: {status.get('phase')}, attempt "
                       f"{status.get('attempt')} (expected Pending, attempt 1)")
    run.wait(lambda: kueue.admit() == [job], "Kueue to admit the gang again", 60)
    outcome = run.judge(run.finish(), Expected(preemptions=1, resumed_from=HOLD,
                                               warnings=frozenset({"Preempted"})), step)
    problems = [f"ranks' exit codes on preemption: {exits}, expected [75, 75]"] \
        if exits != [75, 75] else []
    if cluster.api.get(JOBS, NAMESPACE, f"{run.name}-a2") is not None:
        problems.append("a second attempt's Job was created")
    if outcome.passed and problems:
        outcome.passed, outcome.problem = False, "; ".join(problems)
    return outcome


def queued_job(run: Run, kueue: KueueModel) -> str:
    """The FineTuneJob in Kueue's queue, its Job created and suspended (the Job controller's
    Suspended=True condition written)."""
    job = f"{run.name}-a1"

    def suspended() -> bool:
        kueue.webhook()
        conditions = ((run.cluster.api.get(JOBS, NAMESPACE, job) or {}).get("status") or {}).get(
            "conditions") or []
        return any(c["type"] == "Suspended" and c["status"] == "True" for c in conditions)
    run.wait(suspended, "the Job queued and suspended")
    return job


def saw_the_admission(run: Run) -> bool:
    """The operator reconciled the unsuspended Job before the Job controller did: its status
    says so, or (without the handling) it already restarted or failed the attempt."""
    status = run.cluster.status(run.name)
    running: dict[str, Any] = next(
        (c for c in status.get("conditions", []) if c["type"] == "Running"), {})
    return running.get("message") == UNSUSPENDED or status.get("attempt") != 1 \
        or status.get("phase") in ("Restarting", "Failed")


def admitted_after_a_long_queue_wait(run: Run) -> Outcome:
    """Queued longer than schedulingTimeoutSeconds, then admitted: the Job controller writes
    startTime only in the sync that creates the pods, so right after the admission the Job has
    none. The attempt must not be timed from its creation (a SchedulingTimeout, counted)."""
    cluster, kueue = run.cluster, KueueModel(run.cluster.api, quota=2)
    run.apply({QUEUE_LABEL: "team-a"},
              runPolicy={"backoffLimit": 0, "schedulingTimeoutSeconds": SCHEDULING_TIMEOUT})
    job = queued_job(run, kueue)
    run.wait(lambda: (age := seconds_since(cluster.status(run.name).get("attemptStartTime")))
             is not None and age > SCHEDULING_TIMEOUT + 1, "a queue wait past the timeout")
    run.runner.lag(job)  # the Job controller has not synced the admission yet
    assert kueue.admit() == [job]
    run.expect_failed = True  # without the handling the attempt fails right here
    run.wait(lambda: saw_the_admission(run), "the operator to see the admission")
    run.runner.catch_up(job)
    return run.judge(run.finish(), Expected())


def readmitted_while_old_pods_terminate(run: Run) -> Outcome:
    """Kueue frees the quota once the Job's status.active is 0, while the preempted pods are
    still checkpointing (Terminating): it admits the Job again before they are gone. Those
    pods are the suspension's, not failures: the same attempt resumes from step HOLD."""
    cluster, kueue = run.cluster, KueueModel(run.cluster.api, quota=2)
    run.runner.hold_at(HOLD)
    run.apply({QUEUE_LABEL: "team-a"}, runPolicy={"backoffLimit": 0})
    job = queued_job(run, kueue)
    assert kueue.admit() == [job]
    step = run.held()
    kueue.preempt(job)
    # The ranks got SIGTERM and stay held (Terminating); the Job counts them inactive.
    run.wait(lambda: all(r.endswith(" sigterm") for r in run.runner.held_ranks().values())
             and not (cluster.api.get(JOBS, NAMESPACE, job) or {}).get("status", {}).get(
                 "active"), "the preempted pods terminating, the Job's active count 0")
    run.runner.lag(job)
    assert kueue.admit() == [job]
    run.expect_failed = True
    run.wait(lambda: saw_the_admission(run), "the operator to see the re-admission")
    if len(cluster.api.find("v1/pods", NAMESPACE, f"job-name={job}")) != 2:
        return Outcome(False, problem="the old pods were gone before the re-admission was seen")
    run.release()
    run.runner.catch_up(job)
    return run.judge(run.finish(), Expected(preemptions=1, resumed_from=HOLD,
                                            warnings=frozenset({"Preempted"})), step)


def crash_reconciled_late(run: Run) -> Outcome:
    """A deterministic crash the operator sees late: by then the Job controller has set
    FailureTarget and is deleting the surviving rank (SIGTERM; held, so it stays
    Terminating). The crash explains the attempt, not the deletion: counted, so with
    backoffLimit 0 the job ends Failed (taken for a preemption, it would restart forever)."""
    cluster = run.cluster
    assert cluster.operator is not None
    run.runner.hold_at(HOLD)
    run.apply(runPolicy={"backoffLimit": 0})
    run.held()
    cluster.operator.kill()  # back only after the Job controller's teardown began
    run.runner.crash(run.pod(1))

    def tearing_down() -> bool:
        job = cluster.api.get(JOBS, NAMESPACE, f"{run.name}-a1") or {}
        return any(c["type"] == "FailureTarget" for c in job.get("status", {}).get(
            "conditions") or []) and run.runner.held_ranks().get(0, "").endswith(" sigterm")
    run.wait(tearing_down, "FailureTarget and the survivor's SIGTERM")
    cluster.operator.start()
    run.expect_failed = True
    run.wait(lambda: cluster.status(run.name).get("phase") in ("Failed", "Restarting"),
             "the operator's verdict")
    run.release()
    return run.judge(run.finish(), Expected(
        phase="Failed", reason="BackoffLimitExceeded",
        warnings=frozenset({"BackoffLimitExceeded"})))


def watch_expired_with_deletions(run: Run) -> Outcome:
    """The operator's watches break while attempt 1's pods terminate (an API server restart),
    the pods go in the gap and the history expires: the pod informer gets 410 Gone and lists
    again, and the list replaces its cache, so the deleted pods leave it (kopf's indexes kept
    them: they drop entries on DELETED events only) and the job does not wait for them:
    attempt 2 starts, with no force-delete of a pod that is already gone."""
    cluster, emulator = run.cluster, run.cluster.api.emulator
    run.runner.hold_at(HOLD)
    run.apply()
    step = run.held()
    run.runner.crash(run.pod(1))
    run.wait(lambda: cluster.status(run.name).get("attempt") == 2
             and run.runner.held_ranks().get(0, "").endswith(" sigterm"),
             "the restart, rank 0 terminating")
    emulator.partition_watches()
    run.release()
    run.wait(lambda: not cluster.api.find("v1/pods", NAMESPACE, f"job-name={run.name}-a1"),
             "attempt 1's pods gone in the gap")
    emulator.compact()
    emulator.heal_watches()
    return run.judge(run.finish(), Expected(
        restarts=1, attempt=2, resumed_from=CRASHED,
        warnings=frozenset({"RankFailed"})), step)


def seconds_since(stamp: str | None) -> float | None:
    if not stamp:
        return None
    moment = datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    return (datetime.datetime.now(datetime.UTC) - moment).total_seconds()


SCENARIOS: list[tuple[str, int, Callable[[Run], Outcome]]] = [
    ("rank killed mid-run", 3, rank_killed),
    ("node lost (Ready=False, taint eviction, stuck Terminating)", 1, node_lost),
    ("eviction", 1, evicted),
    ("current Job deleted by a user", 1, job_deleted),
    ("delete + re-create with the same name", 1, recreated),
    ("a foreign labelled Job", 1, foreign_job),
    ("rank 0 frozen (SIGSTOP), watchdog on", 1, rank0_frozen),
    ("permanent exit code (bad data)", 1, permanent_exit),
    ("operator SIGKILLed after each kind of write", 1, operator_killed),
    ("Kueue preemption and re-admission", 1, kueue_preempted),
    ("Kueue admission after a queue wait past the scheduling timeout", 1,
     admitted_after_a_long_queue_wait),
    ("Kueue re-admission before the old pods are gone", 1, readmitted_while_old_pods_terminate),
    ("a deterministic crash under a late reconcile", 1, crash_reconciled_late),
    ("watch expiry with deletions in the gap", 1, watch_expired_with_deletions),
]
TITLES = {title for title, _, _ in SCENARIOS}


def choose(only: list[str] | None) -> list[tuple[str, int, Callable[[Run], Outcome]]]:
    """The scenarios named: a whole title names that row alone ("eviction" is also a word of
    the node-loss row's title), anything else every row whose title holds it."""
    if not only:
        return list(SCENARIOS)
    return [s for s in SCENARIOS
            if s[0] in only or any(o in s[0] for o in only if o not in TITLES)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", help="scenario names (substrings) to run")
    parser.add_argument("--runs", type=int, help="at most this many runs of each scenario")
    parser.add_argument("--list", action="store_true")
    args = parser.parse_args(argv)
    chosen = choose(args.only)
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
            runs = min(runs, args.runs or runs)
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
