"""The operator process against the emulated API server under the faults of a real cluster:
foreign and leftover children, deleted Jobs, pods stuck Terminating on a lost node,
evictions, refused creates, event order, uninstall, operator upgrades, partial gangs and
stalls (docs/operator.md, "Failure semantics"). Tests play the Job controller and kubelet.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune_api import contract
from kubetune_operator.builders import network_policy_name
from support.jobs import ftj_body
from support.kube_emulator import EmulatorThread, now_stamp
from support.kueue import KueueModel
from support.operator_process import (
    EVENTS,
    FTJ,
    JOBS,
    PODS,
    PRIORITY_CLASSES,
    QUOTAS,
    OperatorCluster,
    OperatorProcess,
    rank0_metrics,
    set_pod_state,
    start_job_pods,
)

pytestmark = pytest.mark.slow

NS = "default"
CONFIG_MAPS = "v1/configmaps"
FORCE_DELETE_AFTER = "1"


class World(OperatorCluster):
    def running(self, name: str, attempt: int = 1) -> dict[str, Any]:
        job = self.job(f"{name}-a{attempt}")
        start_job_pods(self.api, job)
        self.wait(lambda: self.status(name).get("phase") == "Running"
                  and self.status(name).get("attempt") == attempt, f"{name} a{attempt} running")
        return job

    def condition(self, name: str, type_: str) -> dict[str, Any]:
        return next(c for c in self.status(name)["conditions"] if c["type"] == type_)

    def event(self, name: str, reason: str) -> dict[str, Any]:
        """The first event `reason` of `name` (kopf posts events in the background)."""
        return self.wait(lambda: next((e for e in self.events(name) if e["reason"] == reason),
                                      None), f"event {reason} of {name}")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    with EmulatorThread() as api:
        api.emulator.declare(FTJ, "FineTuneJob", shortnames=["ftj"])
        operator = OperatorProcess(api, tmp_path_factory.mktemp("operator"),
                                   KUBETUNE_FORCE_DELETE_AFTER_SECONDS=FORCE_DELETE_AFTER)
        with operator:
            yield World(api, operator)


def foreign_job(name: str, label: str) -> dict[str, Any]:
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": {
        "name": name, "namespace": NS, "labels": {"kubetune.dev/finetunejob": label}},
        "spec": {"template": {"spec": {"containers": [{"name": "x", "image": "busybox"}],
                                       "restartPolicy": "Never"}}}}


# --- children by owner ----------------------------------------------------------------------

def test_labelled_objects_of_others_are_never_deleted_and_never_block(world: World) -> None:
    api = world.api
    api.create(JOBS, foreign_job("someone-elses", "mine"))  # carries our label
    stray = api.create(PODS, {"apiVersion": "v1", "kind": "Pod", "metadata": {
        "name": "stray", "namespace": NS, "labels": {"kubetune.dev/finetunejob": "mine",
                                                     "kubetune.dev/attempt": "9"}},
        "spec": {"containers": [{"name": "x", "image": "busybox"}]}})
    set_pod_state(api, NS, stray["metadata"]["name"], "Running")
    api.create(FTJ, ftj_body("mine"))
    world.running("mine")
    assert api.get(JOBS, NS, "someone-elses") is not None
    assert api.get(PODS, NS, "stray") is not None


def test_a_configmap_left_by_an_earlier_object_is_replaced(world: World) -> None:
    api = world.api
    first = api.create(FTJ, ftj_body("again", training={"learningRate": 0.001}))
    world.job("again-a1")
    api.call(api.emulator.delete_object, FTJ, NS, "again", propagation="Orphan")
    orphan = api.get(CONFIG_MAPS, NS, "again-config")
    assert orphan is not None and "0.001" in orphan["data"][contract.CONFIG_FILE]
    # Nothing collects the orphans: make them look left by the first object, as a GC lag.
    for resource, name in ((CONFIG_MAPS, "again-config"), ("v1/services", "again"),
                           ("networking.k8s.io/v1/networkpolicies", network_policy_name("again")),
                           (JOBS, "again-a1")):
        api.patch(resource, NS, name, {"metadata": {"ownerReferences": [{
            "apiVersion": "kubetune.dev/v1alpha1", "kind": "FineTuneJob", "name": "again",
            "uid": first["metadata"]["uid"], "controller": True}]}})
    second = api.create(FTJ, ftj_body("again", training={"learningRate": 0.002}))
    job = world.wait(lambda: (j := api.get(JOBS, NS, "again-a1")) and j["metadata"][
        "ownerReferences"][0]["uid"] == second["metadata"]["uid"] and j, "a new Job")
    config = api.get(CONFIG_MAPS, NS, "again-config")
    assert config is not None
    assert config["metadata"]["ownerReferences"][0]["uid"] == second["metadata"]["uid"]
    assert "0.002" in config["data"][contract.CONFIG_FILE]
    assert job["metadata"]["labels"]["kubetune.dev/finetunejob-uid"] == \
        second["metadata"]["uid"]


def test_a_name_taken_by_someone_else_fails_with_create_failed(world: World) -> None:
    world.api.create(CONFIG_MAPS, {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {
        "name": "taken-config", "namespace": NS}, "data": {"x": "y"}})
    world.api.create(FTJ, ftj_body("taken"))
    world.wait_phase("taken", "Failed")
    failed = world.condition("taken", "Failed")
    assert failed["reason"] == "CreateFailed"
    assert "ConfigMap default/taken-config already exists" in failed["message"]
    assert world.api.get(CONFIG_MAPS, NS, "taken-config")["data"] == {"x": "y"}
    assert world.api.get(JOBS, NS, "taken-a1") is None


def test_a_create_the_api_refuses_for_good_fails_the_job_once(world: World) -> None:
    api = world.api
    api.call(api.emulator.inject_fault, "POST", "jobs", 422, times=1)
    api.create(FTJ, ftj_body("refused"))
    status = world.wait_phase("refused", "Failed")
    failed = world.condition("refused", "Failed")
    assert failed["reason"] == "CreateFailed" and "422" in failed["message"]
    assert "injected fault" in failed["message"]
    assert status["completionTime"]
    assert api.get(JOBS, NS, "refused-a1") is None
    world.event("refused", "CreateFailed")


# --- one gang at a time, node loss, disruption -----------------------------------------------

def test_a_job_deleted_by_someone_starts_a_new_attempt(world: World) -> None:
    world.api.create(FTJ, ftj_body("vanished", runPolicy={"backoffLimit": 0}))
    world.running("vanished")
    world.api.delete(JOBS, NS, "vanished-a1")
    world.job("vanished-a2")
    status = world.status("vanished")
    assert (status["attempt"], status["restarts"], status["preemptions"]) == (2, 1, 1)
    assert "vanished-a1 was deleted" in world.event("vanished", "JobDeleted")["message"]
    assert world.api.get(JOBS, NS, "vanished-a1") is None  # never the same name twice


def test_a_rank_on_a_lost_node_restarts_the_gang_after_force_deletion(world: World) -> None:
    api = world.api
    api.create(FTJ, ftj_body("lost", resources={"nodes": 2}, runPolicy={"backoffLimit": 0}))
    world.running("lost")
    api.emulator.lost_pods.add((NS, "lost-a1-1"))
    api.delete(PODS, NS, "lost-a1-1")  # the taint manager evicts; no kubelet answers
    # Restarting lasts about FORCE_DELETE_AFTER seconds: wait for what it leaves behind (the
    # next attempt and the restart's event) rather than for the phase, which a slow poll
    # can miss.
    second = world.job("lost-a2")  # only after the stuck pod was force-deleted
    assert "lost-a1-1" in world.event("lost", "PodDeleted")["message"]
    assert api.get(PODS, NS, "lost-a1-1") is None
    assert "lost-a1-1" in world.event("lost", "ForceDeletedPods")["message"]
    start_job_pods(api, second)
    status = world.wait_phase("lost", "Running")
    assert (status["attempt"], status["restarts"], status["preemptions"]) == (2, 1, 1)


def test_evictions_do_not_use_the_backoff_limit(world: World) -> None:
    world.api.create(FTJ, ftj_body("spot", runPolicy={"backoffLimit": 0}))
    for attempt in (1, 2, 3):
        world.running("spot", attempt)
        set_pod_state(world.api, NS, f"spot-a{attempt}-0", "Failed", pod_reason="Evicted",
                      conditions=[{"type": "DisruptionTarget", "status": "True",
                                   "reason": "PreemptionByScheduler"}])
        world.job(f"spot-a{attempt + 1}")
    status = world.status("spot")
    assert (status["restarts"], status["preemptions"]) == (3, 3)
    assert status["phase"] in ("Restarting", "Pending")


def test_a_permanent_exit_reported_after_the_jobs_failure_still_wins(world: World) -> None:
    api = world.api
    api.create(FTJ, ftj_body("order", resources={"nodes": 2}))
    world.running("order")
    # The Job controller's verdict arrives before the rank's own status.
    api.patch(JOBS, NS, "order-a1", {"status": {"conditions": [{
        "type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
        "lastTransitionTime": datetime.datetime.now(datetime.UTC).strftime(
            "%Y-%m-%dT%H:%M:%SZ")}]}},
              subresource="status")
    world.wait(lambda: world.condition("order", "Running")["reason"] == "WaitingForRankExits",
               "waiting for the ranks' exits")
    set_pod_state(api, NS, "order-a1-1", "Failed", exit_code=contract.EXIT_INVALID_SPEC,
                  message="dataset.fields: no 'text' column")
    world.wait_phase("order", "Failed")
    failed = world.condition("order", "Failed")
    assert failed["reason"] == "PermanentFailure" and "no 'text' column" in failed["message"]
    assert world.status("order")["restarts"] == 0


# --- uninstall never wedges -------------------------------------------------------------------

def test_no_finalizer_is_left_on_jobs_in_any_phase(world: World) -> None:
    api = world.api
    api.create(FTJ, ftj_body("plain", runPolicy={"ttlSecondsAfterFinished": 3600}))
    world.running("plain")
    world.wait(lambda: "kubetune.dev/last-handled-configuration" in (
        api.get(FTJ, NS, "plain")["metadata"].get("annotations") or {}), "kopf handled it")
    assert not api.get(FTJ, NS, "plain")["metadata"].get("finalizers")
    set_pod_state(api, NS, "plain-a1-0", "Succeeded", exit_code=0)
    world.wait_phase("plain", "Succeeded")
    assert not api.get(FTJ, NS, "plain")["metadata"].get("finalizers")


def test_uninstalled_operator_leaves_nothing_that_blocks_deletion(tmp_path: Path) -> None:
    with EmulatorThread() as api:
        api.emulator.declare(FTJ, "FineTuneJob", shortnames=["ftj"])
        # A job handled by an older operator that still used a finalizer.
        old = ftj_body("legacy")
        old["metadata"]["finalizers"] = ["kubetune.dev/finalizer"]
        api.create(FTJ, old)
        with OperatorProcess(api, tmp_path) as operator:
            world = World(api, operator)
            api.create(FTJ, ftj_body("current"))
            world.running("current")
            world.wait(lambda: not api.get(FTJ, NS, "legacy")["metadata"].get("finalizers"),
                       "the old finalizer removed")
        # The operator is gone (helm uninstall): deleting the jobs must not hang.
        for name in ("current", "legacy"):
            api.delete(FTJ, NS, name)
            assert api.get(FTJ, NS, name) is None, name
        assert api.find(JOBS, NS) == [] and api.find(PODS, NS) == []



CRD_FILE = Path(__file__).resolve().parents[2] / "crds" / "finetunejobs.kubetune.dev.yaml"
CRDS = "apiextensions.k8s.io/v1/customresourcedefinitions"
NAMESPACES = "v1/namespaces"


def crd_world(api: EmulatorThread, *namespaces: str) -> dict[str, Any]:
    """The FineTuneJob CRD as `kubectl apply -f crds/` creates it, and `namespaces`."""
    crd = api.create(CRDS, yaml.safe_load(CRD_FILE.read_text()))
    for namespace in namespaces:
        api.create(NAMESPACES, {"metadata": {"name": namespace}})
    return crd


def test_namespace_then_crd_delete_to_completion_with_the_operator_gone(
        tmp_path: Path) -> None:
    with EmulatorThread() as api:
        crd = crd_world(api, "team", "other")
        with OperatorProcess(api, tmp_path) as operator:
            for namespace in ("team", "other"):
                world = World(api, operator, namespace=namespace)
                api.create(FTJ, ftj_body("gone", namespace))
                world.running("gone")
        assert api.find(JOBS, "team") and api.find(CONFIG_MAPS, "team")
        # helm uninstall: the operator is gone; `kubectl delete namespace team` completes.
        api.delete(NAMESPACES, None, "team")
        world = World(api, operator, namespace="team")
        world.wait(lambda: api.get(NAMESPACES, None, "team") is None, "namespace team gone")
        for resource in (FTJ, JOBS, PODS, CONFIG_MAPS, "v1/services"):
            assert api.find(resource, "team") == [], resource
        assert api.get(FTJ, "other", "gone") is not None  # another namespace's job stays
        # `kubectl delete crd`: the remaining jobs go, their children with them, then the CRD.
        api.delete(CRDS, None, crd["metadata"]["name"])
        world.wait(lambda: api.get(CRDS, None, crd["metadata"]["name"]) is None, "CRD gone")
        for resource in (JOBS, PODS, CONFIG_MAPS):
            assert api.find(resource, "other") == [], resource
        assert api.get(FTJ, "other", "gone") is None  # no longer served at all


def test_a_finalizer_nobody_removes_keeps_namespace_and_crd_terminating() -> None:
    """What the operator must never leave behind (the emulator can show a wedge)."""
    with EmulatorThread() as api:
        crd = crd_world(api, "wedged")
        held = ftj_body("held", "wedged")
        held["metadata"]["finalizers"] = ["kubetune.dev/finalizer"]  # an old operator's
        api.create(FTJ, held)
        api.delete(NAMESPACES, None, "wedged")
        api.delete(CRDS, None, crd["metadata"]["name"])
        namespace = api.get(NAMESPACES, None, "wedged")
        assert namespace is not None and namespace["status"]["phase"] == "Terminating"
        assert api.get(CRDS, None, crd["metadata"]["name"]) is not None
        assert api.get(FTJ, "wedged", "held")["metadata"]["deletionTimestamp"]
        api.patch(FTJ, "wedged", "held", {"metadata": {"finalizers": None}})
        assert api.get(NAMESPACES, None, "wedged") is None
        assert api.get(CRDS, None, crd["metadata"]["name"]) is None

# --- attempts pin their runtime ------------------------------------------------------------------

def test_an_operator_upgrade_mid_job_keeps_the_jobs_trainer_image(tmp_path: Path) -> None:
    with EmulatorThread() as api:
        api.emulator.declare(FTJ, "FineTuneJob", shortnames=["ftj"])
        before = OperatorProcess(api, tmp_path, KUBETUNE_TRAINER_IMAGE="trainer:1.0",
                                 KUBETUNE_TERMINATION_GRACE_SECONDS="77")
        with before:
            world = World(api, before)
            api.create(FTJ, ftj_body("pinned"))
            world.running("pinned")
        after = OperatorProcess(api, tmp_path, KUBETUNE_TRAINER_IMAGE="trainer:2.0",
                                KUBETUNE_TERMINATION_GRACE_SECONDS="5")
        with after:
            world = World(api, after)
            api.create(FTJ, ftj_body("fresh"))
            fresh = world.job("fresh-a1")["spec"]["template"]["spec"]
            assert fresh["containers"][0]["image"] == "trainer:2.0"
            set_pod_state(api, NS, "pinned-a1-0", "Failed", exit_code=1)
            second = world.job("pinned-a2")["spec"]["template"]["spec"]
            assert second["containers"][0]["image"] == "trainer:1.0"
            assert second["terminationGracePeriodSeconds"] == 77
            runtime = world.status("pinned")["runtime"]
            assert runtime["trainerImage"] == "trainer:1.0"


# --- partial gangs and stalls -------------------------------------------------------------------

def test_a_partial_gang_is_torn_down_after_the_scheduling_timeout(world: World) -> None:
    api = world.api
    api.create(FTJ, ftj_body("partial", resources={"nodes": 2},
                             runPolicy={"schedulingTimeoutSeconds": 2}))
    job = world.job("partial-a1")
    [first, second] = start_job_pods(api, job, phase="Pending")
    set_pod_state(api, NS, first["metadata"]["name"], "Running")
    set_pod_state(api, NS, second["metadata"]["name"], "Pending", conditions=[{
        "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
        "message": "0/4 nodes are available: 4 Insufficient nvidia.com/gpu."}])
    world.job("partial-a2")
    message = world.event("partial", "SchedulingTimeout")["message"]
    assert "rank 1" in message and "Insufficient nvidia.com/gpu" in message
    assert world.status("partial")["preemptions"] == 0


def test_the_stall_watchdog_restarts_a_frozen_gang(world: World) -> None:
    frozen_at_37 = (f'{contract.METRIC_STEP}{{rank="0"}} 37\n'
                    f'{contract.METRIC_TOTAL_STEPS}{{rank="0"}} 100\n'
                    'kubetune_trainer_phase{rank="0",phase="training"} 1\n')
    with rank0_metrics(frozen_at_37) as port:
        world.api.create(FTJ, ftj_body("frozen", metrics={"port": port},
                                       runPolicy={"stallTimeoutSeconds": 3}))
        world.running("frozen")
        world.job("frozen-a2")
    assert "stalled at step 37" in world.event("frozen", "Stalled")["message"]
    assert world.status("frozen")["preemptions"] == 0  # a hang counts against backoffLimit


# --- Kueue ---------------------------------------------------------------------------------------

@pytest.fixture
def kueue_world(tmp_path: Path) -> Iterator[tuple[World, KueueModel]]:
    with EmulatorThread() as api:
        api.emulator.declare(FTJ, "FineTuneJob", shortnames=["ftj"])
        with OperatorProcess(api, tmp_path) as operator:
            yield World(api, operator), KueueModel(api, quota=2)


def operator_unsuspended(world: World, job: str) -> bool:
    return any(r.method.value == "PATCH" and r.resource is not None
               and r.resource.plural == "jobs" and r.name == job
               and (r.data or {}).get("spec", {}).get("suspend") is False
               for r in list(world.api.emulator._requests))


def test_a_job_kueue_queued_through_a_default_local_queue_is_left_to_kueue(
        kueue_world: tuple[World, KueueModel]) -> None:
    world, kueue = kueue_world
    kueue.default_queue = True  # manageJobsWithoutQueueName: the FineTuneJob has no label
    world.api.create(FTJ, ftj_body("dlq"))
    world.job("dlq-a1")
    kueue.webhook()
    world.wait(lambda: world.condition("dlq", "Running")["message"] ==
               "waiting for Kueue admission", "Queued for Kueue")
    assert kueue.admit() == ["dlq-a1"]
    world.running("dlq")
    assert not operator_unsuspended(world, "dlq-a1")


def test_a_kueue_preemption_resumes_on_readmission(
        kueue_world: tuple[World, KueueModel]) -> None:
    world, kueue = kueue_world
    api = world.api
    body = ftj_body("queued", resources={"nodes": 2}, runPolicy={"backoffLimit": 0})
    body["metadata"]["labels"] = {"kueue.x-k8s.io/queue-name": "team-a"}
    api.create(FTJ, body)
    world.job("queued-a1")
    world.wait(lambda: world.condition("queued", "Running")["reason"] == "Queued", "Queued")
    assert kueue.admit() == ["queued-a1"]
    world.running("queued")
    kueue.preempt("queued-a1")
    for rank in (0, 1):  # the Job controller stops the pods; they checkpoint (exit 75)
        set_pod_state(api, NS, f"queued-a1-{rank}", "Failed",
                      exit_code=contract.EXIT_PREEMPTED)
        api.delete(PODS, NS, f"queued-a1-{rank}")
    status = world.wait(lambda: world.status("queued").get("preemptions") == 1
                        and world.status("queued"), "the preemption counted")
    assert (status["phase"], status["attempt"], status["restarts"]) == ("Pending", 1, 0)
    assert world.event("queued", "Preempted")["type"] == "Warning"
    assert kueue.admit() == ["queued-a1"]  # re-admitted: the same attempt resumes
    world.running("queued")
    status = world.status("queued")
    assert (status["attempt"], status["restarts"], status["preemptions"]) == (1, 0, 1)
    assert not operator_unsuspended(world, "queued-a1")
    # Suspending a queued job stops its attempt instead of fighting Kueue over the Job.
    api.patch(FTJ, NS, "queued", {"spec": {"runPolicy": {"suspend": True}}})
    world.wait_phase("queued", "Suspended")
    world.wait(lambda: api.get(JOBS, NS, "queued-a1") is None, "the attempt stopped")
    api.patch(FTJ, NS, "queued", {"spec": {"runPolicy": {"suspend": False}}})
    second = world.job("queued-a2")
    assert second["spec"]["suspend"] is True  # queued again; Kueue admits it
    assert kueue.admit() == ["queued-a2"]
    world.running("queued", 2)


# --- pods the Job controller cannot create ----------------------------------------------------

def pending_reason(world: World, namespace: str, name: str) -> tuple[str, str] | None:
    status = (world.api.get(FTJ, namespace, name) or {}).get("status", {})
    running = next((c for c in status.get("conditions") or [] if c["type"] == "Running"), None)
    return (running["reason"], running["message"]) if running else None


def test_the_newest_failed_create_is_read_past_the_first_page(world: World) -> None:
    # A list page comes in name order (not by time) and event names are random: the newest
    # refusal may be on the last page. 24 old events sort before it; a page holds 20.
    api, ns = world.api, "paged"
    api.create(FTJ, ftj_body("paged", namespace=ns, resources={"nodes": 2}))
    job = world.wait(lambda: api.get(JOBS, ns, "paged-a1"), "Job paged-a1")
    involved = {"apiVersion": "batch/v1", "kind": "Job", "name": "paged-a1", "namespace": ns,
                "uid": job["metadata"]["uid"]}
    for name, message, stamp in [*((f"paged-a1.a{i:02}", "quota gpus", now_stamp(-60))
                                   for i in range(24)),
                                 ("paged-a1.zz", "no PriorityClass gpu-high", now_stamp())]:
        api.create(EVENTS, {"apiVersion": "v1", "kind": "Event", "metadata": {
            "name": name, "namespace": ns}, "involvedObject": involved,
            "reason": "FailedCreate", "type": "Warning", "message": f"Error creating: {message}",
            "count": 1, "firstTimestamp": stamp, "lastTimestamp": stamp})
    world.wait(lambda: (r := pending_reason(world, ns, "paged")) and r[0] == "PodCreationFailed"
               and "no PriorityClass gpu-high" in r[1], "the newest refusal shown")


def test_pods_refused_by_quota_or_priority_class_show_in_pending_then_clear(
        world: World) -> None:
    api, ns = world.api, "quota"  # a namespace of its own: the quota counts its pods only
    api.create(QUOTAS, {"apiVersion": "v1", "kind": "ResourceQuota", "metadata": {
        "name": "gpus", "namespace": ns}, "spec": {"hard": {"pods": "1"}}})
    api.create(FTJ, ftj_body("capped", namespace=ns, resources={"nodes": 2}))
    job = world.wait(lambda: api.get(JOBS, ns, "capped-a1"), "Job capped-a1")
    assert len(start_job_pods(api, job)) == 1  # the quota admits one of two ranks
    _, message = world.wait(
        lambda: (r := pending_reason(world, ns, "capped")) and r[0] == "PodCreationFailed"
        and r, "PodCreationFailed in the Pending condition")
    assert message.startswith('Job capped-a1 cannot create pods: Error creating: pods '
                              '"capped-a1-1" is forbidden: exceeded quota: gpus')
    assert message.endswith("(1/2 pods created)")
    assert (api.get(FTJ, ns, "capped") or {})["status"]["phase"] == "Pending"
    # The event is posted after the status write that carries the same words.
    world.wait(lambda: any(e["reason"] == "PodCreationFailed" and e["type"] == "Warning"
                           for e in api.find("v1/events", ns)
                           if e["involvedObject"]["name"] == "capped"), "the Warning event")
    api.delete(QUOTAS, ns, "gpus")  # the admin raises the quota: the controller retries
    assert len(start_job_pods(api, job)) == 1
    world.wait(lambda: (api.get(FTJ, ns, "capped") or {}).get("status", {}).get("phase")
               == "Running", "capped Running once every pod is created")
    assert pending_reason(world, ns, "capped") == ("AllRanksRunning", "2/2 ranks running")

    api.create(FTJ, ftj_body("urgent", namespace=ns, pod={"priorityClassName": "gpu-high"}))
    job = world.wait(lambda: api.get(JOBS, ns, "urgent-a1"), "Job urgent-a1")
    assert start_job_pods(api, job) == []
    world.wait(lambda: (r := pending_reason(world, ns, "urgent")) and "no PriorityClass with "
               "name gpu-high was found" in r[1] and r[0] == "PodCreationFailed",
               "the missing PriorityClass in the Pending condition")
    api.create(PRIORITY_CLASSES, {"apiVersion": "scheduling.k8s.io/v1", "kind":
                                  "PriorityClass", "metadata": {"name": "gpu-high"},
                                  "value": 1000})
    assert len(start_job_pods(api, job)) == 1
    world.wait(lambda: (r := pending_reason(world, ns, "urgent")) and r[0] == "AllRanksRunning",
               "urgent Running once its PriorityClass exists")
