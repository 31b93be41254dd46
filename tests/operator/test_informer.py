"""informer.py against the emulated API server: the trainer pods it keeps follow their
creates, changes and deletes; an event that leaves the kept entry as it was wakes nobody; the
API server filters by label (other pods never reach the operator); a relist after 410 Gone
drops what was deleted while the watch was down."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import kopf

from kubetune_operator.builders import LABEL_JOB
from kubetune_operator.informer import Informer
from kubetune_operator.kube import PODS, KubeApi
from support.kube_emulator import EmulatorThread
from support.operator_process import PODS as POD_PLURAL

NS = "default"


def create_pod(api: EmulatorThread, name: str, labels: dict[str, str]) -> None:
    api.create(POD_PLURAL, {"apiVersion": "v1", "kind": "Pod", "metadata": {
        "name": name, "namespace": NS, "labels": labels}})
    api.patch(POD_PLURAL, NS, name, {"status": {"phase": "Pending"}}, subresource="status")


async def until(condition: Callable[[], object], timeout: float = 60.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition never held"
        await asyncio.sleep(0.02)


class Follower:
    """An informer of the labelled pods that keeps their phase and records whom it woke."""

    def __init__(self, api: EmulatorThread) -> None:
        self.client = KubeApi(lambda: kopf.ConnectionInfo(server=api.url, token="t"))
        self.woken: list[tuple[str, str]] = []
        self.informer = Informer(self.client, PODS, LABEL_JOB, [],
                                 lambda body: {"phase": body.get("status", {}).get("phase")},
                                 lambda *key: self.woken.append(key))

    def phases(self) -> list[str]:
        return [e["phase"] for e in self.informer.get(NS, "ft")]

    async def __aenter__(self) -> Follower:
        self.task = asyncio.create_task(self.informer.run())
        await asyncio.wait_for(self.informer.ready.wait(), 60)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        await self.client.close()


def test_the_informer_follows_creates_changes_and_deletes() -> None:
    with EmulatorThread() as api:
        create_pod(api, "ft-a1-0", {LABEL_JOB: "ft"})
        create_pod(api, "web", {"app": "web"})
        requests_before = len(api.emulator._requests)

        async def follow() -> None:
            async with Follower(api) as follower:
                assert follower.phases() == ["Pending"] and follower.woken == []  # listed
                assert list(follower.informer.entries) == [(NS, "ft")]  # not the web pod
                api.patch(POD_PLURAL, NS, "ft-a1-0", {"status": {"phase": "Running"}},
                          subresource="status")
                await until(lambda: follower.phases() == ["Running"])
                assert follower.woken == [(NS, "ft")]
                # A change of a field the informer does not keep, then one it keeps.
                api.patch(POD_PLURAL, NS, "ft-a1-0", {"metadata": {"annotations": {"a": "b"}}})
                api.patch(POD_PLURAL, NS, "ft-a1-0",
                          {"status": {"phase": "Succeeded"}}, subresource="status")
                await until(lambda: follower.phases() == ["Succeeded"])
                assert follower.woken == [(NS, "ft")] * 2
                create_pod(api, "web-2", {"app": "web"})
                api.delete(POD_PLURAL, NS, "ft-a1-0")
                await until(lambda: not follower.informer.entries)
                assert follower.woken == [(NS, "ft")] * 3

        asyncio.run(follow())
        reads = [r for r in list(api.emulator._requests)[requests_before:]
                 if r.method.value == "GET"]
        assert reads and all(r.params.get("labelSelector") == LABEL_JOB for r in reads)


def test_a_relist_after_410_drops_what_was_deleted_meanwhile() -> None:
    with EmulatorThread() as api:
        create_pod(api, "ft-a1-0", {LABEL_JOB: "ft"})

        async def follow() -> None:
            async with Follower(api) as follower:
                assert follower.phases() == ["Pending"]
                api.call(api.emulator.partition_watches)
                api.delete(POD_PLURAL, NS, "ft-a1-0")
                api.call(api.emulator.compact)  # the watch cannot resume: 410, then a list
                api.call(api.emulator.heal_watches)
                await until(lambda: not follower.informer.entries)
                assert follower.woken == [(NS, "ft")]

        asyncio.run(follow())
