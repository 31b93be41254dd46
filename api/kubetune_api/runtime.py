"""Runtimes curated by admins: ClusterFineTuneRuntime (cluster-scoped) and FineTuneRuntime
(namespaced). A FineTuneJob names one with spec.runtimeRef; the operator merges the two
(kubetune_operator.runtimes, precedence in docs/runtimes.md) and enforces its policy.

A field left out of a runtime does not constrain jobs; a field set is what every job that
names the runtime gets, and a job may only repeat it or narrow it.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from kubetune_api.spec import (
    CLUSTER_RUNTIME_KIND,
    DNS_LABEL,
    MAX_ENV,
    MAX_ITEMS,
    MAX_NAME,
    MAX_PROPERTIES,
    MAX_URI,
    RUNTIME_KIND,
    MethodType,
    Name,
    SpecModel,
    Structure,
    Text,
)

RUNTIME_PLURAL = "finetuneruntimes"
CLUSTER_RUNTIME_PLURAL = "clusterfinetuneruntimes"
# Where a job's Kueue queue goes (builders.LABEL_KUEUE_QUEUE; this layer imports no operator).
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"


URI = Annotated[str, Field(max_length=MAX_URI)]


class RuntimePolicy(SpecModel):
    """What jobs naming this runtime may ask for; null means no restriction by this runtime
    (the operator-wide policy still applies)."""

    allowed_methods: list[MethodType] | None = Field(
        None, max_length=MAX_ITEMS, description="Allowed spec.method.type values (full, lora, "
        "qlora).")
    max_gpus_per_job: int | None = Field(
        None, ge=0, description="Cap on resources.nodes x resources.gpusPerNode.")
    allowed_storage_prefixes: list[URI] | None = Field(
        None, max_length=MAX_ITEMS, description="spec.output.uri and spec.checkpoint.uri must "
        "start with one of these (e.g. s3://team-a/).")


class FineTuneRuntimeSpec(SpecModel):
    """The image, placement and defaults every job naming this runtime gets."""

    image: str | None = Field(
        None, max_length=MAX_URI, description="Trainer image; a job may only repeat it.")
    image_pull_secrets: list[Name] = Field(
        default_factory=list, max_length=MAX_ITEMS, description="Pull secrets added to the "
        "job's.")
    cpu: str | None = Field(
        None, max_length=MAX_NAME, description="Default CPU per pod (a job's spec.pod.cpu "
        "wins).")
    memory: str | None = Field(
        None, max_length=MAX_NAME, description="Default memory per pod (a job's "
        "spec.pod.memory wins).")
    node_selector: dict[str, Name] = Field(
        default_factory=dict, max_length=MAX_PROPERTIES, description="Node labels required; "
        "a job may add keys, not change these.")
    tolerations: list[Structure] | None = Field(
        None, max_length=MAX_ITEMS, description="Pod tolerations (core/v1). When set, a job's "
        "tolerations must each be one of these; a job that lists none gets these.")
    affinity: Structure | None = Field(
        None, description="Pod affinity (core/v1); when set, a job may only repeat it.")
    scheduler_name: str | None = Field(
        None, max_length=MAX_NAME, description="Scheduler of the pods; a job may only repeat "
        "it.")
    priority_class_name: str | None = Field(
        None, max_length=MAX_NAME, description="PriorityClass of the pods; a job may only "
        "repeat it.")
    queue: str | None = Field(
        None, max_length=63, pattern=DNS_LABEL, description="Kueue queue (label "
        + KUEUE_QUEUE_LABEL + "); a job may only repeat it.")
    labels: dict[str, Name] = Field(
        default_factory=dict, max_length=MAX_PROPERTIES, description="Pod labels added; a job "
        "may not give these keys other values.")
    annotations: dict[str, Text] = Field(
        default_factory=dict, max_length=MAX_PROPERTIES, description="Pod annotations added; "
        "a job may not give these keys other values.")
    env: dict[str, Text] = Field(
        default_factory=dict, max_length=MAX_ENV, description="Trainer environment variables "
        "added; a job may not give these other values.")
    service_account_name: Name | None = Field(
        None, description="The trainer pods' ServiceAccount, in the job's namespace, in place "
        "of the operator's default: workload identity (IRSA's eks.amazonaws.com/role-arn or "
        "GKE's iam.gke.io/gcp-service-account annotation on it) gives the pods storage access "
        "with no static key, so jobs need no storage Secret. Jobs cannot set it themselves.")
    policy: RuntimePolicy = Field(
        default_factory=RuntimePolicy, description="Limits on the jobs that name this runtime.")


RUNTIME_KINDS = {CLUSTER_RUNTIME_KIND: CLUSTER_RUNTIME_PLURAL, RUNTIME_KIND: RUNTIME_PLURAL}
