"""A kind cluster with the images built from this tree, the Helm chart and MinIO, for
tests/kind. Every step has its own timeout (the test's own pytest timeout is their sum plus
the job's), logs are collected on any failure including set-up, and a job that fails stops the
wait at once. The command runner is a parameter so tests/kind/test_kind_harness.py checks the
logic without Docker.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from support.net import free_port
from support.tools import ROOT, tool_path

TAG = "e2e"
OPERATOR_IMAGE = f"ghcr.io/kubetune/operator:{TAG}"
TRAINER_IMAGE = f"ghcr.io/kubetune/trainer:{TAG}-cpu"
MINIO_MANIFEST = ROOT / "tests" / "kind" / "minio.yaml"
REQUIRED_ENV = "KIND_E2E_REQUIRED"  # set by the workflow: missing tools fail, never skip

# Seconds for each set-up step, on a fresh 2-core runner (image builds dominate).
STEP_TIMEOUTS = {"create": 300, "build": 1500, "load": 600, "helm": 420, "minio": 320}
JOB_TIMEOUT = 1200  # the tiny job: pods pulling nothing, importing the stack, 40 steps
TEST_TIMEOUT = sum(STEP_TIMEOUTS.values()) + JOB_TIMEOUT + 300  # + logs, download, teardown

Runner = Callable[..., str]


class CommandFailed(AssertionError):
    pass


def run(*args: str, timeout: float = 600) -> str:
    result = subprocess.run(args, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if result.returncode != 0:
        raise CommandFailed(f"{' '.join(args)} (exit {result.returncode}):\n"
                            f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result.stdout


def missing_tools() -> str | None:
    if shutil.which("kind") is None:
        return "kind is not installed (https://kind.sigs.k8s.io)"
    if shutil.which("docker") is None or subprocess.run(
            ["docker", "info"], capture_output=True).returncode != 0:
        return "no Docker engine (`docker info` failed)"
    for tool in ("helm", "kubectl"):
        if tool_path(tool) is None:
            return f"{tool} is not installed (make {tool})"
    return None


def required() -> bool:
    return os.environ.get(REQUIRED_ENV, "").lower() in ("1", "true", "yes")


class JobFailed(AssertionError):
    pass


class Kind:
    def __init__(self, workdir: Path, runner: Runner = run) -> None:
        self.name = f"kubetune-e2e-{uuid.uuid4().hex[:6]}"
        self.workdir = workdir
        self.kubeconfig = workdir / "kubeconfig"
        self.logs = Path(os.environ.get("KIND_E2E_LOGS") or workdir / "logs")
        self.run = runner
        self.helm = tool_path("helm") or "helm"
        self.kubectl_bin = tool_path("kubectl") or "kubectl"

    def kubectl(self, *args: str, timeout: float = 120) -> str:
        return self.run(self.kubectl_bin, "--kubeconfig", str(self.kubeconfig), *args,
                        timeout=timeout)

    def create(self) -> None:
        """Cluster, images, chart, MinIO; on any failure the logs are collected first."""
        try:
            self.run("kind", "create", "cluster", "--name", self.name, "--kubeconfig",
                     str(self.kubeconfig), "--wait", "180s", timeout=STEP_TIMEOUTS["create"])
            for dockerfile, image in (("operator/Dockerfile", OPERATOR_IMAGE),
                                      ("trainer_image/Dockerfile.cpu", TRAINER_IMAGE)):
                self.run("docker", "build", "-f", dockerfile, "-t", image, ".",
                         timeout=STEP_TIMEOUTS["build"])
            self.load_images(OPERATOR_IMAGE, TRAINER_IMAGE)
            self.run(self.helm, "install", "kubetune", "charts/kubetune", "--kubeconfig",
                     str(self.kubeconfig), "--wait", "--timeout", "5m",
                     "--set", f"image.tag={TAG}", "--set", f"trainer.image.tag={TAG}-cpu",
                     "--set", "operator.progressInterval=2", timeout=STEP_TIMEOUTS["helm"])
            self.kubectl("apply", "-f", str(MINIO_MANIFEST))
            self.kubectl("rollout", "status", "deployment/minio", "--timeout=300s",
                         timeout=STEP_TIMEOUTS["minio"])
        except BaseException:
            self.collect_logs("set-up failed")
            raise

    def load_images(self, *images: str) -> None:
        """`kind load docker-image`; where that fails (it is known to with some Docker
        storage drivers and containerd image stores), `docker save` archives loaded with
        `kind load image-archive`."""
        try:
            self.run("kind", "load", "docker-image", *images, "--name", self.name,
                     timeout=STEP_TIMEOUTS["load"])
            return
        except CommandFailed as exc:
            print(f"kind load docker-image failed; loading docker save archives:\n{exc}")
        for image in images:
            archive = self.workdir / (image.replace("/", "_").replace(":", "_") + ".tar")
            self.run("docker", "save", "-o", str(archive), image, timeout=STEP_TIMEOUTS["load"])
            try:
                self.run("kind", "load", "image-archive", str(archive), "--name", self.name,
                         timeout=STEP_TIMEOUTS["load"])
            finally:
                archive.unlink(missing_ok=True)

    def wait_for_phase(self, job: str, phase: str = "Succeeded", timeout: float = JOB_TIMEOUT,
                       interval: float = 5.0, clock: Callable[[], float] = time.monotonic,
                       sleep: Callable[[float], None] = time.sleep) -> dict[str, object]:
        """Poll the FineTuneJob's status; a Failed job stops the wait at once."""
        deadline = clock() + timeout
        status: dict[str, object] = {}
        while clock() < deadline:
            body = json.loads(self.kubectl("get", f"ftj/{job}", "-o", "json"))
            status = body.get("status") or {}
            if status.get("phase") == phase:
                return status
            if status.get("phase") == "Failed" and phase != "Failed":
                raise JobFailed(f"ftj/{job} Failed: {json.dumps(status.get('conditions'))}")
            sleep(interval)
        raise AssertionError(f"ftj/{job} not {phase} after {timeout}s; status: {status}")

    def collect_logs(self, why: str, job: str = "tiny-lora") -> None:
        """Whatever can be had: helm status, describe, operator and rank logs, events, disk."""
        self.logs.mkdir(parents=True, exist_ok=True)
        (self.logs / "why.txt").write_text(why + "\n")
        commands: dict[str, list[str]] = {
            "helm-status.txt": [self.helm, "status", "kubetune", "--kubeconfig",
                                str(self.kubeconfig)],
            "finetunejob.txt": [self.kubectl_bin, "--kubeconfig", str(self.kubeconfig),
                                "describe", "ftj"],
            "describe-pods.txt": [self.kubectl_bin, "--kubeconfig", str(self.kubeconfig),
                                  "describe", "pods", "-A"],
            "pods.txt": [self.kubectl_bin, "--kubeconfig", str(self.kubeconfig), "get", "pods",
                         "-A", "-o", "wide"],
            "events.txt": [self.kubectl_bin, "--kubeconfig", str(self.kubeconfig), "get",
                           "events", "-A", "--sort-by=.lastTimestamp"],
            "operator.log": [self.kubectl_bin, "--kubeconfig", str(self.kubeconfig), "logs",
                             "-l", "app.kubernetes.io/name=kubetune", "--all-containers",
                             "--tail=-1", "--prefix"],
            "ranks.log": [self.kubectl_bin, "--kubeconfig", str(self.kubeconfig), "logs", "-l",
                          f"kubetune.dev/finetunejob={job}", "--all-containers", "--tail=-1",
                          "--prefix"],
            "disk.txt": ["df", "-h"],
        }
        for file, args in commands.items():
            try:
                text = self.run(*args, timeout=120)
            except (AssertionError, subprocess.TimeoutExpired, OSError) as exc:
                text = f"(failed: {exc})"
            (self.logs / file).write_text(text)
        with contextlib.suppress(AssertionError, subprocess.TimeoutExpired, OSError):
            self.run("kind", "export", "logs", str(self.logs / "kind"), "--name", self.name,
                     timeout=300)

    def delete(self) -> None:
        with contextlib.suppress(AssertionError, subprocess.TimeoutExpired, OSError):
            self.run("kind", "delete", "cluster", "--name", self.name, timeout=300)

    @contextlib.contextmanager
    def port_forward(self, service: str, port: int) -> Iterator[str]:
        local = free_port()
        proc = subprocess.Popen([self.kubectl_bin, "--kubeconfig", str(self.kubeconfig),
                                 "port-forward", service, f"{local}:{port}"],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            assert proc.stdout is not None and "Forwarding" in proc.stdout.readline()
            yield f"http://127.0.0.1:{local}"
        finally:
            proc.terminate()
            proc.wait(10)
