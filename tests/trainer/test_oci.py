"""spec.output.oci: the published artifact pushed to a real registry (Debian's docker-registry,
the CNCF distribution registry, on a free loopback port; `make tools` installs it) and pulled
back by digest with plain HTTP requests, independently of the pushing code."""

from __future__ import annotations

import base64
import hashlib
import http.server
import json
import shutil
import subprocess
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from kubetune_api import contract
from kubetune_api.load import SpecError, parse_job
from kubetune_trainer import launch, oci, recipe
from kubetune_trainer.artifacts import BASE_MODEL_DIR
from kubetune_trainer.console import summary_dict
from support.images import registry_ready
from support.jobs import MINIMAL_JOB_YAML, example_job
from support.net import free_port
from support.operator_process import wait_for

USER, PASSWORD = "trainer", "s3cret-pass"


def start_registry(root: Path, htpasswd: bool) -> Iterator[str]:
    if shutil.which("docker-registry") is None:
        pytest.skip("docker-registry is not installed (make tools)")
    port = free_port()
    auth = ""
    if htpasswd:
        import bcrypt

        hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=4)).decode()
        (root / "htpasswd").write_text(f"{USER}:{hashed}\n")
        auth = f"auth: {{htpasswd: {{realm: kubetune-test, path: {root / 'htpasswd'}}}}}\n"
    config = root / "registry.yml"
    config.write_text(f"version: 0.1\nlog: {{level: warn}}\n"
                      f"storage: {{filesystem: {{rootdirectory: {root / 'data'}}}}}\n"
                      f"http: {{addr: 127.0.0.1:{port}}}\n{auth}")
    with (root / "registry.log").open("wb") as log:
        process = subprocess.Popen(["docker-registry", "serve", str(config)], stdout=log,
                                   stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: process.poll() is not None or listening(port), 60, 0.1, "the registry")
        assert process.poll() is None, (root / "registry.log").read_text()
        yield f"127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(30)


def listening(port: int) -> bool:
    if registry_ready(port):
        return True
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=2)
    except urllib.error.HTTPError as e:
        return e.code == 401  # up, and asking for credentials
    except OSError:
        return False
    return True


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[str]:
    (tmp_path / "registry").mkdir()
    yield from start_registry(tmp_path / "registry", htpasswd=False)


@pytest.fixture
def private_registry(tmp_path: Path) -> Iterator[str]:
    (tmp_path / "private").mkdir()
    yield from start_registry(tmp_path / "private", htpasswd=True)


def get(url: str, accept: str = "", auth: tuple[str, str] | None = None) -> bytes:
    headers = {"Accept": accept} if accept else {}
    if auth:
        headers["Authorization"] = "Basic " + base64.b64encode(":".join(auth).encode()).decode()
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=30) as r:
        return bytes(r.read())


def pull(registry: str, repository: str, digest: str, into: Path,
         auth: tuple[str, str] | None = None) -> dict:
    """The manifest by digest and every layer, checked against its digest, written by title."""
    base = f"http://{registry}/v2/{repository}"
    raw = get(f"{base}/manifests/{digest}", oci.MANIFEST_MEDIA_TYPE, auth)
    assert "sha256:" + hashlib.sha256(raw).hexdigest() == digest
    manifest = json.loads(raw)
    for layer in manifest["layers"]:
        data = get(f"{base}/blobs/{layer['digest']}", auth=auth)
        assert "sha256:" + hashlib.sha256(data).hexdigest() == layer["digest"]
        assert len(data) == layer["size"]
        target = into / layer["annotations"][oci.TITLE]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    return manifest


def dockerconfig(directory: Path, registry: str, user: str, password: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    auth = base64.b64encode(f"{user}:{password}".encode()).decode()
    (directory / ".dockerconfigjson").write_text(
        json.dumps({"auths": {registry: {"auth": auth}}}))
    return directory


@pytest.mark.slow
def test_a_trained_adapter_is_pushed_pulled_by_digest_and_reloads_identically(
        tmp_path: Path, registry: str) -> None:
    output = tmp_path / "out"
    reference = f"{registry}/team/support-adapter:v1"
    job = example_job("tiny-lora", output, training={"maxSteps": 3},
                      output={"oci": {"reference": reference, "plainHttp": True}})
    ready = recipe.setup(job, str(output), tmp_path / "work")
    trainer = recipe.build_trainer(ready)
    trainer.train()
    result = recipe.save(ready, trainer, recipe.summarize(ready, trainer, None, 1.0))
    assert result is not None and result.oci is not None
    assert result.oci.reference == reference
    # What reaches status.output (the termination message) and `kubetune run --json`.
    recorded = {"reference": reference, "digest": result.oci.digest}
    assert launch.termination_summary(result)["oci"] == recorded
    assert summary_dict(result.output_uri, result.manifest, result.manifest_sha256,
                        result.oci)["oci"] == recorded

    pulled = tmp_path / "pulled"
    manifest = pull(registry, "team/support-adapter", result.oci.digest, pulled)
    # ORAS' artifact layout: artifactType, the empty config, one titled layer per file.
    assert manifest["artifactType"] == oci.ARTIFACT_TYPE_ADAPTER
    assert manifest["config"]["mediaType"] == "application/vnd.oci.empty.v1+json"
    assert manifest["config"]["size"] == 2
    assert manifest["annotations"]["dev.kubetune.manifest-sha256"] == result.manifest_sha256
    types = {layer["annotations"][oci.TITLE]: layer["mediaType"] for layer in manifest["layers"]}
    assert types["adapter_model.safetensors"] == oci.WEIGHTS_MEDIA_TYPE
    assert types["adapter_config.json"] == "application/json"
    # The same files as the object-storage artifact, its manifest (same bytes) included.
    published = {p.relative_to(output).as_posix() for p in output.rglob("*") if p.is_file()}
    assert set(types) == published
    assert (pulled / contract.MANIFEST_FILE).read_bytes() == \
        (output / contract.MANIFEST_FILE).read_bytes()
    # The tag resolves to the same manifest.
    by_tag = get(f"http://{registry}/v2/team/support-adapter/manifests/v1",
                 oci.MANIFEST_MEDIA_TYPE)
    assert "sha256:" + hashlib.sha256(by_tag).hexdigest() == result.oci.digest

    batch = ready.tokenizer(["Customer: How do I reset my password?\nAgent:"],
                            return_tensors="pt")
    ready.model.eval()
    with torch.no_grad():
        expected = ready.model(**batch).logits
        base = AutoModelForCausalLM.from_pretrained(pulled / BASE_MODEL_DIR)
        reloaded = PeftModel.from_pretrained(base, pulled).eval()
        assert torch.allclose(reloaded(**batch).logits, expected, atol=1e-5)


def test_basic_auth_from_the_dockerconfigjson_secret(
        tmp_path: Path, private_registry: str, monkeypatch: pytest.MonkeyPatch) -> None:
    files = tmp_path / "artifact"
    files.mkdir()
    (files / "adapter_config.json").write_text('{"r": 8}')
    (files / "nested").mkdir()
    (files / "nested" / "weights.safetensors").write_bytes(b"\x00" * 1000)
    reference = f"{private_registry}/team/a:v2"
    with pytest.raises(oci.OciError, match="asks for credentials") as refused:
        oci.push(files, reference, artifact_type=oci.ARTIFACT_TYPE_ADAPTER, plain_http=True,
                 env={})
    assert refused.value.permanent

    wrong = dockerconfig(tmp_path / "wrong", private_registry, USER, "nope")
    with pytest.raises(oci.OciError, match="401") as denied:
        oci.push(files, reference, artifact_type=oci.ARTIFACT_TYPE_ADAPTER, plain_http=True,
                 env={contract.OCI_CREDENTIALS_DIR_ENV: str(wrong)})
    assert denied.value.permanent

    secret = dockerconfig(tmp_path / "secret", private_registry, USER, PASSWORD)
    pushed = oci.push(files, reference, artifact_type=oci.ARTIFACT_TYPE_ADAPTER,
                      plain_http=True, env={contract.OCI_CREDENTIALS_DIR_ENV: str(secret)})
    pulled = tmp_path / "pulled"
    manifest = pull(private_registry, "team/a", pushed.digest, pulled, (USER, PASSWORD))
    assert [layer["annotations"][oci.TITLE] for layer in manifest["layers"]] == \
        ["adapter_config.json", "nested/weights.safetensors"]
    assert (pulled / "nested" / "weights.safetensors").read_bytes() == b"\x00" * 1000
    assert pushed.size == 1000 + len('{"r": 8}')


class TokenFront(http.server.BaseHTTPRequestHandler):
    """A registry with distribution's token auth: a 401 naming a token realm on every request
    without the token; the realm hands it out for Basic USER:PASSWORD; requests that carry it
    go on to the real registry behind (upload Locations rewritten to this front)."""

    behind = ""
    token = "t0ken"
    scopes: list[str] = []

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        if self.path.startswith("/token"):
            query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
            expected = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
            if self.headers.get("Authorization") != expected:
                return self.answer(401, b"{}", {})
            self.scopes.append(query["scope"][0])
            return self.answer(200, json.dumps({"token": self.token}).encode(), {})
        self.forward()

    do_HEAD = do_POST = do_PUT = do_GET

    def forward(self) -> None:
        host = f"127.0.0.1:{self.server.server_address[1]}"
        if self.headers.get("Authorization") != f"Bearer {self.token}":
            realm = f'Bearer realm="http://{host}/token",service="front"'
            return self.answer(401, b"{}", {"WWW-Authenticate": realm})
        size = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(size) if size else None
        headers = {k: v for k, v in self.headers.items()
                   if k.lower() in ("content-type", "accept")}
        request = urllib.request.Request(f"http://{self.behind}{self.path}", data=body,
                                         method=self.command, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=30) as reply:
                status, got, data = reply.status, reply.headers, reply.read()
        except urllib.error.HTTPError as e:
            status, got, data = e.code, e.headers, e.read()
        keep = {k: v.replace(self.behind, host) for k, v in got.items()
                if k.lower() in ("location", "docker-content-digest", "content-type")}
        self.answer(status, data, keep)

    def answer(self, status: int, data: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        for key, value in {**headers, "Content-Length": str(len(data))}.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)


def test_token_auth_as_the_registry_challenges_for_it(tmp_path: Path, registry: str) -> None:
    TokenFront.behind, TokenFront.scopes = registry, []
    front = http.server.ThreadingHTTPServer(("127.0.0.1", 0), TokenFront)
    threading.Thread(target=front.serve_forever, daemon=True).start()
    try:
        host = f"127.0.0.1:{front.server_address[1]}"
        files = tmp_path / "artifact"
        files.mkdir()
        (files / "adapter_model.safetensors").write_bytes(b"w" * 300)
        secret = dockerconfig(tmp_path / "secret", host, USER, PASSWORD)
        pushed = oci.push(files, f"{host}/team/tok:v1", artifact_type=oci.ARTIFACT_TYPE_MODEL,
                          plain_http=True, env={contract.OCI_CREDENTIALS_DIR_ENV: str(secret)})
        assert TokenFront.scopes == ["repository:team/tok:pull,push"]  # one token, reused
        manifest = pull(registry, "team/tok", pushed.digest, tmp_path / "pulled")
        assert manifest["artifactType"] == oci.ARTIFACT_TYPE_MODEL
        wrong = dockerconfig(tmp_path / "wrong", host, USER, "nope")
        with pytest.raises(oci.OciError, match="401") as denied:
            oci.push(files, f"{host}/team/tok:v2", artifact_type=oci.ARTIFACT_TYPE_MODEL,
                     plain_http=True, env={contract.OCI_CREDENTIALS_DIR_ENV: str(wrong)})
        assert denied.value.permanent
    finally:
        front.shutdown()


def test_plain_http_off_speaks_tls_and_fails_against_a_plain_registry(
        tmp_path: Path, registry: str) -> None:
    files = tmp_path / "artifact"
    files.mkdir()
    (files / "a.json").write_text("{}")
    with pytest.raises(oci.OciError) as failed:
        oci.push(files, f"{registry}/team/a:v1", artifact_type=oci.ARTIFACT_TYPE_ADAPTER,
                 env={}, attempts=1)
    assert "https://" in str(failed.value)


@pytest.mark.slow
def test_an_unreachable_registry_is_retried_then_retryable_and_the_artifact_is_kept(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(oci, "RETRY_BASE_DELAY", 0.0)
    tries: list[str] = []
    send = oci.Registry.request

    def counted(self: oci.Registry, method: str, url: str, **kw: object) -> object:
        tries.append(method)
        return send(self, method, url, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(oci.Registry, "request", counted)
    output = tmp_path / "out"
    nobody = f"127.0.0.1:{free_port()}/team/a:v1"  # nothing listens there
    job = example_job("tiny-lora", output, training={"maxSteps": 2},
                      output={"oci": {"reference": nobody, "plainHttp": True}})
    with pytest.raises(oci.OciError, match="is kept") as failed:
        recipe.run(job)
    assert not failed.value.permanent  # exit 1: the gang's restart tries again
    assert tries == ["HEAD"] * oci.RETRY_ATTEMPTS
    assert (output / contract.MANIFEST_FILE).is_file()  # the object-storage artifact stands


@pytest.mark.slow
def test_a_refused_push_is_a_spec_error_and_the_artifact_is_kept(
        tmp_path: Path, private_registry: str) -> None:
    output = tmp_path / "out"
    job = example_job("tiny-lora", output, training={"maxSteps": 2},
                      output={"oci": {"reference": f"{private_registry}/team/a:v1",
                                      "plainHttp": True}})
    with pytest.raises(SpecError, match=r"spec\.output\.oci: .* asks for credentials"):
        recipe.run(job)  # no secretName: exit 2, no restart can help
    assert (output / contract.MANIFEST_FILE).is_file()


@pytest.mark.parametrize(("reference", "says"), [
    ("adapters/support:v1", "name the registry host first"),
    ("registry.example.com/Team/a:v1", "is not an OCI reference"),
    ("registry.example.com/team/a@sha256:" + "0" * 64, "give a tag, not a digest"),
    ("registry.example.com/team/a:bad tag", "is not an OCI reference"),
])
def test_a_bad_reference_is_a_validation_error_naming_the_field(reference: str,
                                                                says: str) -> None:
    text = MINIMAL_JOB_YAML.replace("output: {uri: out}",
                                    f"output: {{uri: out, oci: {{reference: '{reference}'}}}}")
    with pytest.raises(SpecError) as error:
        parse_job(text, "job.yaml")
    assert "spec.output.oci.reference" in str(error.value) and says in str(error.value)
    assert "job.yaml:9:" in str(error.value)


def test_references_parse_with_a_default_tag() -> None:
    from kubetune_api.oci import parse_reference

    ref = parse_reference("localhost:5000/a/b")
    assert (ref.registry, ref.repository, ref.tag) == ("localhost:5000", "a/b", "latest")
    assert parse_reference("ghcr.io/org/x:v1.2").by_digest("sha256:ab") == "ghcr.io/org/x@sha256:ab"


def test_the_docker_config_entry_is_found_by_host(tmp_path: Path) -> None:
    secret = dockerconfig(tmp_path / "s", "https://reg.example.com/v1/", "u", "p:w")
    env = {contract.OCI_CREDENTIALS_DIR_ENV: str(secret)}
    assert oci.registry_credentials("reg.example.com", env) == ("u", "p:w")
    assert oci.registry_credentials("other.example.com", env) is None
    (secret / ".dockerconfigjson").write_text("not json")
    with pytest.raises(oci.OciError, match="not a docker config"):
        oci.registry_credentials("reg.example.com", env)


def test_a_second_push_sends_only_what_the_registry_lacks(
        tmp_path: Path, registry: str, monkeypatch: pytest.MonkeyPatch) -> None:
    files = tmp_path / "artifact"
    files.mkdir()
    (files / "a.json").write_text('{"a": 1}')
    (files / "b.safetensors").write_bytes(b"b" * 100)
    reference = f"{registry}/team/again:v1"
    first = oci.push(files, reference, artifact_type=oci.ARTIFACT_TYPE_ADAPTER,
                     plain_http=True, env={})
    calls: list[str] = []
    send = oci.Registry.request

    def counted(self: oci.Registry, method: str, url: str, **kw: object) -> object:
        calls.append(f"{method} {url.rsplit('/v2/', 1)[-1].split('/')[2]}")
        return send(self, method, url, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(oci.Registry, "request", counted)
    (files / "a.json").write_text('{"a": 2}')  # one file changed
    second = oci.push(files, reference, artifact_type=oci.ARTIFACT_TYPE_ADAPTER,
                      plain_http=True, env={})
    assert second.digest != first.digest
    # a.json is new (HEAD 404, then upload); b.safetensors and the config are there already.
    assert calls == ["HEAD blobs", "POST blobs", "PUT blobs", "HEAD blobs", "HEAD blobs",
                     "PUT manifests"]
