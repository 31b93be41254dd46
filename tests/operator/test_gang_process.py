"""Gang scheduling without Kueue, with the real operator process: a Volcano or coscheduling
job's attempt gets its scheduler's PodGroup (minMember = nodes, minResources = the ranks'
requests), owned by the attempt's Job and gone with it; its pods name it; a PodGroup stuck
Pending shows its reason in the FineTuneJob's status. Tests play the scheduler."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

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
from support.podgroups import COSCHEDULING_PODGROUPS, POD_GROUP_CRDS, VOLCANO_PODGROUPS

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
NS = "default"


def gang_job(name: str, scheduler: str, nodes: int) -> dict[str, Any]:
    body: dict[str, Any] = yaml.safe_load((ROOT / "examples" / "tiny-lora.yaml").read_text())
    body["metadata"] = {"name": name, "namespace": NS}
    body["spec"]["resources"] = {"nodes": nodes, "gpusPerNode": 0}
    body["spec"]["pod"] = {"schedulerName": scheduler, "cpu": "2", "memory": "3Gi"}
    return body


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OperatorCluster]:
    with EmulatorThread() as api:
        api.emulator.declare(FTJ, "FineTuneJob", shortnames=["ftj"])
        for crd in POD_GROUP_CRDS:
            api.emulator.register_crd(crd)
        with OperatorProcess(api, tmp_path_factory.mktemp("operator")) as operator:
            yield OperatorCluster(api, operator)


def test_volcano_job_gets_a_pod_group_with_min_member_2(cluster: OperatorCluster) -> None:
    cluster.api.create(FTJ, gang_job("volc", "volcano", nodes=2))
    job = cluster.job("volc-a1")
    group = cluster.wait(lambda: cluster.api.get(VOLCANO_PODGROUPS, NS, "volc-a1"),
                         "the Volcano PodGroup")
    assert group["spec"]["minMember"] == 2
    assert group["spec"]["minResources"] == {"cpu": "4", "memory": str(2 * 3 * 2**30)}
    [owner] = group["metadata"]["ownerReferences"]
    assert (owner["kind"], owner["name"], owner["uid"]) == ("Job", "volc-a1",
                                                            job["metadata"]["uid"])
    template = job["spec"]["template"]
    assert template["metadata"]["annotations"]["scheduling.k8s.io/group-name"] == "volc-a1"
    assert template["spec"]["schedulerName"] == "volcano"
    assert cluster.api.get(COSCHEDULING_PODGROUPS, NS, "volc-a1") is None

    # Volcano cannot place the gang: its PodGroup says why, and so do the pods' conditions.
    cluster.api.patch(VOLCANO_PODGROUPS, NS, "volc-a1", {"status": {
        "phase": "Pending", "conditions": [{
            "type": "Unschedulable", "status": "True", "reason": "NotEnoughResources",
            "message": "2/2 tasks in gang unschedulable: 0/3 nodes are available",
            "transitionID": "t1", "lastTransitionTime": "2026-01-01T00:00:00Z"}]}})
    for pod in start_job_pods(cluster.api, job, phase="Pending"):
        set_pod_state(cluster.api, NS, pod["metadata"]["name"], "Pending", conditions=[{
            "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
            "message": "pod group is not ready, 2 Pending, 2 minAvailable"}])

    def gang_condition() -> dict[str, Any] | None:
        return next((c for c in cluster.status("volc").get("conditions", [])
                     if c["type"] == "Running" and c["reason"] == "GangPending"), None)
    condition = cluster.wait(gang_condition, "the PodGroup's reason in the status")
    assert condition["status"] == "False"
    assert condition["message"] == ("PodGroup volc-a1 (volcano) Pending: NotEnoughResources: "
                                    "2/2 tasks in gang unschedulable: 0/3 nodes are available")
    assert cluster.status("volc")["phase"] == "Pending"

    # The attempt goes, its PodGroup with it (owner reference: the garbage collector).
    cluster.api.delete(FTJ, NS, "volc")
    cluster.wait(lambda: cluster.api.get(JOBS, NS, "volc-a1") is None, "the Job gone")
    cluster.wait(lambda: cluster.api.get(VOLCANO_PODGROUPS, NS, "volc-a1") is None,
                 "the PodGroup gone with its Job")
    for pod in cluster.api.find(PODS, NS):
        cluster.api.delete(PODS, NS, pod["metadata"]["name"])


def test_coscheduling_job_labels_its_pods_and_waits_on_the_pod_group(
        cluster: OperatorCluster) -> None:
    cluster.api.create(FTJ, gang_job("cosched", "scheduler-plugins-scheduler", nodes=3))
    job = cluster.job("cosched-a1")
    group = cluster.wait(lambda: cluster.api.get(COSCHEDULING_PODGROUPS, NS, "cosched-a1"),
                         "the coscheduling PodGroup")
    assert group["apiVersion"] == "scheduling.x-k8s.io/v1alpha1"
    assert group["spec"] == {"minMember": 3, "minResources": {
        "cpu": "6", "memory": str(3 * 3 * 2**30)}}
    labels = job["spec"]["template"]["metadata"]["labels"]
    assert labels["scheduling.x-k8s.io/pod-group"] == "cosched-a1"
    assert "scheduling.k8s.io/group-name" not in job["spec"]["template"]["metadata"].get(
        "annotations", {})

    cluster.api.patch(COSCHEDULING_PODGROUPS, NS, "cosched-a1",
                      {"status": {"phase": "PreScheduling"}}, subresource="status")
    start_job_pods(cluster.api, job, phase="Pending")
    cluster.wait(lambda: any(c["reason"] == "GangPending" and c["message"] == (
        "PodGroup cosched-a1 (coscheduling) PreScheduling: waiting for all 3 ranks to fit "
        "at once") for c in cluster.status("cosched").get("conditions", [])),
        "the PodGroup's phase in the status")


def test_a_gang_scheduler_without_its_crd_fails_the_job_saying_so(tmp_path: Path) -> None:
    with EmulatorThread() as api:
        api.emulator.declare(FTJ, "FineTuneJob", shortnames=["ftj"])
        with OperatorProcess(api, tmp_path) as operator:
            cluster = OperatorCluster(api, operator)
            api.create(FTJ, gang_job("nocrd", "volcano", nodes=2))
            status = cluster.wait_phase("nocrd", "Failed")
    message = " ".join(c["message"] for c in status["conditions"])
    assert "schedulerName 'volcano' needs scheduling.volcano.sh/v1beta1 PodGroups" in message
