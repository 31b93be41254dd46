"""The operator's own cache of its trainer pods and Jobs: per resource and watched namespace,
a paged list and then a watch, both with the label selector applied by the API server.

kopf used to watch them into its indexes. kopf runs each watch event of each object through
its whole handler machinery (a Body view, three loggers, the index handler called with every
kwarg resolved, cause detection, a diff base, the event handler, a patch check); at 1000 jobs
x 8 pods, 24,000 pod events, that was most of the operator's CPU (bench/operator_scale.py
--profile-top). Here an event costs its JSON decoding, slim.py and a dict update. kopf still
watches and handles FineTuneJobs.

What kopf's indexes promised holds: the reconciler decides nothing before every initial list
is in (the startup handler waits for `ready`); an object's entry is replaced at each event and
removed at its DELETED event; each change wakes the FineTuneJob it belongs to. An event that
leaves the kept entry as it was (a kubelet heartbeat, a field slim.py drops) wakes nobody.
Unlike kopf's indexes, a relist (after 410 Gone) replaces the cache, so an object deleted
while the watch was down leaves it, and its FineTuneJob is woken.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Iterable
from typing import Any

import aiohttp

from kubetune_operator.builders import LABEL_JOB
from kubetune_operator.kube import ApiError, KubeApi, Resource

logger = logging.getLogger(__name__)

Entry = dict[str, Any]
Key = tuple[str, str]  # (namespace, the kubetune.dev/finetunejob label: a base name)
Keep = Callable[[dict[str, Any]], Entry | None]  # what the cache keeps of a body (None: nothing)
Changed = Callable[[str, str], None]  # (namespace, base name): its children changed

PAGE_SIZE = 500  # objects per page of an initial list
WATCH_SECONDS = 300  # the server ends each watch after this long; it is resumed at once
RETRY_SECONDS = (1.0, 2.0, 5.0, 10.0)  # after a failed list or watch, then every 10 s


class Expired(Exception):
    """410 Gone: the watch's resourceVersion is older than the server's history."""


class Informer:
    def __init__(self, api: KubeApi, resource: Resource, selector: str,
                 namespaces: Iterable[str], keep: Keep, changed: Changed) -> None:
        self.api, self.resource, self.selector = api, resource, selector
        self.namespaces = list(namespaces) or [""]  # "": the whole cluster
        self.keep, self.changed = keep, changed
        self.entries: dict[Key, dict[str, Entry]] = {}  # key → uid → entry
        self._keys: dict[str, Key] = {}  # uid → key
        self._unlisted = set(self.namespaces)
        self.ready = asyncio.Event()  # every namespace listed once

    def get(self, namespace: str, base: str) -> list[Entry]:
        return list(self.entries.get((namespace, base), {}).values())

    async def run(self) -> None:
        await asyncio.gather(*(self._follow(namespace) for namespace in self.namespaces))

    async def _follow(self, namespace: str) -> None:
        """One namespace's list and watches, for good: a bug in one event's handling is
        logged and the namespace listed again, never the end of the watch."""
        while True:
            try:
                await self._list_and_watch(namespace)
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("%s: unexpected error; listing again", self.resource.plural)
                await asyncio.sleep(RETRY_SECONDS[0])

    async def _list_and_watch(self, namespace: str) -> None:
        version = await self._retrying(self._relist, namespace)
        self._unlisted.discard(namespace)
        if not self._unlisted:
            self.ready.set()
        while True:
            try:
                version = await self._watch(namespace, version)
            except Expired:
                logger.info("%s watch expired (410); listing again", self.resource.plural)
                version = await self._retrying(self._relist, namespace)
            except (ApiError, aiohttp.ClientError, TimeoutError, ValueError) as exc:
                logger.warning("%s watch failed (%s); resuming in %.0fs", self.resource.plural,
                               exc, RETRY_SECONDS[0])
                await asyncio.sleep(RETRY_SECONDS[0])

    async def _retrying(self, step: Callable[[str], Any], namespace: str) -> str:
        for attempt in range(10**9):
            try:
                return str(await step(namespace))
            except (ApiError, aiohttp.ClientError, TimeoutError, ValueError) as exc:
                delay = RETRY_SECONDS[min(attempt, len(RETRY_SECONDS) - 1)]
                logger.warning("cannot list %s%s (%s); retrying in %.0fs", self.resource.plural,
                               f" in namespace {namespace}" if namespace else "", exc, delay)
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    async def _relist(self, namespace: str) -> str:
        """Every object, page by page; the cache of this namespace replaced by them."""
        params = {"labelSelector": self.selector, "limit": str(PAGE_SIZE)}
        bodies: list[dict[str, Any]] = []
        while True:
            page = await self.api.request("GET", self.resource.path(namespace or None),
                                          params=params)
            if page is None:
                raise ApiError(404, f"{self.resource.plural} not served")
            bodies += page.get("items") or []
            meta = page.get("metadata") or {}
            if not meta.get("continue"):
                break
            params = {**params, "continue": meta["continue"]}
        listed = {b["metadata"]["uid"] for b in bodies}
        gone = [uid for uid, key in self._keys.items() if not namespace or key[0] == namespace]
        notify = self.ready.is_set()  # the first lists wake nobody: kopf resumes every job
        for uid in gone:
            if uid not in listed:
                self._remove(uid, notify)
        for body in bodies:
            self._upsert(body, notify)
        return str(meta.get("resourceVersion", ""))

    async def _watch(self, namespace: str, version: str) -> str:
        """One watch stream, to its end; the last resourceVersion seen."""
        params = {"watch": "true", "labelSelector": self.selector, "resourceVersion": version,
                  "allowWatchBookmarks": "true", "timeoutSeconds": str(WATCH_SECONDS)}
        async with self.api.stream(self.resource.path(namespace or None), params) as response:
            if response.status == 410:
                raise Expired()
            if response.status >= 400:
                raise ApiError(response.status, (await response.text())[:200])
            pending = b""
            async for chunk in response.content.iter_any():
                *lines, pending = (pending + chunk).split(b"\n")
                for line in lines:
                    if line.strip():
                        version = self._apply(json.loads(line), version)
        return version

    def _apply(self, event: dict[str, Any], version: str) -> str:
        kind, body = event.get("type"), event.get("object") or {}
        if kind == "ERROR":
            if body.get("code") == 410:
                raise Expired()
            raise ApiError(int(body.get("code") or 500), str(body.get("message")))
        if kind == "DELETED":
            self._remove(body["metadata"]["uid"], notify=True)
        elif kind in ("ADDED", "MODIFIED"):
            self._upsert(body, notify=True)
        return str(body.get("metadata", {}).get("resourceVersion") or version)

    def _upsert(self, body: dict[str, Any], notify: bool) -> None:
        meta = body["metadata"]
        uid, label = meta["uid"], (meta.get("labels") or {}).get(LABEL_JOB)
        entry = self.keep(body) if label is not None else None
        old_key = self._keys.get(uid)
        old = self.entries[old_key].get(uid) if old_key is not None else None
        if entry is None or label is None:
            self._remove(uid, notify)
            return
        key = (str(meta["namespace"]), str(label))
        if old_key is not None and old_key != key:
            self._remove(uid, notify)
        self.entries.setdefault(key, {})[uid] = entry
        self._keys[uid] = key
        if notify and entry != old:
            self.changed(*key)

    def _remove(self, uid: str, notify: bool) -> None:
        key = self._keys.pop(uid, None)
        if key is None:
            return
        entries = self.entries[key]
        entries.pop(uid, None)
        if not entries:
            del self.entries[key]
        if notify:
            self.changed(*key)
