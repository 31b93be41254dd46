"""The SDK's cluster backend: FineTuneJobs, their pods' logs and events through the
Kubernetes API (the `kubernetes` client: kubeconfig, exec plugins and in-cluster config)."""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes.client.exceptions import ApiException
from kubernetes.config.config_exception import ConfigException

from kubetune.errors import (
    AlreadyExists,
    ApiError,
    Forbidden,
    InvalidSpec,
    KubetuneError,
    LogsUnavailable,
    NotFound,
)
from kubetune.sdk import (
    POD_LABEL_ATTEMPT,
    POD_LABEL_JOB_UID,
    POD_LABEL_RANK,
    TRAINER_CONTAINER,
    EventList,
    Job,
    JobEvent,
    JobList,
    _Backend,
)
from kubetune_api.spec import GROUP, KIND, PLURAL, VERSION, FineTuneJob

Manifest = dict[str, Any]
IN_CLUSTER_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
POD_POLL_SECONDS = 0.5  # how often `logs --follow` looks for a rank's pod that is not running
MERGE_PATCH = "application/merge-patch+json"
PodList = list[Manifest]


def connect(kubeconfig: str | None, context: str | None) -> tuple[k8s.ApiClient, str]:
    """An API client and the namespace of the kubeconfig context (or of this pod).

    $KUBECONFIG is read now, not when the kubernetes package was imported (which fixes its
    default then): a notebook that sets it after `import kubetune` gets the file it names."""
    config_file = kubeconfig or os.environ.get("KUBECONFIG") or None
    try:
        contexts, current = k8s_config.list_kube_config_contexts(config_file=config_file)
    except (ConfigException, OSError) as exc:
        if kubeconfig is not None or context is not None:
            raise KubetuneError(f"kubeconfig: {exc}") from None
        try:
            k8s_config.load_incluster_config()
        except ConfigException:
            raise KubetuneError(f"no kubeconfig ({exc}) and not in a pod") from None
        namespace = IN_CLUSTER_NAMESPACE.read_text().strip() \
            if IN_CLUSTER_NAMESPACE.exists() else "default"
        return k8s.ApiClient(), namespace
    chosen = current
    if context is not None:
        chosen = next((c for c in contexts if c["name"] == context), None)
        if chosen is None:
            names = ", ".join(c["name"] for c in contexts)
            raise KubetuneError(f"context: {context!r} is not in the kubeconfig ({names})")
    api = k8s_config.new_client_from_config(config_file=config_file, context=context)
    return api, (chosen or {}).get("context", {}).get("namespace") or "default"


def refusal(exc: ApiException, what: str) -> NoReturn:
    """The API server's Status as the SDK's typed error."""
    try:
        status = json.loads(exc.body or "{}")
    except ValueError:
        status = {}
    message = f"{what}: {status.get('message') or exc.reason}"
    if exc.status == 404:
        raise NotFound(message) from None
    if exc.status in (401, 403):
        raise Forbidden(message) from None
    if exc.status == 409 and status.get("reason") == "AlreadyExists":
        raise AlreadyExists(message) from None
    if exc.status == 422:
        causes = (status.get("details") or {}).get("causes") or []
        raise InvalidSpec(message, tuple(c["field"] for c in causes if c.get("field"))) from None
    raise ApiError(message, int(exc.status or 0)) from None


class ClusterBackend(_Backend):
    def __init__(self, namespace: str | None, kubeconfig: str | None,
                 context: str | None) -> None:
        api, default_namespace = connect(kubeconfig, context)
        self.namespace = namespace or default_namespace
        self.custom = k8s.CustomObjectsApi(api)
        self.core = k8s.CoreV1Api(api)

    def create(self, job: FineTuneJob) -> Job:
        body = job.model_dump(mode="json", by_alias=True, exclude_none=True)
        try:
            obj = self.custom.create_namespaced_custom_object(
                GROUP, VERSION, self.namespace, PLURAL, body)
        except ApiException as exc:
            refusal(exc, f"creating {KIND} {job.name!r}")
        return Job.from_object(obj)

    def _object(self, name: str) -> Manifest:
        try:
            obj: Manifest = self.custom.get_namespaced_custom_object(
                GROUP, VERSION, self.namespace, PLURAL, name)
        except ApiException as exc:
            refusal(exc, f"{KIND} {self.namespace}/{name}")
        return obj

    def get(self, name: str) -> Job:
        return Job.from_object(self._object(name))

    def list(self, label_selector: str | None, all_namespaces: bool) -> JobList:
        selector = {"label_selector": label_selector} if label_selector else {}
        try:
            if all_namespaces:
                listing = self.custom.list_cluster_custom_object(GROUP, VERSION, PLURAL,
                                                                 **selector)
            else:
                listing = self.custom.list_namespaced_custom_object(
                    GROUP, VERSION, self.namespace, PLURAL, **selector)
        except ApiException as exc:
            refusal(exc, f"listing {KIND}s")
        jobs = [Job.from_object(o) for o in listing.get("items", [])]
        return sorted(jobs, key=lambda j: (j.namespace, j.name))

    def set_suspend(self, name: str, suspend: bool) -> Job:
        patch = {"spec": {"runPolicy": {"suspend": suspend}}}
        try:
            obj = self.custom.patch_namespaced_custom_object(
                GROUP, VERSION, self.namespace, PLURAL, name, patch, _content_type=MERGE_PATCH)
        except ApiException as exc:
            refusal(exc, f"{'suspending' if suspend else 'resuming'} {KIND} {name!r}")
        return Job.from_object(obj)

    def delete(self, name: str) -> None:
        try:
            self.custom.delete_namespaced_custom_object(
                GROUP, VERSION, self.namespace, PLURAL, name,
                body=k8s.V1DeleteOptions(propagation_policy="Background"))
        except ApiException as exc:
            refusal(exc, f"deleting {KIND} {name!r}")

    # --- pods: logs and events ------------------------------------------------------------------

    def _pods(self, job: Job, rank: int | None = None) -> PodList:
        selector = f"{POD_LABEL_JOB_UID}={job.uid}"
        if rank is not None:
            selector += f",{POD_LABEL_RANK}={rank}"
        try:
            return _items(self.core.list_namespaced_pod(
                self.namespace, label_selector=selector, _preload_content=False))
        except ApiException as exc:
            refusal(exc, f"pods of {job.name!r}")

    def _rank_pod(self, job: Job, rank: int) -> Manifest | None:
        """The rank's pod of the newest attempt there is a pod of."""
        def attempt(pod: Manifest) -> tuple[int, str]:
            labels = pod["metadata"].get("labels") or {}
            return int(labels.get(POD_LABEL_ATTEMPT, "0")), pod["metadata"]["name"]
        pods = self._pods(job, rank)
        return max(pods, key=attempt) if pods else None

    def logs(self, name: str, rank: int, follow: bool, tail: int | None) -> Iterator[str]:
        job = self.get(name)
        if rank >= job.spec.resources.nodes:
            raise NotFound(f"{name} has ranks 0..{job.spec.resources.nodes - 1}, not {rank}")
        pod = self._rank_pod(job, rank)
        while follow and not _started(pod):
            if self.get(name).finished and pod is None:
                raise LogsUnavailable(f"{name} ended before rank {rank} had a pod")
            time.sleep(POD_POLL_SECONDS)
            pod = self._rank_pod(job, rank)
        if pod is None:
            raise LogsUnavailable(f"{name}: rank {rank} has no pod yet ({job.phase})")
        return self._stream(pod["metadata"]["name"], follow, tail)

    def _stream(self, pod: str, follow: bool, tail: int | None) -> Iterator[str]:
        options: dict[str, Any] = {"container": TRAINER_CONTAINER, "follow": follow,
                                   "_preload_content": False}
        if tail is not None:
            options["tail_lines"] = tail
        try:
            response = self.core.read_namespaced_pod_log(pod, self.namespace, **options)
        except ApiException as exc:
            if exc.status == 400:  # the kubelet: container waiting to start
                raise LogsUnavailable(f"pod {pod}: {exc.reason}") from None
            refusal(exc, f"logs of pod {pod}")
        return _lines(response)

    def events(self, name: str) -> EventList:
        job = self.get(name)
        subjects = {job.uid} | {p["metadata"]["uid"] for p in self._pods(job)}
        with contextlib.suppress(ApiException):  # may not list Jobs: their events stay out
            subjects |= {j["metadata"]["uid"] for j in _items(
                k8s.BatchV1Api(self.core.api_client).list_namespaced_job(
                    self.namespace, label_selector=f"{POD_LABEL_JOB_UID}={job.uid}",
                    _preload_content=False))}
        try:
            found = _items(self.core.list_namespaced_event(self.namespace,
                                                           _preload_content=False))
        except ApiException as exc:
            refusal(exc, f"events of {name!r}")
        events = [e for e in found if (e.get("involvedObject") or {}).get("uid") in subjects]
        return [JobEvent(type=e.get("type") or "", reason=e.get("reason") or "",
                         message=e.get("message") or "",
                         object=f"{e['involvedObject'].get('kind')}/"
                                f"{e['involvedObject'].get('name')}",
                         count=e.get("count") or 1, last_seen=_stamp(e))
                for e in sorted(events, key=lambda e: _stamp(e) or "")]


def _items(response: Any) -> PodList:
    """The items of a list answer read as plain JSON: the generated models refuse objects
    with fields they think required (a pod status without `image`), and cost time."""
    return list(json.loads(response.data).get("items") or [])


def _started(pod: Manifest | None) -> bool:
    return pod is not None and (pod.get("status") or {}).get("phase", "Pending") != "Pending"


def _stamp(event: Manifest) -> str | None:
    stamp = event.get("lastTimestamp") or event.get("eventTime") or event.get("firstTimestamp")
    return str(stamp)[:19] + "Z" if stamp else None


def _lines(response: Any) -> Iterator[str]:
    """Lines of a streamed log response as they arrive (the body is chunked)."""
    pending = b""
    try:
        for chunk in response.stream(amt=None, decode_content=True):
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                yield line.decode(errors="replace")
        if pending:
            yield pending.decode(errors="replace")
    finally:
        response.release_conn()
