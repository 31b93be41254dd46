"""Object storage for datasets, checkpoints and outputs, through fsspec.

URIs: ``s3://bucket/prefix`` (AWS or any S3-compatible store such as MinIO or Ceph),
``gs://bucket/prefix``, ``file:///abs/path`` and plain paths. Credentials come from the
standard environment (docs/storage.md); nothing here takes secrets as arguments.

Every write and read is retried with exponential backoff. ``publish`` is the commit protocol
of an artifact: the manifest (``MANIFEST_FILE``) is removed first and written last, so an
artifact with a manifest is complete, and a failed upload leaves no manifest behind.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Collection
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from fnmatch import fnmatch
from pathlib import Path
from typing import Any, TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem

from kubetune_api.contract import MANIFEST_FILE

log = logging.getLogger(__name__)

T = TypeVar("T")

# Retry policy of every storage operation: attempt n (from 0) that fails waits
# min(RETRY_MAX_DELAY, RETRY_BASE_DELAY * 2**n) (with +-20 % jitter) before the next one.
# With these defaults an operation survives an outage of about 15 s. Read at call time, so
# tests can shorten them.
RETRY_ATTEMPTS = 5
RETRY_BASE_DELAY = 1.0
RETRY_MAX_DELAY = 30.0
# Files uploaded/downloaded concurrently by upload_dir/download_dir.
TRANSFER_WORKERS = 4
# Requests s3fs itself retries (connection errors, timeouts, SlowDown) before our per-file
# retry sees the error; botocore's own retries are switched off so the layers don't multiply.
S3_REQUEST_RETRIES = 5
# gcsfs (like google-cloud-storage) sends gs:// requests here instead of Google's endpoint.
GCS_EMULATOR_ENV = "STORAGE_EMULATOR_HOST"
# Parts of one multipart upload (files of 100 MiB and more, 50 MiB parts) in flight at once;
# peak buffer memory is about TRANSFER_WORKERS * S3_PART_CONCURRENCY * 50 MiB.
S3_PART_CONCURRENCY = 4

# Errors no retry can fix: a missing bucket or source file, denied access.
PERMANENT_ERRORS: tuple[type[BaseException], ...] = (
    FileNotFoundError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
)


class StorageError(RuntimeError):
    """A storage operation failed for good; the message names the URI and the cause."""


# --- URIs and filesystems ------------------------------------------------------------------


def _split(uri: str) -> tuple[str, str]:
    """(protocol, rest) of a URI; plain paths are ``file``."""
    if "://" in uri:
        protocol, rest = uri.split("://", 1)
        return protocol.lower(), rest
    return "file", uri


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a URI or path with exactly one ``/`` between them.

    ``join("s3://b/p/", "a", "b.txt") == "s3://b/p/a/b.txt"``,
    ``join("/data/", "x") == "/data/x"``, ``join("file:///x", "y") == "file:///x/y"``.
    Empty parts are skipped; slashes inside a part are kept.
    """
    scheme, sep, path = uri.rpartition("://") if "://" in uri else ("", "", uri)
    for part in parts:
        part = part.strip("/")
        if not part:
            continue
        path = part if not path else f"{path.rstrip('/')}/{part}"
    return f"{scheme}{sep}{path}"


def is_local(uri: str) -> bool:
    """True for plain paths and ``file://`` URIs."""
    return _split(uri)[0] in ("file", "local")


_fs_cache: dict[tuple[Any, ...], fsspec.AbstractFileSystem] = {}
_fs_lock = threading.Lock()
# s3fs clients are not fork-safe ("This class is not fork-safe"): a forked process (the
# tokenizer workers, a DataLoader worker) makes its own.
os.register_at_fork(after_in_child=_fs_cache.clear)


def _s3_options() -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Cache key and S3FileSystem kwargs from the environment."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    config: dict[str, Any] = {"retries": {"total_max_attempts": 1, "mode": "standard"}}
    if endpoint:
        # MinIO/Ceph behind a plain host name: virtual-host style would need per-bucket DNS.
        config["s3"] = {"addressing_style": "path"}
    client: dict[str, Any] = {"region_name": region} if region else {}
    kwargs: dict[str, Any] = {
        "endpoint_url": endpoint or None,
        "client_kwargs": client,
        "config_kwargs": config,
        "max_concurrency": S3_PART_CONCURRENCY,
        # Other processes write the same prefixes (checkpoints, manifests): never trust a
        # cached listing.
        "use_listings_cache": False,
        # Our own cache below is keyed on the environment; fsspec's instance cache is not.
        "skip_instance_cache": True,
    }
    # Credentials themselves are left to botocore's chain (env vars, AWS_SHARED_CREDENTIALS_FILE,
    # web identity, instance metadata); the key id is only part of the cache key.
    key = ("s3", endpoint, region, os.environ.get("AWS_ACCESS_KEY_ID"),
           os.environ.get("AWS_PROFILE"), os.environ.get("AWS_SHARED_CREDENTIALS_FILE"))
    return key, kwargs


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem serving ``uri`` and the path within it.

    S3 honours ``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL``, ``AWS_REGION``/``AWS_DEFAULT_REGION``
    and botocore's credential chain; filesystems are cached per protocol, endpoint and
    credentials. Local paths come back absolute.
    """
    protocol, rest = _split(uri)
    if protocol in ("file", "local"):
        return _local_fs(), os.path.abspath(os.path.expanduser(rest))
    if protocol in ("s3", "s3a"):
        key, kwargs = _s3_options()
        with _fs_lock:
            fs = _fs_cache.get(key)
            if fs is None:
                from s3fs import S3FileSystem  # heavy (aiobotocore): only when S3 is used

                s3 = S3FileSystem(**kwargs)
                s3.retries = S3_REQUEST_RETRIES
                fs = _fs_cache[key] = s3
        return fs, rest.rstrip("/")
    if protocol in ("gs", "gcs") and os.environ.get(GCS_EMULATOR_ENV):
        # A GCS emulator (STORAGE_EMULATOR_HOST, as Google's own clients honour it): gcsfs's
        # plain JSON-API filesystem without credentials. An emulator takes none (looking them
        # up would probe the GCE metadata server), and it has no gRPC control plane for the
        # bucket-type lookup of gcsfs's default (extended) filesystem, which waits 60 s.
        from gcsfs.core import GCSFileSystem

        fs = GCSFileSystem(token="anon")
        return fs, fs._strip_protocol(uri).rstrip("/")
    # gs:// (gcsfs: GOOGLE_APPLICATION_CREDENTIALS or workload identity) and anything else
    # fsspec knows; fsspec caches these instances itself.
    fs = fsspec.filesystem(protocol)
    return fs, fs._strip_protocol(uri).rstrip("/")


def _local_fs() -> LocalFileSystem:
    return LocalFileSystem(auto_mkdir=True)


# --- retries -------------------------------------------------------------------------------


def _retry(
    what: str,
    fn: Callable[[], T],
    *,
    attempts: int | None = None,
    base_delay: float | None = None,
    cancelled: threading.Event | None = None,
    fatal: tuple[type[BaseException], ...] = (),
) -> T:
    """Call ``fn`` until it succeeds, with exponential backoff; StorageError when it won't.

    Exceptions of the `fatal` types pass through at once (the caller's own verdicts)."""
    attempts = RETRY_ATTEMPTS if attempts is None else attempts
    base_delay = RETRY_BASE_DELAY if base_delay is None else base_delay
    for attempt in range(max(1, attempts)):
        try:
            return fn()
        except fatal:
            raise
        except PERMANENT_ERRORS as e:
            raise StorageError(f"{what}: {_describe(e)}") from e
        except Exception as e:
            if attempt + 1 >= attempts or (cancelled is not None and cancelled.is_set()):
                raise StorageError(
                    f"{what}: failed after {attempt + 1} attempt(s): {_describe(e)}"
                ) from e
            delay = min(RETRY_MAX_DELAY, base_delay * 2**attempt) * random.uniform(0.8, 1.2)
            log.warning("%s: attempt %d/%d failed (%s); retrying in %.1fs",
                        what, attempt + 1, attempts, _describe(e), delay)
            if cancelled is None:
                time.sleep(delay)
            elif cancelled.wait(delay):
                raise StorageError(f"{what}: cancelled after {_describe(e)}") from e
    raise AssertionError("unreachable")


def read_with_retries(what: str, fn: Callable[[], T], *,
                      fatal: tuple[type[BaseException], ...] = ()) -> T:
    """A whole read (e.g. streaming a dataset file) retried like every other storage call: a
    transient error restarts it from the beginning; StorageError once retries are spent (a
    retryable failure, exit 1), with a permanent cause (missing, denied) at once."""
    return _retry(what, fn, fatal=fatal)


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


# --- single objects ------------------------------------------------------------------------


def _atomic_local(path: str, write: Callable[[str], object]) -> None:
    """``write(tmp)`` next to ``path``, then rename: readers see the old file or the new one."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _write_bytes(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    if isinstance(fs, LocalFileSystem):
        _atomic_local(path, lambda tmp: Path(tmp).write_bytes(data))
    else:
        fs.pipe_file(path, data)  # one PUT: an object appears whole or not at all


def _put_file(fs: fsspec.AbstractFileSystem, src: Path, path: str) -> None:
    if isinstance(fs, LocalFileSystem):
        _atomic_local(path, lambda tmp: shutil.copyfile(src, tmp))
    else:
        fs.put_file(str(src), path)


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return _retry(f"checking {uri}", lambda: bool(fs.exists(path)))


def read_text(uri: str) -> str:
    fs, path = filesystem(uri)
    return _retry(f"reading {uri}", lambda: fs.cat_file(path).decode("utf-8"))


def write_text(uri: str, text: str) -> None:
    """Write ``text`` (UTF-8) to ``uri``, atomically on local paths, retried."""
    fs, path = filesystem(uri)
    data = text.encode("utf-8")
    _retry(f"writing {uri}", lambda: _write_bytes(fs, path, data))


def list_subdirs(uri: str) -> list[str]:
    """Sorted names (not paths) of the directories/prefixes directly under ``uri``."""
    fs, path = filesystem(uri)

    def ls() -> list[str]:
        try:
            entries = fs.ls(path, detail=True)
        except FileNotFoundError:
            return []
        return sorted(
            e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e["type"] == "directory"
        )

    return _retry(f"listing {uri}", ls)


def _rm(fs: fsspec.AbstractFileSystem, path: str, recursive: bool) -> None:
    try:
        if fs.exists(path):
            fs.rm(path, recursive=recursive)
    except FileNotFoundError:
        pass


def remove(uri: str, recursive: bool = True) -> None:
    """Delete a file or (with ``recursive``) a whole prefix; a missing ``uri`` is fine."""
    fs, path = filesystem(uri)
    _retry(f"removing {uri}", lambda: _rm(fs, path, recursive))


# --- directories ---------------------------------------------------------------------------


def _excluded(rel: str, exclude: Collection[str]) -> bool:
    name = rel.rsplit("/", 1)[-1]
    return any(fnmatch(rel, pattern) or fnmatch(name, pattern) for pattern in exclude)


def _parallel(tasks: list[Callable[[threading.Event], None]], workers: int) -> None:
    """Run ``task(cancelled)`` callables in a thread pool; on the first failure, stop the rest
    and raise that failure."""
    if not tasks:
        return
    cancelled = threading.Event()

    def guarded(fn: Callable[[threading.Event], None]) -> None:
        if not cancelled.is_set():
            fn(cancelled)

    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(tasks))),
                            thread_name_prefix="kubetune-storage") as pool:
        futures = [pool.submit(guarded, fn) for fn in tasks]
        done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        failed = next((f for f in futures if f in done and f.exception() is not None), None)
        if failed is not None:
            cancelled.set()
            for f in futures:
                f.cancel()
            exc = failed.exception()
            assert exc is not None
            raise exc


def upload_dir(
    local_dir: Path,
    uri: str,
    *,
    exclude: Collection[str] = (),
    attempts: int | None = None,
    base_delay: float | None = None,
    workers: int | None = None,
) -> int:
    """Upload every file under ``local_dir`` to ``uri``, keeping relative paths.

    Files go in parallel (``TRANSFER_WORKERS`` threads, largest first), each retried with
    exponential backoff. ``exclude`` holds fnmatch patterns matched against each file's
    relative path and its name. Returns the bytes uploaded; raises StorageError naming the
    file and the URI when a file cannot be uploaded.
    """
    local_dir = Path(local_dir)
    if not local_dir.is_dir():
        raise StorageError(f"uploading {local_dir} to {uri}: not a directory")
    fs, base = filesystem(uri)
    files = []
    for src in local_dir.rglob("*"):
        rel = src.relative_to(local_dir).as_posix()
        if src.is_file() and not _excluded(rel, exclude):
            files.append((src.stat().st_size, src, rel))
    files.sort(key=lambda f: f[0], reverse=True)

    def task(src: Path, rel: str) -> Callable[[threading.Event], None]:
        dest = f"{base}/{rel}"
        return lambda cancelled: _retry(
            f"uploading {src} to {join(uri, rel)}",
            lambda: _put_file(fs, src, dest),
            attempts=attempts, base_delay=base_delay, cancelled=cancelled,
        )

    _parallel([task(src, rel) for _, src, rel in files],
              TRANSFER_WORKERS if workers is None else workers)
    total = sum(size for size, _, _ in files)
    log.info("uploaded %d files (%d bytes) to %s", len(files), total, uri)
    return total


def download_dir(uri: str, local_dir: Path,
                 select: Callable[[list[str]], list[str]] | None = None) -> None:
    """Download every object under ``uri`` into ``local_dir``, keeping relative paths
    (`select`: of the relative paths found, the ones to download).

    Each file is written to a temporary name and renamed, so a retried or interrupted
    download never leaves a truncated file under its real name.
    """
    fs, base = filesystem(uri)
    local_dir = Path(local_dir)
    found = _retry(f"listing {uri}", lambda: fs.find(base))
    prefix = base.rstrip("/") + "/"
    rels = [p[len(prefix):] for p in found if p.startswith(prefix)]
    if not rels:
        raise StorageError(f"downloading {uri}: nothing found there")
    if select is not None:
        rels = select(rels)

    def get(remote: str, dest: Path) -> None:
        _atomic_local(str(dest), lambda tmp: fs.get_file(remote, tmp))

    def task(rel: str) -> Callable[[threading.Event], None]:
        return lambda cancelled: _retry(
            f"downloading {join(uri, rel)} to {local_dir / rel}",
            lambda: get(f"{prefix}{rel}", local_dir / rel),
            cancelled=cancelled,
        )

    _parallel([task(rel) for rel in rels], TRANSFER_WORKERS)


def download_file(uri: str, dest: Path) -> None:
    """Download one object to `dest`, written under a temporary name and renamed, retried."""
    fs, path = filesystem(uri)
    dest.parent.mkdir(parents=True, exist_ok=True)
    _retry(f"downloading {uri} to {dest}",
           lambda: _atomic_local(str(dest), lambda tmp: fs.get_file(path, tmp)))


# --- artifacts -----------------------------------------------------------------------------


def manifest_bytes(manifest: dict[str, Any]) -> bytes:
    """The manifest file as `publish` writes it (its sha256 is the artifact's digest)."""
    return (json.dumps(manifest, sort_keys=True, indent=2) + "\n").encode("utf-8")


def publish(
    local_dir: Path,
    uri: str,
    manifest: dict[str, Any],
    *,
    attempts: int | None = None,
    base_delay: float | None = None,
) -> str:
    """Upload ``local_dir`` to ``uri`` as an artifact that is complete once visible.

    1. remove ``uri/MANIFEST_FILE`` (a rewritten artifact never looks complete half-written);
    2. upload the files (any ``MANIFEST_FILE`` inside ``local_dir`` is skipped);
    3. write ``manifest`` as JSON (sorted keys, indent 2) to ``uri/MANIFEST_FILE``, last.

    Returns the sha256 hex digest of the manifest bytes written. On failure StorageError is
    raised and no manifest exists at ``uri`` (if step 1 itself failed, nothing was changed
    and the previous artifact is still whole).
    """
    manifest_uri = join(uri, MANIFEST_FILE)
    data = manifest_bytes(manifest)
    try:
        fs, path = filesystem(manifest_uri)
        _retry(f"removing {manifest_uri}", lambda: _rm(fs, path, False),
               attempts=attempts, base_delay=base_delay)
        upload_dir(Path(local_dir), uri, exclude={MANIFEST_FILE},
                   attempts=attempts, base_delay=base_delay)
        _retry(f"writing {manifest_uri}", lambda: _write_bytes(fs, path, data),
               attempts=attempts, base_delay=base_delay)
    except Exception as e:
        raise StorageError(f"publishing {local_dir} to {uri} failed; {MANIFEST_FILE} not "
                           f"written: {e if isinstance(e, StorageError) else _describe(e)}") from e
    digest = hashlib.sha256(data).hexdigest()
    log.info("published %s (manifest sha256 %s)", uri, digest)
    return digest
