"""The shared Hub cache (spec.model.cache) and the Hub token file (spec.model.tokenSecret), as
trainer pods get them from the operator (builders.hf_env): HF_HUB_CACHE on a shared volume,
HF_TOKEN_PATH a read-only file. Real huggingface_hub processes against a gated fake Hub on
loopback:

- several jobs downloading the same model at once into one cache leave one intact copy;
- a later job (or a restart) reads the cache and downloads nothing; a read-only cache works
  offline;
- the token file is what the Hub client authenticates with; without it the model is refused.
"""

from __future__ import annotations

import hashlib
import http.server
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kubetune_api import contract
from kubetune_api.load import validate_job
from kubetune_operator import builders

pytestmark = pytest.mark.slow

REPO, COMMIT = "org/gated-model", "c0ffee" + "0" * 34
TOKEN = "hf_" + "CacheTestToken0123456789abcdefgh"
FILES = {"config.json": b'{"model_type": "llama"}',
         "model.safetensors": hashlib.sha256(b"seed").digest() * (3 * 2**20 // 32)}
DOWNLOAD = """
import sys, huggingface_hub
path = huggingface_hub.hf_hub_download(sys.argv[1], sys.argv[2], revision="main")
print(path)
"""


class FakeHub(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        self.files = FILES  # the gated repo's files, by name
        self.requests: Counter[tuple[str, str]] = Counter()
        self.authorized: Counter[tuple[str, str]] = Counter()  # those that carried the token
        self.heads: list[float] = []  # when each HEAD of the model file arrived
        self.body_done: list[float] = []  # when each GET of it finished
        self.hold_until_heads = 0  # the first GET's body waits for this many HEADs
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), HubHandler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class HubHandler(http.server.BaseHTTPRequestHandler):
    server: FakeHub
    protocol_version = "HTTP/1.1"

    def do_HEAD(self) -> None:
        self.answer(body=False)

    def do_GET(self) -> None:
        self.answer(body=True)

    def answer(self, body: bool) -> None:
        prefix = f"/{REPO}/resolve/main/"
        name = self.path.split("?")[0].removeprefix(prefix)
        with self.server.lock:
            self.server.requests[(self.command, name)] += 1
            if self.command == "HEAD" and name == "model.safetensors":
                self.server.heads.append(time.monotonic())
        if self.headers.get("Authorization") != f"Bearer {TOKEN}":
            self.send_response(401)
            self.send_header("X-Error-Code", "GatedRepo")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        with self.server.lock:
            self.server.authorized[(self.command, name)] += 1
        if not self.path.startswith(prefix) or name not in self.server.files:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        data = self.server.files[name]
        self.send_response(200)
        self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:  # slowly, and only once every downloader has asked: they overlap for sure
            deadline = time.monotonic() + 60
            while len(self.server.heads) < self.server.hold_until_heads \
                    and time.monotonic() < deadline:
                time.sleep(0.05)
            for start in range(0, len(data), 2**18):
                self.wfile.write(data[start:start + 2**18])
                time.sleep(0.02)
            self.server.body_done.append(time.monotonic())

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def hub() -> Iterator[FakeHub]:
    server = FakeHub()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def pod_env(tmp: Path, hub: FakeHub, read_only: bool = False, token: bool = True,
            pod: str = "pod") -> dict[str, str]:
    """The Hub variables the operator sets, with the pod's mounts on local disk: the shared
    claim at tmp/claim, a pod's own HF_HOME emptyDir, the Secret's key as a file."""
    model: dict[str, Any] = {"name": REPO, "cache": {"pvc": "models", "readOnly": read_only}}
    if token:
        model["tokenSecret"] = {"name": "hf"}
    job = validate_job({"metadata": {"name": "j", "namespace": "ml"}, "spec": {
        "model": model, "method": {"type": "lora"}, "dataset": {"train": "d.jsonl"},
        "output": {"uri": "out"}}})
    mounts = {contract.HF_HUB_CACHE_DIR: tmp / "claim",
              contract.HF_HOME_DIR: tmp / pod / "hf-home",
              contract.HF_TOKEN_DIR: tmp / "secret"}
    (tmp / "secret").mkdir(parents=True, exist_ok=True)
    (tmp / "secret" / "HF_TOKEN").write_text(TOKEN + "\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_ENDPOINT=hub.url, HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_XET="1")
    for var in builders.hf_env(job):
        value = var["value"]
        for path, local in sorted(mounts.items(), key=lambda m: -len(m[0])):
            if value == path or value.startswith(path + "/"):
                value = str(local) + value[len(path):]
                break
        env[var["name"]] = value
    return env


def download(env: dict[str, str], filename: str = "model.safetensors") -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", DOWNLOAD, REPO, filename], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen[str]) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=180)
    return process.returncode, out.strip(), err


def test_concurrent_jobs_share_one_intact_copy_and_later_jobs_download_nothing(
        tmp_path: Path, hub: FakeHub) -> None:
    hub.hold_until_heads = 3
    runs = [download(pod_env(tmp_path, hub, pod=f"pod{i}")) for i in range(3)]
    results = [finish(p) for p in runs]
    for code, path, err in results:
        assert code == 0, err[-2000:]
        assert Path(path).read_bytes() == FILES["model.safetensors"]
        assert Path(path).is_relative_to(tmp_path / "claim")
    blobs = list((tmp_path / "claim").rglob("blobs/*"))
    assert [b.read_bytes() == FILES["model.safetensors"] for b in blobs] == [True]
    assert not list((tmp_path / "claim").rglob("*.incomplete"))
    # They overlapped: every job asked for the file while the first download was running...
    [done] = hub.body_done
    assert len([t for t in hub.heads if t < done]) == 3, (hub.heads, done)
    # ...and the Hub client's per-file lock made the others wait for it instead of fetching.
    assert hub.requests[("GET", "model.safetensors")] == 1, hub.requests
    # A later job (another pod, another HF_HOME) and a read-only, offline mount of the claim.
    code, path, err = finish(download(pod_env(tmp_path, hub, pod="later")))
    assert code == 0, err[-2000:]
    assert hub.requests[("GET", "model.safetensors")] == 1
    before = sum(hub.requests.values())
    offline = pod_env(tmp_path, hub, read_only=True, pod="offline")
    assert offline["HF_HUB_OFFLINE"] == "1"
    code, path, err = finish(download(offline))
    assert code == 0, err[-2000:]
    assert sum(hub.requests.values()) == before  # not even a HEAD


def test_the_token_file_authenticates_and_nothing_else_does(tmp_path: Path,
                                                            hub: FakeHub) -> None:
    env = pod_env(tmp_path, hub, pod="a")
    assert "HF_TOKEN" not in env  # the token is never a variable
    code, _, err = finish(download(env, "config.json"))
    assert code == 0, err[-2000:]
    code, _, err = finish(download(pod_env(tmp_path / "b", hub, token=False), "config.json"))
    assert code != 0 and ("401" in err or "Gated" in err or "gated" in err), err[-2000:]
    assert TOKEN not in err


def test_a_training_run_reads_a_gated_model_with_the_token_file_and_writes_it_nowhere(
        tmp_path: Path, hub: FakeHub) -> None:
    """The trainer as a pod runs it (HF_TOKEN_PATH set, tokenSecret in its config), training a
    gated model that only the token opens: the Hub client reads the token file and sends it,
    and the token appears in no output file (artifact, manifest) and no printed text. Without
    the token file the same run is refused at the download."""
    import json as json_

    import yaml as yaml_

    from kubetune_trainer.tiny import build_tiny_model
    from support.jobs import example_dict

    model_dir = build_tiny_model("llama", ["the ball the cat sees is round and red"] * 50,
                                 tmp_path / "model", max_positions=64, seed=0)
    served = {p.name: p.read_bytes() for p in model_dir.iterdir() if p.is_file()}
    hub.files = served
    body = example_dict("tiny-lora")
    body["spec"]["model"] = {"name": REPO, "task": "causal-lm", "tokenSecret": {"name": "hf"}}
    body["spec"]["training"] = {**body["spec"]["training"], "epochs": 1, "maxSteps": 2}
    for name, token in (("with-token", True), ("without-token", False)):
        out = tmp_path / name / "out"
        body["spec"]["output"] = {"uri": str(out)}
        job_file = tmp_path / name / "job.yaml"
        job_file.parent.mkdir()
        job_file.write_text(yaml_.safe_dump(body))
        env = pod_env(tmp_path / name, hub, token=token)
        result = subprocess.run([str(Path(sys.executable).parent / "kubetune"), "run",
                                 str(job_file)], env=env, capture_output=True, text=True,
                                cwd=tmp_path, timeout=600)
        printed = result.stdout + result.stderr
        assert TOKEN not in printed
        if not token:
            assert result.returncode != 0 and "config.json" in printed, printed[-3000:]
            continue
        assert result.returncode == 0, printed[-3000:]
        assert hub.authorized[("GET", "model.safetensors")] == 1, hub.authorized
        written = [p for p in out.rglob("*") if p.is_file()]
        assert written and not [p for p in written if TOKEN.encode() in p.read_bytes()]
        manifest = json_.loads((out / contract.MANIFEST_FILE).read_text())
        assert manifest["baseModel"]["name"] == REPO, manifest["baseModel"]
