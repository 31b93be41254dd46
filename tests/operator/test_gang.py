"""gang.py's pure parts: which scheduler is a gang scheduler, the PodGroup's shape, its
minResources arithmetic, and the Pending reason it gives."""

from __future__ import annotations

from typing import Any

import pytest

from kubetune_api.crd import Condition, FineTuneJobStatus
from kubetune_operator import gang


def job_manifest(ranks: int, requests: dict[str, str], priority: str | None = None
                 ) -> dict[str, Any]:
    spec: dict[str, Any] = {"containers": [{"name": "trainer", "resources": {
        "requests": requests}}]}
    if priority:
        spec["priorityClassName"] = priority
    return {"metadata": {"name": "j-a2", "namespace": "ns", "labels": {"a": "b"}},
            "spec": {"completions": ranks, "template": {"metadata": {}, "spec": spec}}}


def test_only_volcano_and_coscheduling_are_gang_schedulers() -> None:
    assert gang.gang_api("volcano") is gang.VOLCANO
    assert gang.gang_api("scheduler-plugins-scheduler") is gang.COSCHEDULING
    assert gang.gang_api(None) is None and gang.gang_api("default-scheduler") is None


def test_min_resources_sum_every_rank() -> None:
    manifest = job_manifest(4, {"cpu": "500m", "memory": "1.5Gi", "nvidia.com/gpu": "8",
                                "ephemeral-storage": "10G"})
    assert gang.min_resources(manifest) == {
        "cpu": "2", "ephemeral-storage": str(40 * 10**9), "memory": str(6 * 2**30),
        "nvidia.com/gpu": "32"}
    assert gang.min_resources(job_manifest(3, {"cpu": "250m"})) == {"cpu": "750m"}


def test_volcano_pod_group_copies_the_priority_and_is_owned_by_the_job() -> None:
    group = gang.build_pod_group(gang.VOLCANO, job_manifest(2, {"cpu": "1"}, "high"), "uid-1")
    assert group["spec"] == {"minMember": 2, "minResources": {"cpu": "2"},
                             "priorityClassName": "high"}
    assert group["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    assert group["metadata"]["labels"] == {"a": "b"}
    cosched = gang.build_pod_group(gang.COSCHEDULING, job_manifest(2, {}, "high"), "uid-1")
    assert cosched["spec"] == {"minMember": 2, "minResources": {}}  # no priority field there


@pytest.mark.parametrize(("gang_kind", "status", "expected"), [
    (gang.VOLCANO, {"phase": "Inqueue"},
     "PodGroup g (volcano) Inqueue: waiting for all 2 ranks to fit at once"),
    (gang.VOLCANO, {"phase": "Running"}, None),
    (gang.VOLCANO, {"phase": "Running", "conditions": [
        {"type": "Unschedulable", "status": "False", "reason": "x"}]}, None),
    (gang.VOLCANO, {"conditions": [{"type": "Unschedulable", "status": "True",
                                    "reason": "NotEnoughResources", "message": "m"}]},
     "PodGroup g (volcano) Pending: NotEnoughResources: m"),
    (gang.COSCHEDULING, {"phase": "Scheduled"}, None),
    (gang.COSCHEDULING, {"phase": "Pending"},
     "PodGroup g (coscheduling) Pending: waiting for all 2 ranks to fit at once"),
    (gang.COSCHEDULING, {}, None),  # no status yet: nothing to say
])
def test_pending_reason(gang_kind: gang.GangApi, status: dict[str, Any],
                        expected: str | None) -> None:
    group = {"metadata": {"name": "g"}, "spec": {"minMember": 2}, "status": status}
    assert gang.pending_reason(gang_kind, group) == expected
    assert gang.pending_reason(gang_kind, None) is None


def test_explain_pending_replaces_only_the_waiting_reason() -> None:
    waiting = Condition(type="Running", status="False", reason="Unschedulable", message="rank 0",
                        last_transition_time="t0")
    status = FineTuneJobStatus(phase="Pending", conditions=[waiting])
    explained = gang.explain_pending(status, "PodGroup g: why", 3)
    [condition] = explained.conditions
    assert (condition.reason, condition.message) == ("GangPending", "PodGroup g: why")
    assert condition.last_transition_time == "t0"  # still False: no transition
    assert gang.explain_pending(status, None, 3) is status
    running = FineTuneJobStatus(phase="Running", conditions=[waiting])
    assert gang.explain_pending(running, "PodGroup g: why", 3) is running
    failed_create = status.model_copy(update={"conditions": [waiting.model_copy(
        update={"reason": "PodCreationFailed"})]})
    assert gang.explain_pending(failed_create, "x", 3) is failed_create
