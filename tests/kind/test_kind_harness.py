"""The kind harness's own logic, without Docker: image loading falls back to `docker save`
archives, a Failed job ends the wait at once, logs are collected when set-up fails, the test's
timeout covers set-up plus the job, and a required run fails instead of skipping."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from support import kind_cluster
from support.kind_cluster import (
    JOB_TIMEOUT,
    STEP_TIMEOUTS,
    TEST_TIMEOUT,
    CommandFailed,
    JobFailed,
    Kind,
)

ROOT = Path(__file__).resolve().parents[2]
WORKFLOW = yaml.safe_load((ROOT / ".github" / "workflows" / "e2e-kind.yaml").read_text())


class FakeCommands:
    """Records commands; fails those whose words contain a key of `fail`."""

    def __init__(self, fail: tuple[str, ...] = (), answers: list[str] | None = None) -> None:
        self.calls: list[tuple[str, ...]] = []
        self.fail, self.answers = fail, list(answers or [])

    def __call__(self, *args: str, timeout: float = 600) -> str:
        self.calls.append(args)
        line = " ".join(args)
        if any(word in line for word in self.fail):
            raise CommandFailed(f"{line}: failed")
        if args[0] == "df":
            return "Filesystem Size Used Avail\n/ 72G 40G 32G\n"
        return self.answers.pop(0) if self.answers and "get" in args else ""


def test_kind_load_falls_back_to_docker_save_archives(tmp_path: Path) -> None:
    commands = FakeCommands(fail=("load docker-image",))
    Kind(tmp_path, commands).load_images("a:1", "b/c:2")
    words = [" ".join(c) for c in commands.calls]
    assert words[0].startswith("kind load docker-image a:1 b/c:2")
    assert any(w.startswith("docker save -o") and w.endswith(" a:1") for w in words)
    archives = [c[3] for c in commands.calls if c[:3] == ("kind", "load", "image-archive")]
    assert len(archives) == 2 and all(not Path(a).exists() for a in archives)


def test_kind_load_without_trouble_loads_directly(tmp_path: Path) -> None:
    commands = FakeCommands()
    Kind(tmp_path, commands).load_images("a:1")
    assert [c[:3] for c in commands.calls] == [("kind", "load", "docker-image")]


def status(phase: str, reason: str = "") -> str:
    return json.dumps({"status": {"phase": phase, "conditions": [{"type": phase,
                                                                   "reason": reason}]}})


def test_a_failed_job_stops_the_wait_at_once(tmp_path: Path) -> None:
    commands = FakeCommands(answers=[status("Pending"), status("Running"),
                                     status("Failed", "BackoffLimitExceeded")])
    slept: list[float] = []
    with pytest.raises(JobFailed, match="BackoffLimitExceeded"):
        Kind(tmp_path, commands).wait_for_phase("j", sleep=slept.append)
    assert slept == [5.0, 5.0]  # three polls, not the whole timeout


def test_the_wait_returns_on_success_and_times_out_otherwise(tmp_path: Path) -> None:
    kind = Kind(tmp_path, FakeCommands(answers=[status("Running"), status("Succeeded")]))
    assert kind.wait_for_phase("j", sleep=lambda s: None)["phase"] == "Succeeded"
    now = [0.0]

    def advance(seconds: float) -> None:
        now[0] += seconds

    stuck = Kind(tmp_path, FakeCommands(answers=[status("Running")] * 100))
    with pytest.raises(AssertionError, match="not Succeeded after 12s"):
        stuck.wait_for_phase("j", timeout=12, clock=lambda: now[0], sleep=advance)


def test_setup_failure_collects_logs_then_raises(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KIND_E2E_LOGS", str(tmp_path / "logs"))
    commands = FakeCommands(fail=("helm install",))
    kind = Kind(tmp_path, commands)
    with pytest.raises(CommandFailed, match="helm"):
        kind.create()
    logs = {p.name for p in (tmp_path / "logs").iterdir()}
    assert {"why.txt", "helm-status.txt", "describe-pods.txt", "operator.log", "ranks.log",
            "events.txt", "disk.txt"} <= logs
    assert "set-up failed" in (tmp_path / "logs" / "why.txt").read_text()
    assert "Avail" in (tmp_path / "logs" / "disk.txt").read_text()
    assert any(c[:3] == ("kind", "export", "logs") for c in commands.calls)


def test_the_tests_own_timeout_covers_setup_and_the_job() -> None:
    assert sum(STEP_TIMEOUTS.values()) + JOB_TIMEOUT < TEST_TIMEOUT
    source = (ROOT / "tests" / "kind" / "test_kind_e2e.py").read_text()
    assert "pytest.mark.timeout(TEST_TIMEOUT)" in source
    job = WORKFLOW["jobs"]["kind"]
    assert job["timeout-minutes"] * 60 > TEST_TIMEOUT  # the runner outlives the test


def test_required_run_fails_without_tools(tmp_path: Path) -> None:
    """KIND_E2E_REQUIRED=1 with no kind on PATH: the kind test fails, it does not skip."""
    env = {"PATH": "/nonexistent", "KIND_E2E_REQUIRED": "1", "CI": "",
           "PYTHONPATH": ":".join([str(ROOT / "tests"), *sys.path])}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-m", "kind",
         str(ROOT / "tests" / "kind" / "test_kind_e2e.py")],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert result.returncode == 1, result.stdout[-3000:]
    assert "KIND_E2E_REQUIRED is set but kind is not installed" in result.stdout
    assert kind_cluster.REQUIRED_ENV == "KIND_E2E_REQUIRED"


def test_workflow_requires_the_test_frees_disk_and_keeps_logs() -> None:
    job = WORKFLOW["jobs"]["kind"]
    assert job["env"]["KIND_E2E_REQUIRED"] == "1"
    runs = "\n".join(step.get("run", "") for step in job["steps"])
    assert "df -h" in runs and "rm -rf" in runs
    upload = next(s for s in job["steps"] if s.get("uses", "").startswith(
        "actions/upload-artifact"))
    assert upload["if"] == "failure()" and upload["with"]["path"] == "kind-e2e-logs"
