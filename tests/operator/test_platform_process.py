"""Shared-cluster behaviour of the real operator process against the emulated API server:
admin policy, the Hub token never leaking, and rank 0 endpoints that misbehave.

Tests play Kueue (unsuspending a queued Job), the Job controller and kubelet
(support/operator_process.py)."""

from __future__ import annotations

import base64
import json
import select
import socketserver
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune_api import contract
from support.canaries import CANARIES
from support.kube_emulator import EmulatorThread
from support.operator_process import (
    FTJ,
    JOBS,
    PODS,
    OperatorCluster,
    OperatorProcess,
    set_pod_state,
    start_job_pods,
)

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
NS = "default"
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
POLICY = {"allowedImagePrefixes": ["registry.corp/ml/"], "allowedTolerations": [],
          "allowedSchedulers": [], "defaultQueue": "shared", "maxGpusPerJob": 8,
          "allowedPriorityClasses": [], "allowedQueues": ["shared", "team-a"],
          "allowedKueuePriorityClasses": ["batch-low"]}
PRIORITY_LABEL = "kueue.x-k8s.io/priority-class"
# Shaped like a real Hub token, so a leak could not hide behind an unusual format.
CANARY = "hf_" + "KubetuneCanary0123456789abcdefXYZ"
CHILDREN = ("v1/configmaps", "v1/services", "networking.k8s.io/v1/networkpolicies", JOBS)


def finetunejob(name: str, labels: dict[str, str] | None = None,
                **spec_overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = yaml.safe_load((ROOT / "examples" / "tiny-lora.yaml").read_text())
    body["metadata"] = {"name": name, "namespace": NS, "labels": labels or {}}
    for key, value in spec_overrides.items():
        body["spec"][key] = {**body["spec"].get(key, {}), **value}
    return body


class Cluster(OperatorCluster):
    def admit_and_run(self, name: str) -> list[dict[str, Any]]:
        """Kueue admits the queued gang; the Job controller starts its pods."""
        job = self.job(f"{name}-a1")
        self.api.patch(JOBS, NS, f"{name}-a1", {"spec": {"suspend": False}})
        pods = start_job_pods(self.api, job)
        self.wait_phase(name, "Running")
        return pods


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with EmulatorThread() as api:
        api.emulator.declare(FTJ, "FineTuneJob", shortnames=["ftj"])
        operator = OperatorProcess(api, tmp_path_factory.mktemp("operator"),
                                   KUBETUNE_POLICY=json.dumps(POLICY),
                                   KUBETUNE_SCRAPE_TIMEOUT="1")
        with operator:
            yield Cluster(api, operator)


# --- admin policy ---------------------------------------------------------------------------

def test_a_violating_job_fails_before_any_child_exists(cluster: Cluster) -> None:
    cluster.api.create(FTJ, finetunejob(
        "rogue", resources={"nodes": 2, "gpusPerNode": 8},
        pod={"image": "docker.io/someone/miner:latest", "schedulerName": "my-scheduler",
             "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}]}))
    status = cluster.wait_phase("rogue", "Failed")
    [failed] = [c for c in status["conditions"] if c["type"] == "Failed"]
    assert failed["reason"] == "PolicyViolation"
    for words in ("spec.pod.image: docker.io/someone/miner:latest is not allowed "
                  "(allowedImagePrefixes: registry.corp/ml/)",
                  "spec.pod.schedulerName: my-scheduler is not allowed (allowedSchedulers: none)",
                  "spec.pod.tolerations[0]", "(allowedTolerations: none)",
                  "2 nodes x 8 GPUs = 16 GPUs (maxGpusPerJob: 8)"):
        assert words in failed["message"], failed["message"]
    cluster.wait(lambda: any(e["reason"] == "PolicyViolation" for e in cluster.events("rogue")),
                 "PolicyViolation event")
    # kopf records the permanent failure in its annotations once; after that nothing may
    # touch the job again (no retries), over more than two timer intervals.
    version = settled_version(cluster, "rogue")
    time.sleep(2.5)
    assert cluster.api.get(FTJ, NS, "rogue")["metadata"]["resourceVersion"] == version
    for resource in CHILDREN:
        assert cluster.owned(resource, "rogue") == [], resource


def settled_version(cluster: Cluster, name: str, quiet: float = 1.0) -> str:
    """The resourceVersion once it has not changed for `quiet` seconds."""
    def probe() -> str | None:
        before = cluster.api.get(FTJ, NS, name)["metadata"]["resourceVersion"]
        time.sleep(quiet)
        after = cluster.api.get(FTJ, NS, name)["metadata"]["resourceVersion"]
        return str(after) if after == before else None
    return str(cluster.wait(probe, f"{name} settled"))


def test_a_job_without_a_queue_gets_the_default_one(cluster: Cluster) -> None:
    cluster.api.create(FTJ, finetunejob("unqueued", pod={"image": "registry.corp/ml/t:1"}))
    job = cluster.job("unqueued-a1")
    assert job["metadata"]["labels"][QUEUE_LABEL] == "shared"
    assert job["spec"]["suspend"] is True  # Kueue admits it, not the operator
    cluster.wait(lambda: any(c.get("reason") == "Queued"
                             for c in cluster.status("unqueued").get("conditions", [])),
                 "Queued condition")
    own = finetunejob("own-queue", labels={QUEUE_LABEL: "team-a"})
    cluster.api.create(FTJ, own)
    assert cluster.job("own-queue-a1")["metadata"]["labels"][QUEUE_LABEL] == "team-a"


def fail_rank0(cluster: Cluster, name: str) -> None:
    set_pod_state(cluster.api, NS, f"{name}-a1-0", "Failed", exit_code=1)


def test_a_later_attempt_is_built_from_the_finetunejob_not_its_configmap(
        cluster: Cluster) -> None:
    """The ConfigMap is output: a tenant with `edit` who rewrites it gets nothing from it."""
    cluster.api.create(FTJ, finetunejob("tamper", labels={QUEUE_LABEL: "team-a"},
                                        pod={"image": "registry.corp/ml/t:1"}))
    cluster.admit_and_run("tamper")
    config = cluster.api.get("v1/configmaps", NS, "tamper-config")
    edited = yaml.safe_load(config["data"][contract.CONFIG_FILE])
    edited["spec"]["pod"].update(image="docker.io/attacker/miner",
                                 priorityClassName="system-cluster-critical",
                                 schedulerName="my-scheduler",
                                 tolerations=[{"operator": "Exists"}])
    edited["spec"]["resources"]["gpusPerNode"] = 64
    cluster.api.patch("v1/configmaps", NS, "tamper-config",
                      {"data": {contract.CONFIG_FILE: yaml.safe_dump(edited)}})
    fail_rank0(cluster, "tamper")
    pod = cluster.job("tamper-a2")["spec"]["template"]["spec"]
    [trainer] = [c for c in pod["containers"] if c["name"] == "trainer"]
    assert trainer["image"] == "registry.corp/ml/t:1"
    assert not {"priorityClassName", "schedulerName", "tolerations"} & set(pod)
    assert "64" not in json.dumps(trainer["resources"])
    assert cluster.status("tamper")["admittedSpecHash"].startswith("sha256:")


def test_a_relabelled_job_is_rechecked_before_its_next_attempt(cluster: Cluster) -> None:
    """Job rights only: relabel to a queue the admin never allowed, then restart."""
    cluster.api.create(FTJ, finetunejob("relabel", labels={QUEUE_LABEL: "team-a"},
                                        pod={"image": "registry.corp/ml/t:1"}))
    cluster.admit_and_run("relabel")
    cluster.api.patch(FTJ, NS, "relabel", {"metadata": {"labels": {
        QUEUE_LABEL: "vip", PRIORITY_LABEL: "prod-critical"}}})
    fail_rank0(cluster, "relabel")
    status = cluster.wait_phase("relabel", "Failed")
    [failed] = [c for c in status["conditions"] if c["type"] == "Failed"]
    assert failed["reason"] == "PolicyViolation"
    assert f"metadata.labels[{QUEUE_LABEL}]: vip is not allowed (allowedQueues: shared, " \
        "team-a)" in failed["message"], failed["message"]
    assert f"metadata.labels[{PRIORITY_LABEL}]: prod-critical is not allowed " \
        "(allowedKueuePriorityClasses: batch-low)" in failed["message"]
    assert cluster.api.get(JOBS, NS, "relabel-a2") is None
    cluster.wait(lambda: cluster.owned(JOBS, "relabel") == [], "the old attempt stopped")


# --- the Hub token -------------------------------------------------------------------------

def test_the_hub_token_reaches_only_the_trainer(cluster: Cluster) -> None:
    cluster.api.create("v1/secrets", {
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "hf", "namespace": NS},
        "data": {"HF_TOKEN": base64.b64encode(CANARY.encode()).decode()}})
    cluster.api.create(FTJ, finetunejob("gated", model={"tokenSecret": {"name": "hf"}}))
    [pod] = cluster.admit_and_run("gated")
    # A rank dies printing its environment: the log tail reaches status and events.
    others = "\n".join(text for text, _ in CANARIES.values())
    set_pod_state(cluster.api, NS, pod["metadata"]["name"], "Failed", exit_code=1,
                  message=f"Traceback ...\nenviron={{'HF_TOKEN': '{CANARY}'}}\n"
                          f"huggingface_hub: 401 for token {CANARY}\n{others}\n"
                          "RuntimeError: boom")
    cluster.wait(lambda: cluster.status("gated").get("restarts", 0) >= 1, "a restart")
    cluster.wait(lambda: any("boom" in e.get("message", "") for e in cluster.events("gated")),
                 "the failure's event")
    # The pods reference the key by name, as a file for the Hub client.
    template = cluster.job("gated-a2")["spec"]["template"]["spec"]
    volume = next(v for v in template["volumes"] if v["name"] == "hf-token")
    assert volume["secret"]["secretName"] == "hf"
    env = {e["name"]: e for e in template["containers"][0]["env"]}
    assert env["HF_TOKEN_PATH"]["value"] == f"{contract.HF_TOKEN_DIR}/HF_TOKEN"
    # Nowhere else: every object of the cluster but the Secret itself, and the operator log.
    secrets = [CANARY, *(secret for _, secret in CANARIES.values())]
    leaks = [f"{kind} {obj['metadata'].get('name')}: {secret}"
             for kind, objects in all_objects(cluster.api).items() for obj in objects
             for secret in secrets
             if kind != "v1/secrets" and secret in json.dumps(obj)]
    failed_pods = [p["metadata"]["name"] for p in cluster.api.find(PODS, NS)
                   if any(secret in json.dumps(p) for secret in secrets)]
    # The pod's own termination message holds the log tail (kubelet's copy); the operator
    # must not spread it further.
    assert [leak for leak in leaks if not leak.startswith(PODS)] == [], leaks
    assert set(failed_pods) <= {pod["metadata"]["name"]}
    logs, metrics = cluster.operator.logs(), operator_metrics(cluster)
    assert [s for s in secrets if s in logs or s in metrics] == []
    failure = next(e["message"] for e in cluster.events("gated") if "boom" in e["message"])
    assert "***" in failure, failure  # what was masked, visibly


def operator_metrics(cluster: Cluster) -> str:
    url = f"http://127.0.0.1:{cluster.operator.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as answer:
        return str(answer.read().decode())


def all_objects(api: EmulatorThread) -> dict[str, list[dict[str, Any]]]:
    kinds = ("v1/configmaps", "v1/services", "v1/events", PODS, JOBS, FTJ,
             "networking.k8s.io/v1/networkpolicies", "v1/secrets")
    return {kind: api.find(kind, NS) for kind in kinds}


# --- rank 0 endpoints that misbehave --------------------------------------------------------

class Hostile(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, behaviour: str) -> None:
        self.behaviour, self.sent, self.scrapes, self.hung_up = behaviour, 0, 0, 0
        self.holding, self.release = threading.Event(), threading.Event()
        super().__init__(("127.0.0.1", 0), HostileHandler)

    @property
    def port(self) -> int:
        return int(self.server_address[1])


class HostileHandler(socketserver.StreamRequestHandler):
    server: Hostile

    def handle(self) -> None:
        try:
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass
            self.server.scrapes += 1
            getattr(self, self.server.behaviour)()
        except OSError:
            self.server.hung_up += 1  # the operator hung up: that is the point

    def flood(self) -> None:
        """100 MB of well-formed trainer samples, no length announced."""
        self.wfile.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")
        chunk = f'{contract.METRIC_STEP}{{rank="0"}} 1\n'.encode() * 4096
        while self.server.sent < 100 * 2**20:
            self.wfile.write(chunk)
            self.server.sent += len(chunk)

    def stall(self) -> None:
        """Headers, then silence until the test releases it or the operator hangs up."""
        self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n")
        self.wfile.flush()
        self.server.holding.set()
        while not self.server.release.is_set():
            readable, _, _ = select.select([self.request], [], [], 0.1)
            if readable and not self.request.recv(1):
                self.server.hung_up += 1
                return

    def garbage(self) -> None:
        self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: 200000\r\n\r\n"
                         + bytes(range(256)) * 781 + b"\xff" * 64)


@pytest.fixture(scope="module")
def patient_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """An operator whose scrapes wait an hour for rank 0's answer: a stalled scrape stays in
    flight for as long as the test holds it, so the test can show other jobs reconciling
    during it without measuring how fast anything is."""
    with EmulatorThread() as api:
        api.emulator.declare(FTJ, "FineTuneJob", shortnames=["ftj"])
        operator = OperatorProcess(api, tmp_path_factory.mktemp("patient"),
                                   KUBETUNE_SCRAPE_TIMEOUT="3600")
        with operator:
            yield Cluster(api, operator)


@pytest.fixture
def hostile_ranks() -> Iterator[list[Hostile]]:
    servers = [Hostile(b) for b in ("flood", "stall", "garbage")]
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    yield servers
    for server in servers:
        server.release.set()
        server.shutdown()
        server.server_close()


def test_hostile_rank0_endpoints_leave_the_operator_responsive(
        patient_cluster: Cluster, hostile_ranks: list[Hostile]) -> None:
    cluster = patient_cluster
    flood, stall, garbage = hostile_ranks
    for server in hostile_ranks:
        name = f"hostile-{server.behaviour}"
        cluster.api.create(FTJ, finetunejob(name, metrics={"port": server.port}))
        cluster.admit_and_run(name)
    cluster.wait(stall.holding.is_set, "a scrape of the stalled rank in flight", timeout=60)
    # While that scrape waits (the test holds it), new jobs still reconcile: the event loop
    # never waits on a rank's answer. A blocked loop could not make these Jobs before release.
    for index in range(3):
        name = f"bystander-{index}"
        cluster.api.create(FTJ, finetunejob(name))
        cluster.wait(lambda n=name: cluster.api.get(JOBS, NS, f"{n}-a1"), f"{name}'s Job",
                     timeout=60)
    assert stall.holding.is_set() and stall.hung_up == 0, "the stalled scrape ended early"
    stall.release.set()
    # The flood is cut off at the scrape's byte limit, never read to its 100 MB, and the
    # garbage gives no progress; both are scraped again on later ticks.
    cluster.wait(lambda: flood.hung_up >= 2 and garbage.scrapes >= 2,
                 "the flood cut off twice and the garbage scraped twice", timeout=120)
    assert flood.sent < 100 * 2**20
    for server in hostile_ranks:  # no progress invented from garbage
        assert "progress" not in cluster.status(f"hostile-{server.behaviour}")
    assert cluster.operator.process is not None and cluster.operator.process.poll() is None


# --- what reaches the operator ----------------------------------------------------------------

def test_pods_and_jobs_are_filtered_by_the_api_server_and_listed_in_pages(
        cluster: Cluster) -> None:
    """Unrelated pods of the cluster never reach the operator: its pod and Job lists and
    watches ask the API server for the operator's label only, and lists come in pages."""
    asked: dict[str, set[tuple[str | None, str | None]]] = {}
    for request in list(cluster.api.emulator._requests):
        resource = request.resource
        if resource is None or request.method.value != "GET" or request.name:
            continue
        params = request.params
        asked.setdefault(resource.plural, set()).add(
            (params.get("labelSelector"), params.get("limit") if params.get("watch") != "true"
             else "watch"))
    for plural in ("pods", "jobs"):
        selectors = {selector for selector, _ in asked[plural]}
        assert selectors == {"kubetune.dev/finetunejob"}, (plural, asked[plural])
        assert ("kubetune.dev/finetunejob", "500") in asked[plural]  # the paged initial list
        assert ("kubetune.dev/finetunejob", "watch") in asked[plural]
