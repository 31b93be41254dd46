"""What a reconcile costs when little changed (bench/operator_scale.py measures it at 1000
jobs x 8 pods): most reconciles of a FineTuneJob (every pod phase, every status write) see the
same spec again, and the spec is validated only when its content changed."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from typing import Any

import kopf
import pytest

from kubetune_api.load import validate_job
from kubetune_operator import reconciler as reconciler_module
from kubetune_operator.reconciler import InvalidSpec
from support.in_process import in_process_reconciler
from support.jobs import ftj_body
from support.kube_emulator import EmulatorThread
from support.operator_process import FTJ

NS = "default"


def counting_validation(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    validated: list[str] = []

    def validate(body: dict[str, Any], **kwargs: Any) -> Any:
        validated.append(body["metadata"]["name"])
        return validate_job(body, **kwargs)

    monkeypatch.setattr(reconciler_module, "validate_job", validate)
    monkeypatch.setattr(kopf, "event", lambda *args, **kwargs: None)  # no kopf context here
    return validated


@contextlib.contextmanager
def api_with_one_job() -> Iterator[EmulatorThread]:
    """An emulated API server holding one FineTuneJob, `job`."""
    with EmulatorThread() as api:
        api.emulator.declare(FTJ, "FineTuneJob", shortnames=["ftj"])
        api.create(FTJ, ftj_body("job"))
        yield api


def test_an_unchanged_spec_is_validated_once(monkeypatch: pytest.MonkeyPatch) -> None:
    validated = counting_validation(monkeypatch)
    with api_with_one_job() as api:

        async def reconciles() -> None:
            async with in_process_reconciler(api) as reconciler:
                await reconciler.reconcile(NS, "job")  # creates the attempt, writes status
                api.patch(FTJ, NS, "job", {"metadata": {"labels": {"team": "a"}}})
                await reconciler.reconcile(NS, "job")
                await reconciler.reconcile(NS, "job")
                job = await reconciler._validated_job(api.get(FTJ, NS, "job"), (NS, "job"))
                assert job.metadata["labels"] == {"team": "a"}  # this body's, not the cached

        asyncio.run(reconciles())
        assert api.get(FTJ, NS, "job")["status"]["phase"] == "Pending"
    assert validated == ["job"]


def test_a_changed_spec_is_validated_again(monkeypatch: pytest.MonkeyPatch) -> None:
    validated = counting_validation(monkeypatch)
    with api_with_one_job() as api:

        async def reconciles() -> None:
            async with in_process_reconciler(api) as reconciler:
                await reconciler.reconcile(NS, "job")
                api.patch(FTJ, NS, "job", {"spec": {"method": {"type": "bogus"}}})
                with pytest.raises(InvalidSpec, match="method"):
                    await reconciler.reconcile(NS, "job")

        asyncio.run(reconciles())
        status = api.get(FTJ, NS, "job")["status"]
        assert status["phase"] == "Failed"
        assert any(c.get("reason") == "InvalidSpec" for c in status["conditions"])
    assert validated == ["job", "job"]
