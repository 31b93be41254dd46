"""Which storage protocols a job's URIs may open. The operator checks this at admission against
the admin's policy, and the trainer checks it again before it opens anything (the extra
schemes reach it as EXTRA_URI_SCHEMES_ENV). An http(s) URI would let a job read the cloud
metadata address (169.254.169.254) or any internal service through fsspec's HTTPFileSystem."""

from __future__ import annotations

from collections.abc import Iterable

from kubetune_api.spec import FineTuneJobSpec

URI_SCHEMES = ("s3", "gs", "hf", "file")  # docs/storage.md; a plain path is a local file
EXTRA_URI_SCHEMES_ENV = "KUBETUNE_EXTRA_URI_SCHEMES"  # comma-separated, from the admin policy


def schemes(uri: str) -> list[str]:
    """Every protocol fsspec would open for uri, in order: chained URLs
    (simplecache::s3://...) open each; a plain path has none."""
    parts = uri.split("::")
    return [part.split("://", 1)[0].lower() if "://" in part else part.lower()
            for index, part in enumerate(parts)
            if "://" in part or index < len(parts) - 1]


def job_uris(spec: FineTuneJobSpec) -> dict[str, str | None]:
    """Every URI the job opens, by field: dataset.train is one URI or a mixture of sources."""
    train = spec.dataset.train
    sources = ({"spec.dataset.train": train} if isinstance(train, str) else
               {f"spec.dataset.train[{i}].path": source.path for i, source in enumerate(train)})
    return {**sources, "spec.dataset.eval": spec.dataset.eval,
            "spec.output.uri": spec.output.uri, "spec.checkpoint.uri": spec.checkpoint.uri}


def scheme_violations(spec: FineTuneJobSpec, extra: Iterable[str] = ()) -> list[str]:
    """One line per URI field that would open a protocol outside URI_SCHEMES and extra."""
    extra = tuple(extra)
    allowed = (*URI_SCHEMES, *extra)
    return [f"{field}: scheme {scheme} is not allowed (schemes: {', '.join(URI_SCHEMES)}; "
            f"extraUriSchemes: {', '.join(extra) or 'none'})"
            for field, uri in job_uris(spec).items() if uri
            for scheme in schemes(uri) if scheme not in allowed]


def extra_schemes_from(env_value: str | None) -> tuple[str, ...]:
    return tuple(s.strip().lower() for s in (env_value or "").split(",") if s.strip())
