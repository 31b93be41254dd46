"""Shared pytest fixtures (several areas append here; keep each block small)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from support.s3 import MotoServer, create_bucket, s3_env_vars

# Under CI=true a skipped test fails, except gpu and kind tests (tests/support/tools.py).
pytest_plugins = ["support.tools"]

# --- S3: a real moto server on loopback (tests/support/s3.py) ------------------------------


@pytest.fixture(scope="session")
def s3_server() -> Iterator[MotoServer]:
    """One moto S3 server for the session; ``.endpoint`` is its URL. Sets no environment."""
    with MotoServer() as server:
        yield server


@pytest.fixture
def s3_env(s3_server: MotoServer, monkeypatch: pytest.MonkeyPatch) -> str:
    """AWS_* env vars pointing at the moto server for this test; returns the endpoint."""
    for name, value in s3_env_vars(s3_server.endpoint).items():
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    return s3_server.endpoint


@pytest.fixture
def s3_bucket(s3_env: str) -> str:
    """A fresh, empty bucket on the moto server, as ``s3://<bucket>``."""
    return f"s3://{create_bucket(s3_env)}"
