"""The storage Secret's files turned into what botocore and google-auth read
(kubetune_trainer/credentials.py): a key never becomes an environment variable."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import boto3

from kubetune_api import contract
from kubetune_trainer.credentials import use_storage_credentials
from support.s3 import create_bucket, s3_env_vars


def secret_dir(tmp_path: Path, **files: str) -> Path:
    """A Secret as the kubelet mounts it: keys as symlinks into a `..data` directory."""
    directory = tmp_path / "secret"
    data = directory / "..2026_01_01"
    data.mkdir(parents=True)
    (directory / "..data").symlink_to(data.name)
    for key, value in files.items():
        (data / key).write_text(value)
        (directory / key).symlink_to(f"..data/{key}")
    return directory


def test_environment_style_aws_keys_become_a_private_credentials_file(tmp_path: Path) -> None:
    directory = secret_dir(tmp_path, AWS_ACCESS_KEY_ID="AKIDFILE", AWS_SECRET_ACCESS_KEY="s3cr3t",
                           AWS_SESSION_TOKEN="tok", AWS_DEFAULT_REGION="eu-west-1",
                           AWS_ENDPOINT_URL="http://from-secret:9000")
    env = {contract.STORAGE_CREDENTIALS_DIR_ENV: str(directory),
           "AWS_ENDPOINT_URL": "http://from-spec:9000"}
    assert use_storage_credentials(env, scratch=tmp_path / "scratch") == [
        "AWS_DEFAULT_REGION", "AWS_SHARED_CREDENTIALS_FILE"]
    path = Path(env["AWS_SHARED_CREDENTIALS_FILE"])
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert "AWS_ACCESS_KEY_ID" not in env and "AWS_SECRET_ACCESS_KEY" not in env
    assert env["AWS_ENDPOINT_URL"] == "http://from-spec:9000"  # the spec's setting wins
    # botocore's own credential chain reads the file.
    session = boto3.Session()
    session._session.set_config_variable("credentials_file", str(path))
    credentials = session.get_credentials()
    assert (credentials.access_key, credentials.secret_key, credentials.token) == (
        "AKIDFILE", "s3cr3t", "tok")


def test_a_shared_credentials_file_and_gcs_keys_are_pointed_at(tmp_path: Path) -> None:
    directory = secret_dir(tmp_path, credentials="[default]\naws_access_key_id = A\n",
                           **{"key.json": '{"type": "service_account"}'})
    env = {contract.STORAGE_CREDENTIALS_DIR_ENV: str(directory)}
    use_storage_credentials(env, scratch=tmp_path)
    assert env["AWS_SHARED_CREDENTIALS_FILE"] == str(directory / "credentials")
    assert env["GOOGLE_APPLICATION_CREDENTIALS"] == str(directory / "key.json")


def test_google_application_credentials_key_holds_json_or_a_path(tmp_path: Path) -> None:
    as_json = secret_dir(tmp_path / "a", GOOGLE_APPLICATION_CREDENTIALS='{"type": "x"}')
    env = {contract.STORAGE_CREDENTIALS_DIR_ENV: str(as_json)}
    use_storage_credentials(env, scratch=tmp_path)
    assert env["GOOGLE_APPLICATION_CREDENTIALS"] == str(as_json / "GOOGLE_APPLICATION_CREDENTIALS")
    as_path = secret_dir(tmp_path / "b", GOOGLE_APPLICATION_CREDENTIALS="/var/gcp/key.json\n")
    env = {contract.STORAGE_CREDENTIALS_DIR_ENV: str(as_path)}
    use_storage_credentials(env, scratch=tmp_path)
    assert env["GOOGLE_APPLICATION_CREDENTIALS"] == "/var/gcp/key.json"


def test_without_a_secret_nothing_changes(tmp_path: Path) -> None:
    env: dict[str, str] = {}
    assert use_storage_credentials(env) == [] and env == {}
    env = {contract.STORAGE_CREDENTIALS_DIR_ENV: str(tmp_path / "missing")}
    assert use_storage_credentials(env) == []


WEB_IDENTITY = """
import sys
import botocore.session
from kubetune_trainer import storage
storage.write_text(sys.argv[1], "hi")
assert storage.read_text(sys.argv[1]) == "hi"
credentials = botocore.session.Session().get_credentials()
print(credentials.method, credentials.access_key[:4])
"""


def test_workload_identity_needs_no_static_key(s3_server: Any, tmp_path: Path) -> None:
    """A runtime's ServiceAccount with the IRSA annotation (docs/storage.md): the EKS webhook
    gives the pod AWS_ROLE_ARN and a projected token file, never a key. The trainer's storage
    then writes and reads through credentials botocore's chain got from STS (moto's
    AssumeRoleWithWebIdentity, reached at the same endpoint)."""
    bucket = create_bucket(s3_server.endpoint)
    token = tmp_path / "token"
    token.write_text("eyJhbGciOiJSUzI1NiJ9.team-a.signature")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env |= {k: v for k, v in s3_env_vars(s3_server.endpoint).items()
            if v is not None and k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    env |= {"AWS_ROLE_ARN": "arn:aws:iam::123456789012:role/team-a",
            "AWS_WEB_IDENTITY_TOKEN_FILE": str(token)}
    result = subprocess.run([sys.executable, "-c", WEB_IDENTITY,
                             f"s3://{bucket}/identity/hello.txt"], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    # STS-issued temporary credentials (ASIA...), from the web identity provider.
    assert result.stdout.split() == ["assume-role-with-web-identity", "ASIA"], result.stdout
