"""A ghost in kopf's index: after a watch expires (410 Gone) kopf relists, and its indexes
drop an entry only on a DELETED event, so a pod deleted in the gap stays in the index. The
reconciler's uid-precondition DELETE then finds it gone (404): it must leave it out and go on,
never wait for it forever (reconciler._gone)."""

from __future__ import annotations

import asyncio
from typing import Any

import kopf
import pytest

from kubetune_operator import status as st
from kubetune_operator.builders import LABEL_ATTEMPT, LABEL_JOB, LABEL_OWNER_UID
from support.in_process import in_process_reconciler
from support.jobs import ftj_body
from support.kube_emulator import EmulatorThread, now_stamp
from support.operator_process import FTJ, JOBS

NS = "default"


def ghost_pod(owner_uid: str) -> dict[str, Any]:
    """Attempt 1's rank 0, Terminating since 10 minutes: gone from the API server."""
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {
        "name": "ghost-a1-0", "namespace": NS, "uid": "ghost-pod-uid",
        "deletionTimestamp": now_stamp(-600),
        "labels": {LABEL_JOB: "ghost", LABEL_ATTEMPT: "1", LABEL_OWNER_UID: owner_uid}},
        "status": {"phase": "Running"}}


def test_a_ghost_pod_never_wedges_the_next_attempt(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kopf, "event", lambda *args, **kwargs: None)  # no kopf context here
    with EmulatorThread() as api:
        api.emulator.declare(FTJ, "FineTuneJob", shortnames=["ftj"])
        uid = api.create(FTJ, ftj_body("ghost"))["metadata"]["uid"]
        api.patch(FTJ, NS, "ghost", {"status": {
            "phase": "Restarting", "attempt": 2, "restarts": 1}}, subresource="status")

        async def two_reconciles() -> None:
            async with in_process_reconciler(api) as reconciler:
                reconciler.children = lambda ns, base: st.Children([], [ghost_pod(uid)])
                await reconciler.reconcile(NS, "ghost")  # force-deletes it: 404
                assert api.get(JOBS, NS, "ghost-a2") is None  # still waiting for it
                await reconciler.reconcile(NS, "ghost")  # the plan without the ghost

        asyncio.run(two_reconciles())
        assert api.get(JOBS, NS, "ghost-a2") is not None
