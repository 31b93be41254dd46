"""Operator settings from the environment, and the RBAC rules as a Kubernetes object."""

from __future__ import annotations

import logging

import kubernetes_validate

from kubetune_operator import rbac
from kubetune_operator.settings import DEFAULT_TRAINER_IMAGE, Settings


def test_defaults() -> None:
    settings = Settings.from_env({})
    assert settings.trainer_image == DEFAULT_TRAINER_IMAGE
    assert settings.watch_namespaces == ()  # all namespaces
    assert (settings.metrics_port, settings.health_port) == (8000, 8081)
    assert settings.peering is None and settings.storage_secret is None
    assert settings.log_level == logging.INFO


def test_overrides() -> None:
    settings = Settings.from_env({
        "KUBETUNE_TRAINER_IMAGE": "registry/trainer:2",
        "KUBETUNE_WATCH_NAMESPACES": "team-a, team-b,,",
        "KUBETUNE_OPERATOR_METRICS_PORT": "9100",
        "KUBETUNE_STORAGE_SECRET": "s3",
        "KUBETUNE_IMAGE_PULL_SECRETS": "pull-1,pull-2",
        "KUBETUNE_SERVICE_ACCOUNT": "trainer",
        "KUBETUNE_PEERING": "standalone",
        "KUBETUNE_PROGRESS_INTERVAL": "2.5",
        "KUBETUNE_LOG_LEVEL": "debug",
    })
    assert settings.trainer_image == "registry/trainer:2"
    assert settings.watch_namespaces == ("team-a", "team-b")
    assert settings.metrics_port == 9100 and settings.storage_secret == "s3"
    assert settings.image_pull_secrets == ("pull-1", "pull-2")
    assert settings.service_account == "trainer" and settings.peering is None
    assert settings.progress_interval == 2.5 and settings.log_level == logging.DEBUG
    assert Settings.from_env({"KUBETUNE_LOG_LEVEL": "loud"}).log_level == logging.INFO


def test_peering_only_when_named() -> None:
    assert Settings.from_env({"KUBETUNE_PEERING": "kubetune"}).peering == "kubetune"
    for standalone in ("", " ", "standalone"):
        assert Settings.from_env({"KUBETUNE_PEERING": standalone}).peering is None


def test_rbac_rules_form_a_valid_cluster_role() -> None:
    kubernetes_validate.validate(rbac.cluster_role(), "1.35", strict=True)
    assert rbac.allows("batch", "jobs", "delete")
    assert rbac.allows("kubetune.dev", "finetunejobs/status", "patch")
    assert rbac.allows("", "pods", "delete")  # force-deleting pods of a lost node
    assert not rbac.allows("", "pods", "create")  # the Job controller creates them
    assert not rbac.allows("", "secrets", "get")  # the operator never reads Secrets
