"""The storage Secret's files turned into what botocore and google-auth read
(kubetune_trainer/credentials.py): a key never becomes an environment variable."""

from __future__ import annotations

import stat
from pathlib import Path

import boto3

from kubetune_api import contract
from kubetune_trainer.credentials import use_storage_credentials


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
