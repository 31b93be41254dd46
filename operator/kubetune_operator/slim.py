"""What the operator keeps of each trainer pod and Job in its indexes.

kopf's indexes hold one entry per object for the operator's lifetime; with thousands of pods a
whole pod body (its spec: the trainer's env, volumes, ...; managedFields) is most of the
operator's memory, and the status logic never reads it. Jobs keep their metadata, status and
spec without the pod template. Pods keep their status and, of their metadata, only what the
status logic reads (names, owners, timestamps, the attempt and owner labels, the completion
index): labels and annotations are the tenant's to set, as large as the API server allows
(256 KiB), and the operator is shared. Only pods a Job controls are indexed at all (indexed):
anyone may put the kubetune.dev/finetunejob label on a pod of their own.

A pod that has finished (Succeeded or Failed) changes no more: the pods of finished attempts
and of finished FineTuneJobs are most of a busy cluster's trainer pods, kept until their Job's
TTL. Such a pod keeps only what the status logic reads of it (observe.py: its rank, attempt,
owners, timestamps, phase, reason, pod IP, the trainer's termination and the conditions that
explain a failure). Whoever reads another field of a pod must add it here; test_slim.py checks
that the decisions are the same on whole bodies.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kubetune_api.spec import API_VERSION, KIND
from kubetune_operator.builders import (
    ANNOTATION_COMPLETION_INDEX,
    ANNOTATION_SUSPENDED_BY_OPERATOR,
    KUEUE_LABELS,
    LABEL_ATTEMPT,
    LABEL_JOB,
    LABEL_KUEUE_QUEUE,
    LABEL_OWNER_UID,
)
from kubetune_operator.status import trainer_status

Manifest = dict[str, Any]

FINISHED_POD_PHASES = frozenset({"Succeeded", "Failed"})
# Finished pods: the metadata, status fields and conditions the status logic reads.
FINISHED_METADATA = ("name", "namespace", "uid", "labels", "ownerReferences",
                     "creationTimestamp", "deletionTimestamp")
FINISHED_STATUS = ("phase", "reason", "message", "podIP")
FINISHED_CONDITIONS = frozenset({"DisruptionTarget", "PodScheduled"})
TERMINATED_FIELDS = ("exitCode", "reason", "message", "signal")
KEPT_LABELS = (LABEL_JOB, LABEL_ATTEMPT, LABEL_OWNER_UID)


# Jobs: the labels and annotations status.queued_by_others reads.
KEPT_JOB_LABELS = (*KEPT_LABELS, *KUEUE_LABELS)
KEPT_JOB_ANNOTATIONS = (LABEL_KUEUE_QUEUE, ANNOTATION_SUSPENDED_BY_OPERATOR)


def _controlled_by(body: Mapping[str, Any], api_version: str, kind: str) -> bool:
    return any(ref.get("controller") and ref.get("kind") == kind
               and ref.get("apiVersion") == api_version
               for ref in (body.get("metadata") or {}).get("ownerReferences") or [])


def indexed(body: Mapping[str, Any]) -> bool:
    """A pod a Job controls (the Job controller sets this owner; a tenant's bare pod, or a
    Deployment's, has none)."""
    return _controlled_by(body, "batch/v1", "Job")


def indexed_job(body: Mapping[str, Any]) -> bool:
    """A Job a FineTuneJob controls (the operator sets this owner)."""
    return _controlled_by(body, API_VERSION, KIND)


def _pod_metadata(meta: Mapping[str, Any]) -> Manifest:
    kept = {k: meta[k] for k in FINISHED_METADATA if k in meta}
    labels = meta.get("labels") or {}
    kept["labels"] = {k: labels[k] for k in KEPT_LABELS if k in labels}
    kept["ownerReferences"] = [ref for ref in meta.get("ownerReferences") or []
                               if ref.get("kind") == "Job"]
    index = (meta.get("annotations") or {}).get(ANNOTATION_COMPLETION_INDEX)
    if index is not None:
        kept["annotations"] = {ANNOTATION_COMPLETION_INDEX: index}
    return kept


def _metadata(body: Mapping[str, Any]) -> Manifest:
    meta = dict(body.get("metadata") or {})
    meta.pop("managedFields", None)
    return meta


def pod(body: Mapping[str, Any]) -> Manifest:
    status = body.get("status") or {}
    if status.get("phase") in FINISHED_POD_PHASES:
        return finished_pod(body)
    return {"apiVersion": body.get("apiVersion"), "kind": body.get("kind"),
            "metadata": _pod_metadata(body.get("metadata") or {}), "status": dict(status)}


def finished_pod(body: Mapping[str, Any]) -> Manifest:
    meta, status = body.get("metadata") or {}, body.get("status") or {}
    kept_meta = _pod_metadata(meta)
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
    meta = _metadata(body)
    labels, annotations = meta.get("labels") or {}, meta.pop("annotations", None) or {}
    meta["labels"] = {k: labels[k] for k in KEPT_JOB_LABELS if k in labels}
    kept = {k: annotations[k] for k in KEPT_JOB_ANNOTATIONS if k in annotations}
    if kept:
        meta["annotations"] = kept
    return {"apiVersion": body.get("apiVersion"), "kind": body.get("kind"),
            "metadata": meta, "spec": spec, "status": dict(body.get("status") or {})}
