"""The SDK and the lifecycle verbs against the emulated API server (no operator, no
training): typed errors, the verbs' output through real kubectl as a plugin, pod logs as the
kubelet serves them. tests/e2e/test_client_cluster.py runs them with the operator and
training."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

import kubetune
from kubetune import cli
from kubetune.sdk import POD_LABEL_JOB_UID, POD_LABEL_RANK, build_job
from kubetune_api import contract
from support.cluster_api import cluster_emulator
from support.e2e_cluster import CRD_FILE
from support.jobs import MINIMAL_JOB_YAML
from support.kube_emulator import EmulatorThread
from support.operator_process import EVENTS, FTJ, JOBS, PODS, set_pod_state, wait_for
from support.tools import tool_path

NAMESPACE = "team-a"
VENV_BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def api() -> Iterator[EmulatorThread]:
    with EmulatorThread(cluster_emulator(CRD_FILE)) as api:
        yield api


@pytest.fixture
def kubeconfig(api: EmulatorThread, tmp_path: Path) -> Path:
    return api.write_kubeconfig(tmp_path / "kubeconfig", namespace=NAMESPACE, token="user")


@pytest.fixture
def client(kubeconfig: Path) -> kubetune.Client:
    return kubetune.Client(kubeconfig=str(kubeconfig))


def job_object(name: str, nodes: int = 1) -> dict[str, Any]:
    body = yaml.safe_load(MINIMAL_JOB_YAML)
    body["spec"]["resources"] = {"nodes": nodes}
    body["metadata"] = {"name": name, "namespace": NAMESPACE, "labels": {"team": "a"}}
    return body


def make_job(api: EmulatorThread, name: str, status: dict[str, Any] | None = None,
             nodes: int = 1) -> dict[str, Any]:
    api.delete(FTJ, NAMESPACE, name)
    created = api.create(FTJ, job_object(name, nodes))
    if status:
        api.patch(FTJ, NAMESPACE, name, {"status": status}, subresource="status")
    return created


def make_rank_pod(api: EmulatorThread, job: dict[str, Any], rank: int, attempt: int = 1,
                  ) -> str:
    name = f"{job['metadata']['name']}-a{attempt}-{rank}"
    api.create(PODS, {"apiVersion": "v1", "kind": "Pod", "metadata": {
        "name": name, "namespace": NAMESPACE, "labels": {
            POD_LABEL_JOB_UID: job["metadata"]["uid"], POD_LABEL_RANK: str(rank),
            contract.POD_LABEL_ATTEMPT: str(attempt)}},
        "spec": {"containers": [{"name": "trainer", "image": "x"}]}})
    return name


def run_cli(*args: str, kubeconfig: Path, plugin: bool = False) -> subprocess.CompletedProcess[str]:
    """`kubetune ARGS` as a process, or `kubectl kubetune ARGS` through real kubectl."""
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}"}
    if plugin:
        kubectl = tool_path("kubectl")
        if kubectl is None:
            pytest.fail("kubectl is not installed (make kubectl)")
        argv = [kubectl, "kubetune", *args, "--kubeconfig", str(kubeconfig)]
    else:
        argv = [str(VENV_BIN / "kubetune"), *args, "--kubeconfig", str(kubeconfig)]
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)


# --- layering ----------------------------------------------------------------------------------

def test_contract_imports_neither_trainer_nor_operator_nor_client() -> None:
    """Every module of api/kubetune_api, imported and read: no arrow back up the layers (a
    lazy import inside a function counts too)."""
    api_dir = Path(contract.__file__).parent
    modules = sorted(f"kubetune_api.{p.stem}" for p in api_dir.glob("*.py")
                     if p.stem != "__init__")
    probe = subprocess.run([sys.executable, "-c", (
        f"import importlib, sys; [importlib.import_module(m) for m in {modules!r}]; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('kubetune', 'kubetune_trainer', 'kubetune_operator', 'torch', 'kopf')))")],
        capture_output=True, text=True, check=True)
    assert probe.stdout.strip() == "[]"
    for path in api_dir.glob("*.py"):
        for line_no, line in enumerate(path.read_text().splitlines(), 1):
            words = line.split()
            if words[:1] in (["import"], ["from"]) and len(words) > 1:
                top = words[1].split(".")[0]
                assert top not in ("kubetune", "kubetune_trainer", "kubetune_operator"), \
                    f"{path.name}:{line_no}: {line.strip()}"


def test_client_imports_heavy_stacks_only_when_used() -> None:
    probe = subprocess.run([sys.executable, "-c", (
        "import sys, kubetune, kubetune.cli; print(sorted(m for m in sys.modules if "
        "m.split('.')[0] in ('torch', 'kubetune_trainer', 'kubetune_operator', "
        "'kubernetes', 'kopf')))")], capture_output=True, text=True, check=True)
    assert probe.stdout.strip() == "[]"


# --- building a job ----------------------------------------------------------------------------

def test_train_sections_replace_the_spec_and_are_validated() -> None:
    base = yaml.safe_load(MINIMAL_JOB_YAML)
    job = build_job(base, name="x", namespace="ns", training={"maxSteps": 3},
                    labels={"team": "a"})
    assert job.spec.training.max_steps == 3 and job.metadata["namespace"] == "ns"
    assert job.metadata["labels"] == {"team": "a"} and job.name == "x"
    with pytest.raises(kubetune.InvalidSpec) as refused:
        build_job(base["spec"], name="y", namespace="ns", method={"type": "qlora"})
    assert refused.value.fields == ("spec.method",)
    assert "quantization is required" in str(refused.value)
    with pytest.raises(kubetune.InvalidSpec) as nameless:
        build_job(base["spec"], name=None, namespace="ns")
    assert nameless.value.fields == ("metadata.name",)


# --- typed errors over HTTP --------------------------------------------------------------------

def test_get_list_and_typed_errors(api: EmulatorThread, client: kubetune.Client) -> None:
    assert client.namespace == NAMESPACE  # the kubeconfig context's
    make_job(api, "listed", {"phase": "Running", "restarts": 1})
    job = client.get("listed")
    assert (job.phase, job.status.restarts, job.spec.model.name) == ("Running", 1,
                                                                      "tiny://llama")
    assert "listed" in [j.name for j in client.list(label_selector="team=a")]
    assert "listed" not in [j.name for j in client.list(label_selector="team=b")]
    with pytest.raises(kubetune.NotFound, match='"missing" not found'):
        client.get("missing")
    with pytest.raises(kubetune.AlreadyExists):
        client.train(yaml.safe_load(MINIMAL_JOB_YAML), name="listed")
    api.call(api.emulator.inject_fault, "GET", "finetunejobs", 403)
    with pytest.raises(kubetune.Forbidden):
        client.get("listed")


def test_suspend_resume_and_cancel_change_the_object(api: EmulatorThread,
                                                     client: kubetune.Client) -> None:
    make_job(api, "lifecycle")
    assert client.suspend("lifecycle").spec.run_policy.suspend is True
    assert api.get(FTJ, NAMESPACE, "lifecycle")["spec"]["runPolicy"]["suspend"] is True
    assert client.resume("lifecycle").spec.run_policy.suspend is False
    client.cancel("lifecycle")
    assert api.get(FTJ, NAMESPACE, "lifecycle") is None
    with pytest.raises(kubetune.NotFound):
        client.cancel("lifecycle")


def test_wait_returns_raises_failed_and_times_out(api: EmulatorThread,
                                                  client: kubetune.Client) -> None:
    make_job(api, "waited", {"phase": "Succeeded"})
    assert client.wait("waited", until="Succeeded", timeout=5).phase == "Succeeded"
    make_job(api, "broken", {"phase": "Failed", "conditions": [{
        "type": "Failed", "status": "True", "reason": "PermanentFailure",
        "message": "rank 0 exited 2", "lastTransitionTime": "2026-01-01T00:00:00Z"}]})
    with pytest.raises(kubetune.JobFailed, match="PermanentFailure: rank 0 exited 2"):
        client.wait("broken")
    make_job(api, "pending")
    with pytest.raises(kubetune.WaitTimeout) as timed_out:
        client.wait("pending", timeout=0.2, poll=0.05)
    assert timed_out.value.job.phase == "Pending"  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="not phases"):
        client.wait("pending", until="Done")


def test_events_cover_the_job_its_jobs_and_pods(api: EmulatorThread,
                                               client: kubetune.Client) -> None:
    job = make_job(api, "eventful")
    pod = make_rank_pod(api, job, 0)
    child = api.create(JOBS, {"apiVersion": "batch/v1", "kind": "Job", "metadata": {
        "name": "eventful-a1", "namespace": NAMESPACE,
        "labels": {POD_LABEL_JOB_UID: job["metadata"]["uid"]}}, "spec": {"template": {}}})
    subjects = [("FineTuneJob", "eventful", job["metadata"]["uid"], "Created"),
                ("Job", "eventful-a1", child["metadata"]["uid"], "SuccessfulCreate"),
                ("Pod", pod, api.get(PODS, NAMESPACE, pod)["metadata"]["uid"], "Started"),
                ("Pod", "someone-else", "other-uid", "Unrelated")]
    for second, (kind, name, uid, reason) in enumerate(subjects):
        api.create(EVENTS, {"metadata": {"generateName": "e.", "namespace": NAMESPACE},
                            "involvedObject": {"kind": kind, "name": name, "uid": uid},
                            "reason": reason, "type": "Normal", "message": reason.lower(),
                            "lastTimestamp": f"2026-01-01T00:00:0{second}Z"})
    events = client.events("eventful")
    assert [(e.reason, e.object) for e in events] == [
        ("Created", "FineTuneJob/eventful"), ("SuccessfulCreate", "Job/eventful-a1"),
        ("Started", f"Pod/{pod}")]


# --- pod logs: the emulator's kubelet, kubectl, the SDK ----------------------------------------

def test_pod_log_endpoint_as_kubectl_reads_it(api: EmulatorThread, kubeconfig: Path,
                                              tmp_path: Path) -> None:
    job = make_job(api, "logged")
    pod = make_rank_pod(api, job, 0)
    kubectl = tool_path("kubectl")
    assert kubectl is not None, "make kubectl"
    base = [kubectl, "--kubeconfig", str(kubeconfig), "logs", pod]
    waiting = subprocess.run(base, capture_output=True, text=True, timeout=60)
    assert waiting.returncode == 1 and "is waiting to start" in waiting.stderr
    log = tmp_path / "log"
    log.write_text("one\ntwo\n")
    api.emulator.pod_log_path = lambda namespace, name: log  # type: ignore[attr-defined]
    set_pod_state(api, NAMESPACE, pod, "Running")
    assert subprocess.run(base, capture_output=True, text=True, timeout=60).stdout == "one\ntwo\n"
    assert subprocess.run([*base, "--tail=1"], capture_output=True, text=True,
                          timeout=60).stdout == "two\n"

    follower = subprocess.Popen([*base, "-f"], stdout=subprocess.PIPE, text=True)
    assert follower.stdout is not None
    assert follower.stdout.readline() == "one\n"
    with log.open("a") as out:
        out.write("three\n")
    assert follower.stdout.readline() == "two\n" and follower.stdout.readline() == "three\n"
    assert follower.poll() is None  # still running: it follows a running container
    with log.open("a") as out:
        out.write("last\n")
    set_pod_state(api, NAMESPACE, pod, "Succeeded", exit_code=0)
    assert follower.wait(60) == 0 and follower.stdout.read() == "last\n"


def test_sdk_logs_pick_the_rank_and_newest_attempt_and_follow(
        api: EmulatorThread, client: kubetune.Client, tmp_path: Path) -> None:
    job = make_job(api, "ranks", nodes=2)
    for attempt, rank in ((1, 0), (1, 1), (2, 1)):
        make_rank_pod(api, job, rank, attempt)
    logs = {}
    for name in ("ranks-a1-0", "ranks-a1-1", "ranks-a2-1"):
        logs[name] = tmp_path / name
        logs[name].write_text(f"{name} says hi\n")
        set_pod_state(api, NAMESPACE, name, "Running")
    api.emulator.pod_log_path = lambda namespace, name: logs[name]  # type: ignore[attr-defined]
    assert list(client.logs("ranks", rank=0)) == ["ranks-a1-0 says hi"]
    assert list(client.logs("ranks", rank=1)) == ["ranks-a2-1 says hi"]
    with pytest.raises(kubetune.NotFound, match=r"ranks 0\.\.1, not 2"):
        list(client.logs("ranks", rank=2))

    lines: list[str] = []
    follower = threading.Thread(target=lambda: lines.extend(
        client.logs("ranks", rank=1, follow=True)), daemon=True)
    follower.start()
    wait_for(lambda: lines or None, what="the first followed line")
    with logs["ranks-a2-1"].open("a") as out:
        out.write("step 1/1 loss 1.0\n")
    wait_for(lambda: len(lines) == 2 or None, what="the appended line")
    assert follower.is_alive()
    set_pod_state(api, NAMESPACE, "ranks-a2-1", "Succeeded", exit_code=0)
    follower.join(30)
    assert not follower.is_alive() and lines == ["ranks-a2-1 says hi", "step 1/1 loss 1.0"]


def test_logs_of_a_rank_without_a_pod(api: EmulatorThread, client: kubetune.Client) -> None:
    make_job(api, "podless")
    with pytest.raises(kubetune.LogsUnavailable, match="rank 0 has no pod yet"):
        list(client.logs("podless"))


# --- the verbs ---------------------------------------------------------------------------------

def test_kubectl_plugin_list_get_and_json(api: EmulatorThread, kubeconfig: Path) -> None:
    make_job(api, "plugged", {"phase": "Running", "restarts": 2, "progress": {
        "percent": 42.0, "loss": 1.23456, "eta": "3m"}})
    listed = run_cli("list", kubeconfig=kubeconfig, plugin=True)
    assert listed.returncode == 0, listed.stderr
    header, *rows = listed.stdout.splitlines()
    assert header.split() == list(cli_columns())
    row = next(r.split() for r in rows if r.startswith("plugged "))
    assert row[:9] == ["plugged", "Running", "lora", "tiny://llama", "1", "42%", "1.2346", "3m",
                       "2"]
    as_json = run_cli("get", "plugged", "-o", "json", kubeconfig=kubeconfig, plugin=True)
    assert json.loads(as_json.stdout)["status"]["restarts"] == 2
    as_yaml = run_cli("list", "-o", "yaml", kubeconfig=kubeconfig)
    assert "plugged" in [o["metadata"]["name"] for o in yaml.safe_load(as_yaml.stdout)["items"]]
    described = run_cli("describe", "plugged", kubeconfig=kubeconfig)
    assert "Phase:        Running" in described.stdout
    missing = run_cli("get", "missing", kubeconfig=kubeconfig, plugin=True)
    assert missing.returncode == 1 and '"missing" not found' in missing.stderr
    other = run_cli("list", "-n", "empty-ns", kubeconfig=kubeconfig)
    assert other.returncode == 0 and "No FineTuneJobs found in empty-ns" in other.stderr


def cli_columns() -> tuple[str, ...]:
    from kubetune.output import JOB_COLUMNS

    return JOB_COLUMNS


def test_verbs_exit_codes(api: EmulatorThread, kubeconfig: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(MINIMAL_JOB_YAML.replace("type: lora", "type: qlora"))
    refused = run_cli("submit", str(bad), kubeconfig=kubeconfig)
    assert refused.returncode == contract.EXIT_INVALID_SPEC
    assert f"{bad}:" in refused.stderr and "spec.method: quantization is required" in \
        refused.stderr
    make_job(api, "slow")
    timed_out = run_cli("wait", "slow", "--timeout", "0.1", kubeconfig=kubeconfig)
    assert timed_out.returncode == cli.EXIT_WAIT_TIMEOUT and "still Pending" in timed_out.stderr
    good = tmp_path / "good.yaml"
    good.write_text(MINIMAL_JOB_YAML.replace("name: t", "name: submitted"))
    api.delete(FTJ, NAMESPACE, "submitted")
    created = run_cli("submit", str(good), kubeconfig=kubeconfig)
    assert created.stdout.strip() == "finetunejob.kubetune.dev/submitted created"
    assert api.get(FTJ, NAMESPACE, "submitted") is not None
    suspended = run_cli("suspend", "submitted", kubeconfig=kubeconfig, plugin=True)
    assert suspended.returncode == 0, suspended.stderr
    assert api.get(FTJ, NAMESPACE, "submitted")["spec"]["runPolicy"]["suspend"] is True


@pytest.mark.parametrize(("status", "body", "error", "fields"), [
    (422, {"reason": "Invalid", "message": 'FineTuneJob "x" is invalid', "details": {"causes": [
        {"field": "spec.resources.nodes", "message": "must be >= 1"},
        {"field": "spec.method.type", "message": "Unsupported value"}]}},
     kubetune.InvalidSpec, ("spec.resources.nodes", "spec.method.type")),
    (403, {"reason": "Forbidden", "message": "cannot create"}, kubetune.Forbidden, None),
    (401, {"reason": "Unauthorized", "message": "Unauthorized"}, kubetune.Forbidden, None),
    (409, {"reason": "AlreadyExists", "message": "exists"}, kubetune.AlreadyExists, None),
    (409, {"reason": "Conflict", "message": "modified"}, kubetune.ApiError, None),
    (500, {"reason": "InternalError", "message": "boom"}, kubetune.ApiError, None),
])
def test_api_server_refusals_become_typed_errors(status: int, body: dict[str, Any],
                                                 error: type[Exception],
                                                 fields: tuple[str, ...] | None) -> None:
    """The API server's Status (its admission's 422 lists the fields at fault as causes)."""
    from kubernetes.client.exceptions import ApiException

    from kubetune.cluster import refusal

    exc = ApiException(status=status, reason="x")
    exc.body = json.dumps({"kind": "Status", "code": status, **body})
    with pytest.raises(error) as raised:
        refusal(exc, "creating FineTuneJob 'x'")
    assert str(raised.value).startswith(f"creating FineTuneJob 'x': {body['message']}")
    if fields is not None:
        assert raised.value.fields == fields  # type: ignore[attr-defined]


def test_context_namespace_all_namespaces_and_tail(api: EmulatorThread, kubeconfig: Path,
                                                   tmp_path: Path) -> None:
    config = yaml.safe_load(kubeconfig.read_text())
    config["contexts"].append({"name": "team-b", "context": {
        "cluster": "emulator", "user": "emulator", "namespace": "team-b"}})
    kubeconfig.write_text(yaml.safe_dump(config))
    assert kubetune.Client(kubeconfig=str(kubeconfig), context="team-b").namespace == "team-b"
    assert kubetune.Client(kubeconfig=str(kubeconfig), namespace="x").namespace == "x"
    with pytest.raises(kubetune.KubetuneError, match="context: 'nope' is not in the kubeconfig"):
        kubetune.Client(kubeconfig=str(kubeconfig), context="nope")

    other = job_object("elsewhere")
    other["metadata"]["namespace"] = "team-b"
    api.delete(FTJ, "team-b", "elsewhere")
    api.create(FTJ, other)
    client = kubetune.Client(kubeconfig=str(kubeconfig))
    assert "elsewhere" not in [j.name for j in client.list()]
    everywhere = {(j.namespace, j.name) for j in client.list(all_namespaces=True)}
    assert ("team-b", "elsewhere") in everywhere
    listed = run_cli("list", "-A", kubeconfig=kubeconfig)
    assert listed.stdout.splitlines()[0].split()[:2] == ["NAMESPACE", "NAME"]

    job = make_job(api, "tailed")
    pod = make_rank_pod(api, job, 0)
    log = tmp_path / "tailed.log"
    log.write_text("a\nb\nc\n")
    api.emulator.pod_log_path = lambda namespace, name: log  # type: ignore[attr-defined]
    set_pod_state(api, NAMESPACE, pod, "Running")
    assert list(client.logs("tailed", tail=2)) == ["b", "c"]
    tailed = run_cli("logs", "tailed", "--tail", "1", kubeconfig=kubeconfig)
    assert tailed.stdout == "c\n"


def test_kubeconfig_set_after_import_is_the_one_used(kubeconfig: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A notebook sets $KUBECONFIG after `import kubetune` (the kubernetes package fixed its
    default path when it was imported): Client() must still read the file it names."""
    import kubernetes.config  # noqa: F401  (imported before the variable is set)

    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    client = kubetune.Client()
    assert client.namespace == NAMESPACE
    assert client.list() is not None
