"""The trainer's own URI check (kubetune_api.uris): a spec that reaches a rank with a URI
outside s3, gs, hf, file and the admin's extra schemes stops with EXIT_INVALID_SPEC, naming
the field, before anything is opened. Shown with the cloud metadata address and a loopback
listener that must see no connection."""

from __future__ import annotations

import contextlib
import os
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from kubetune_api import contract, uris
from kubetune_api.load import SpecError, validate_job
from kubetune_trainer.launch import refuse_other_schemes
from support.jobs import ROOT

METADATA = "http://169.254.169.254/latest/meta-data/iam/security-credentials/"


class Listener:
    """A loopback TCP listener that counts the connections it gets and closes each at once
    (so a client that did connect fails fast instead of waiting for a reply)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = int(self.sock.getsockname()[1])
        self.connections = 0
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:  # closed
                return
            self.connections += 1
            conn.close()

    def close(self) -> int:
        """The count, once every connection the kernel completed has been accepted."""
        if self.sock.fileno() != -1:
            while select.select([self.sock], [], [], 0)[0]:
                time.sleep(0.01)  # a completed connection still waits for the thread's accept
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)  # wakes the thread's accept()
            self.sock.close()
            self._thread.join()
        return self.connections


@pytest.fixture
def listener() -> Iterator[Listener]:
    served = Listener()
    yield served
    served.close()


def tiny_config(tmp_path: Path, **dataset: str) -> Path:
    body = yaml.safe_load((ROOT / "examples/tiny-lora.yaml").read_text())
    body["spec"]["dataset"].update(dataset)
    body["spec"]["output"]["uri"] = str(tmp_path / "out")
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(body))
    return config


def test_a_rank_refuses_the_metadata_address_before_connecting(
        tmp_path: Path, listener: Listener) -> None:
    config = tiny_config(tmp_path, train=f"http://127.0.0.1:{listener.port}/support.jsonl",
                         eval=METADATA)
    proc = subprocess.run([sys.executable, "-m", "kubetune_trainer", "--config", str(config)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env={k: v for k, v in os.environ.items()
                               if k != uris.EXTRA_URI_SCHEMES_ENV})
    assert listener.close() == 0, proc.stderr[-2000:]  # it has exited: any connect is counted
    assert proc.returncode == contract.EXIT_INVALID_SPEC, proc.stderr[-2000:]
    assert "spec.dataset.train: scheme http is not allowed" in proc.stderr
    assert "spec.dataset.eval: scheme http is not allowed" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_the_admins_extra_schemes_come_from_the_pod_env(monkeypatch: pytest.MonkeyPatch) -> None:
    body = yaml.safe_load((ROOT / "examples/tiny-lora.yaml").read_text())
    body["spec"]["output"]["uri"] = "abfs://container/out"
    spec = validate_job(body).spec
    monkeypatch.delenv(uris.EXTRA_URI_SCHEMES_ENV, raising=False)
    with pytest.raises(SpecError, match=r"spec\.output\.uri: scheme abfs is not allowed "
                                        r"\(schemes: s3, gs, hf, file; extraUriSchemes: none\)"):
        refuse_other_schemes(spec)
    monkeypatch.setenv(uris.EXTRA_URI_SCHEMES_ENV, "az, abfs")
    refuse_other_schemes(spec)
    body["spec"]["output"]["uri"] = "simplecache::http://example.com/out"
    with pytest.raises(SpecError, match="scheme http is not allowed"):
        refuse_other_schemes(validate_job(body).spec)
