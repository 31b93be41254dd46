"""A model of Kueue for the emulated API server: what the operator sees of it on a cluster.

Kueue (https://kueue.sigs.k8s.io) manages a batch/v1 Job that names a LocalQueue (label or
annotation `kueue.x-k8s.io/queue-name`), or any Job when `manageJobsWithoutQueueName` is on
(the "default LocalQueue"): its webhook makes the Job suspended at creation; it admits the whole
Job as one Workload when the ClusterQueue has quota, by unsuspending it only (the Job
controller then creates the pods and, in that sync, writes `status.startTime` and
Suspended=False); it preempts an admitted Job by suspending it again and clearing its
`status.startTime` (the Job controller deletes its pods, which get SIGTERM).

This model keeps a quota in pods (one per completion), admits in creation order, and leaves
the Job controller's part to the caller (the operator-process tests create and delete pods;
in the e2e harness tests/support/pod_runner.py deletes a suspended Job's pods and creates them
again on re-admission). It acts only when called (`webhook`, `admit`, `preempt`), not on a
timer. What it does not model: Workload objects, cohorts and borrowing, fair sharing,
priorities, WaitForPodsReady.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from support.kube_emulator import EmulatorThread
from support.operator_process import JOBS

QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
ADMITTED = "kueue.emulated/admitted"  # an annotation of the model: this Job holds quota



@dataclass
class KueueModel:
    api: EmulatorThread
    quota: int  # pods the ClusterQueue can run at once
    default_queue: bool = False  # manageJobsWithoutQueueName: every Job is queued
    namespace: str = "default"
    _seen: set[str] = field(default_factory=set)

    def managed(self, job: dict[str, Any]) -> bool:
        meta = job["metadata"]
        return self.default_queue or QUEUE_LABEL in (meta.get("labels") or {}) \
            or QUEUE_LABEL in (meta.get("annotations") or {})

    def webhook(self) -> None:
        """Suspend newly seen managed Jobs, as Kueue's mutating webhook does at creation
        (a default LocalQueue also gets its queue-name label)."""
        for job in self.api.find(JOBS, self.namespace):
            uid = job["metadata"]["uid"]
            if uid in self._seen or not self.managed(job):
                continue
            self._seen.add(uid)
            patch: dict[str, Any] = {"spec": {"suspend": True}}
            if QUEUE_LABEL not in (job["metadata"].get("labels") or {}):
                patch["metadata"] = {"labels": {QUEUE_LABEL: "default"}}
            self.api.patch(JOBS, self.namespace, job["metadata"]["name"], patch)

    def used(self) -> int:
        return sum(int(j["spec"]["completions"]) for j in self.api.find(JOBS, self.namespace)
                   if ADMITTED in (j["metadata"].get("annotations") or {}))

    def admit(self) -> list[str]:
        """Admit waiting Jobs in creation order while the quota lasts; returns their names."""
        self.webhook()
        admitted = []
        waiting = sorted((j for j in self.api.find(JOBS, self.namespace)
                          if self.managed(j) and j["spec"].get("suspend")
                          and ADMITTED not in (j["metadata"].get("annotations") or {})),
                         key=lambda j: j["metadata"]["creationTimestamp"])
        for job in waiting:
            size = int(job["spec"]["completions"])
            if self.used() + size > self.quota:
                break
            name = job["metadata"]["name"]
            # Kueue only unsuspends (jobframework's startJob): the Job controller writes
            # startTime and Suspended=False in the sync that creates the pods.
            self.api.patch(JOBS, self.namespace, name, {
                "metadata": {"annotations": {ADMITTED: "true"}}, "spec": {"suspend": False}})
            admitted.append(name)
        return admitted

    def preempt(self, name: str) -> None:
        """Evict an admitted Job's Workload: suspend the Job, clear its startTime (Kueue's
        batch/v1 Job integration, `Job.Stop`: "Reset start time if necessary, so we can
        update the scheduling directives") and release its quota (`IsActive` is
        `status.active != 0`: deleted pods still terminating do not hold it)."""
        self.api.patch(JOBS, self.namespace, name, {
            "metadata": {"annotations": {ADMITTED: None}}, "spec": {"suspend": True}})
        self.api.patch(JOBS, self.namespace, name, {"status": {"startTime": None}},
                       subresource="status")
