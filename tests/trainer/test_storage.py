"""kubetune_trainer.storage against local paths and a real S3-protocol server (moto)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from kubetune_api.contract import MANIFEST_FILE
from kubetune_trainer import storage
from kubetune_trainer.storage import StorageError, join
from support.gcs import GcsEmulator
from support.s3 import FlakyProxy, MotoServer, create_bucket


@pytest.fixture(scope="module")
def gcs_server() -> Iterator[GcsEmulator]:
    with GcsEmulator() as server:
        yield server


@pytest.fixture
def gcs_bucket(gcs_server: GcsEmulator, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh bucket on the GCS emulator; STORAGE_EMULATOR_HOST points gcsfs at it."""
    monkeypatch.setenv(storage.GCS_EMULATOR_ENV, gcs_server.endpoint)
    return gcs_server.create_bucket(f"b{uuid.uuid4().hex[:12]}")


@pytest.fixture(params=["path", "file-uri", "s3", "gs"])
def remote(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The same tests on a plain path, a file:// URI, an S3 bucket and a GCS bucket."""
    if request.param == "path":
        return str(tmp_path / "remote")
    if request.param == "file-uri":
        return f"file://{tmp_path}/remote"
    if request.param == "gs":
        return join(request.getfixturevalue("gcs_bucket"), "runs", "r1")
    return join(request.getfixturevalue("s3_bucket"), "runs", "r1")


def make_tree(root: Path) -> dict[str, bytes]:
    files = {
        "config.json": b'{"a": 1}',
        "adapter/weights.bin": os.urandom(3000),
        "adapter/deep/er/notes.txt": "ünïcode\n".encode(),
        "empty.txt": b"",
    }
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


def read_tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize(
    ("uri", "parts", "expected"),
    [
        ("s3://b/p/", ("a", "b.txt"), "s3://b/p/a/b.txt"),
        ("s3://b", ("/a/", "b/"), "s3://b/a/b"),
        ("s3://b/p", ("x/y",), "s3://b/p/x/y"),
        ("s3://", ("bucket", "k"), "s3://bucket/k"),
        ("gs://b/p//", ("c",), "gs://b/p/c"),
        ("/local/p", ("a",), "/local/p/a"),
        ("/local/p/", ("", "a"), "/local/p/a"),
        ("/", ("a",), "/a"),
        ("rel", ("a",), "rel/a"),
        ("file:///x", ("y",), "file:///x/y"),
        ("file:///", ("y",), "file:///y"),
        ("s3://b/p", (), "s3://b/p"),
    ],
)
def test_join(uri: str, parts: tuple[str, ...], expected: str) -> None:
    assert join(uri, *parts) == expected


def test_filesystem_local_paths_are_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    _, path = storage.filesystem("out/model")
    assert path == str(tmp_path / "out" / "model")
    assert storage.filesystem("file:///data/x/")[1] == "/data/x"
    assert storage.is_local("file:///x") and storage.is_local("x") and not storage.is_local("s3://b")


def test_filesystem_s3_honours_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://minio.example:9000")
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.setenv("AWS_REGION", "eu-west-3")
    fs, path = storage.filesystem("s3://bucket/a/b/")
    assert path == "bucket/a/b"
    assert fs.endpoint_url == "http://minio.example:9000"
    assert fs.client_kwargs == {"region_name": "eu-west-3"}
    assert storage.filesystem("s3://other")[0] is fs  # cached

    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://ceph.example")  # service-specific wins
    fs2, _ = storage.filesystem("s3://bucket")
    assert fs2 is not fs
    assert fs2.endpoint_url == "http://ceph.example"


def test_upload_download_round_trip(remote: str, tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    files = make_tree(src)
    (src / "skip.tmp").write_text("x")

    sent = storage.upload_dir(src, remote, exclude={"*.tmp"})

    assert sent == sum(len(d) for d in files.values())
    assert storage.exists(join(remote, "adapter/deep/er/notes.txt"))
    assert not storage.exists(join(remote, "skip.tmp"))
    storage.download_dir(remote, dst)
    assert read_tree(dst) == files


def test_text_list_remove_exists(remote: str) -> None:
    assert storage.list_subdirs(remote) == []
    assert not storage.exists(remote)
    storage.remove(remote)  # missing: no error

    storage.write_text(join(remote, "checkpoints/step-20/COMPLETE"), "20\n")
    storage.write_text(join(remote, "checkpoints/step-10/COMPLETE"), "10\n")
    storage.write_text(join(remote, "checkpoints/file.txt"), "not a dir")

    assert storage.read_text(join(remote, "checkpoints/step-20/COMPLETE")) == "20\n"
    assert storage.list_subdirs(join(remote, "checkpoints")) == ["step-10", "step-20"]
    storage.remove(join(remote, "checkpoints/step-10"))
    assert storage.list_subdirs(join(remote, "checkpoints")) == ["step-20"]
    assert not storage.exists(join(remote, "checkpoints/step-10/COMPLETE"))
    storage.remove(join(remote, "checkpoints/file.txt"), recursive=False)
    assert not storage.exists(join(remote, "checkpoints/file.txt"))


def test_read_missing_is_a_clear_error(remote: str, tmp_path: Path) -> None:
    with pytest.raises(StorageError, match=r"nope\.txt"):
        storage.read_text(join(remote, "nope.txt"))
    with pytest.raises(StorageError, match="nothing found"):
        storage.download_dir(join(remote, "nothing"), tmp_path / "dl")


def test_local_writes_leave_no_temp_files(tmp_path: Path) -> None:
    target = tmp_path / "out"
    storage.write_text(str(target / "a.txt"), "one")
    storage.write_text(str(target / "a.txt"), "two")
    storage.publish(make_tree_dir(tmp_path / "src"), str(target), {"v": 1})
    assert (target / "a.txt").read_text() == "two"
    assert not [p for p in target.rglob("*") if ".tmp-" in p.name]


def make_tree_dir(root: Path) -> Path:
    make_tree(root)
    return root


def test_publish_writes_manifest_last(
    remote: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = make_tree_dir(tmp_path / "src")
    (src / MANIFEST_FILE).write_text("stale local manifest: must not be uploaded as a file")
    manifest_uri = join(remote, MANIFEST_FILE)
    events: list[str] = []
    put_file, write_bytes = storage._put_file, storage._write_bytes

    def recording_put(fs, src_path, path):
        assert not storage.exists(manifest_uri), "manifest visible before all files are up"
        events.append(Path(path).name)
        put_file(fs, src_path, path)

    def recording_write(fs, path, data):
        events.append(Path(path).name)
        write_bytes(fs, path, data)

    monkeypatch.setattr(storage, "_put_file", recording_put)
    monkeypatch.setattr(storage, "_write_bytes", recording_write)
    manifest = {"kind": "adapter", "step": 20, "base_model": "tiny"}

    digest = storage.publish(src, remote, manifest)

    assert events[-1] == MANIFEST_FILE and events.count(MANIFEST_FILE) == 1
    assert len(events) == 5  # four files, then the manifest
    text = storage.read_text(manifest_uri)
    assert json.loads(text) == manifest
    assert text == json.dumps(manifest, sort_keys=True, indent=2) + "\n"
    assert digest == hashlib.sha256(text.encode()).hexdigest()


def test_failed_upload_leaves_no_manifest(
    remote: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = make_tree_dir(tmp_path / "src")
    storage.publish(src, remote, {"version": 1})
    assert storage.exists(join(remote, MANIFEST_FILE))
    attempts: list[str] = []
    put_file = storage._put_file

    def flaky_put(fs, src_path, path):
        if path.endswith("weights.bin"):
            attempts.append(path)
            raise ConnectionResetError("connection reset by peer")
        put_file(fs, src_path, path)

    monkeypatch.setattr(storage, "_put_file", flaky_put)
    (src / "adapter" / "weights.bin").write_bytes(b"version 2")

    with pytest.raises(StorageError) as err:
        storage.publish(src, remote, {"version": 2}, attempts=2, base_delay=0.01)

    message = str(err.value)
    assert "weights.bin" in message and join(remote, "adapter/weights.bin") in message
    assert "ConnectionResetError" in message and "2 attempt" in message
    assert isinstance(err.value.__cause__, StorageError)
    assert len(attempts) == 2  # retried, then gave up
    # The old artifact's manifest went first, so the half-rewritten artifact is not complete.
    assert not storage.exists(join(remote, MANIFEST_FILE))


def test_permanent_errors_are_not_retried(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    calls = []

    def fail() -> None:
        calls.append(1)
        raise PermissionError("AccessDenied")

    with pytest.raises(StorageError, match="AccessDenied"):
        storage._retry("writing s3://b/x", fail, attempts=5)
    assert len(calls) == 1


def test_parallel_upload_of_large_files(s3_bucket: str, tmp_path: Path, monkeypatch):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    files = {f"model-0000{i}-of-00004.safetensors": os.urandom(3 * 2**20 + i) for i in range(4)}
    for name, data in files.items():
        (src / name).write_bytes(data)
    active, peak = 0, 0
    lock = threading.Lock()
    put_file = storage._put_file

    def counting_put(fs, src_path, path):
        nonlocal active, peak
        with lock:
            active += 1
            peak = max(peak, active)
        try:
            put_file(fs, src_path, path)
        finally:
            with lock:
                active -= 1

    monkeypatch.setattr(storage, "_put_file", counting_put)
    uri = join(s3_bucket, "big")

    assert storage.upload_dir(src, uri) == sum(len(d) for d in files.values())

    assert peak > 1, "files were uploaded one at a time"
    storage.download_dir(uri, dst)
    assert read_tree(dst) == files


def test_large_file_goes_multipart(s3_bucket: str, tmp_path: Path, monkeypatch) -> None:
    """Files of 2+ chunks go as S3 multipart uploads (chunk shrunk from 50 MiB to 5 MiB,
    S3's minimum part size, to keep the test small)."""
    import s3fs.core

    monkeypatch.setattr(s3fs.core, "calculate_chunksize", lambda size, chunksize=None: 5 * 2**20)
    calls: list[str] = []
    fs, _ = storage.filesystem(s3_bucket)
    call_s3 = fs._call_s3

    async def recording_call_s3(method, *args, **kwargs):
        calls.append(method)
        return await call_s3(method, *args, **kwargs)

    monkeypatch.setattr(fs, "_call_s3", recording_call_s3)
    src = tmp_path / "src"
    src.mkdir()
    data = os.urandom(11 * 2**20 + 7)
    (src / "model.safetensors").write_bytes(data)

    storage.upload_dir(src, join(s3_bucket, "mp"))

    assert calls.count("upload_part") == 3 and "complete_multipart_upload" in calls
    storage.download_dir(join(s3_bucket, "mp"), tmp_path / "dst")
    assert (tmp_path / "dst" / "model.safetensors").read_bytes() == data


@pytest.mark.parametrize("layers", ["defaults", "kubetune-only"])
def test_upload_survives_brief_outage(
    s3_server: MotoServer, s3_env: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture, layers: str,
) -> None:
    """Storage goes away (open connections reset, new ones refused) just as the first file
    upload starts, and comes back 1.5 s later with its data intact (a proxy in front of moto).
    With the defaults publish rides it out (s3fs's request retries, then kubetune's per-file
    ones); with s3fs's retries off, kubetune's own per-file retries alone do it."""
    bucket = create_bucket(s3_server.endpoint)
    src = make_tree_dir(tmp_path / "src")
    kubetune_only = layers == "kubetune-only"
    if kubetune_only:
        monkeypatch.setattr(storage, "S3_REQUEST_RETRIES", 1)
    outages: list[threading.Thread] = []
    put_file = storage._put_file

    def put_during_outage(fs, src_path, path):
        with lock:
            if not outages:
                outages.append(proxy.outage(1.5))
        put_file(fs, src_path, path)

    lock = threading.Lock()
    with FlakyProxy(s3_server.port) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        monkeypatch.setattr(storage, "_put_file", put_during_outage)
        with caplog.at_level(logging.WARNING, logger=storage.__name__):
            if kubetune_only:
                storage.publish(src, f"s3://{bucket}/out", {"ok": True}, attempts=8,
                                base_delay=0.2)
            else:
                storage.publish(src, f"s3://{bucket}/out", {"ok": True})
        outages[0].join()

    retried = [r.getMessage() for r in caplog.records if "retrying" in r.getMessage()]
    assert any(m.startswith("uploading ") for m in retried) or not kubetune_only, retried
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)  # straight to moto now
    assert json.loads(storage.read_text(f"s3://{bucket}/out/{MANIFEST_FILE}")) == {"ok": True}
    storage.download_dir(f"s3://{bucket}/out", tmp_path / "dst")
    manifest = (json.dumps({"ok": True}, indent=2) + "\n").encode()
    assert read_tree(tmp_path / "dst") == {**read_tree(src), MANIFEST_FILE: manifest}


def test_storage_down_for_good_is_a_clear_error(
    s3_server: MotoServer, s3_env: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bucket = create_bucket(s3_server.endpoint)
    proxy = FlakyProxy(s3_server.port)  # never up: every connection is refused
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
    uri = f"s3://{bucket}/out"

    with pytest.raises(StorageError) as err:
        storage.publish(make_tree_dir(tmp_path / "src"), uri, {}, attempts=2, base_delay=0.01)

    assert uri in str(err.value) and "2 attempt" in str(err.value)
    assert "connect" in str(err.value).lower()  # the underlying cause is named
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)
    assert not storage.exists(join(uri, MANIFEST_FILE))


class FakeClock:
    """Stands in for storage's `time` module: sleeps are recorded, not waited."""

    def __init__(self) -> None:
        self.sleeps: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)

    def __getattr__(self, name: str) -> object:
        return getattr(time, name)


@pytest.mark.parametrize("failures", [4, 5])
def test_retry_defaults_are_the_documented_ones(failures: int,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/storage.md: 5 attempts, attempt n waits min(30 s, 1 s x 2^n) +-20 %. The product's
    constants run; only the waiting is recorded instead of slept."""
    clock = FakeClock()
    monkeypatch.setattr(storage, "time", clock)
    calls = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) <= failures:
            raise ConnectionResetError("peer reset")
        return "ok"

    if failures < storage.RETRY_ATTEMPTS:
        assert storage._retry("reading s3://b/x", flaky) == "ok"
    else:
        with pytest.raises(StorageError, match=r"s3://b/x: failed after 5 attempt\(s\)"):
            storage._retry("reading s3://b/x", flaky)
    assert len(calls) == min(failures + 1, 5)
    assert len(clock.sleeps) == 4
    for n, slept in enumerate(clock.sleeps):
        assert 0.8 * 2**n <= slept <= 1.2 * 2**n, clock.sleeps
    assert (storage.RETRY_ATTEMPTS, storage.RETRY_BASE_DELAY, storage.RETRY_MAX_DELAY) == \
        (5, 1.0, 30.0)


def test_moto_server_restarts_on_the_same_port() -> None:
    """The helper itself: stop/start keeps the endpoint (moto forgets its buckets)."""
    with MotoServer() as server:
        endpoint = server.endpoint
        create_bucket(endpoint, "kept-name")
        server.stop()
        assert not server.ready()
        server.start()
        assert server.endpoint == endpoint and server.ready()
        create_bucket(endpoint, "kept-name")  # a fresh server: no BucketAlreadyExists
