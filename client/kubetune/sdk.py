"""The Python SDK: FineTuneJobs on a cluster (or in this process), typed by the contract.

    client = kubetune.Client(namespace="team-a")
    job = client.train(model={"name": "tiny://llama"}, ...)      # or a FineTuneJob / spec
    for line in client.logs(job.name, follow=True): print(line)
    job = client.wait(job.name, until="Succeeded", timeout=600)
    client.artifact(job.name).manifest["files"]

The Kubernetes client is imported when a cluster Client is made, never by `import kubetune`,
so `kubetune validate` stays fast; the trainer only by the local backend.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from kubetune.errors import InvalidSpec, JobFailed, KubetuneError, WaitTimeout
from kubetune_api import contract
from kubetune_api.crd import TERMINAL_PHASES, FineTuneJobStatus, Phase
from kubetune_api.load import SpecError, validate_job
from kubetune_api.spec import API_VERSION, KIND, FineTuneJob, FineTuneJobSpec

Manifest = dict[str, Any]

# Labels the operator puts on every trainer pod (operator/kubetune_operator/builders.py uses
# the same contract names); the Job controller adds the completion index, i.e. the node rank.
POD_LABEL_JOB_UID = contract.POD_LABEL_JOB_UID
POD_LABEL_ATTEMPT = contract.POD_LABEL_ATTEMPT
POD_LABEL_RANK = "batch.kubernetes.io/job-completion-index"
TRAINER_CONTAINER = contract.TRAINER_CONTAINER
DEFAULT_POLL_SECONDS = 1.0


@dataclass(frozen=True)
class Job:
    """One FineTuneJob as the API server holds it: typed spec and status, plus the object."""

    name: str
    namespace: str
    uid: str
    spec: FineTuneJobSpec
    status: FineTuneJobStatus
    created: str | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    raw: Manifest = field(default_factory=dict, repr=False, compare=False)

    @property
    def phase(self) -> str:
        return str(self.status.phase or Phase.PENDING)

    @property
    def finished(self) -> bool:
        return self.status.phase in TERMINAL_PHASES

    @property
    def message(self) -> str:
        """The latest condition's message (why it failed, what it waits for)."""
        latest = self.status.conditions[-1] if self.status.conditions else None
        return f"{latest.reason}: {latest.message}" if latest else ""

    @classmethod
    def from_object(cls, obj: Manifest) -> Job:
        meta = obj.get("metadata") or {}
        try:
            spec = FineTuneJob.model_validate(obj).spec
        except ValueError:  # written by a newer contract: keep what validates
            spec = FineTuneJobSpec.model_construct(**(obj.get("spec") or {}))
        return cls(name=meta.get("name", ""), namespace=meta.get("namespace", ""),
                   uid=meta.get("uid", ""), spec=spec,
                   status=FineTuneJobStatus.model_validate(obj.get("status") or {}),
                   created=meta.get("creationTimestamp"), labels=dict(meta.get("labels") or {}),
                   raw=obj)

    def to_dict(self) -> Manifest:
        return self.raw


@dataclass(frozen=True)
class Artifact:
    """A succeeded job's output: where it is, the manifest's digest, and the manifest."""

    uri: str
    manifest_sha256: str | None
    manifest: Manifest | None = None


@dataclass(frozen=True)
class JobEvent:
    type: str
    reason: str
    message: str
    object: str  # kind/name of what it is about (the FineTuneJob, its Job, a pod)
    count: int = 1
    last_seen: str | None = None


# Aliases: inside the classes below, `list` is the method.
JobList = list[Job]
EventList = list[JobEvent]


def build_job(spec: FineTuneJob | FineTuneJobSpec | Mapping[str, Any] | None, *,
              name: str | None, namespace: str, labels: Mapping[str, str] | None = None,
              **fields: Any) -> FineTuneJob:
    """One FineTuneJob from whatever `train` was given, checked by the contract (InvalidSpec
    names the fields). `fields` are spec sections (camelCase or snake_case) that replace the
    given spec's."""
    if isinstance(spec, FineTuneJob):
        body: Manifest = spec.model_dump(mode="json", by_alias=True, exclude_none=True)
    elif isinstance(spec, FineTuneJobSpec):
        body = {"spec": spec.model_dump(mode="json", by_alias=True, exclude_none=True)}
    elif spec is not None and ("spec" in spec or "kind" in spec):
        body = json.loads(json.dumps(dict(spec)))
    else:
        body = {"spec": dict(spec or {})}
    body.update(apiVersion=API_VERSION, kind=KIND)
    body.setdefault("spec", {}).update(fields)
    meta = body.setdefault("metadata", {})
    if name:
        meta["name"] = name
    if not meta.get("name"):
        raise InvalidSpec("metadata.name: a FineTuneJob needs a name", ("metadata.name",))
    meta["namespace"] = namespace
    if labels:
        meta["labels"] = {**meta.get("labels", {}), **labels}
    try:
        return validate_job(body, source=f"{KIND} {meta['name']!r}")
    except SpecError as exc:
        raise InvalidSpec(str(exc), exc.fields) from None


class Client:
    """FineTuneJobs in one namespace of a cluster, or in this process (`backend="local"`).

    namespace: default the kubeconfig context's (in a pod: the pod's own);
    kubeconfig/context: default $KUBECONFIG / ~/.kube/config and its current context, or the
    in-cluster service account when there is no kubeconfig.
    """

    def __init__(self, namespace: str | None = None, kubeconfig: str | None = None,
                 context: str | None = None, backend: str = "cluster",
                 workdir: str | None = None) -> None:
        if backend not in ("cluster", "local"):
            raise ValueError(f"backend: {backend!r} is not 'cluster' or 'local'")
        self._backend: _Backend
        if backend == "local":
            from kubetune.local import LocalBackend

            self._backend = LocalBackend(namespace or "local", workdir)
        else:
            try:
                from kubetune.cluster import ClusterBackend
            except ImportError as exc:  # installed without the client extra
                raise KubetuneError(f"a cluster Client needs the Kubernetes client ({exc}): "
                                    "pip install 'kubetune[client]'") from None
            self._backend = ClusterBackend(namespace, kubeconfig, context)
        self.namespace = self._backend.namespace

    # --- jobs ---------------------------------------------------------------------------------

    def train(self, spec: FineTuneJob | FineTuneJobSpec | Mapping[str, Any] | None = None, *,
              name: str | None = None, labels: Mapping[str, str] | None = None,
              **fields: Any) -> Job:
        """Submit a FineTuneJob: a FineTuneJob, a spec, a dict (a whole object or a spec), or
        spec sections as keywords (`model={...}, dataset={...}`). Returns it as created."""
        job = build_job(spec, name=name, namespace=self.namespace, labels=labels, **fields)
        return self._backend.create(job)

    def get(self, name: str) -> Job:
        return self._backend.get(name)

    def list(self, label_selector: str | None = None, all_namespaces: bool = False
             ) -> JobList:
        return self._backend.list(label_selector, all_namespaces)

    def wait(self, name: str, until: str | Iterable[str] = Phase.SUCCEEDED,
             timeout: float | None = None, poll: float = DEFAULT_POLL_SECONDS) -> Job:
        """Until the job's phase is one of `until`. Reaching another terminal phase raises
        JobFailed (with the job), running out of `timeout` seconds WaitTimeout."""
        wanted = {until} if isinstance(until, str) else set(until)
        unknown = wanted - {p.value for p in Phase}
        if unknown:
            raise ValueError(f"until: {sorted(unknown)} are not phases "
                             f"({', '.join(p.value for p in Phase)})")
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.get(name)
            if job.phase in wanted:
                return job
            if job.finished:
                raise JobFailed(f"{name} ended {job.phase} ({job.message}), not "
                                f"{' or '.join(sorted(wanted))}", job)
            if deadline is not None and time.monotonic() >= deadline:
                raise WaitTimeout(f"{name} still {job.phase} after {timeout}s", job)
            time.sleep(poll)

    def logs(self, name: str, rank: int = 0, follow: bool = False,
             tail: int | None = None) -> Iterator[str]:
        """Lines of node rank `rank`'s trainer container (its current attempt). With
        `follow`, lines as they come until the container ends."""
        if rank < 0:
            raise ValueError(f"rank: {rank} is negative")
        return self._backend.logs(name, rank, follow, tail)

    def events(self, name: str) -> EventList:
        """Events about the FineTuneJob and the Jobs and pods of its attempts, oldest first."""
        return self._backend.events(name)

    def suspend(self, name: str) -> Job:
        """runPolicy.suspend: true. The operator stops the ranks (they checkpoint first);
        `resume` continues from the last checkpoint."""
        return self._backend.set_suspend(name, True)

    def resume(self, name: str) -> Job:
        return self._backend.set_suspend(name, False)

    def cancel(self, name: str) -> None:
        """Stop the job for good: the FineTuneJob is deleted and its Jobs and pods with it
        (owner references); what it wrote to storage stays."""
        self._backend.delete(name)

    delete = cancel

    def artifact(self, name: str, storage_options: Mapping[str, Any] | None = None
                 ) -> Artifact:
        """A succeeded job's output URI, manifest digest and manifest, read through fsspec
        (`storage_options` are fsspec's: credentials; a job's spec.storage endpoint and region
        are filled in). The manifest must match the digest the trainer reported."""
        job = self.get(name)
        if job.status.output is None:
            raise KubetuneError(f"{name} has no artifact ({job.phase})")
        output = job.status.output
        manifest = read_manifest(output.uri, output.manifest_sha256,
                                 storage_defaults(job, storage_options))
        return Artifact(output.uri, output.manifest_sha256, manifest)


def storage_defaults(job: Job, options: Mapping[str, Any] | None) -> dict[str, Any]:
    merged: dict[str, Any] = dict(options or {})
    storage = job.spec.storage
    if job.status.output and job.status.output.uri.startswith("s3://") and storage:
        client_kwargs = dict(merged.get("client_kwargs") or {})
        if storage.endpoint_url:
            client_kwargs.setdefault("endpoint_url", storage.endpoint_url)
        if storage.region:
            client_kwargs.setdefault("region_name", storage.region)
        merged["client_kwargs"] = client_kwargs
    return merged


def read_manifest(uri: str, digest: str | None, options: Mapping[str, Any]) -> Manifest:
    try:
        import fsspec
    except ImportError:  # the SDK alone: install kubetune[trainer] or fsspec + s3fs/gcsfs
        raise KubetuneError("reading an artifact needs fsspec (pip install fsspec s3fs gcsfs)"
                            ) from None
    path = f"{uri.rstrip('/')}/{contract.MANIFEST_FILE}"
    try:
        with fsspec.open(path, "rb", **options) as handle:
            data = handle.read()
    except (OSError, ValueError) as exc:
        raise KubetuneError(f"{path}: cannot read: {exc}") from None
    if digest and hashlib.sha256(data).hexdigest() != digest:
        raise KubetuneError(f"{path}: sha256 differs from the digest the trainer reported "
                            f"({digest}); the artifact was changed after it was written")
    manifest: Manifest = json.loads(data)
    return manifest


class _Backend:
    namespace: str

    def create(self, job: FineTuneJob) -> Job:
        raise NotImplementedError

    def get(self, name: str) -> Job:
        raise NotImplementedError

    def list(self, label_selector: str | None, all_namespaces: bool) -> JobList:
        raise NotImplementedError

    def logs(self, name: str, rank: int, follow: bool, tail: int | None) -> Iterator[str]:
        raise NotImplementedError

    def events(self, name: str) -> EventList:
        raise NotImplementedError

    def set_suspend(self, name: str, suspend: bool) -> Job:
        raise NotImplementedError

    def delete(self, name: str) -> None:
        raise NotImplementedError

