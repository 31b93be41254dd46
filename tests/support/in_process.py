"""The operator's Reconciler in the test's own event loop, against the emulated API server:
for tests that drive single reconciles (no kopf; a test stubs kopf.event itself)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import kopf
from prometheus_client import CollectorRegistry

from kubetune_operator.kube import KubeApi
from kubetune_operator.metrics import OperatorMetrics
from kubetune_operator.reconciler import Reconciler
from kubetune_operator.settings import Settings
from support.kube_emulator import EmulatorThread


@asynccontextmanager
async def in_process_reconciler(api: EmulatorThread) -> AsyncIterator[Reconciler]:
    """A Reconciler with default settings; afterwards its pending re-checks are cancelled and
    its client closed, so nothing outlives the test's loop."""
    client = KubeApi(lambda: kopf.ConnectionInfo(server=api.url, token="t"))
    reconciler = Reconciler(client, Settings.from_env({}), OperatorMetrics(CollectorRegistry()))
    try:
        yield reconciler
    finally:
        for timer in reconciler._rechecks.values():
            timer.cancel()
        await client.close()
