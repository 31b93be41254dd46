"""Operator settings, read once from the environment (the Helm chart sets them)."""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from kubetune_operator.policy import POLICY_ENV, Policy, parse_policy

DEFAULT_TRAINER_IMAGE = "ghcr.io/kubetune/trainer:0.1.0"


def _list(value: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in value.split(",") if item.strip())


def _bool(value: str, name: str) -> bool:
    text = value.strip().lower()
    if text not in ("true", "false", "1", "0", "yes", "no", ""):
        raise ValueError(f"{name}: expected true or false, got {value!r}")
    return text in ("true", "1", "yes")


def _log_level(name: str) -> int:
    level = logging.getLevelName(name.strip().upper())
    return level if isinstance(level, int) else logging.INFO


_QUANTITY = re.compile(r"^(\d+(\.\d+)?(m|k|M|G|T|Ki|Mi|Gi|Ti)?)?$")


def _quantity(env: Mapping[str, str], name: str, default: str) -> str:
    """A plain Kubernetes quantity ('4', '500m', '32Gi') or '' for none; anything else stops
    the operator at start with the variable's name, not at the first Job creation."""
    value = env.get(name, default).strip()
    if not _QUANTITY.match(value):
        raise ValueError(f"{name}={value!r}: expected a quantity like 4, 500m or 32Gi, or empty")
    return value


def _flag(env: Mapping[str, str], name: str, default: bool) -> bool:
    """A boolean variable; unset keeps the default (an empty value means false, as _bool)."""
    value = env.get(name)
    return default if value is None else _bool(value, name)


def _json_objects(env: Mapping[str, str], name: str) -> tuple[dict[str, Any], ...]:
    """A JSON list of objects (Kubernetes structures the chart renders with toJson)."""
    text = env.get(name, "").strip()
    try:
        value = json.loads(text) if text else []
    except json.JSONDecodeError as exc:
        raise ValueError(f"{name}: not JSON: {exc}") from None
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise ValueError(f"{name}: expected a JSON list of objects")
    return tuple(value)


def _cidrs(env: Mapping[str, str], name: str) -> tuple[str, ...]:
    """Comma-separated CIDRs, normalized (10.0.0.1/8 is refused: host bits set)."""
    try:
        return tuple(str(ipaddress.ip_network(c)) for c in _list(env.get(name, "")))
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}") from None


def _ports(env: Mapping[str, str], name: str) -> tuple[int, ...]:
    ports = []
    for item in _list(env.get(name, "")):
        if not item.isdigit() or not 1 <= int(item) <= 65535:
            raise ValueError(f"{name}: {item!r} is not a port (1-65535)")
        ports.append(int(item))
    return tuple(ports)


def _api_server(env: Mapping[str, str]) -> tuple[str, ...]:
    """The API server's address as pods see it (the kubernetes Service), as a host CIDR."""
    try:
        return (str(ipaddress.ip_network(env.get("KUBERNETES_SERVICE_HOST", "").strip())),)
    except ValueError:
        return ()  # unset (outside a cluster) or a name


@dataclass(frozen=True)
class Settings:
    trainer_image: str = DEFAULT_TRAINER_IMAGE
    watch_namespaces: tuple[str, ...] = ()  # empty: all namespaces
    metrics_port: int = 8000  # the operator's own Prometheus endpoint; 0 turns it off
    health_port: int = 8081  # kopf's liveness endpoint (/healthz); 0 turns it off
    storage_secret: str | None = None  # spec.storage.secretName when the spec names none
    image_pull_secrets: tuple[str, ...] = ()  # added to every trainer pod
    service_account: str | None = None  # trainer pods' service account (no token mounted)
    # kopf peering object shared by replicas; None (the default): standalone, one replica.
    peering: str | None = None
    progress_interval: float = 15.0  # seconds between scrapes of rank 0 / periodic resyncs
    scrape_timeout: float = 3.0
    termination_grace_seconds: int = 300  # time for ranks to checkpoint on SIGTERM
    # OpenShift's restricted SCC (and similar platforms) assign each namespace a UID range:
    # trainer pods then set no runAsUser/runAsGroup/fsGroup of their own.
    platform_assigns_uids: bool = False
    # A pod still there this long after its deletion deadline (deletionTimestamp) is on a node
    # that is gone: it is force-deleted so the next attempt can start.
    force_delete_after: float = 60.0
    log_level: int = logging.INFO
    # Trainer requests where spec.pod.cpu/memory are empty ("" = none): per GPU, or per pod
    # of a CPU-only job. The memory default is also the limit (builders.container_resources).
    cpu_per_gpu: str = "4"
    memory_per_gpu: str = "32Gi"
    cpu_without_gpu: str = "1"
    memory_without_gpu: str = "4Gi"
    policy: Policy = field(default_factory=Policy)  # admin rules (policy.py)
    # A NetworkPolicy per job (builders.build_network_policy): who may scrape the ranks'
    # metrics (NetworkPolicyPeers: the operator, Prometheus) and extra egress rules
    # (NetworkPolicyEgressRules: a proxy, an experiment tracker, ...).
    network_policy: bool = True
    read_only_root_filesystem: bool = True  # trainer containers
    metrics_from: tuple[dict[str, Any], ...] = ()
    extra_egress: tuple[dict[str, Any], ...] = ()
    # CIDRs excluded from the ranks' web egress besides link-local (builders.LINK_LOCAL): the
    # admin's node/pod/service CIDRs, then the API server's address.
    egress_except: tuple[str, ...] = ()
    endpoint_ports: tuple[int, ...] = ()  # spec.storage.endpointUrl ports that may be opened

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        peering = env.get("KUBETUNE_PEERING", "").strip()
        return cls(
            trainer_image=env.get("KUBETUNE_TRAINER_IMAGE") or DEFAULT_TRAINER_IMAGE,
            watch_namespaces=_list(env.get("KUBETUNE_WATCH_NAMESPACES", "")),
            metrics_port=int(env.get("KUBETUNE_OPERATOR_METRICS_PORT", cls.metrics_port)),
            health_port=int(env.get("KUBETUNE_HEALTH_PORT", cls.health_port)),
            storage_secret=env.get("KUBETUNE_STORAGE_SECRET") or None,
            image_pull_secrets=_list(env.get("KUBETUNE_IMAGE_PULL_SECRETS", "")),
            service_account=env.get("KUBETUNE_SERVICE_ACCOUNT") or None,
            peering=None if peering in ("", "standalone") else peering,
            progress_interval=float(env.get("KUBETUNE_PROGRESS_INTERVAL",
                                            cls.progress_interval)),
            scrape_timeout=float(env.get("KUBETUNE_SCRAPE_TIMEOUT", cls.scrape_timeout)),
            termination_grace_seconds=int(env.get("KUBETUNE_TERMINATION_GRACE_SECONDS",
                                                  cls.termination_grace_seconds)),
            force_delete_after=float(env.get("KUBETUNE_FORCE_DELETE_AFTER_SECONDS",
                                             cls.force_delete_after)),
            log_level=_log_level(env.get("KUBETUNE_LOG_LEVEL", "INFO")),
            platform_assigns_uids=_bool(env.get("KUBETUNE_PLATFORM_ASSIGNS_UIDS", "false"),
                                        "KUBETUNE_PLATFORM_ASSIGNS_UIDS"),
            cpu_per_gpu=_quantity(env, "KUBETUNE_CPU_PER_GPU", cls.cpu_per_gpu),
            memory_per_gpu=_quantity(env, "KUBETUNE_MEMORY_PER_GPU", cls.memory_per_gpu),
            cpu_without_gpu=_quantity(env, "KUBETUNE_CPU_WITHOUT_GPU", cls.cpu_without_gpu),
            memory_without_gpu=_quantity(env, "KUBETUNE_MEMORY_WITHOUT_GPU",
                                         cls.memory_without_gpu),
            policy=parse_policy(env.get(POLICY_ENV, "")),
            network_policy=_flag(env, "KUBETUNE_NETWORK_POLICY", cls.network_policy),
            read_only_root_filesystem=_flag(env, "KUBETUNE_READ_ONLY_ROOT_FILESYSTEM",
                                            cls.read_only_root_filesystem),
            metrics_from=_json_objects(env, "KUBETUNE_METRICS_FROM"),
            extra_egress=_json_objects(env, "KUBETUNE_EXTRA_EGRESS"),
            egress_except=_cidrs(env, "KUBETUNE_EGRESS_EXCEPT") + _api_server(env),
            endpoint_ports=_ports(env, "KUBETUNE_ENDPOINT_PORTS"),
        )
