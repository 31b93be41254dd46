"""The SDK's errors: one class per thing a caller can act on, all `KubetuneError`s."""

from __future__ import annotations


class KubetuneError(Exception):
    """Base of every error the SDK raises on purpose."""


class NotFound(KubetuneError):
    """The FineTuneJob (or the pod of a rank) does not exist."""


class InvalidSpec(KubetuneError, ValueError):
    """The FineTuneJob was refused, by the contract here or by the API server's schema.
    `fields` names the dotted paths at fault (`spec.method.quantization`)."""

    def __init__(self, message: str, fields: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.fields = fields


class Forbidden(KubetuneError):
    """The credentials may not do this (RBAC: 403, or 401 without valid credentials)."""


class AlreadyExists(KubetuneError):
    """A FineTuneJob of that name exists already."""


class JobFailed(KubetuneError):
    """`wait` saw the job end in a phase it was not waiting for (Failed, or Succeeded when
    waiting for Running); `job` is what it saw."""

    def __init__(self, message: str, job: object) -> None:
        super().__init__(message)
        self.job = job


class WaitTimeout(KubetuneError, TimeoutError):
    """`wait` ran out of time; `job` is the last state it saw."""

    def __init__(self, message: str, job: object) -> None:
        super().__init__(message)
        self.job = job


class LogsUnavailable(KubetuneError):
    """The rank's container has no log yet (still waiting to start)."""


class ApiError(KubetuneError):
    """Any other refusal of the API server; `status` is its HTTP status."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status
