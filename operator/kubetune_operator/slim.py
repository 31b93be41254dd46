"""What the operator keeps of each trainer pod and Job in its indexes.

kopf's indexes hold one entry per object for the operator's lifetime; with thousands of pods a
whole pod body (its spec: the trainer's env, volumes, ...; managedFields) is most of the
operator's memory, and the status logic never reads it. Pods keep their metadata and status;
Jobs their metadata, status and spec without the pod template.

A pod that has finished (Succeeded or Failed) changes no more: the pods of finished attempts
and of finished FineTuneJobs are most of a busy cluster's trainer pods, kept until their Job's
TTL. Such a pod keeps only what the status logic reads of it (status.py: its rank, attempt,
owners, timestamps, phase, reason, pod IP, the trainer's termination and the conditions that
explain a failure). Whoever reads another field of a pod must add it here; test_slim.py checks
that the decisions are the same on whole bodies.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kubetune_operator.builders import ANNOTATION_COMPLETION_INDEX
from kubetune_operator.status import trainer_status

Manifest = dict[str, Any]

FINISHED_POD_PHASES = frozenset({"Succeeded", "Failed"})
# Finished pods: the metadata, status fields and conditions the status logic reads.
FINISHED_METADATA = ("name", "namespace", "uid", "labels", "ownerReferences",
                     "creationTimestamp", "deletionTimestamp")
FINISHED_STATUS = ("phase", "reason", "message", "podIP")
FINISHED_CONDITIONS = frozenset({"DisruptionTarget", "PodScheduled"})
TERMINATED_FIELDS = ("exitCode", "reason", "message", "signal")


def _metadata(body: Mapping[str, Any]) -> Manifest:
    meta = dict(body.get("metadata") or {})
    meta.pop("managedFields", None)
    return meta


def pod(body: Mapping[str, Any]) -> Manifest:
    status = body.get("status") or {}
    if status.get("phase") in FINISHED_POD_PHASES:
        return finished_pod(body)
    return {"apiVersion": body.get("apiVersion"), "kind": body.get("kind"),
            "metadata": _metadata(body), "status": dict(status)}


def finished_pod(body: Mapping[str, Any]) -> Manifest:
    meta, status = body.get("metadata") or {}, body.get("status") or {}
    kept_meta = {k: meta[k] for k in FINISHED_METADATA if k in meta}
    index = (meta.get("annotations") or {}).get(ANNOTATION_COMPLETION_INDEX)
    if index is not None:
        kept_meta["annotations"] = {ANNOTATION_COMPLETION_INDEX: index}
    kept = {k: status[k] for k in FINISHED_STATUS if k in status}
    conditions = [c for c in status.get("conditions") or []
                  if c.get("type") in FINISHED_CONDITIONS]
    if conditions:
        kept["conditions"] = conditions
    if trainer := trainer_status(dict(body)):
        kept["containerStatuses"] = [{"name": trainer.get("name"),
                                      "state": _state(trainer.get("state") or {})}]
    return {"apiVersion": body.get("apiVersion"), "kind": body.get("kind"),
            "metadata": kept_meta, "status": kept}


def _state(state: Mapping[str, Any]) -> Manifest:
    terminated = state.get("terminated")
    if terminated is None:
        return dict(state)
    return {"terminated": {k: terminated[k] for k in TERMINATED_FIELDS if k in terminated}}


def job(body: Mapping[str, Any]) -> Manifest:
    spec = {k: v for k, v in (body.get("spec") or {}).items() if k != "template"}
    return {"apiVersion": body.get("apiVersion"), "kind": body.get("kind"),
            "metadata": _metadata(body), "spec": spec, "status": dict(body.get("status") or {})}
