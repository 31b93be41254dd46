"""The SDK's local backend: `train` runs the spec in this process as `kubetune run` does (the
trainer is imported here, and only here), and the finished jobs are kept in memory."""

from __future__ import annotations

import datetime
import hashlib
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import yaml

from kubetune.errors import AlreadyExists, KubetuneError, LogsUnavailable, NotFound
from kubetune.sdk import EventList, Job, JobList, _Backend
from kubetune_api import contract
from kubetune_api.crd import FineTuneJobStatus, Output, Phase
from kubetune_api.spec import FineTuneJob


class LocalBackend(_Backend):
    def __init__(self, namespace: str, workdir: str | None) -> None:
        self.namespace = namespace
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="kubetune-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.jobs: dict[str, Job] = {}

    def create(self, job: FineTuneJob) -> Job:
        from kubetune_trainer.launch import run_local

        if job.name in self.jobs:
            raise AlreadyExists(f"FineTuneJob {job.name!r} ran already in this Client")
        body = job.model_dump(mode="json", by_alias=True, exclude_none=True)
        config = self.workdir / f"{job.name}.yaml"
        config.write_text(yaml.safe_dump(body, sort_keys=False))
        started = _now()
        code = run_local(str(config), workdir=str(self.workdir / job.name), quiet=True)
        status = FineTuneJobStatus(phase=Phase.SUCCEEDED if code == contract.EXIT_OK
                                   else Phase.FAILED, start_time=started,
                                   completion_time=_now(), attempt=1)
        if code == contract.EXIT_OK:
            status.output = Output(uri=job.spec.output.uri,
                                   manifest_sha256=_digest(job.spec.output.uri))
        done = Job(name=job.name, namespace=self.namespace, uid=str(uuid.uuid4()),
                   spec=job.spec, status=status, created=started, raw=body)
        self.jobs[job.name] = done
        return done

    def get(self, name: str) -> Job:
        if name not in self.jobs:
            raise NotFound(f"FineTuneJob {name!r} has not run in this Client")
        return self.jobs[name]

    def list(self, label_selector: str | None, all_namespaces: bool) -> JobList:
        if label_selector:
            raise KubetuneError("the local backend does not select by labels")
        return sorted(self.jobs.values(), key=lambda j: j.name)

    def logs(self, name: str, rank: int, follow: bool, tail: int | None) -> Iterator[str]:
        self.get(name)
        raise LogsUnavailable("the local backend runs in this process: its progress went to "
                              "stderr")

    def events(self, name: str) -> EventList:
        self.get(name)
        return []

    def set_suspend(self, name: str, suspend: bool) -> Job:
        job = self.get(name)
        raise KubetuneError(f"{name} ran to its end in this process ({job.phase}); only a "
                            "cluster job can be suspended or resumed")

    def delete(self, name: str) -> None:
        self.get(name)
        del self.jobs[name]


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _digest(uri: str) -> str | None:
    """The manifest's sha256 for a local output (the trainer's rank 0 reports it to the
    operator in a cluster; here it is read back from the file)."""
    path = Path(uri.removeprefix("file://")) / contract.MANIFEST_FILE
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None
