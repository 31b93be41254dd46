"""kubetune: the client of the kubetune operator (the `kubetune` CLI and the Python SDK).

    import kubetune
    client = kubetune.Client(namespace="team-a")

Depends on the contract (kubetune_api); the Kubernetes client is imported by a cluster
Client, the trainer by `kubetune run` and `Client(backend="local")`.
"""

from kubetune.errors import (
    AlreadyExists,
    ApiError,
    Forbidden,
    InvalidSpec,
    JobFailed,
    KubetuneError,
    LogsUnavailable,
    NotFound,
    WaitTimeout,
)
from kubetune.sdk import Artifact, Client, Job, JobEvent

__all__ = ["AlreadyExists", "ApiError", "Artifact", "Client", "Forbidden", "InvalidSpec", "Job",
           "JobEvent", "JobFailed", "KubetuneError", "LogsUnavailable", "NotFound",
           "WaitTimeout"]
