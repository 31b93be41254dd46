"""A real S3-protocol server for tests: moto's standalone server on a loopback port.

``MotoServer`` runs ``moto_server`` as a subprocess (start/stop on the same port; moto keeps
everything in memory, so a restart loses all buckets). ``FlakyProxy`` is a TCP forwarder in
front of it that can go down and come back on the same port while moto keeps its data: that
is how tests simulate "storage briefly unavailable" honestly, with clients seeing refused and
reset connections.
"""

from __future__ import annotations

import contextlib
import io
import os
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import IO

from support.net import free_port

ACCESS_KEY = "testing"
SECRET_KEY = "testing"
REGION = "us-east-1"



def _moto_command(port: int) -> list[str]:
    script = Path(sys.executable).parent / "moto_server"
    if script.exists():
        return [str(script), "-H", "127.0.0.1", "-p", str(port)]
    return [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]


class MotoServer:
    """``moto_server -H 127.0.0.1 -p PORT``; ``endpoint`` is its URL."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] = io.BytesIO()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            return
        # moto logs every request to stderr: a pipe nobody reads fills up after a few thousand
        # requests and wedges the server, so the log goes to a file.
        self._log = log = tempfile.TemporaryFile()  # noqa: SIM115 (closed in stop())
        self.proc = subprocess.Popen(_moto_command(self.port), stdout=log, stderr=log)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                log.seek(0)
                err = log.read()[-2000:].decode(errors="replace")
                raise RuntimeError(f"moto_server exited with {self.proc.returncode}: {err}")
            if self.ready():
                return
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"moto_server not ready on {self.endpoint} after {timeout}s")

    def ready(self) -> bool:
        try:
            urllib.request.urlopen(self.endpoint + "/", timeout=1).close()
        except urllib.error.HTTPError:
            return True  # any HTTP answer means it is serving
        except OSError:
            return False
        return True

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        self._log.close()

    def __enter__(self) -> MotoServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class FlakyProxy:
    """A loopback TCP forwarder to ``target_port`` that can go down and come back up.

    ``down()`` closes the listening socket (new connections are refused) and resets every
    open connection; ``up()`` listens on the same port again. ``outage(seconds)`` does both
    from a background thread.
    """

    def __init__(self, target_port: int, port: int | None = None) -> None:
        self.target_port = target_port
        self.port = port or free_port()
        self._listener: socket.socket | None = None
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self.connections = 0  # accepted so far, to show a test that traffic went through

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def up(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        listener.settimeout(0.05)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def down(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
        with self._lock:
            conns, self._conns = self._conns, set()
        for conn in conns:
            with contextlib.suppress(OSError):
                # RST instead of FIN, like a server that went away mid-request.
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                conn.close()

    def outage(self, seconds: float) -> threading.Thread:
        """Go down now and come back after ``seconds``, without blocking the caller."""
        self.down()

        def restore() -> None:
            time.sleep(seconds)
            self.up()

        thread = threading.Thread(target=restore, daemon=True)
        thread.start()
        return thread

    def _accept(self, listener: socket.socket) -> None:
        while self._listener is listener:
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns.update((client, upstream))
                self.connections += 1
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
            with self._lock:
                self._conns.discard(src)
                self._conns.discard(dst)

    def __enter__(self) -> FlakyProxy:
        self.up()
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()


def s3_env_vars(endpoint: str) -> dict[str, str | None]:
    """Environment for kubetune_trainer.storage (and boto3/s3fs) to reach ``endpoint``;
    None means unset."""
    return {
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_DEFAULT_REGION": REGION,
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ENDPOINT_URL_S3": None,
        "AWS_REGION": None,
        "AWS_SESSION_TOKEN": None,
        "AWS_PROFILE": None,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        "AWS_CONFIG_FILE": os.devnull,
    }


def create_bucket(endpoint: str, name: str | None = None) -> str:
    """Create a bucket (a fresh random name by default) and return its name."""
    import boto3

    name = name or f"kt-{uuid.uuid4().hex[:16]}"
    client = boto3.client(
        "s3", endpoint_url=endpoint, region_name=REGION,
        aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY,
    )
    client.create_bucket(Bucket=name)
    return name
