"""Spec-size work (validating a spec of up to load.MAX_SPEC_BYTES, building its children) runs
off the operator's event loop: while one job's spec work is under way, other jobs reconcile.
Shown by states: the slow job's validation waits until another job's Job exists, which can
only happen if the loop is free meanwhile."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import kopf
import pytest

from kubetune_api.load import validate_job
from kubetune_operator import reconciler as reconciler_module
from support.in_process import in_process_reconciler
from support.jobs import ftj_body
from support.kube_emulator import EmulatorThread
from support.operator_process import FTJ, JOBS

NS = "default"
PATIENCE_SECONDS = 120  # how long the slow validation waits for the other job's Job


def test_a_slow_spec_leaves_other_jobs_reconciling(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kopf, "event", lambda *args, **kwargs: None)  # no kopf context here
    with EmulatorThread() as api:
        api.emulator.declare(FTJ, "FineTuneJob", shortnames=["ftj"])
        api.create(FTJ, ftj_body("slow"))
        api.create(FTJ, ftj_body("quick"))

        def validate(body: dict[str, Any], **kwargs: Any) -> Any:
            if body["metadata"]["name"] == "slow":  # a huge spec: busy until the other is done
                deadline = time.monotonic() + PATIENCE_SECONDS
                while api.get(JOBS, NS, "quick-a1") is None:
                    if time.monotonic() > deadline:
                        raise AssertionError("no other job reconciled while a spec was "
                                             "validated: the event loop waited on it")
                    time.sleep(0.05)
            return validate_job(body, **kwargs)

        monkeypatch.setattr(reconciler_module, "validate_job", validate)

        async def both() -> None:
            async with in_process_reconciler(api) as reconciler:
                slow = asyncio.create_task(reconciler.reconcile(NS, "slow"))
                await asyncio.sleep(0)  # the slow one starts first
                await asyncio.gather(slow, reconciler.reconcile(NS, "quick"))

        asyncio.run(both())
        assert api.get(JOBS, NS, "slow-a1") is not None
        assert api.get(JOBS, NS, "quick-a1") is not None
