"""A small async Kubernetes API client for the operator's own requests and its watches of trainer
pods and Jobs (informer.py; kopf watches FineTuneJobs).

Plain JSON over aiohttp with the credentials kopf logged in with: no generated models (they
cost seconds of import and megabytes per object). Transient failures (5xx, 429, connection
errors, timeouts) are retried with exponential backoff; 404 and 409 are answers, not errors.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp
import kopf

logger = logging.getLogger(__name__)

Manifest = dict[str, Any]

RETRY_DELAYS = (0.1, 0.3, 1.0, 3.0)  # seconds before each retry; then the error propagates
REQUEST_TIMEOUT = 30.0
RETRYABLE_STATUSES = frozenset({429, 500, 502, 503, 504})


@dataclass(frozen=True)
class Resource:
    group: str
    version: str
    plural: str
    namespaced: bool = True

    def path(self, namespace: str | None = None, name: str | None = None,
             subresource: str | None = None) -> str:
        base = f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"
        parts = [base]
        if self.namespaced and namespace:
            parts.append(f"namespaces/{namespace}")
        parts.append(self.plural)
        if name:
            parts.append(name)
        if subresource:
            parts.append(subresource)
        return "/".join(parts)


PODS = Resource("", "v1", "pods")
CONFIG_MAPS = Resource("", "v1", "configmaps")
SERVICES = Resource("", "v1", "services")
JOBS = Resource("batch", "v1", "jobs")
NETWORK_POLICIES = Resource("networking.k8s.io", "v1", "networkpolicies")
EVENTS = Resource("", "v1", "events")


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status


class AlreadyExists(ApiError):
    pass


class KubeApi:
    """JSON requests to the API server; `login` returns fresh credentials (kopf's)."""

    def __init__(self, login: Callable[[], kopf.ConnectionInfo]) -> None:
        self._login = login
        self._session: aiohttp.ClientSession | None = None
        self._plain: aiohttp.ClientSession | None = None  # no API credentials: for pods
        self._server = ""

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._plain is not None:
            await self._plain.close()
            self._plain = None

    def _connect(self) -> aiohttp.ClientSession:
        if self._session is None:
            info = self._login()
            self._server = info.server.rstrip("/")
            ssl = info.as_ssl_context() if self._server.startswith("https") else False
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=64, ssl=ssl),
                headers={**info.as_http_headers(), "User-Agent": "kubetune-operator"},
                timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT))
        return self._session

    async def request(self, method: str, path: str, body: Any = None,
                      content_type: str = "application/json",
                      params: dict[str, str] | None = None) -> Manifest | None:
        """One API call with retries; None for 404."""
        for attempt, delay in enumerate((*RETRY_DELAYS, None)):
            try:
                return await self._send(method, path, body, content_type, params)
            except (ApiError, aiohttp.ClientError, TimeoutError) as exc:
                retryable = not isinstance(exc, ApiError) or exc.status in RETRYABLE_STATUSES
                if isinstance(exc, ApiError) and exc.status == 401:
                    await self.close()  # credentials rotated: log in again once
                    retryable = attempt == 0
                if not retryable or delay is None:
                    raise
                logger.info("API %s %s failed (%s); retrying in %.1fs", method, path, exc, delay)
                await asyncio.sleep(delay * (1 + random.random() / 2))
        raise AssertionError("unreachable")

    async def _send(self, method: str, path: str, body: Any, content_type: str,
                    params: dict[str, str] | None) -> Manifest | None:
        session = self._connect()
        async with session.request(method, self._server + path, json=body, params=params,
                                   headers={"Content-Type": content_type}) as response:
            if response.status == 404:
                return None
            payload = await response.json(content_type=None) if response.content_length != 0 \
                else {}
            if response.status == 409 and method == "POST":
                raise AlreadyExists(409, str(payload.get("message", "")))
            if response.status >= 400:
                raise ApiError(response.status, str(payload.get("message", payload)))
            return payload if isinstance(payload, dict) else {}

    async def get(self, resource: Resource, namespace: str, name: str) -> Manifest | None:
        return await self.request("GET", resource.path(namespace, name))

    async def list(self, resource: Resource, namespace: str, field_selector: str,
                   limit: int, pages: int = 1) -> list[Manifest]:
        """The objects the API server selected by `field_selector`, `limit` a page, following
        `continue` for at most `pages` pages. A server returns a page in key (name) order, not
        by time: a caller that wants the newest must read every page."""
        items: list[Manifest] = []
        params = {"fieldSelector": field_selector, "limit": str(limit)}
        for _ in range(pages):
            result = await self.request("GET", resource.path(namespace), params=params) or {}
            items += result.get("items") or []
            token = (result.get("metadata") or {}).get("continue")
            if not token:
                break
            params = {**params, "continue": token}
        return items

    async def create(self, resource: Resource, namespace: str, body: Manifest) -> bool:
        """Create unless it exists; True when this call created it."""
        try:
            await self.request("POST", resource.path(namespace), body)
        except AlreadyExists:
            return False
        return True

    async def patch(self, resource: Resource, namespace: str, name: str, patch: Manifest,
                    subresource: str | None = None) -> Manifest | None:
        return await self.request("PATCH", resource.path(namespace, name, subresource), patch,
                                  content_type="application/merge-patch+json")

    async def delete(self, resource: Resource, namespace: str, name: str,
                     propagation: str = "Background", grace_seconds: int | None = None,
                     uid: str | None = None) -> bool:
        """Delete if present (and, given `uid`, only that object: a newer one of the same
        name answers 409 and stays); True when it was deleted. grace_seconds=0 forces."""
        options: Manifest = {"kind": "DeleteOptions", "apiVersion": "v1",
                             "propagationPolicy": propagation}
        if grace_seconds is not None:
            options["gracePeriodSeconds"] = grace_seconds
        if uid is not None:
            options["preconditions"] = {"uid": uid}
        try:
            result = await self.request("DELETE", resource.path(namespace, name), options)
        except ApiError as exc:
            if exc.status == 409 and uid is not None:
                return False  # that object is gone; the name is another's now
            raise
        return result is not None

    @asynccontextmanager
    async def stream(self, path: str, params: dict[str, str]
                     ) -> AsyncIterator[aiohttp.ClientResponse]:
        """A long GET (a watch): no total timeout, only one between reads. A 401 drops the
        session, so the next request logs in again (tokens rotate)."""
        session = self._connect()
        read_timeout = float(params.get("timeoutSeconds", REQUEST_TIMEOUT)) + REQUEST_TIMEOUT
        async with session.get(self._server + path, params=params, timeout=aiohttp.ClientTimeout(
                total=None, sock_connect=REQUEST_TIMEOUT, sock_read=read_timeout)) as response:
            unauthorized = response.status == 401
            yield response
        if unauthorized:
            await self.close()

    def plain_session(self) -> aiohttp.ClientSession:
        """A session for requests outside the API server (rank 0's /metrics): no token."""
        if self._plain is None:
            self._plain = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=16))
        return self._plain
