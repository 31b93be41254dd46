"""`kubetune operator`: run the operator with the kubeconfig or in-cluster credentials."""

from __future__ import annotations

import asyncio
import logging
import random
import sys
from typing import Any


def _import_kopf_without_kubernetes_client() -> None:
    """kopf imports the kubernetes client (about 60 MB of RSS and 0.7 s) only to recognise
    its model classes, which this operator never hands to kopf. Hide it while kopf loads;
    `kopf.login_via_client` can still import it later for exec-plugin kubeconfigs."""
    if "kopf" in sys.modules or "kubernetes" in sys.modules:
        return
    sys.modules["kubernetes"] = None  # type: ignore[assignment]  # import → ImportError
    try:
        import kopf  # noqa: F401
    finally:
        del sys.modules["kubernetes"]


_import_kopf_without_kubernetes_client()

import kopf  # noqa: E402

from kubetune_operator import handlers  # noqa: E402
from kubetune_operator.kube import KubeApi, Resource  # noqa: E402
from kubetune_operator.metrics import OperatorMetrics  # noqa: E402
from kubetune_operator.reconciler import Reconciler  # noqa: E402
from kubetune_operator.settings import Settings  # noqa: E402

logger = logging.getLogger("kubetune_operator")

PREFIX = "kubetune.dev"
WORKER_IDLE_SECONDS = 0.5
LIST_PAGE_SIZE = 500  # objects per page of kopf's initial lists
CLUSTER_PEERINGS = Resource("kopf.dev", "v1", "clusterkopfpeerings", namespaced=False)
NAMESPACED_PEERINGS = Resource("kopf.dev", "v1", "kopfpeerings")
EXIT_CONFIG_ERROR = 2  # the operator cannot work as configured; restarting will not help


class StartupError(Exception):
    """A configuration the operator cannot work with; the message says what to do."""


class Credentials:
    """kopf's login, remembered so the operator's own client can log in the same way."""

    def __init__(self) -> None:
        self._kwargs: dict[str, Any] = {}

    def login(self, **kwargs: Any) -> kopf.ConnectionInfo:
        self._kwargs = kwargs
        return self.current()

    def current(self) -> kopf.ConnectionInfo:
        # Service-account tokens rotate on disk: read them at every login. The informers start
        # in a startup handler, before kopf's login: until then, kopf's default settings.
        kwargs = self._kwargs or {"settings": kopf.OperatorSettings(), "logger": logger}
        info = kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)
        if info is not None and (info.token or info.certificate_path or info.certificate_data
                                 or info.username):
            return info
        # exec plugins and auth providers (cloud kubeconfigs) need the client library.
        info = kopf.login_via_client(**kwargs)
        if info is None:
            raise kopf.LoginError("no service account, kubeconfig or client credentials")
        return info


def configure_kopf(settings: kopf.OperatorSettings) -> None:
    settings.persistence.finalizer = f"{PREFIX}/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=PREFIX, key="last-handled-configuration")
    settings.posting.level = logging.WARNING  # our own events say what happened
    settings.watching.server_timeout = 300  # reconnect watches regularly, as kubectl does
    settings.watching.client_timeout = 330
    # Initial lists come in pages instead of one response holding every object. (Trainer pods
    # and Jobs are not kopf's: informer.py watches them, with the label selector.)
    settings.watching.chunk_size = LIST_PAGE_SIZE
    # kopf's per-object worker keeps the object's last raw event (a whole body) while it
    # waits for the next one; a new event simply starts a new worker.
    settings.queueing.idle_timeout = WORKER_IDLE_SECONDS


def build(settings: Settings) -> tuple[kopf.OperatorRegistry, Reconciler, KubeApi]:
    credentials = Credentials()
    registry = kopf.OperatorRegistry()
    api = KubeApi(login=credentials.current)
    metrics = OperatorMetrics()
    reconciler = Reconciler(api, settings, metrics)
    kopf.on.login(id="login", registry=registry)(credentials.login)

    @kopf.on.startup(id="configure-kopf", registry=registry)
    async def startup(settings: kopf.OperatorSettings, **_: Any) -> None:
        configure_kopf(settings)

    @kopf.on.cleanup(id="close-api-client", registry=registry)
    async def cleanup(**_: Any) -> None:
        await api.close()

    handlers.register(registry, reconciler, settings)
    return registry, reconciler, api


async def missing_peerings(api: KubeApi, settings: Settings) -> list[str]:
    """The peering objects `settings.peering` names that do not exist. kopf never creates
    them: with one missing it waits, paused, and reconciles nothing, without a word."""
    name = settings.peering
    if name is None:
        return []
    if not settings.watch_namespaces:
        found = await api.request("GET", CLUSTER_PEERINGS.path(None, name))
        return [] if found is not None else [f"ClusterKopfPeering {name!r}"]
    return [f"KopfPeering {name!r} in namespace {namespace!r}"
            for namespace in settings.watch_namespaces
            if await api.get(NAMESPACED_PEERINGS, namespace, name) is None]


async def check_peering(settings: Settings) -> None:
    if settings.peering is None:
        return
    credentials = Credentials()
    credentials.login(settings=kopf.OperatorSettings(), logger=logger)  # as kopf will
    api = KubeApi(login=credentials.current)
    try:
        missing = await missing_peerings(api, settings)
    finally:
        await api.close()
    if missing:
        raise StartupError(
            f"KUBETUNE_PEERING={settings.peering}: no {', no '.join(missing)} (or no kopf "
            "peering CRD). kopf would wait for it and reconcile nothing. Create it (the Helm "
            "chart does with replicas > 1; kopf's peering CRDs are in "
            "charts/kubetune/crds/kopf-peerings.yaml), or unset KUBETUNE_PEERING to run one "
            "standalone operator.")


def run_operator() -> int:
    settings = Settings.from_env()
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: "
                        "%(message)s")
    # kopf logs every handler call at INFO; with thousands of jobs that is most of the CPU.
    if settings.log_level >= logging.INFO:
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    try:
        asyncio.run(check_peering(settings))
    except StartupError as exc:
        logger.error("cannot start: %s", exc)
        return EXIT_CONFIG_ERROR
    registry, reconciler, _ = build(settings)
    reconciler.metrics.serve(settings.metrics_port)
    liveness = f"http://0.0.0.0:{settings.health_port}/healthz" if settings.health_port \
        else None
    logger.info("kubetune operator: namespaces=%s peering=%s metrics=:%s",
                ",".join(settings.watch_namespaces) or "all", settings.peering or "standalone",
                settings.metrics_port)
    # kopf handles SIGTERM/SIGINT: handlers finish, then the loop ends.
    asyncio.run(kopf.operator(
        registry=registry,
        clusterwide=not settings.watch_namespaces,
        namespaces=list(settings.watch_namespaces),
        standalone=settings.peering is None,
        peering_name=settings.peering,
        # Distinct priorities: with equal ones kopf pauses every replica. The highest
        # priority replica acts; the others pause until it is gone.
        priority=random.randint(1, 2**31),
        liveness_endpoint=liveness,
    ))
    return 0


if __name__ == "__main__":
    sys.exit(run_operator())
