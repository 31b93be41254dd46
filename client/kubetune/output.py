"""kubectl-style text: tables (the CRD's printer columns) and `describe`. Pure functions."""

from __future__ import annotations

import datetime
from collections.abc import Sequence

from kubetune.sdk import Job, JobEvent
from kubetune_api.oci import parse_reference

Row = Sequence[str]
JOB_COLUMNS = ("NAME", "PHASE", "METHOD", "MODEL", "NODES", "PROGRESS", "LOSS", "ETA",
               "RESTARTS", "AGE")


def table(header: Row, rows: Sequence[Row]) -> str:
    """Columns padded to their widest cell and three spaces apart, as kubectl prints."""
    widths = [max(len(str(r[i])) for r in (header, *rows)) for i in range(len(header))]
    lines = ["   ".join(str(cell).ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip()
             for r in (header, *rows)]
    return "\n".join(lines)


def age(timestamp: str | None, now: datetime.datetime | None = None) -> str:
    """kubectl's short duration (45s, 3m12s, 5h, 2d) since an RFC 3339 timestamp."""
    if not timestamp:
        return "<unknown>"
    then = datetime.datetime.fromisoformat(timestamp.replace("Z", "+00:00"))
    seconds = max(0, int(((now or datetime.datetime.now(datetime.UTC)) - then).total_seconds()))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 600:
        return f"{seconds // 60}m{seconds % 60}s"
    if seconds < 3 * 3600:
        return f"{seconds // 60}m"
    if seconds < 48 * 3600:
        return f"{seconds // 3600}h"
    return f"{seconds // 86400}d"


def _number(value: float | None, digits: int) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def job_rows(jobs: Sequence[Job], namespaces: bool = False,
             now: datetime.datetime | None = None) -> tuple[Row, list[Row]]:
    rows: list[Row] = []
    for job in jobs:
        progress = job.status.progress
        cells = [job.name, job.phase, str(job.spec.method.type), job.spec.model.name,
                 str(job.spec.resources.nodes),
                 f"{progress.percent:.0f}%" if progress and progress.percent is not None else "",
                 _number(progress.loss if progress else None, 4),
                 (progress.eta or "") if progress else "", str(job.status.restarts),
                 age(job.created, now)]
        rows.append([job.namespace, *cells] if namespaces else cells)
    header = ("NAMESPACE", *JOB_COLUMNS) if namespaces else JOB_COLUMNS
    return header, rows


def event_rows(events: Sequence[JobEvent], now: datetime.datetime | None = None
               ) -> tuple[Row, list[Row]]:
    return (("LAST SEEN", "TYPE", "REASON", "OBJECT", "MESSAGE"),
            [[age(e.last_seen, now), e.type, e.reason, e.object, e.message] for e in events])


def describe(job: Job, events: Sequence[JobEvent],
             now: datetime.datetime | None = None) -> str:
    spec, status = job.spec, job.status
    lines = [f"Name:         {job.name}", f"Namespace:    {job.namespace}",
             f"Created:      {job.created} ({age(job.created, now)} ago)",
             f"Model:        {spec.model.name} ({spec.model.task})",
             f"Method:       {spec.method.type}, objective {spec.training.objective}",
             f"Resources:    {spec.resources.nodes} node(s) x {spec.resources.gpus_per_node} "
             "GPU(s)",
             f"Output:       {spec.output.uri if spec.output else '<none>'}",
             f"Suspend:      {spec.run_policy.suspend}",
             f"Phase:        {job.phase}",
             f"Attempt:      {status.attempt or '-'} (restarts {status.restarts}, "
             f"preemptions {status.preemptions})"]
    if status.progress and status.progress.step is not None:
        p = status.progress
        lines.append(f"Progress:     step {p.step}/{p.total_steps} loss {_number(p.loss, 4)} "
                     f"tokens/s {_number(p.tokens_per_second, 0)} eta {p.eta or '-'}")
    if status.output:
        lines.append(f"Artifact:     {status.output.uri} (manifest sha256 "
                     f"{status.output.manifest_sha256})")
        if status.output.oci:  # spec.output.oci: pull it by digest (the tag may move)
            pushed = status.output.oci
            by_digest = parse_reference(pushed.reference).by_digest(pushed.digest)
            lines.append(f"Pushed:       {by_digest} (tag {pushed.reference})")
    if status.runtime:
        lines.append(f"Image:        {status.runtime.trainer_image}")
    lines.append("Conditions:")
    if status.conditions:
        header = ("TYPE", "STATUS", "REASON", "MESSAGE")
        rows = [[c.type, c.status, c.reason, c.message] for c in status.conditions]
        lines += ["  " + line for line in table(header, rows).splitlines()]
    else:
        lines.append("  <none>")
    lines.append("Events:")
    if events:
        lines += ["  " + line for line in table(*event_rows(events, now)).splitlines()]
    else:
        lines.append("  <none>")
    return "\n".join(lines)
