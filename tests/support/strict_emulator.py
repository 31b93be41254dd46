"""KubeEmulator with what a real API server and network do to a client: transport faults
(error statuses, dropped connections, stalls) and RBAC.

- `inject(method, plural, *faults)`: the next requests `METHOD .../<plural>[/...]` get these
  faults in order, one each: an HTTP status (500, 503, 429 ...), DROP (the connection is closed
  without an answer) or STALL (no answer for `stall_seconds`, then a 504). Nothing changes in
  the store. Enough faults in a row outlast a client's own retries.
- `authorize(token, rules...)`: requests with that bearer token are checked against RBAC
  rules (a ClusterRole's apply everywhere, a Role's in its namespace only; a list or watch
  across all namespaces needs a cluster rule) and answered 403 otherwise, as the API server's
  RBAC authorizer does. Tokens with no rules are not checked (tests, admins). `denied` records
  each refusal. Like the OwnerReferencesPermissionEnforcement admission plugin (on by default
  in OpenShift), an ownerReference with `blockOwnerDeletion: true` also needs `update` on the
  owner's `finalizers` subresource.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import aiohttp.web
import attrs
import kmock

from support.kube_emulator import KubeEmulator, _error

DROP = "drop"
STALL = "stall"
Fault = int | str


@dataclass
class Grants:
    """RBAC rules of one subject: from ClusterRoles (everywhere) and Roles (per namespace)."""

    cluster: list[dict[str, Any]] = field(default_factory=list)
    namespaced: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    def allows(self, group: str, resource: str, verb: str, namespace: str | None) -> bool:
        rules = self.cluster + (self.namespaced.get(namespace, []) if namespace else [])
        return any(group in rule["apiGroups"] and resource in rule["resources"]
                   and verb in rule["verbs"] for rule in rules)


def verb_of(request: kmock.Request) -> str:
    method = request.method.value
    if method == "GET":
        if request.params.get("watch") in ("true", "1"):
            return "watch"
        return "get" if request.name else "list"
    return {"POST": "create", "PATCH": "patch", "PUT": "update", "DELETE": "delete"}[method]


@attrs.define(kw_only=True)
class StrictEmulator(KubeEmulator):
    stall_seconds: float = 60.0
    denied: list[tuple[str, str, str, str | None]] = attrs.field(factory=list, init=False)
    _queued: list[tuple[str, str, list[Fault]]] = attrs.field(factory=list, init=False)
    _grants: dict[str, Grants] = attrs.field(factory=dict, init=False)
    hits: list[tuple[str, str, Fault]] = attrs.field(factory=list, init=False)

    def inject(self, method: str, plural: str, *faults: Fault) -> None:
        self._queued.append((method.upper(), plural, list(faults)))

    def pending_faults(self) -> int:
        return sum(len(faults) for _, _, faults in self._queued)

    def authorize(self, token: str, grants: Grants) -> None:
        self._grants[token] = grants

    def _next_fault(self, request: kmock.Request) -> Fault | None:
        plural = request.resource.plural if request.resource is not None else None
        for method, wanted, faults in self._queued:
            if faults and method == request.method.value and wanted == plural:
                fault = faults.pop(0)
                self.hits.append((method, wanted, fault))
                return fault
        return None

    def _forbidden(self, request: kmock.Request) -> str | None:
        token = request.headers.get("Authorization", "").removeprefix("Bearer ")
        grants = self._grants.get(token)
        if grants is None or request.resource is None or not request.resource.plural:
            return None  # unchecked subject, or discovery (allowed to every user)
        resource = request.resource.plural + (f"/{request.subresource}"
                                              if request.subresource else "")
        needed = [(request.resource.group, resource, verb_of(request))]
        if request.method.value in ("POST", "PUT", "PATCH"):
            needed += self._owner_finalizers(request)
        for group, plural, verb in needed:
            if grants.allows(group, plural, verb, request.namespace):
                continue
            self.denied.append((group, plural, verb, request.namespace))
            where = f' in the namespace "{request.namespace}"' if request.namespace else \
                " at the cluster scope"
            return (f'User "{token}" cannot {verb} resource "{plural}" in API group '
                    f'"{group}"{where}')
        return None

    def _owner_finalizers(self, request: kmock.Request) -> list[tuple[str, str, str]]:
        """`update` on <owner>/finalizers for each blockOwnerDeletion owner reference."""
        meta = (request.data or {}).get("metadata") if isinstance(request.data, dict) else None
        needed = []
        for ref in (meta or {}).get("ownerReferences") or []:
            if not ref.get("blockOwnerDeletion"):
                continue
            group = ref["apiVersion"].rpartition("/")[0]
            plural = next((str(r.plural) for r in self.resources
                           if self.resources[r].kind == ref["kind"]
                           and (r.group or "") == group), None)
            assert plural, f"unknown owner kind {ref['kind']}"
            needed.append((group, f"{plural}/finalizers", "update"))
        return needed

    async def _handle(self, request: kmock.Request) -> Any:
        if self._queued and (fault := self._next_fault(request)) is not None:
            if fault == DROP:
                assert request._raw_request is not None and request._raw_request.transport
                request._raw_request.transport.close()
                return aiohttp.web.Response(status=500)  # never reaches the client
            if fault == STALL:
                await asyncio.sleep(self.stall_seconds)
                fault = 504
            raise _error(int(fault), "TooManyRequests" if fault == 429 else "InternalError",
                         "injected fault")
        if self._grants and (message := self._forbidden(request)) is not None:
            raise _error(403, "Forbidden", message)
        return await super()._handle(request)
