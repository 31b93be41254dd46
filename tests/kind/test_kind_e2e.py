"""The tiny LoRA example on a real Kubernetes: kind, the images built from this tree, the Helm
chart, an in-cluster MinIO. Needs Docker and kind (`make kind-e2e`, .github/workflows/
e2e-kind.yaml); skips without them. Logs of the operator, the trainer pods and the
FineTuneJob go to $KIND_E2E_LOGS (default: the test's tmp dir) when it fails.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from support.e2e_cluster import s3_example
from support.operator_process import free_port
from support.pod_runner import ROOT
from support.s3 import REGION

pytestmark = [pytest.mark.kind, pytest.mark.slow]

TAG = "e2e"
OPERATOR_IMAGE = f"ghcr.io/kubetune/operator:{TAG}"
TRAINER_IMAGE = f"ghcr.io/kubetune/trainer:{TAG}-cpu"
MINIO = yaml.safe_load_all((Path(__file__).parent / "minio.yaml").read_text())
MINIO_SECRET = next(d for d in MINIO if d["kind"] == "Secret")["stringData"]
MINIO_ENDPOINT = "http://minio.default.svc.cluster.local:9000"
JOB = "tiny-lora"
HELM = shutil.which("helm") or str(ROOT / ".tools" / "helm")


def missing_tools() -> str | None:
    if shutil.which("kind") is None:
        return "kind is not installed (https://kind.sigs.k8s.io)"
    if shutil.which("docker") is None or subprocess.run(
            ["docker", "info"], capture_output=True).returncode != 0:
        return "no Docker engine (`docker info` failed)"
    if not Path(HELM).exists():
        return "helm is not installed (make helm)"
    return None


def run(*args: str, timeout: float = 1800, **kwargs: object) -> str:
    result = subprocess.run(args, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                            **kwargs)  # type: ignore[call-overload]
    assert result.returncode == 0, f"{' '.join(args)}:\n{result.stdout}\n{result.stderr}"
    return str(result.stdout)


class Kind:
    def __init__(self, workdir: Path) -> None:
        self.name = f"kubetune-e2e-{uuid.uuid4().hex[:6]}"
        self.kubeconfig = workdir / "kubeconfig"
        self.logs = Path(os.environ.get("KIND_E2E_LOGS") or workdir / "logs")

    def kubectl(self, *args: str, timeout: float = 120) -> str:
        return run("kubectl", "--kubeconfig", str(self.kubeconfig), *args, timeout=timeout)

    def create(self) -> None:
        run("kind", "create", "cluster", "--name", self.name, "--kubeconfig",
            str(self.kubeconfig), "--wait", "180s")
        run("docker", "build", "-f", "operator/Dockerfile", "-t", OPERATOR_IMAGE, ".")
        run("docker", "build", "-f", "trainer_image/Dockerfile.cpu", "-t", TRAINER_IMAGE, ".")
        run("kind", "load", "docker-image", OPERATOR_IMAGE, TRAINER_IMAGE, "--name", self.name)
        run(HELM, "install", "kubetune", "charts/kubetune", "--kubeconfig",
            str(self.kubeconfig), "--wait", "--timeout", "5m",
            "--set", f"image.tag={TAG}", "--set", f"trainer.image.tag={TAG}-cpu",
            "--set", "operator.progressInterval=2")
        self.kubectl("apply", "-f", str(Path(__file__).parent / "minio.yaml"))
        self.kubectl("rollout", "status", "deployment/minio", "--timeout=300s", timeout=320)

    def collect_logs(self) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        commands = {"finetunejob.txt": ["describe", "ftj"],
                    "pods.txt": ["get", "pods", "-A", "-o", "wide"],
                    "events.txt": ["get", "events", "-A", "--sort-by=.lastTimestamp"],
                    "operator.log": ["logs", "-l", "app.kubernetes.io/name=kubetune",
                                     "--all-containers", "--tail=-1", "--prefix"],
                    "trainer.log": ["logs", "-l", f"kubetune.dev/finetunejob={JOB}",
                                    "--all-containers", "--tail=-1", "--prefix"]}
        for file, args in commands.items():
            with contextlib.suppress(AssertionError, subprocess.TimeoutExpired):
                (self.logs / file).write_text(self.kubectl(*args))

    def delete(self) -> None:
        run("kind", "delete", "cluster", "--name", self.name)

    @contextlib.contextmanager
    def port_forward(self, service: str, port: int) -> Iterator[str]:
        local = free_port()
        proc = subprocess.Popen(["kubectl", "--kubeconfig", str(self.kubeconfig),
                                 "port-forward", service, f"{local}:{port}"],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            assert proc.stdout is not None and "Forwarding" in proc.stdout.readline()
            yield f"http://127.0.0.1:{local}"
        finally:
            proc.terminate()
            proc.wait(10)


@pytest.fixture(scope="module")
def kind(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kind]:
    if reason := missing_tools():
        pytest.skip(reason)
    cluster = Kind(tmp_path_factory.mktemp("kind"))
    try:
        cluster.create()
        yield cluster
    finally:
        cluster.delete()


def test_tiny_lora_on_kind_to_minio(kind: Kind, request: pytest.FixtureRequest,
                                    tmp_path: Path) -> None:
    import s3fs

    bucket = "kubetune"
    manifest = s3_example("tiny-lora", name=JOB, bucket=bucket, endpoint=MINIO_ENDPOINT,
                          nodes=2, training={"maxSteps": 40})
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(manifest))
    with kind.port_forward("svc/minio", 9000) as endpoint:
        s3 = s3fs.S3FileSystem(key=MINIO_SECRET["AWS_ACCESS_KEY_ID"],
                               secret=MINIO_SECRET["AWS_SECRET_ACCESS_KEY"],
                               client_kwargs={"endpoint_url": endpoint,
                                              "region_name": REGION})
        s3.mkdir(bucket)
        try:
            kind.kubectl("apply", "-f", str(tmp_path / "job.yaml"))
            kind.kubectl("wait", f"ftj/{JOB}", "--for=jsonpath={.status.phase}=Succeeded",
                         "--timeout=1200s", timeout=1260)
        except BaseException:
            kind.collect_logs()
            raise
        started = time.monotonic()
        s3.get(f"{bucket}/{JOB}/", str(tmp_path / "adapter"), recursive=True)
        assert time.monotonic() - started < 120
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    local = tmp_path / "adapter"
    adapted = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(local / "base_model"), local)
    assert any("lora_B" in name for name, _ in adapted.named_parameters())
    assert "Succeeded" in kind.kubectl("get", "ftj", JOB)
