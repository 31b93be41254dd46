"""The operator's API client (kubetune_operator.kube) against transport faults: each kind is
retried, a run of faults longer than its retries reaches the caller (the handlers' own retry
takes over: tests/operator/test_operator_process.py), 401 logs in again once."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import aiohttp
import kopf
import pytest

from kubetune_operator import kube
from support.kube_emulator import EmulatorThread, default_emulator
from support.strict_emulator import DROP, STALL, StrictEmulator

CONFIG_MAPS = kube.CONFIG_MAPS
NS = "default"


@pytest.fixture(scope="module")
def api() -> Iterator[EmulatorThread]:
    with EmulatorThread(default_emulator(StrictEmulator, stall_seconds=3.0)) as thread:
        yield thread


@pytest.fixture
def emulator(api: EmulatorThread) -> StrictEmulator:
    assert isinstance(api.emulator, StrictEmulator)
    api.emulator.hits.clear()
    return api.emulator


class Logins:
    def __init__(self, url: str) -> None:
        self.url, self.count = url, 0

    def __call__(self) -> kopf.ConnectionInfo:
        self.count += 1
        return kopf.ConnectionInfo(server=self.url, token=f"token-{self.count}")


def run(api: EmulatorThread, *calls: Any) -> tuple[list[Any], Logins]:
    """Run coroutine factories f(client) in order on one client; their results."""
    logins = Logins(api.url)

    async def main() -> list[Any]:
        client = kube.KubeApi(logins)
        try:
            return [await call(client) for call in calls]
        finally:
            await client.close()
    return asyncio.run(main()), logins


def configmap(name: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": {}}


@pytest.mark.parametrize("fault", [500, 503, 429, DROP], ids=str)
def test_each_transient_fault_is_retried(api: EmulatorThread, emulator: StrictEmulator,
                                         fault: int | str) -> None:
    emulator.inject("POST", "configmaps", fault)
    [created], _ = run(api, lambda c: c.create(CONFIG_MAPS, NS, configmap(f"retry-{fault}")))
    assert created is True
    assert emulator.hits == [("POST", "configmaps", fault)]
    assert api.get("v1/configmaps", NS, f"retry-{fault}")


def test_a_stalled_request_times_out_and_is_retried(api: EmulatorThread,
                                                    emulator: StrictEmulator,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    # The 30 s default is the product's; a unit test shortens it rather than wait it out.
    monkeypatch.setattr(kube, "REQUEST_TIMEOUT", 0.5)
    emulator.inject("GET", "configmaps", STALL)
    api.create("v1/configmaps", {**configmap("stalled"), "metadata": {
        "name": "stalled", "namespace": NS}})
    [found], _ = run(api, lambda c: c.get(CONFIG_MAPS, NS, "stalled"))
    assert found is not None and found["metadata"]["name"] == "stalled"
    assert emulator.hits == [("GET", "configmaps", STALL)]


@pytest.mark.slow  # the client's whole backoff: about 5 s
def test_more_faults_than_retries_reach_the_caller(api: EmulatorThread,
                                                   emulator: StrictEmulator) -> None:
    attempts = len(kube.RETRY_DELAYS) + 1
    faults = [503, 429, DROP, 500, 503, 502][:attempts]
    assert faults[-1] == 503
    emulator.inject("PATCH", "configmaps", *faults)
    api.create("v1/configmaps", {**configmap("unlucky"), "metadata": {
        "name": "unlucky", "namespace": NS}})
    with pytest.raises(kube.ApiError, match="503"):
        run(api, lambda c: c.patch(CONFIG_MAPS, NS, "unlucky", {"data": {"a": "1"}}))
    assert [hit[2] for hit in emulator.hits] == faults
    assert emulator.pending_faults() == 0
    # The next call (the handler's retry) goes through.
    [patched], _ = run(api, lambda c: c.patch(CONFIG_MAPS, NS, "unlucky", {"data": {"a": "2"}}))
    assert patched["data"] == {"a": "2"}


@pytest.mark.slow
def test_dropped_connections_past_the_retries_raise_a_client_error(
        api: EmulatorThread, emulator: StrictEmulator) -> None:
    # aiohttp itself resends an idempotent request once when a kept-alive connection turns out
    # closed, so a GET may use two drops per attempt of the client.
    attempts = len(kube.RETRY_DELAYS) + 1
    emulator.inject("GET", "configmaps", *[DROP] * (2 * attempts))
    with pytest.raises(aiohttp.ClientError):
        run(api, lambda c: c.get(CONFIG_MAPS, NS, "whatever"))
    assert len(emulator.hits) >= attempts
    emulator._queued.clear()


def test_401_logs_in_again_once(api: EmulatorThread, emulator: StrictEmulator) -> None:
    emulator.inject("GET", "configmaps", 401)
    [missing], logins = run(api, lambda c: c.get(CONFIG_MAPS, NS, "absent"))
    assert missing is None and logins.count == 2  # 404 is an answer: None
    emulator.inject("GET", "configmaps", 401, 401)
    with pytest.raises(kube.ApiError, match="401"):
        run(api, lambda c: c.get(CONFIG_MAPS, NS, "absent"))


@pytest.mark.parametrize("status", [400, 403, 422])
def test_client_errors_are_not_retried(api: EmulatorThread, emulator: StrictEmulator,
                                       status: int) -> None:
    emulator.inject("POST", "configmaps", status, status)
    with pytest.raises(kube.ApiError, match=str(status)):
        run(api, lambda c: c.create(CONFIG_MAPS, NS, configmap(f"bad-{status}")))
    assert emulator.pending_faults() == 1  # one attempt only
    emulator._queued.clear()


def test_conflict_on_create_means_it_exists(api: EmulatorThread) -> None:
    [first, second], _ = run(api, lambda c: c.create(CONFIG_MAPS, NS, configmap("twice")),
                             lambda c: c.create(CONFIG_MAPS, NS, configmap("twice")))
    assert (first, second) == (True, False)


def test_list_follows_continue_for_the_pages_it_may_read(api: EmulatorThread) -> None:
    for index in range(5):
        api.create("v1/configmaps", {"metadata": {"name": f"p{index}", "namespace": "pages"}})
    [every, one], _ = run(
        api, lambda c: c.list(CONFIG_MAPS, "pages", "", limit=2, pages=10),
        lambda c: c.list(CONFIG_MAPS, "pages", "", limit=2))
    assert [o["metadata"]["name"] for o in every] == [f"p{i}" for i in range(5)]
    assert [o["metadata"]["name"] for o in one] == ["p0", "p1"]
