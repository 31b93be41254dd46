"""A Kubernetes API server on loopback for operator tests and benchmarks.

kmock's `KubernetesEmulator` gives the HTTP plumbing (routing, discovery, Status errors, user
reactions that pre-empt the defaults, e.g. `emu['post /api/v1/namespaces/ns/pods'] << 500`).
It keeps objects as plain merged dicts, so this subclass replaces its storage with the
API-server semantics an operator depends on:

- `metadata.uid`, `resourceVersion` (one global counter), `generation` (bumped when anything
  outside metadata/status changes), `creationTimestamp`, `generateName`;
- label and field selectors on list and watch; watch resume from a resourceVersion (410 when
  it is older than the event log), `timeoutSeconds`, DELETED/ADDED when an object leaves/enters
  a label selection;
- the status subresource: the main resource ignores status, `/status` changes only status;
- merge, strategic-merge (treated as merge) and JSON patches, PUT with resourceVersion
  preconditions (409 on conflict), 409 AlreadyExists on create;
- finalizers (deletionTimestamp until they are removed) and owner-reference garbage collection
  (background cascade; `propagationPolicy: Orphan` drops the reference instead);
- Namespace and CRD deletion: the Namespace (phase Terminating) or CRD (condition Terminating)
  gets a deletionTimestamp, everything in it (its namespaced objects; its custom resources)
  is deleted as a DELETE of each would (finalizers honoured), nothing new may be created in
  it, and it disappears once it is empty (a CRD's resource is then no longer served). A
  created CRD registers its served versions;
- optional graceful pod deletion (`pod_grace_seconds`): a deleted pod keeps a
  deletionTimestamp for that long before it disappears, as a kubelet would make it.

Not emulated (see docs/operator.md): admission (CRD schema, defaults, CEL rules), controllers
(Job, kubelet, scheduler: tests play them), foreground deletion ordering, server-side apply,
field managers, RBAC, bookmarks. Lists honour `limit`/`continue` as the apiserver's storage
does (key order, a continue token that starts after the page's last key,
`remainingItemCount`), without its snapshot consistency across pages.

Use `EmulatorThread` from synchronous code (tests that run the operator or `kubectl` as a
subprocess): it runs the server in its own thread and event loop.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import copy
import datetime
import itertools
import json
import re
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import attrs
import kmock
import yaml
from kmock._internal import parsing as _kmock_parsing

JsonDict = dict[str, Any]
T = TypeVar("T")
StoreKey = tuple[kmock.resource, str | None, str]

EVENT_LOG_SIZE = 10_000  # watch resume window per resource, in events
NAMESPACES = kmock.resource("v1/namespaces")
CRDS = kmock.resource("apiextensions.k8s.io/v1/customresourcedefinitions")
WATCH_QUEUE_POLL = 1.0  # seconds between checks of a watch's own timeout


def _parse_path(path: str) -> _kmock_parsing.ParsedPath:
    """kmock's parser, plus the Namespace resource itself (`/api/v1/namespaces[/name]`),
    which kmock mistakes for a namespace prefix."""
    parts = path.strip("/").split("/")
    if len(parts) in (3, 4) and parts[:3] == ["api", "v1", "namespaces"]:
        return _kmock_parsing.ParsedPath("", "v1", "namespaces", None,
                                         parts[3] if len(parts) == 4 else None, None)
    if len(parts) == 5 and parts[:3] == ["api", "v1", "namespaces"] and parts[4] in (
            "status", "finalize"):
        return _kmock_parsing.ParsedPath("", "v1", "namespaces", None, parts[3], parts[4])
    return _original_parse_path(path)


_original_parse_path = _kmock_parsing.parse_path
_kmock_parsing.parse_path = _parse_path  # a bug fix: kmock answers 500 to these paths


# --- selectors ---------------------------------------------------------------------------------

_SET_REQ = re.compile(r"^\s*([^\s!=]+)\s+(in|notin)\s+\(([^)]*)\)\s*$")


@dataclass(frozen=True)
class Requirement:
    key: str
    op: str  # "=", "!=", "in", "notin", "exists", "!exists"
    values: frozenset[str] = frozenset()

    def matches(self, labels: dict[str, str]) -> bool:
        value = labels.get(self.key)
        match self.op:
            case "exists":
                return self.key in labels
            case "!exists":
                return self.key not in labels
            case "=" | "in":
                return value in self.values
            case _:  # "!=" and "notin" also match an absent key
                return value not in self.values


def _split_selector(text: str) -> Iterator[str]:
    """Split on commas outside parentheses."""
    depth, start = 0, 0
    for i, char in enumerate(text):
        depth += char == "("
        depth -= char == ")"
        if char == "," and depth == 0:
            yield text[start:i]
            start = i + 1
    yield text[start:]


def parse_label_selector(text: str | None) -> list[Requirement]:
    requirements = []
    for raw in _split_selector(text or ""):
        term = raw.strip()
        if not term:
            continue
        if match := _SET_REQ.match(term):
            values = frozenset(v.strip() for v in match[3].split(",") if v.strip())
            requirements.append(Requirement(match[1], match[2], values))
        elif "!=" in term:
            key, value = term.split("!=", 1)
            requirements.append(Requirement(key.strip(), "!=", frozenset({value.strip()})))
        elif "=" in term:
            key, value = term.replace("==", "=").split("=", 1)
            requirements.append(Requirement(key.strip(), "=", frozenset({value.strip()})))
        elif term.startswith("!"):
            requirements.append(Requirement(term[1:].strip(), "!exists"))
        else:
            requirements.append(Requirement(term, "exists"))
    return requirements


def parse_field_selector(text: str | None) -> list[tuple[str, bool, str]]:
    """`a.b=x,c!=y` → [(path, equal, value)]."""
    result = []
    for raw in (text or "").split(","):
        term = raw.strip()
        if not term:
            continue
        equal = "!=" not in term
        path, value = re.split(r"!=|==|=", term, maxsplit=1)
        result.append((path.strip(), equal, value.strip()))
    return result


def _field_value(obj: JsonDict, path: str) -> str:
    node: Any = obj
    for part in path.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return "" if node is None else str(node)


@dataclass(frozen=True)
class Selection:
    """What one list or watch request asks for."""

    namespace: str | None = None
    labels: tuple[Requirement, ...] = ()
    fields: tuple[tuple[str, bool, str], ...] = ()
    name: str | None = None

    @classmethod
    def from_params(cls, params: dict[str, str], namespace: str | None,
                    name: str | None = None) -> Selection:
        return cls(namespace, tuple(parse_label_selector(params.get("labelSelector"))),
                   tuple(parse_field_selector(params.get("fieldSelector"))), name)

    def matches(self, obj: JsonDict) -> bool:
        meta = obj.get("metadata", {})
        if self.namespace is not None and meta.get("namespace") != self.namespace:
            return False
        if self.name is not None and meta.get("name") != self.name:
            return False
        labels = meta.get("labels") or {}
        if not all(req.matches(labels) for req in self.labels):
            return False
        return all((_field_value(obj, path) == value) == equal
                   for path, equal, value in self.fields)


# --- patches -----------------------------------------------------------------------------------

def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch (null deletes a key)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def json_patch(target: JsonDict, operations: list[JsonDict]) -> JsonDict:
    """RFC 6902 add / replace / remove / test (what `kubectl patch --type json` sends)."""
    doc = copy.deepcopy(target)
    for op in operations:
        *parents, last = [p.replace("~1", "/").replace("~0", "~")
                          for p in op["path"].lstrip("/").split("/")]
        node: Any = doc
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        match op["op"]:
            case "add" | "replace" if isinstance(node, list):
                index = len(node) if last == "-" else int(last)
                if op["op"] == "add":
                    node.insert(index, op["value"])
                else:
                    node[index] = op["value"]
            case "add" | "replace":
                node[last] = op["value"]
            case "remove":
                del node[int(last) if isinstance(node, list) else last]
            case "test":
                actual = node[int(last)] if isinstance(node, list) else node.get(last)
                if actual != op["value"]:
                    raise _error(422, "Invalid", f"test failed at {op['path']}")
            case other:
                raise _error(422, "Invalid", f"unsupported JSON patch op {other!r}")
    return doc


# --- the emulator ------------------------------------------------------------------------------

def _error(code: int, reason: str, message: str) -> kmock.KubernetesError:
    return kmock.KubernetesError(status=code, reason=reason, message=message,
                                 details={"causes": []})


def _list_key(obj: JsonDict) -> str:
    """The object's storage key below its resource's prefix: lists come in this order."""
    meta = obj["metadata"]
    return f"{meta.get('namespace') or ''}/{meta['name']}"


def _encode_continue(start: str, revision: int) -> str:
    token = {"apiVersion": "meta.k8s.io/v1", "rv": revision, "start": start}
    return base64.urlsafe_b64encode(json.dumps(token).encode()).decode().rstrip("=")


def _decode_continue(value: str) -> str:
    try:
        token = json.loads(base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)))
        return str(token["start"])
    except (ValueError, KeyError, TypeError):
        raise _error(400, "BadRequest", f"continue key is not valid: {value}") from None


def now_stamp(later: float = 0.0) -> str:
    moment = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=later)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class _Watcher:
    selection: Selection
    queue: asyncio.Queue[JsonDict] = field(default_factory=asyncio.Queue)


@attrs.define(kw_only=True)
class KubeEmulator(kmock.KubernetesEmulator):
    """kmock's emulator with resourceVersions, selectors, status and garbage collection."""

    pod_grace_seconds: float = 0.0
    # (namespace, name) of pods on a node that is gone: a graceful delete marks them and
    # nothing ever finishes it (no kubelet); only a force delete (grace 0) removes them.
    lost_pods: set[tuple[str, str]] = attrs.field(factory=set)
    keep_requests: bool = True  # kmock keeps every request for assertions; benchmarks opt out

    _store: dict[StoreKey, JsonDict] = attrs.field(factory=dict, init=False)
    # The same objects by resource: a list reads its resource's objects only, not every
    # object of the cluster (bench/operator_scale.py fills it with 10,000 unrelated pods).
    _by_resource: dict[kmock.resource, dict[StoreKey, JsonDict]] = attrs.field(
        factory=lambda: collections.defaultdict(dict), init=False)
    _dependents: dict[str, set[StoreKey]] = attrs.field(
        factory=lambda: collections.defaultdict(set), init=False)
    _log: dict[kmock.resource, collections.deque[tuple[int, JsonDict]]] = attrs.field(
        factory=lambda: collections.defaultdict(lambda: collections.deque(maxlen=EVENT_LOG_SIZE)),
        init=False)
    _watchers: dict[kmock.resource, list[_Watcher]] = attrs.field(
        factory=lambda: collections.defaultdict(list), init=False)
    _revision: itertools.count[int] = attrs.field(factory=lambda: itertools.count(1), init=False)
    _last_revision: int = attrs.field(default=0, init=False)
    _terminating: set[StoreKey] = attrs.field(factory=set, init=False)
    _emptying: set[StoreKey] = attrs.field(factory=set, init=False)  # Namespaces and CRDs

    _builtin_reactions: int = attrs.field(default=0, init=False)
    _faults: list[list[Any]] = attrs.field(factory=list, init=False)
    # A partition (an API server restart, a long network cut): watch streams end and new ones
    # wait until it heals; a watch resuming from before the compaction revision gets 410.
    partitioned: bool = attrs.field(default=False, init=False)
    _compacted: int = attrs.field(default=0, init=False)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.fallback[kmock.method.PUT] << self._serve_replace
        self.fallback[kmock.method.DELETE] << self._serve_delete_collection
        self._builtin_reactions = len(self._payloads)

    async def __call__(self, raw_request: Any) -> Any:
        try:
            return await super().__call__(raw_request)
        finally:
            if not self.keep_requests:
                self._requests.clear()
                for errors in self._errors:
                    errors.clear()

    def inject_fault(self, method: str, plural: str, status: int = 500, times: int = 1) -> None:
        """Answer the next `times` requests `METHOD .../<plural>[/...]` with `status` (and
        change nothing): transient API errors for retry tests, cheaper than a kmock reaction."""
        self._faults.append([method.upper(), plural, status, times])

    def _take_fault(self, request: kmock.Request) -> int | None:
        plural = request.resource.plural if request.resource is not None else None
        for fault in self._faults:
            if fault[3] > 0 and fault[0] == request.method.value and fault[1] == plural:
                fault[3] -= 1
                return int(fault[2])
        return None

    async def _handle(self, request: kmock.Request) -> Any:
        if self._faults and (status := self._take_fault(request)) is not None:
            raise _error(status, "InternalError" if status >= 500 else "Conflict",
                         "injected fault")
        # State changes happen in the fallback handlers only (not in KubernetesEmulator._handle),
        # so a user reaction that answers 500 changes nothing. Without user reactions, resource
        # requests skip kmock's matching, which rescans every past request for every reaction.
        handler = self._route(request) if len(self._payloads) == self._builtin_reactions else None
        if handler is None:
            return await kmock.RawHandler._handle(self, request)
        return await kmock.Response(payload=handler)(request)

    def _route(self, request: kmock.Request) -> Callable[[kmock.Request], Any] | None:
        if request.resource is None or not request.resource.plural:
            return None  # discovery and non-API paths
        routes: dict[Any, Callable[[kmock.Request], Any]] = {
            kmock.action.LIST: self._serve_list, kmock.action.WATCH: self._serve_watch,
            kmock.action.FETCH: self._serve_fetch, kmock.action.CREATE: self._serve_create,
            kmock.action.UPDATE: self._serve_update, kmock.action.DELETE: self._serve_delete,
        }
        if request.action in routes:
            return routes[request.action]
        if request.method == kmock.method.PUT:
            return self._serve_replace
        if request.method == kmock.method.DELETE:
            return self._serve_delete_collection
        return None

    async def _serve_version(self, request: kmock.Request) -> Any:
        """Two fixes to kmock's discovery for kubectl: the core group is "v1" (not "/v1"),
        and subresources have no short names (kubectl warns that `ftj` is ambiguous)."""
        payload = await super()._serve_version(request)
        payload["groupVersion"] = payload["groupVersion"].lstrip("/")
        for entry in payload.get("resources", []):
            if "/" in entry["name"]:
                entry.update(shortNames=[], categories=[], verbs=["get", "patch", "update"])
        return payload

    # --- resource metadata -------------------------------------------------------------------

    def declare(self, resource: str, kind: str, *, namespaced: bool = True,
                status: bool = True, shortnames: Iterable[str] = ()) -> None:
        """Declare a custom resource (what creating its CRD does: register_crd)."""
        self.resources[resource] = kmock.ResourceInfo(
            kind=kind, namespaced=namespaced, singular=kind.lower(),
            verbs={"create", "delete", "get", "list", "patch", "update", "watch",
                   "deletecollection"},
            subresources={"status"} if status else set(), shortnames=set(shortnames))

    def register_crd(self, crd: JsonDict) -> None:
        """Serve the versions a CustomResourceDefinition defines."""
        spec, names = crd["spec"], crd["spec"]["names"]
        for resource in _crd_resources(crd):
            path = f"{resource.group}/{resource.version}/{resource.plural}"
            self.declare(path, names["kind"], namespaced=spec.get("scope") == "Namespaced",
                         status=any("status" in (v.get("subresources") or {})
                                    for v in spec["versions"]),
                         shortnames=names.get("shortNames", ()))

    def _info(self, resource: kmock.resource) -> kmock.ResourceInfo:
        if resource not in self.resources:
            raise _error(404, "NotFound", f"the server could not find the requested resource "
                         f"({resource.group}/{resource.version}/{resource.plural})")
        return self.resources[resource]

    def _api_version(self, resource: kmock.resource) -> str:
        return f"{resource.group}/{resource.version}" if resource.group else str(resource.version)

    def _has_status(self, resource: kmock.resource) -> bool:
        return "status" in self._info(resource).subresources

    # --- synchronous store operations (the HTTP handlers and tests call these) ---------------

    def get_object(self, resource: str | kmock.resource, namespace: str | None,
                   name: str) -> JsonDict:
        res = kmock.resource(resource)
        obj = self._store.get((res, self._ns(res, namespace), name))
        if obj is None:
            kind = self._info(res).kind or res.plural
            raise _error(404, "NotFound", f'{res.plural} "{name}" not found ({kind})')
        return obj

    def find(self, resource: str | kmock.resource, namespace: str | None = None,
             labels: str | None = None) -> list[JsonDict]:
        """Objects of a resource (sorted by namespace/name); for tests, deep copies."""
        res = kmock.resource(resource)
        selection = Selection(namespace, tuple(parse_label_selector(labels)))
        return [copy.deepcopy(o) for o in self._select(res, selection)]

    def create_object(self, resource: str | kmock.resource, namespace: str | None,
                      body: JsonDict) -> JsonDict:
        res = kmock.resource(resource)
        info = self._info(res)
        obj = copy.deepcopy(body)
        meta = obj.setdefault("metadata", {})
        namespace = self._ns(res, namespace or meta.get("namespace"))
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + secrets.token_hex(3)[:5]
        name = meta.get("name")
        if not name:
            raise _error(422, "Invalid", "metadata.name: Required value")
        key = (res, namespace, name)
        if key in self._store:
            raise _error(409, "AlreadyExists", f'{res.plural} "{name}" already exists')
        self._refuse_in_terminating(res, namespace)
        if namespace is not None:
            meta["namespace"] = namespace
        meta.pop("deletionTimestamp", None)
        meta.update(uid=str(uuid.uuid4()), creationTimestamp=now_stamp(), generation=1)
        obj.setdefault("apiVersion", self._api_version(res))
        obj.setdefault("kind", info.kind)
        if self._has_status(res):
            obj.pop("status", None)  # set through the status subresource only
        self._store[key] = self._by_resource[res][key] = obj
        self._index_owners(key, obj)
        self._emit(res, "ADDED", obj, None)
        if res == CRDS:
            self.register_crd(obj)
        return obj

    def patch_object(self, resource: str | kmock.resource, namespace: str | None, name: str,
                     patch: Any, *, subresource: str | None = None,
                     content_type: str = "application/merge-patch+json") -> JsonDict:
        res = kmock.resource(resource)
        old = self.get_object(res, namespace, name)
        if "json-patch" in content_type:
            new = json_patch(old, patch)
        else:
            self._check_precondition(old, (patch or {}).get("metadata", {}))
            new = merge_patch(old, patch)
        return self._update(res, old, new, subresource)

    def replace_object(self, resource: str | kmock.resource, namespace: str | None, name: str,
                       body: JsonDict, *, subresource: str | None = None) -> JsonDict:
        res = kmock.resource(resource)
        old = self.get_object(res, namespace, name)
        self._check_precondition(old, body.get("metadata", {}))
        new = copy.deepcopy(body)
        for immutable in ("uid", "creationTimestamp", "generation", "deletionTimestamp"):
            if immutable in old["metadata"]:
                new.setdefault("metadata", {})[immutable] = old["metadata"][immutable]
        return self._update(res, old, new, subresource)

    def delete_object(self, resource: str | kmock.resource, namespace: str | None, name: str,
                      *, propagation: str = "Background",
                      grace_seconds: float | None = None) -> JsonDict:
        res = kmock.resource(resource)
        key = (res, self._ns(res, namespace), name)
        obj = self.get_object(res, namespace, name)
        meta = obj["metadata"]
        grace = self.pod_grace_seconds if grace_seconds is None else grace_seconds
        if res in (NAMESPACES, CRDS):
            return self._delete_container(res, key, obj)
        if propagation == "Orphan":
            self._orphan_dependents(obj)
        lost = res.plural == "pods" and grace_seconds != 0 \
            and (meta.get("namespace"), name) in self.lost_pods
        graceful = res.plural == "pods" and (grace > 0 or lost) and not meta.get("finalizers")
        if meta.get("finalizers") or graceful:
            if meta.get("deletionTimestamp"):
                return obj
            # As the API server: a pod's deletionTimestamp is the deadline its grace period
            # gives the kubelet (now + grace), other objects' the moment of the request.
            marked = merge_patch(obj, {"metadata": {
                "deletionTimestamp": now_stamp(grace if graceful else 0.0),
                "deletionGracePeriodSeconds": int(grace)}})
            self._commit(res, key, obj, marked)
            if lost:
                self._terminating.add(key)  # stuck Terminating until force-deleted
            elif graceful:
                self._remove_later(res, key, grace)
            return marked
        self._remove(res, key)
        return obj

    # --- Namespace and CRD deletion -----------------------------------------------------------

    def _delete_container(self, res: kmock.resource, key: StoreKey, obj: JsonDict) -> JsonDict:
        """A Namespace (the namespace controller's part) or a CRD (its cleanup finalizer):
        Terminating at once, its contents deleted, gone once they all are."""
        if not obj["metadata"].get("deletionTimestamp"):
            status: JsonDict = {"phase": "Terminating"} if res == NAMESPACES else {"conditions": [{
                "type": "Terminating", "status": "True", "reason": "InstanceDeletionInProgress",
                "message": "CustomResource deletion is in progress",
                "lastTransitionTime": now_stamp()}]}
            obj = merge_patch(obj, {"metadata": {"deletionTimestamp": now_stamp()},
                                    "status": status})
            self._commit(res, key, self._store[key], obj)
            self._emptying.add(key)
            for content in self._contents(key):
                with contextlib.suppress(kmock.KubernetesError):
                    self.delete_object(*content)
        self._finish_emptied()
        return obj

    def _contents(self, container: StoreKey) -> list[StoreKey]:
        res, _, name = container
        if res == NAMESPACES:
            return [k for k in self._store if k[1] == name]
        served = set(_crd_resources(self._store[container]))
        return [k for k in self._store if k[0] in served]

    def _finish_emptied(self) -> None:
        """Remove the terminating Namespaces and CRDs that nothing is left in (a CRD's
        resource then stops being served)."""
        while key := next((k for k in self._emptying if not self._contents(k)), None):
            self._emptying.discard(key)
            crd = self._store[key]
            self._remove(key[0], key)
            if key[0] == CRDS:
                for resource in _crd_resources(crd):
                    self.resources.pop(resource, None)

    def _refuse_in_terminating(self, res: kmock.resource, namespace: str | None) -> None:
        for key in self._emptying:
            if key[0] == NAMESPACES and key[2] == namespace:
                raise _error(403, "Forbidden", f"unable to create new content in namespace "
                             f"{namespace} because it is being terminated")
            if key[0] == CRDS and res in _crd_resources(self._store[key]):
                raise _error(405, "MethodNotAllowed", "create not allowed while custom "
                             "resource definition is terminating")

    def _update(self, res: kmock.resource, old: JsonDict, new: JsonDict,
                subresource: str | None) -> JsonDict:
        key = (res, old["metadata"].get("namespace"), old["metadata"]["name"])
        new = self._apply_subresource_rules(res, old, new, subresource)
        if new == old:
            return old  # a no-op: no new resourceVersion, no watch event
        if self._spec_changed(old, new):
            new["metadata"]["generation"] = old["metadata"].get("generation", 1) + 1
        self._commit(res, key, old, new)
        meta = new["metadata"]
        # A terminating pod goes when its grace period ends, not when its finalizers do.
        if meta.get("deletionTimestamp") and not meta.get("finalizers") \
                and key not in self._terminating:
            self._remove(res, key)
        return new

    def _apply_subresource_rules(self, res: kmock.resource, old: JsonDict, new: JsonDict,
                                 subresource: str | None) -> JsonDict:
        new = dict(new)
        if subresource == "status":
            result = copy.deepcopy(old)
            if "status" in new:
                result["status"] = new["status"]
            else:
                result.pop("status", None)
            return result
        if subresource:
            raise _error(404, "NotFound", f"subresource {subresource!r} is not emulated")
        if self._has_status(res):
            if "status" in old:
                new["status"] = old["status"]
            else:
                new.pop("status", None)
        meta = dict(new.get("metadata") or {})
        for fixed in ("uid", "creationTimestamp", "namespace", "name", "resourceVersion",
                      "generation", "deletionTimestamp"):
            meta.pop(fixed, None)
            if fixed in old["metadata"]:
                meta[fixed] = old["metadata"][fixed]
        new["metadata"] = meta
        new["apiVersion"], new["kind"] = old.get("apiVersion"), old.get("kind")
        return new

    @staticmethod
    def _spec_changed(old: JsonDict, new: JsonDict) -> bool:
        ignored = {"metadata", "status"}
        return ({k: v for k, v in old.items() if k not in ignored}
                != {k: v for k, v in new.items() if k not in ignored})

    @staticmethod
    def _check_precondition(old: JsonDict, meta: JsonDict) -> None:
        wanted = meta.get("resourceVersion")
        if wanted and wanted != old["metadata"]["resourceVersion"]:
            raise _error(409, "Conflict", "the object has been modified; please apply your "
                         "changes to the latest version and try again")

    def _ns(self, res: kmock.resource, namespace: str | None) -> str | None:
        return (namespace or "default") if self._info(res).namespaced is not False else None

    def _commit(self, res: kmock.resource, key: StoreKey, old: JsonDict | None,
                new: JsonDict) -> None:
        self._store[key] = self._by_resource[res][key] = new
        self._index_owners(key, new)
        self._emit(res, "MODIFIED", new, old)

    def _remove(self, res: kmock.resource, key: StoreKey) -> None:
        self._terminating.discard(key)
        obj = self._store.pop(key, None)
        self._by_resource[res].pop(key, None)
        if obj is None:
            return
        self._emit(res, "DELETED", obj, obj)
        uid = obj["metadata"]["uid"]
        for dep_key in sorted(self._dependents.pop(uid, set()), key=str):
            self._collect_garbage(dep_key)
        if self._emptying and key not in self._emptying:
            self._finish_emptied()

    def _remove_later(self, res: kmock.resource, key: StoreKey, seconds: float) -> None:
        self._terminating.add(key)
        asyncio.get_running_loop().call_later(seconds, self._remove, res, key)

    def _collect_garbage(self, key: StoreKey) -> None:
        """Delete a dependent once none of its owners exists (background propagation)."""
        obj = self._store.get(key)
        if obj is None:
            return
        owners = {ref.get("uid") for ref in obj["metadata"].get("ownerReferences") or []}
        alive = {o["metadata"]["uid"] for o in self._store.values()
                 if o["metadata"]["uid"] in owners} if len(owners) > 1 else set()
        if not alive:
            res, namespace, name = key
            with contextlib.suppress(kmock.KubernetesError):
                self.delete_object(res, namespace, name)

    def _orphan_dependents(self, owner: JsonDict) -> None:
        uid = owner["metadata"]["uid"]
        for key in list(self._dependents.pop(uid, set())):
            dep = self._store.get(key)
            if dep is not None:
                refs = [r for r in dep["metadata"].get("ownerReferences", [])
                        if r.get("uid") != uid]
                self._commit(key[0], key, dep,
                             merge_patch(dep, {"metadata": {"ownerReferences": refs or None}}))

    def _index_owners(self, key: StoreKey, obj: JsonDict) -> None:
        for ref in obj["metadata"].get("ownerReferences") or []:
            if ref.get("uid"):
                self._dependents[ref["uid"]].add(key)

    # --- watch events ------------------------------------------------------------------------

    def _emit(self, res: kmock.resource, kind: str, obj: JsonDict, old: JsonDict | None) -> None:
        revision = next(self._revision)
        self._last_revision = revision
        if kind == "DELETED":
            obj = merge_patch(obj, {"metadata": {"resourceVersion": str(revision)}})
        else:
            obj["metadata"]["resourceVersion"] = str(revision)
        self._log[res].append((revision, {"type": kind, "object": obj, "old": old}))
        for watcher in self._watchers.get(res, ()):
            event = self._event_for(watcher.selection, kind, obj, old)
            if event is not None:
                watcher.queue.put_nowait(event)

    @staticmethod
    def _event_for(selection: Selection, kind: str, obj: JsonDict,
                   old: JsonDict | None) -> JsonDict | None:
        now_in = selection.matches(obj)
        was_in = old is not None and selection.matches(old)
        if kind == "MODIFIED" and was_in != now_in:
            kind = "ADDED" if now_in else "DELETED"  # the object entered / left the selection
        elif not now_in and (kind == "MODIFIED" or not was_in):
            return None
        return {"type": kind, "object": obj}

    def _select(self, res: kmock.resource, selection: Selection) -> list[JsonDict]:
        objs = [o for o in self._by_resource[res].values() if selection.matches(o)]
        return sorted(objs, key=lambda o: (o["metadata"].get("namespace") or "",
                                           o["metadata"]["name"]))

    # --- HTTP handlers -----------------------------------------------------------------------

    async def _serve_list(self, request: kmock.Request) -> JsonDict:
        assert request.resource is not None
        info = self._info(request.resource)
        params = dict(request.params)
        items = self._select(request.resource, Selection.from_params(params, request.namespace))
        metadata: JsonDict = {"resourceVersion": str(self._last_revision)}
        if params.get("continue"):
            start = _decode_continue(params["continue"])
            items = [o for o in items if _list_key(o) >= start]
        limit = int(params.get("limit") or 0)
        if 0 < limit < len(items):
            # apiserver storage/continue.go: the next page starts just after the last key
            # of this one (key + "\x00"); remainingItemCount says how many are left.
            last = _list_key(items[limit - 1])
            metadata["continue"] = _encode_continue(last + "\x00", self._last_revision)
            metadata["remainingItemCount"] = len(items) - limit
            items = items[:limit]
        return {"apiVersion": self._api_version(request.resource),
                "kind": f"{info.kind}List", "metadata": metadata, "items": items}

    async def _serve_watch(self, request: kmock.Request) -> AsyncIterator[Any]:
        assert request.resource is not None
        res = request.resource
        self._info(res)
        params = dict(request.params)
        selection = Selection.from_params(params, request.namespace, request.name)
        while self.partitioned:  # the client reconnects; nothing answers until it heals
            await asyncio.sleep(WATCH_QUEUE_POLL)
        watcher = _Watcher(selection)
        backlog = self._backlog(res, selection, params.get("resourceVersion"))
        self._watchers[res].append(watcher)
        deadline = time.monotonic() + float(params.get("timeoutSeconds") or 1e9)
        try:
            yield b""  # send the headers now, as a real server does
            for event in backlog:
                yield event
                if event["type"] == "ERROR":
                    return
            while time.monotonic() < deadline and not self.partitioned:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(WATCH_QUEUE_POLL,
                                                   deadline - time.monotonic())):
                        yield await watcher.queue.get()
        finally:
            self._watchers[res].remove(watcher)

    def partition_watches(self) -> None:
        """Every watch stream ends; new ones wait until `heal_watches()`."""
        self.partitioned = True

    def compact(self) -> None:
        """The watch history so far expires (etcd compaction): a watch resuming from an older
        resourceVersion gets 410 Gone and its client must list again."""
        self._compacted = self._last_revision
        for log in self._log.values():
            log.clear()

    def heal_watches(self) -> None:
        self.partitioned = False

    def _backlog(self, res: kmock.resource, selection: Selection,
                 since: str | None) -> list[JsonDict]:
        if not since or since == "0":
            return [{"type": "ADDED", "object": o} for o in self._select(res, selection)]
        since_revision = int(since)
        log = self._log[res]
        if since_revision < self._compacted or (
                len(log) == log.maxlen and log[0][0] > since_revision + 1):
            return [{"type": "ERROR", "object": {
                "kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 410,
                "reason": "Expired", "message": f"too old resource version: {since}"}}]
        events = []
        for revision, entry in log:
            if revision > since_revision:
                event = self._event_for(selection, entry["type"], entry["object"], entry["old"])
                if event is not None:
                    events.append(event)
        return events

    async def _serve_fetch(self, request: kmock.Request) -> JsonDict:
        assert request.resource is not None and request.name is not None
        return self.get_object(request.resource, request.namespace, request.name)

    async def _serve_create(self, request: kmock.Request) -> Any:
        assert request.resource is not None
        if "protobuf" in request.headers.get("Content-Type", ""):
            raise _error(415, "UnsupportedMediaType", "protobuf bodies are not emulated "
                         "(kubectl's create <kind> generators send them; use apply -f)")
        if not isinstance(request.data, dict):
            raise _error(400, "BadRequest", "the body must be a JSON object")
        obj = self.create_object(request.resource, request.namespace, request.data)
        return kmock.Response(status=201, payload=obj)

    async def _serve_update(self, request: kmock.Request) -> JsonDict:
        assert request.resource is not None and request.name is not None
        content_type = request.headers.get("Content-Type", "application/merge-patch+json")
        if "apply-patch" in content_type:
            raise _error(415, "UnsupportedMediaType", "server-side apply is not emulated")
        data = request.data if request.data is not None else json.loads(request.text or "null")
        return self.patch_object(request.resource, request.namespace, request.name, data,
                                 subresource=request.subresource, content_type=content_type)

    async def _serve_replace(self, request: kmock.Request) -> JsonDict:
        if request.resource is None or request.name is None:
            raise _error(405, "MethodNotAllowed", "PUT needs an object URL")
        return self.replace_object(request.resource, request.namespace, request.name,
                                   request.data or {}, subresource=request.subresource)

    async def _serve_delete(self, request: kmock.Request) -> JsonDict:
        assert request.resource is not None and request.name is not None
        options = request.data if isinstance(request.data, dict) else {}
        params = dict(request.params)
        propagation = options.get("propagationPolicy") or params.get("propagationPolicy")
        grace = options.get("gracePeriodSeconds", params.get("gracePeriodSeconds"))
        wanted = (options.get("preconditions") or {}).get("uid")
        if wanted and self.get_object(request.resource, request.namespace,
                                      request.name)["metadata"]["uid"] != wanted:
            raise _error(409, "Conflict", "Precondition failed: UID in precondition: "
                         f"{wanted}, UID in object meta: (another object)")
        return self.delete_object(request.resource, request.namespace, request.name,
                                  propagation=propagation or "Background",
                                  grace_seconds=None if grace is None else float(grace))

    async def _serve_delete_collection(self, request: kmock.Request) -> JsonDict:
        if request.resource is None or request.name is not None:
            raise _error(405, "MethodNotAllowed", "not a collection URL")
        selection = Selection.from_params(dict(request.params), request.namespace)
        for obj in self._select(request.resource, selection):
            meta = obj["metadata"]
            with contextlib.suppress(kmock.KubernetesError):
                self.delete_object(request.resource, meta.get("namespace"), meta["name"])
        return {"apiVersion": "v1", "kind": "Status", "status": "Success", "metadata": {}}


def _crd_resources(crd: JsonDict) -> list[kmock.resource]:
    spec = crd["spec"]
    return [kmock.resource(f"{spec['group']}/{v['name']}/{spec['names']['plural']}")
            for v in spec["versions"] if v.get("served", True)]


def default_emulator(emulator_class: type[KubeEmulator] = KubeEmulator,
                     **kwargs: Any) -> KubeEmulator:
    """Core and batch resources, plus kopf's peering resources (kopf looks them up)."""
    emulator = emulator_class(**kwargs)
    emulator.resources.load_bundled()
    emulator.declare("kopf.dev/v1/kopfpeerings", "KopfPeering", status=False)
    emulator.declare("kopf.dev/v1/clusterkopfpeerings", "ClusterKopfPeering",
                     namespaced=False, status=False)
    return emulator


def write_kubeconfig(path: Path, server: str, namespace: str = "default",
                     token: str = "emulator") -> Path:
    """A kubeconfig for the emulator; distinct tokens tell clients apart in its requests."""
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "emulator",
        "clusters": [{"name": "emulator", "cluster": {"server": server}}],
        "users": [{"name": "emulator", "user": {"token": token}}],
        "contexts": [{"name": "emulator", "context": {"cluster": "emulator",
                                                        "user": "emulator",
                                                        "namespace": namespace}}],
    }))
    return path


class EmulatorThread:
    """The emulator served on 127.0.0.1 from a background thread, with a synchronous API.

        with EmulatorThread(default_emulator()) as api:
            api.call(api.emulator.create_object, "v1/configmaps", "default", {...})
    """

    def __init__(self, emulator: KubeEmulator | None = None, port: int | None = None) -> None:
        self.emulator = emulator if emulator is not None else default_emulator()
        self._port = port
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="kube-emulator", daemon=True)
        self._ready = threading.Event()
        self._stopped: asyncio.Event | None = None
        self.url = ""
        self._failure: BaseException | None = None

    def __enter__(self) -> EmulatorThread:
        self._thread.start()
        self._ready.wait(30)
        if self._failure is not None:
            raise RuntimeError("the emulator failed to start") from self._failure
        return self

    def __exit__(self, *exc: object) -> None:
        if self._stopped is not None:
            self._loop.call_soon_threadsafe(self._stopped.set)
        self._thread.join(30)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._serve())
        except BaseException as exc:  # surfaced to the thread that waits in __enter__
            self._failure = exc
            self._ready.set()

    async def _serve(self) -> None:
        self._stopped = asyncio.Event()
        async with self.emulator, kmock.Server(self.emulator, port=self._port) as server:
            self.url = str(server.url).rstrip("/")
            self._ready.set()
            await self._stopped.wait()

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a store operation on the server's loop (the store is not thread-safe)."""
        async def invoke() -> T:
            return fn(*args, **kwargs)
        return asyncio.run_coroutine_threadsafe(invoke(), self._loop).result(30)

    # Shortcuts for tests; they return deep copies.
    def create(self, resource: str, body: JsonDict, namespace: str | None = None) -> JsonDict:
        return copy.deepcopy(self.call(self.emulator.create_object, resource,
                                       namespace or body.get("metadata", {}).get("namespace"),
                                       body))

    def get(self, resource: str, namespace: str | None, name: str) -> JsonDict | None:
        try:
            return copy.deepcopy(self.call(self.emulator.get_object, resource, namespace, name))
        except kmock.KubernetesError:
            return None

    def find(self, resource: str, namespace: str | None = None,
             labels: str | None = None) -> list[JsonDict]:
        return self.call(self.emulator.find, resource, namespace, labels)

    def patch(self, resource: str, namespace: str | None, name: str, patch: JsonDict,
              subresource: str | None = None) -> JsonDict:
        return copy.deepcopy(self.call(self.emulator.patch_object, resource, namespace, name,
                                       patch, subresource=subresource))

    def delete(self, resource: str, namespace: str | None, name: str, **kwargs: Any) -> None:
        with contextlib.suppress(kmock.KubernetesError):
            self.call(self.emulator.delete_object, resource, namespace, name, **kwargs)

    def write_kubeconfig(self, path: Path, namespace: str = "default",
                         token: str = "emulator") -> Path:
        return write_kubeconfig(path, self.url, namespace, token)
