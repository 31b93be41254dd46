"""Run the real operator (`python -m kubetune_operator`) against the emulator, and play the
controllers the emulator lacks (the Job controller and kubelet) in tests."""

from __future__ import annotations

import http.server
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from support.kube_emulator import EmulatorThread, now_stamp
from support.net import free_port

T = TypeVar("T")

FTJ = "kubetune.dev/v1alpha1/finetunejobs"
JOBS = "batch/v1/jobs"
PODS = "v1/pods"
COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"
EVENTS = "v1/events"
QUOTAS = "v1/resourcequotas"
PRIORITY_CLASSES = "scheduling.k8s.io/v1/priorityclasses"



def wait_for(probe: Callable[[], T | None], timeout: float = 15.0, interval: float = 0.05,
             what: str = "condition") -> T:
    """Poll until probe() returns something truthy; fail with what it last returned."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")


class OperatorProcess:
    """The operator as a subprocess; logs go to `log_path` (printed by tests on failure)."""

    def __init__(self, api: EmulatorThread, workdir: Path, token: str = "operator",
                 **env: str) -> None:
        self.token = token
        self.kubeconfig = api.write_kubeconfig(workdir / "kubeconfig", token=token)
        self.log_path = workdir / "operator.log"
        self.metrics_port = free_port()
        self.env = {**os.environ, "KUBECONFIG": str(self.kubeconfig),
                    "KUBETUNE_HEALTH_PORT": "0",
                    "KUBETUNE_OPERATOR_METRICS_PORT": str(self.metrics_port),
                    "KUBETUNE_PROGRESS_INTERVAL": "1", **env}
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> OperatorProcess:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "kubetune_operator"], env=self.env,
                stdout=log, stderr=subprocess.STDOUT)
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def kill(self) -> None:
        """A crash: no cleanup, no goodbye."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()
        self.process = None

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def __enter__(self) -> OperatorProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --- the Job controller and kubelet, played by tests ---------------------------------------

def start_job_pods(api: EmulatorThread, job: dict[str, Any], phase: str = "Running",
                   ip: str = "127.0.0.1") -> list[dict[str, Any]]:
    """Create the missing pod of each completion index of an Indexed Job, as the Job
    controller would, and give them `phase` as a kubelet would. A pod the API server's
    admission refuses (a ResourceQuota's pod count, a missing PriorityClass) is not created:
    the Job controller records a FailedCreate event on the Job instead."""
    pods = []
    for index in range(job["spec"]["completions"]):
        pod = job_pod(job, index)
        meta = pod["metadata"]
        if api.get(PODS, meta["namespace"], meta["name"]) is not None:
            continue
        refusal = admission_refusal(api, pod)
        if refusal is not None:
            record_failed_create(api, job, refusal)
            continue
        api.create(PODS, pod)
        pods.append(set_pod_state(api, meta["namespace"], meta["name"], phase, ip=ip))
    return pods


def admission_refusal(api: EmulatorThread, pod: dict[str, Any]) -> str | None:
    """What the API server's admission answers for creating `pod` (its Priority and
    ResourceQuota plugins, pod count only), as the Job controller quotes it; None if allowed."""
    meta = pod["metadata"]
    forbidden = f'pods "{meta["name"]}" is forbidden'
    priority = pod["spec"].get("priorityClassName")
    if priority and api.get(PRIORITY_CLASSES, None, priority) is None:
        return f"{forbidden}: no PriorityClass with name {priority} was found"
    used = len([p for p in api.find(PODS, meta["namespace"])
                if p.get("status", {}).get("phase") not in ("Succeeded", "Failed")])
    for quota in api.find(QUOTAS, meta["namespace"]):
        limit = int(quota["spec"].get("hard", {}).get("pods", used + 1))
        if used + 1 > limit:
            return (f"{forbidden}: exceeded quota: {quota['metadata']['name']}, requested: "
                    f"pods=1, used: pods={used}, limited: pods={limit}")
    return None


def record_failed_create(api: EmulatorThread, job: dict[str, Any], refusal: str) -> None:
    """The Job controller's event for a pod it could not create (reason FailedCreate)."""
    meta = job["metadata"]
    now = now_stamp()
    api.create(EVENTS, {"apiVersion": "v1", "kind": "Event", "metadata": {
        "generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
        "involvedObject": {"apiVersion": "batch/v1", "kind": "Job", "name": meta["name"],
                           "namespace": meta["namespace"], "uid": meta["uid"]},
        "reason": "FailedCreate", "type": "Warning", "message": f"Error creating: {refusal}",
        "source": {"component": "job-controller"}, "count": 1, "firstTimestamp": now,
        "lastTimestamp": now})


def job_pod(job: dict[str, Any], index: int) -> dict[str, Any]:
    """The pod the Job controller creates for completion index `index` of an Indexed Job."""
    meta, template = job["metadata"], job["spec"]["template"]
    name = f"{meta['name']}-{index}"
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {
        "name": name, "namespace": meta["namespace"],
        "labels": {**template["metadata"].get("labels", {}), "job-name": meta["name"],
                   COMPLETION_INDEX: str(index)},
        "annotations": {**template["metadata"].get("annotations", {}),
                        COMPLETION_INDEX: str(index)},
        "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": meta["name"],
                             "uid": meta["uid"], "controller": True,
                             "blockOwnerDeletion": True}]},
        "spec": {**template["spec"], "hostname": name}}


def set_pod_state(api: EmulatorThread, namespace: str, name: str, phase: str, *,
                  exit_code: int | None = None, reason: str | None = None,
                  message: str | None = None, ip: str = "127.0.0.1",
                  waiting: str | None = None, pod_reason: str | None = None,
                  conditions: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Write a pod's status the way a kubelet reports it."""
    state: dict[str, Any]
    if waiting:
        state = {"waiting": {"reason": waiting, "message": message or waiting}}
    elif exit_code is not None:
        state = {"terminated": {"exitCode": exit_code, "reason": reason or (
            "Completed" if exit_code == 0 else "Error"), "message": message or ""}}
    else:
        state = {"running": {"startedAt": "2026-01-01T00:00:00Z"}}
    status: dict[str, Any] = {"phase": phase, "podIP": ip, "containerStatuses": [
        {"name": "trainer", "state": state, "ready": phase == "Running", "restartCount": 0}]}
    if pod_reason:
        status["reason"] = pod_reason
    if conditions:
        status["conditions"] = conditions
    return api.patch(PODS, namespace, name, {"status": status}, subresource="status")


class OperatorCluster:
    """The emulated API plus the operator process that a test drives in one namespace. Its
    waits poll for a state and, when one times out, show the end of the operator's log."""

    def __init__(self, api: EmulatorThread, operator: OperatorProcess, *,
                 namespace: str = "default", timeout: float = 60.0) -> None:
        # The timeout only bounds a failing wait: generous, since the operator, the emulator
        # and the tests share two busy cores.
        self.api, self.operator = api, operator
        self.namespace, self.timeout = namespace, timeout

    def wait(self, probe: Callable[[], T | None], what: str, timeout: float | None = None) -> T:
        try:
            return wait_for(probe, timeout or self.timeout, what=what)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- operator log ---\n"
                                 f"{self.operator.logs()[-5000:]}") from None

    def ftj(self, name: str) -> dict[str, Any] | None:
        return self.api.get(FTJ, self.namespace, name)

    def status(self, name: str) -> dict[str, Any]:
        return (self.ftj(name) or {}).get("status", {})

    def wait_phase(self, name: str, phase: str, timeout: float | None = None) -> dict[str, Any]:
        return self.wait(lambda: self.status(name).get("phase") == phase and self.status(name),
                         f"{name} phase {phase} (now {self.status(name).get('phase')})",
                         timeout)

    def job(self, name: str, timeout: float | None = None) -> dict[str, Any]:
        return self.wait(lambda: self.api.get(JOBS, self.namespace, name), f"Job {name}",
                         timeout)

    def owned(self, resource: str, base: str) -> list[dict[str, Any]]:
        return self.api.find(resource, self.namespace,
                             labels=f"kubetune.dev/finetunejob={base}")

    def events(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.api.find(EVENTS, self.namespace)
                if e["involvedObject"]["name"] == name]


@contextmanager
def rank0_metrics(text: str) -> Iterator[int]:
    """A stand-in for rank 0's /metrics on loopback that always answers `text`; yields its
    port (a job's spec.metrics.port makes the operator scrape it)."""
    body = text.encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_port
    finally:
        server.shutdown()
        server.server_close()
