"""The emulated API server of the e2e harness: `KubeEmulator` plus what a cluster run needs.

- CRDs registered from their manifests (`register_crd`: served versions, scope, short names,
  the status subresource, `additionalPrinterColumns`);
- server-side Table printing for those CRDs (what `kubectl get ftj [-w]` asks for with
  `Accept: application/json;as=Table;g=meta.k8s.io;v=v1`), columns from simple JSONPaths;
- pod logs (`GET pods/<name>/log`, what `kubectl logs [-f]` asks for) as the kubelet serves
  them: the container's output so far (`tailLines`), or with `follow=true` a chunked stream
  that ends when the container has terminated; 400 while it is still waiting to start. The
  output is the pod runner's log file (`pod_log_path`);
- pods that a kubelet finishes: a deleted pod keeps its deletionTimestamp (grace period from
  the request, else `spec.terminationGracePeriodSeconds`) until the kubelet — the e2e pod
  runner — has stopped its process and deletes it with grace 0.

docs/e2e.md lists what the harness does not emulate.
"""

from __future__ import annotations

import asyncio
import datetime
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import attrs
import kmock
import yaml

from support.kube_emulator import JsonDict, KubeEmulator, _error, default_emulator

DEFAULT_POD_GRACE_SECONDS = 30.0
LOG_POLL_SECONDS = 0.1  # how often a followed log looks for new output
FINISHED_POD_PHASES = ("Succeeded", "Failed")
TABLE_MEDIA = "as=Table"


@dataclass(frozen=True)
class PrinterColumn:
    name: str
    type: str
    json_path: str
    description: str = ""
    priority: int = 0

    @classmethod
    def from_crd(cls, column: JsonDict) -> PrinterColumn:
        return cls(column["name"], column["type"], column["jsonPath"],
                   column.get("description", ""), int(column.get("priority", 0)))

    def definition(self) -> JsonDict:
        return {"name": self.name, "type": self.type, "format": "",
                "description": self.description, "priority": self.priority}

    def cell(self, obj: JsonDict, now: datetime.datetime) -> Any:
        value = json_path_value(obj, self.json_path)
        if value is not None and self.type == "date":
            return human_age(value, now)
        return value


NAME_COLUMN = {"name": "Name", "type": "string", "format": "name", "priority": 0,
               "description": "Name must be unique within a namespace."}


def json_path_value(obj: Any, path: str) -> Any:
    """`.a.b.c` (the simple JSONPaths printer columns use); None when a step is missing."""
    for part in path.strip().lstrip(".").split("."):
        obj = obj.get(part) if isinstance(obj, dict) else None
    return obj


def human_age(timestamp: str, now: datetime.datetime) -> str:
    """Kubernetes' duration.HumanDuration, as the API server renders `date` columns."""
    created = datetime.datetime.strptime(timestamp, "%Y-%m-%dT%H:%M:%SZ").replace(
        tzinfo=datetime.UTC)
    seconds = max(0, int((now - created).total_seconds()))
    minutes, hours, days = seconds // 60, seconds // 3600, seconds // 86400
    if seconds < 120:
        return f"{seconds}s"
    if minutes < 10:
        return f"{minutes}m{seconds % 60}s" if seconds % 60 else f"{minutes}m"
    if minutes < 180:
        return f"{minutes}m"
    if hours < 8:
        return f"{hours}h{minutes % 60}m" if minutes % 60 else f"{hours}h"
    if hours < 48:
        return f"{hours}h"
    return f"{days}d{hours % 24}h" if days < 8 and hours % 24 else f"{days}d"


@attrs.define(kw_only=True)
class ClusterEmulator(KubeEmulator):
    """`KubeEmulator` with registered CRDs, Table printing and kubelet-finished pods."""

    _columns: dict[kmock.resource, list[PrinterColumn]] = attrs.field(factory=dict, init=False)
    # The kubelet's side of pod logs: (namespace, pod name) -> the container's output file.
    pod_log_path: Callable[[str, str], Path] | None = None

    def register_crd(self, crd: JsonDict) -> None:
        spec, names = crd["spec"], crd["spec"]["names"]
        for version in spec["versions"]:
            if not version.get("served", True):
                continue
            resource = f"{spec['group']}/{version['name']}/{names['plural']}"
            self.declare(resource, names["kind"], namespaced=spec["scope"] == "Namespaced",
                         status="status" in (version.get("subresources") or {}),
                         shortnames=names.get("shortNames", ()))
            self._columns[kmock.resource(resource)] = [
                PrinterColumn.from_crd(c) for c in version.get("additionalPrinterColumns", [])]

    # --- pods: the kubelet removes them once their process has stopped ----------------------

    def delete_object(self, resource: str | kmock.resource, namespace: str | None, name: str,
                      *, propagation: str = "Background",
                      grace_seconds: float | None = None) -> JsonDict:
        res = kmock.resource(resource)
        if res.plural == "pods" and grace_seconds is None:
            pod = self.get_object(res, namespace, name)
            grace_seconds = float(pod.get("spec", {}).get("terminationGracePeriodSeconds",
                                                          DEFAULT_POD_GRACE_SECONDS))
        return super().delete_object(res, namespace, name, propagation=propagation,
                                     grace_seconds=grace_seconds)

    def _remove_later(self, res: kmock.resource, key: Any, seconds: float) -> None:
        self._terminating.add(key)  # no timer: the kubelet deletes it with grace 0

    # --- pod logs: the kubelet's container output ----------------------------------------------

    def _route(self, request: kmock.Request) -> Callable[[kmock.Request], Any] | None:
        if (request.resource is not None and request.resource.plural == "pods"
                and request.subresource == "log" and request.method == kmock.method.GET):
            return self._serve_log
        return super()._route(request)

    async def _serve_log(self, request: kmock.Request) -> Any:
        """What the kubelet answers (pkg/kubelet/server: getContainerLogs): the output so far,
        or with follow=true a stream until the container has terminated."""
        namespace, name = request.namespace or "default", request.name or ""
        pod = self.get_object("v1/pods", namespace, name)
        path = self.pod_log_path(namespace, name) if self.pod_log_path is not None else None
        if path is None or not path.exists():
            container = request.params.get("container") or "trainer"
            raise _error(400, "BadRequest", f'container "{container}" in pod "{name}" is '
                         "waiting to start: ContainerCreating")
        data = path.read_bytes()
        tail = request.params.get("tailLines")
        if tail is not None:
            lines = data.splitlines(keepends=True)
            data = b"".join(lines[len(lines) - int(tail):]) if int(tail) else b""
        # The API server's query conversion: anything but "", "false" or "0" is true (clients
        # send "true", the Python client "True").
        if str(request.params.get("follow", "")).lower() in ("", "false", "0"):
            return data
        return self._follow(namespace, pod["metadata"]["uid"], path, data,
                            path.stat().st_size)

    async def _follow(self, namespace: str, uid: str, path: Path, first: bytes,
                      offset: int) -> AsyncIterator[bytes]:
        yield first  # headers go out now, even when there is no output yet
        while True:
            finished = self._container_finished(namespace, uid)
            with path.open("rb") as log:
                log.seek(offset)
                chunk = log.read()
            offset += len(chunk)
            if chunk:
                yield chunk
            if finished:  # read once more after it ended: nothing is left behind
                return
            await asyncio.sleep(LOG_POLL_SECONDS)

    def _container_finished(self, namespace: str, uid: str) -> bool:
        pod = next((o for o in self.find("v1/pods", namespace) if o["metadata"]["uid"] == uid),
                   None)
        return pod is None or pod.get("status", {}).get("phase") in FINISHED_POD_PHASES

    # --- Table printing ------------------------------------------------------------------------

    def _table_columns(self, request: kmock.Request) -> list[PrinterColumn] | None:
        if TABLE_MEDIA not in request.headers.get("Accept", ""):
            return None
        return self._columns.get(request.resource) if request.resource is not None else None

    def _table(self, objects: list[JsonDict], columns: list[PrinterColumn],
               resource_version: str = "") -> JsonDict:
        now = datetime.datetime.now(datetime.UTC)
        return {"kind": "Table", "apiVersion": "meta.k8s.io/v1",
                "metadata": {"resourceVersion": resource_version},
                "columnDefinitions": [NAME_COLUMN, *(c.definition() for c in columns)],
                "rows": [{"cells": [o["metadata"]["name"], *(c.cell(o, now) for c in columns)],
                          "object": {"kind": "PartialObjectMetadata",
                                     "apiVersion": "meta.k8s.io/v1",
                                     "metadata": o["metadata"]}} for o in objects]}

    async def _serve_list(self, request: kmock.Request) -> JsonDict:
        listing = await super()._serve_list(request)
        columns = self._table_columns(request)
        if columns is None:
            return listing
        return self._table(listing["items"], columns, listing["metadata"]["resourceVersion"])

    async def _serve_fetch(self, request: kmock.Request) -> JsonDict:
        obj = await super()._serve_fetch(request)
        columns = self._table_columns(request)
        return obj if columns is None else self._table([obj], columns)

    async def _serve_watch(self, request: kmock.Request) -> AsyncIterator[Any]:
        columns = self._table_columns(request)
        async for event in super()._serve_watch(request):
            if columns is not None and isinstance(event, dict) and event["type"] != "ERROR":
                event = {**event, "object": self._table([event["object"]], columns)}
            yield event


def cluster_emulator(*crd_files: Path) -> ClusterEmulator:
    """Core, batch and kopf resources (as `default_emulator`) plus the CRDs in `crd_files`."""
    emulator = default_emulator(ClusterEmulator)
    assert isinstance(emulator, ClusterEmulator)
    for path in crd_files:
        for document in yaml.safe_load_all(path.read_text()):
            if document and document.get("kind") == "CustomResourceDefinition":
                emulator.register_crd(document)
    return emulator
