"""Push a published artifact to an OCI registry (spec.output.oci), the way ORAS pushes files.

The OCI distribution spec's push, and nothing else: each file is a blob (HEAD to skip one the
registry has, POST to open an upload, PUT with ?digest= to finish it in one piece), then the
image manifest is PUT under the tag. The manifest follows ORAS' conventions for artifacts
(oras-go's PackManifest, image-spec 1.1 "Guidelines for Artifact Usage"): an `artifactType`,
the empty config `application/vnd.oci.empty.v1+json` (`{}`), one layer per file named by its
`org.opencontainers.image.title` annotation, so `oras pull REF` writes the same files under the
same relative paths. Media types: docs/storage.md#oci-registries.

Authentication as the registry asks for it (its 401's WWW-Authenticate): Basic with the
credentials of the mounted dockerconfigjson Secret, or Bearer with a token from the realm it
names (distribution's token auth: GET realm?service=&scope=repository:<name>:pull,push, with
Basic credentials where there are some, anonymously otherwise).

Failures are `OciError`s, permanent (denied, unknown repository, invalid name or manifest: a
retry cannot help) or not (connection refused, timeouts, 408/429/5xx: retried here with
backoff, then left to the gang's restart).
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from kubetune_api import contract
from kubetune_api.oci import OciReference, parse_reference

log = logging.getLogger("kubetune.oci")

MANIFEST_MEDIA_TYPE = "application/vnd.oci.image.manifest.v1+json"
EMPTY_CONFIG_MEDIA_TYPE = "application/vnd.oci.empty.v1+json"
EMPTY_CONFIG = b"{}"
ARTIFACT_TYPE_ADAPTER = "application/vnd.kubetune.adapter.v1"  # LoRA/QLoRA (+ merged/)
ARTIFACT_TYPE_MODEL = "application/vnd.kubetune.model.v1"  # full fine-tuning
TITLE = "org.opencontainers.image.title"
CREATED = "org.opencontainers.image.created"
# Layer media types by file (docs/storage.md#oci-registries).
WEIGHTS_MEDIA_TYPE = "application/vnd.kubetune.weights.v1.safetensors"
MEDIA_TYPES = {".safetensors": WEIGHTS_MEDIA_TYPE, ".json": "application/json",
               ".md": "text/markdown", ".jinja": "text/plain", ".txt": "text/plain"}
DEFAULT_MEDIA_TYPE = "application/octet-stream"
DOCKER_CONFIG_FILES = (".dockerconfigjson", "config.json")  # Secret key; `docker login`'s file

RETRY_ATTEMPTS = 5
RETRY_BASE_DELAY = 1.0
TIMEOUT = 300.0  # seconds without a byte moving, per request (a blob PUT streams for longer)
RETRYABLE_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})


class OciError(RuntimeError):
    """A push that failed; `permanent` when trying again cannot help."""

    def __init__(self, message: str, *, permanent: bool) -> None:
        super().__init__(message)
        self.permanent = permanent


@dataclass(frozen=True)
class Pushed:
    reference: str  # registry/repository:tag as given
    digest: str  # sha256:... of the manifest
    size: int  # bytes of the layers

    def by_digest(self) -> str:
        return parse_reference(self.reference).by_digest(self.digest)


@dataclass(frozen=True)
class Blob:
    media_type: str
    digest: str
    size: int
    path: Path | None = None  # None: `data` holds it
    data: bytes = b""
    title: str | None = None

    def descriptor(self) -> dict[str, Any]:
        descriptor: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest,
                                      "size": self.size}
        if self.title is not None:
            descriptor["annotations"] = {TITLE: self.title}
        return descriptor

    def open(self) -> IO[bytes]:
        if self.path is None:
            return io.BytesIO(self.data)
        return self.path.open("rb")


def media_type(path: str) -> str:
    return MEDIA_TYPES.get(Path(path).suffix.lower(), DEFAULT_MEDIA_TYPE)


def sha256_file(path: Path) -> str:
    sha = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            sha.update(chunk)
    return f"sha256:{sha.hexdigest()}"


def file_blobs(directory: Path, extra: Mapping[str, bytes] = {}) -> list[Blob]:
    """One blob per file under directory (relative POSIX path as title), plus `extra` files
    given as bytes (the kubetune manifest), sorted by title: the same files give the same
    manifest."""
    blobs = [Blob(media_type(title), sha256_file(path), path.stat().st_size, path=path,
                  title=title)
             for path in directory.rglob("*") if path.is_file()
             for title in [path.relative_to(directory).as_posix()] if title not in extra]
    blobs += [Blob(media_type(title), f"sha256:{hashlib.sha256(data).hexdigest()}", len(data),
                   data=data, title=title) for title, data in extra.items()]
    return sorted(blobs, key=lambda blob: blob.title or "")


def build_manifest(layers: list[Blob], artifact_type: str,
                   annotations: Mapping[str, str]) -> bytes:
    config = Blob(EMPTY_CONFIG_MEDIA_TYPE, _digest(EMPTY_CONFIG), len(EMPTY_CONFIG),
                  data=EMPTY_CONFIG)
    manifest = {"schemaVersion": 2, "mediaType": MANIFEST_MEDIA_TYPE,
                "artifactType": artifact_type,
                "config": {**config.descriptor(), "data": base64.b64encode(EMPTY_CONFIG).decode()},
                "layers": [layer.descriptor() for layer in layers],
                "annotations": dict(annotations)}
    return json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()


def _digest(data: bytes) -> str:
    return f"sha256:{hashlib.sha256(data).hexdigest()}"


# --- credentials ---------------------------------------------------------------------------

def registry_credentials(registry: str, env: Mapping[str, str] | None = None
                         ) -> tuple[str, str] | None:
    """(username, password) for registry from the mounted dockerconfigjson Secret, if any."""
    env = os.environ if env is None else env
    directory = env.get(contract.OCI_CREDENTIALS_DIR_ENV)
    if not directory:
        return None
    path = next((Path(directory) / name for name in DOCKER_CONFIG_FILES
                 if (Path(directory) / name).is_file()), None)
    if path is None:
        raise OciError(f"spec.output.oci.secretName: the Secret holds neither of "
                       f"{', '.join(DOCKER_CONFIG_FILES)} (create it with kubectl create "
                       "secret docker-registry)", permanent=True)
    try:
        auths = json.loads(path.read_text()).get("auths") or {}
        for key, entry in auths.items():
            if _registry_host(key) != registry:
                continue
            if entry.get("auth"):
                user, _, password = base64.b64decode(entry["auth"]).decode().partition(":")
                return user, password
            if entry.get("username") is not None:
                return str(entry["username"]), str(entry.get("password") or "")
    except (ValueError, AttributeError, TypeError) as e:
        raise OciError(f"spec.output.oci.secretName: {path.name} is not a docker config "
                       f"({{\"auths\": {{host: {{auth}}}}}}): {type(e).__name__}",
                       permanent=True) from None
    log.warning("oci: the registry Secret has no entry for %s; pushing anonymously", registry)
    return None


def _registry_host(key: str) -> str:
    """A docker config `auths` key (`host`, `https://host/v1/`) as host[:port]."""
    return re.sub(r"^[a-z]+://", "", key).split("/", 1)[0]


# --- the distribution API --------------------------------------------------------------------

class Registry:
    """One repository of one registry: requests with the authentication it challenges for."""

    def __init__(self, ref: OciReference, credentials: tuple[str, str] | None,
                 plain_http: bool, timeout: float = TIMEOUT) -> None:
        self.ref, self.credentials, self.timeout = ref, credentials, timeout
        self.base = f"{'http' if plain_http else 'https'}://{ref.registry}/v2/{ref.repository}"
        self.authorization: str | None = None

    def request(self, method: str, url: str, *, body: Callable[[], IO[bytes]] | None = None,
                size: int = 0, headers: Mapping[str, str] | None = None,
                ok: tuple[int, ...] = (200, 201, 202)) -> tuple[int, Any]:
        """(status, response headers); a 401 is answered once with the challenged auth."""
        for attempt in range(2):
            sent = dict(headers or {})
            if self.authorization:
                sent["Authorization"] = self.authorization
            if body is not None:
                sent["Content-Length"] = str(size)
            handle = body() if body is not None else None
            try:
                request = urllib.request.Request(url, data=handle, method=method, headers=sent)
                with urllib.request.urlopen(request, timeout=self.timeout) as reply:
                    reply.read()
                    return reply.status, reply.headers
            except urllib.error.HTTPError as e:
                if e.code in ok:
                    return e.code, e.headers
                if e.code == 401 and attempt == 0 and self.authenticate(
                        e.headers.get("WWW-Authenticate") or ""):
                    continue
                raise _http_error(method, url, e) from None
            except OSError as e:  # refused, reset, DNS, TLS, timeout: the network's
                raise OciError(f"{method} {url}: {type(e).__name__}: {e}",
                               permanent=False) from None
            finally:
                if handle is not None:
                    handle.close()
        raise OciError(f"{method} {url}: still 401 after authenticating", permanent=True)

    def authenticate(self, challenge: str) -> bool:
        """Set the Authorization header the challenge asks for; False when it cannot be met."""
        scheme, _, rest = challenge.partition(" ")
        params = dict(re.findall(r'(\w+)="([^"]*)"', rest))
        if scheme.lower() == "basic":
            if self.credentials is None:
                raise OciError(f"{self.ref.registry} asks for credentials: set "
                               "spec.output.oci.secretName", permanent=True)
            self.authorization = "Basic " + _basic(self.credentials)
            return True
        if scheme.lower() == "bearer" and params.get("realm"):
            self.authorization = "Bearer " + self.token(params)
            return True
        return False

    def token(self, params: dict[str, str]) -> str:
        query = {"service": params.get("service", ""),
                 "scope": f"repository:{self.ref.repository}:pull,push"}
        url = f"{params['realm']}?{urllib.parse.urlencode(query)}"
        headers = {"Authorization": "Basic " + _basic(self.credentials)} \
            if self.credentials else {}
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers),
                                        timeout=self.timeout) as reply:
                answer = json.loads(reply.read())
        except urllib.error.HTTPError as e:
            raise _http_error("GET", params["realm"], e) from None
        except OSError as e:
            raise OciError(f"token from {params['realm']}: {type(e).__name__}: {e}",
                           permanent=False) from None
        except ValueError:
            raise OciError(f"token from {params['realm']}: not JSON", permanent=False) from None
        token = answer.get("token") or answer.get("access_token")
        if not token:
            raise OciError(f"token from {params['realm']}: no token in the answer",
                           permanent=True)
        return str(token)

    def push_blob(self, blob: Blob) -> None:
        blob_url = f"{self.base}/blobs/{blob.digest}"
        status, _ = self.request("HEAD", blob_url, ok=(200, 404))
        if status == 200:
            return  # the registry has it (a retried push, or the same file elsewhere)
        _, headers = self.request("POST", f"{self.base}/blobs/uploads/", ok=(202,))
        location = urllib.parse.urljoin(self.base + "/", headers.get("Location") or "")
        separator = "&" if "?" in location else "?"
        self.request("PUT", f"{location}{separator}digest={urllib.parse.quote(blob.digest)}",
                     body=blob.open, size=blob.size,
                     headers={"Content-Type": "application/octet-stream"}, ok=(201,))

    def push_manifest(self, manifest: bytes) -> str:
        digest = _digest(manifest)
        _, headers = self.request(
            "PUT", f"{self.base}/manifests/{self.ref.tag}",
            body=lambda: io.BytesIO(manifest), size=len(manifest),
            headers={"Content-Type": MANIFEST_MEDIA_TYPE}, ok=(201,))
        answered = headers.get("Docker-Content-Digest")
        if answered and answered != digest:
            raise OciError(f"the registry stored the manifest as {answered}, not {digest}",
                           permanent=True)
        return digest


def _basic(credentials: tuple[str, str] | None) -> str:
    user, password = credentials or ("", "")
    return base64.b64encode(f"{user}:{password}".encode()).decode()


def _http_error(method: str, url: str, e: urllib.error.HTTPError) -> OciError:
    """The registry's own error codes (distribution spec: {"errors": [{code, message}]})."""
    try:
        errors = json.loads(e.read() or b"{}").get("errors") or []
        said = "; ".join(f"{x.get('code')}: {x.get('message')}" for x in errors)
    except (ValueError, AttributeError, OSError):
        said = ""
    return OciError(f"{method} {url}: {e.code} {e.reason}" + (f" ({said})" if said else ""),
                    permanent=e.code not in RETRYABLE_STATUS)


# --- the push --------------------------------------------------------------------------------

def push(directory: Path, reference: str, *, artifact_type: str,
         annotations: Mapping[str, str] = {},
         extra: Mapping[str, bytes] = {},
         plain_http: bool = False, env: Mapping[str, str] | None = None,
         attempts: int | None = None, base_delay: float | None = None,
         sleep: Callable[[float], None] = time.sleep) -> Pushed:
    """Push every file under directory (and `extra`) as one artifact tagged `reference`.

    Transient failures are retried (`attempts` in all, backoff from `base_delay`); blobs already
    there are skipped, so a retry sends only what is missing. Raises OciError."""
    attempts = RETRY_ATTEMPTS if attempts is None else attempts
    base_delay = RETRY_BASE_DELAY if base_delay is None else base_delay
    ref = parse_reference(reference)
    layers = file_blobs(directory, extra)
    manifest = build_manifest(layers, artifact_type, annotations)
    registry = Registry(ref, registry_credentials(ref.registry, env), plain_http)
    for attempt in range(1, attempts + 1):
        try:
            for blob in [*layers, _config_blob()]:
                registry.push_blob(blob)
            digest = registry.push_manifest(manifest)
            log.info("pushed %s (%s, %d files)", reference, digest, len(layers))
            return Pushed(reference, digest, sum(layer.size for layer in layers))
        except OciError as e:
            if e.permanent or attempt == attempts:
                raise
            delay = base_delay * 2 ** (attempt - 1)
            log.warning("oci push to %s: %s; retrying in %.1fs (%d/%d)", reference, e, delay,
                        attempt, attempts)
            sleep(delay)
    raise AssertionError("unreachable")


def _config_blob() -> Blob:
    return Blob(EMPTY_CONFIG_MEDIA_TYPE, _digest(EMPTY_CONFIG), len(EMPTY_CONFIG),
                data=EMPTY_CONFIG)
