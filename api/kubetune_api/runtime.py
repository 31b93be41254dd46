"""Runtimes curated by admins: ClusterFineTuneRuntime (cluster-scoped) and FineTuneRuntime
(namespaced). A FineTuneJob names one with spec.runtimeRef; the operator merges the two
(kubetune_operator.runtimes, precedence in docs/runtimes.md) and enforces its policy.

A field left out of a runtime does not constrain jobs; a field set is what every job that
names the runtime gets, and a job may only repeat it or narrow it.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from kubetune_api.spec import (
    CLUSTER_RUNTIME_KIND,
    DNS_LABEL,
    RUNTIME_KIND,
    MethodType,
    SpecModel,
)

RUNTIME_PLURAL = "finetuneruntimes"
CLUSTER_RUNTIME_PLURAL = "clusterfinetuneruntimes"
# Where a job's Kueue queue goes (builders.LABEL_KUEUE_QUEUE; this layer imports no operator).
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"


class RuntimePolicy(SpecModel):
    """What jobs naming this runtime may ask for; null means no restriction by this runtime
    (the operator-wide policy still applies)."""

    allowed_methods: list[MethodType] | None = Field(
        None, description="Allowed spec.method.type values (full, lora, qlora).")
    max_gpus_per_job: int | None = Field(
        None, ge=0, description="Cap on resources.nodes x resources.gpusPerNode.")
    allowed_storage_prefixes: list[str] | None = Field(
        None, description="spec.output.uri and spec.checkpoint.uri must start with one of "
        "these (e.g. s3://team-a/).")


class FineTuneRuntimeSpec(SpecModel):
    """The image, placement and defaults every job naming this runtime gets."""

    image: str | None = Field(None, description="Trainer image; a job may only repeat it.")
    image_pull_secrets: list[str] = Field(default_factory=list, description="Pull secrets "
                                          "added to the job's.")
    cpu: str | None = Field(None, description="Default CPU per pod (a job's spec.pod.cpu wins).")
    memory: str | None = Field(None, description="Default memory per pod (a job's "
                               "spec.pod.memory wins).")
    node_selector: dict[str, str] = Field(default_factory=dict, description="Node labels "
                                          "required; a job may add keys, not change these.")
    tolerations: list[dict[str, Any]] | None = Field(
        None, description="Pod tolerations (core/v1). When set, a job's tolerations must each "
        "be one of these; a job that lists none gets these.")
    affinity: dict[str, Any] | None = Field(None, description="Pod affinity (core/v1); when "
                                            "set, a job may only repeat it.")
    scheduler_name: str | None = Field(None, description="Scheduler of the pods; a job may "
                                       "only repeat it.")
    priority_class_name: str | None = Field(None, description="PriorityClass of the pods; a "
                                            "job may only repeat it.")
    queue: str | None = Field(None, max_length=63, pattern=DNS_LABEL,
                              description="Kueue queue (label " + KUEUE_QUEUE_LABEL + "); a "
                              "job may only repeat it.")
    labels: dict[str, str] = Field(default_factory=dict, description="Pod labels added; a job "
                                   "may not give these keys other values.")
    annotations: dict[str, str] = Field(default_factory=dict, description="Pod annotations "
                                        "added; a job may not give these keys other values.")
    env: dict[str, str] = Field(default_factory=dict, description="Trainer environment "
                                "variables added; a job may not give these other values.")
    policy: RuntimePolicy = Field(default_factory=RuntimePolicy, description="Limits on the "
                                  "jobs that name this runtime.")


RUNTIME_KINDS = {CLUSTER_RUNTIME_KIND: CLUSTER_RUNTIME_PLURAL, RUNTIME_KIND: RUNTIME_PLURAL}
