"""The storage Secret's files (contract.STORAGE_SECRET_DIR) as the cloud SDKs read them.

The operator mounts the Secret as read-only files and never puts its keys in the pod's
environment (checkov CKV_K8S_35). Before torchrun starts the workers, the node wrapper calls
`use_storage_credentials`:

- `credentials` (an AWS shared credentials file) -> AWS_SHARED_CREDENTIALS_FILE points at it;
- `AWS_ACCESS_KEY_ID` + `AWS_SECRET_ACCESS_KEY` (+ `AWS_SESSION_TOKEN`), the environment-style
  keys of existing Secrets -> written as a shared credentials file (mode 0600) in the pod's
  scratch directory, AWS_SHARED_CREDENTIALS_FILE points at it;
- `key.json` or `service-account.json` (a GCS service-account key) ->
  GOOGLE_APPLICATION_CREDENTIALS points at it; a `GOOGLE_APPLICATION_CREDENTIALS` key holding
  the key JSON itself is used the same way (holding a path: that path);
- the non-secret settings AWS_DEFAULT_REGION, AWS_REGION, AWS_ENDPOINT_URL(_S3) become
  variables of this process (the spec's storage.endpointUrl/region, set by the operator, win).

botocore and google-auth then find the credentials themselves; a key never enters an
environment variable. Without a Secret nothing happens: the pod's service account's workload
identity (IRSA, GKE Workload Identity) is what the SDKs use.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping
from pathlib import Path

from kubetune_api import contract

AWS_FILE = "credentials"
AWS_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
AWS_SESSION_TOKEN = "AWS_SESSION_TOKEN"
GCS_KEY_FILES = ("key.json", "service-account.json")
GCS_ENV = "GOOGLE_APPLICATION_CREDENTIALS"
SETTINGS = ("AWS_DEFAULT_REGION", "AWS_REGION", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")
GENERATED_AWS_FILE = "kubetune-aws-credentials"


def secret_files(directory: Path) -> dict[str, Path]:
    """A mounted Secret's keys (its `..data` bookkeeping entries left out)."""
    return {p.name: p for p in directory.iterdir()
            if not p.name.startswith("..") and p.is_file()}


def use_storage_credentials(env: MutableMapping[str, str] | None = None,
                            scratch: Path | None = None) -> list[str]:
    """Point the SDKs at the mounted Secret's files; returns the variables it set."""
    env = os.environ if env is None else env
    directory = env.get(contract.STORAGE_CREDENTIALS_DIR_ENV)
    if not directory or not Path(directory).is_dir():
        return []
    files = secret_files(Path(directory))
    updates: dict[str, str] = {}
    if AWS_FILE in files:
        updates["AWS_SHARED_CREDENTIALS_FILE"] = str(files[AWS_FILE])
    elif all(key in files for key in AWS_KEYS):
        target = (scratch or Path(env.get("TMPDIR") or contract.SCRATCH_DIR)) / GENERATED_AWS_FILE
        updates["AWS_SHARED_CREDENTIALS_FILE"] = str(write_aws_file(files, target))
    gcs_key = next((files[name] for name in GCS_KEY_FILES if name in files), None)
    if gcs_key is not None:
        updates[GCS_ENV] = str(gcs_key)
    elif GCS_ENV in files:
        text = files[GCS_ENV].read_text().strip()
        updates[GCS_ENV] = str(files[GCS_ENV]) if text.startswith("{") else text
    for name in SETTINGS:
        if name in files and name not in env:
            updates[name] = files[name].read_text().strip()
    env.update(updates)
    return sorted(updates)


def write_aws_file(files: dict[str, Path], target: Path) -> Path:
    lines = ["[default]",
             f"aws_access_key_id = {files['AWS_ACCESS_KEY_ID'].read_text().strip()}",
             f"aws_secret_access_key = {files['AWS_SECRET_ACCESS_KEY'].read_text().strip()}"]
    if AWS_SESSION_TOKEN in files:
        lines.append(f"aws_session_token = {files[AWS_SESSION_TOKEN].read_text().strip()}")
    target.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write("\n".join(lines) + "\n")
    return target
