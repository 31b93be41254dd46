"""What the operator keeps of each trainer pod and Job in its indexes.

kopf's indexes hold one entry per object for the operator's lifetime; with thousands of pods a
whole pod body (its spec: the trainer's env, volumes, ...; managedFields) is most of the
operator's memory, and the status logic never reads it. Pods keep their metadata and status;
Jobs their metadata, status and spec without the pod template.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

Manifest = dict[str, Any]


def _metadata(body: Mapping[str, Any]) -> Manifest:
    meta = dict(body.get("metadata") or {})
    meta.pop("managedFields", None)
    return meta


def pod(body: Mapping[str, Any]) -> Manifest:
    return {"apiVersion": body.get("apiVersion"), "kind": body.get("kind"),
            "metadata": _metadata(body), "status": dict(body.get("status") or {})}


def job(body: Mapping[str, Any]) -> Manifest:
    spec = {k: v for k, v in (body.get("spec") or {}).items() if k != "template"}
    return {"apiVersion": body.get("apiVersion"), "kind": body.get("kind"),
            "metadata": _metadata(body), "spec": spec, "status": dict(body.get("status") or {})}
