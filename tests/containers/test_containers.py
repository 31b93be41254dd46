"""The operator and the trainer pods as containers from the project's own images (make
e2e-containers; docs/e2e.md "Pods as containers"): the images `make images` built are pushed
to a local registry on loopback and pulled back by digest; the operator runs from its image
against the emulated API server, and every trainer pod from the CPU trainer image, with the
options tests/support/containers.py translates from the operator's pod spec."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import s3fs
import yaml

from kubetune_api import contract
from support import images
from support.containers import ContainerPodRunner, OperatorContainer
from support.e2e_cluster import (
    FORCE_DELETE_AFTER_SECONDS,
    TERMINATION_GRACE_SECONDS,
    LocalCluster,
    kubectl_binary,
    s3_example,
    storage_secret,
)
from support.net import free_port
from support.operator_process import wait_for
from support.s3 import ACCESS_KEY, SECRET_KEY, MotoServer, create_bucket

pytestmark = [pytest.mark.containers, pytest.mark.e2e, pytest.mark.slow]

RUN_TIMEOUT = 420  # two trainer containers importing the stack on 2 busy cores, then seconds
TAG = images.project_version()
OPERATOR = images.IMAGES[0].name("ghcr.io/kubetune", TAG)
TRAINER = images.IMAGES[1].name("ghcr.io/kubetune", TAG)


def local_image_id(name: str) -> str | None:
    found = subprocess.run(["podman", "image", "inspect", "--format", "{{.Id}}", name],
                           capture_output=True, text=True)
    return found.stdout.strip() if found.returncode == 0 else None


@pytest.fixture(scope="session")
def pulled(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """{operator, trainer-cpu: the registry reference by digest}, pushed to a fresh registry
    on a free loopback port and pulled back from it by that digest."""
    if shutil.which("podman") is None or kubectl_binary() is None:
        pytest.skip("podman or kubectl missing: make image-tools kubectl")
    built = {key: local_image_id(name) for key, name in
             (("operator", OPERATOR), ("trainer-cpu", TRAINER))}
    if None in built.values():
        pytest.skip(f"images not built ({built}): make images")
    port = free_port()
    server = subprocess.Popen([sys.executable, str(images.ROOT / "tests/support/images.py"),
                               "registry", "--port", str(port), "--root",
                               str(tmp_path_factory.mktemp("registry"))])
    try:
        wait_for(lambda: images.registry_ready(port), 30, 0.2, "the registry")
        pushed = images.push(f"127.0.0.1:{port}/kubetune", "ghcr.io/kubetune", TAG, False)
        assert set(pushed) == {"operator", "trainer-cpu"}
        for key, reference in pushed.items():
            assert "@sha256:" in reference
            # The same image comes back by its digest: same config, same ID.
            assert images.pull_by_digest(reference, False) == built[key]
        yield pushed
    finally:
        server.terminate()
        server.wait(10)


def chart_images(pulled: dict[str, str]) -> tuple[str, str]:
    """(the operator's image, its KUBETUNE_TRAINER_IMAGE) from the chart rendered with the
    values the README's cluster install gives after `make push-images REGISTRY=...`: the
    registry pushed to and each image's digest."""
    helm = shutil.which("helm")
    if helm is None:
        pytest.fail("helm missing: make helm (make e2e-containers installs it)")
    registry = pulled["operator"].rsplit("/", 1)[0]
    sets = {"image.registry": registry, "image.digest": pulled["operator"].split("@")[1],
            "trainer.image.registry": registry,
            "trainer.image.digest": pulled["trainer-cpu"].split("@")[1]}
    rendered = subprocess.run([helm, "template", "kubetune", str(images.ROOT / "charts/kubetune"),
                               *(f"--set={key}={value}" for key, value in sets.items())],
                              capture_output=True, text=True, check=True).stdout
    deployment = next(doc for doc in yaml.safe_load_all(rendered)
                      if doc and doc["kind"] == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    env = {item["name"]: item.get("value") for item in container["env"]}
    return container["image"], env["KUBETUNE_TRAINER_IMAGE"]


class ContainerCluster(LocalCluster):
    """LocalCluster with the operator and the pods as containers of the pulled images, named
    as the chart names them."""

    def __init__(self, workdir: Path, pulled: dict[str, str]) -> None:
        super().__init__(workdir)
        self.operator_image, self.trainer_image = chart_images(pulled)
        # The chart must name exactly the images that were pushed and pulled back.
        assert (self.operator_image, self.trainer_image) == (pulled["operator"],
                                                             pulled["trainer-cpu"])

    def __enter__(self) -> ContainerCluster:
        self.api.__enter__()
        self.api.write_kubeconfig(self.kubeconfig, namespace="default", token="kubectl")
        self.operator = OperatorContainer(
            self.api, self.workdir, self.operator_image,
            KUBETUNE_HEALTH_PORT=str(free_port()),
            KUBETUNE_TRAINER_IMAGE=self.trainer_image,
            KUBETUNE_TERMINATION_GRACE_SECONDS=str(TERMINATION_GRACE_SECONDS),
            KUBETUNE_FORCE_DELETE_AFTER_SECONDS=str(FORCE_DELETE_AFTER_SECONDS)).start()
        trainer = self.trainer_image
        self.runner = ContainerPodRunner(self.api, self.workdir / "pods", {trainer: trainer})
        self.runner.__enter__()
        self.apply(storage_secret())
        return self


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory,
            pulled: dict[str, str]) -> Iterator[ContainerCluster]:
    with ContainerCluster(tmp_path_factory.mktemp("containers"), pulled) as local:
        yield local


@pytest.fixture
def s3(s3_server: MotoServer) -> s3fs.S3FileSystem:
    return s3fs.S3FileSystem(key=ACCESS_KEY, secret=SECRET_KEY,
                             client_kwargs={"endpoint_url": s3_server.endpoint})


def run_example(cluster: ContainerCluster, s3_server: MotoServer, name: str,
                **sections: dict[str, object]) -> str:
    bucket = create_bucket(s3_server.endpoint)
    manifest = s3_example("tiny-lora", name=name, bucket=bucket, endpoint=s3_server.endpoint,
                          nodes=2, **sections)
    assert "created" in cluster.apply(manifest)
    return bucket


def assert_ran_as_containers(cluster: ContainerCluster, pods: list[str]) -> None:
    assert cluster.runner is not None and not cluster.runner.errors, cluster.runner.errors
    for pod in pods:
        assert cluster.runner.log(pod), f"{pod}: no container output"


def test_tiny_lora_on_two_nodes_to_s3(cluster: ContainerCluster, s3_server: MotoServer,
                                      s3: s3fs.S3FileSystem, tmp_path: Path) -> None:
    bucket = run_example(cluster, s3_server, "lora", training={"maxSteps": 20})
    status = cluster.wait_finished("lora", RUN_TIMEOUT)
    assert status["phase"] == "Succeeded", cluster.diagnostics()
    assert_ran_as_containers(cluster, ["lora-a1-0", "lora-a1-1"])
    root = status["output"]["uri"].removeprefix("s3://")
    assert root == f"{bucket}/lora"
    manifest = json.loads(s3.cat(f"{root}/{contract.MANIFEST_FILE}"))
    assert manifest["worldSize"] == 2 and manifest["metrics"]["steps"] == 20
    local = tmp_path / "adapter"
    s3.get(f"{root}/", str(local), recursive=True)
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapted = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(local / "base_model"), local)
    assert any("lora_B" in name for name, _ in adapted.named_parameters())


def test_killed_rank_container_restarts_the_gang_and_resumes(
        cluster: ContainerCluster, s3_server: MotoServer, s3: s3fs.S3FileSystem) -> None:
    bucket = run_example(cluster, s3_server, "gang", training={"maxSteps": 40},
                         checkpoint={"everySteps": 10, "keepLast": 2})

    def checkpoints() -> list[str]:
        s3.invalidate_cache()
        return s3.glob(f"{bucket}/gang/{contract.CHECKPOINTS_SUBDIR}/checkpoint-*/"
                       f"{contract.CHECKPOINT_MARKER_FILE}")
    cluster.wait(checkpoints, "a checkpoint", RUN_TIMEOUT)
    assert cluster.runner is not None
    cluster.runner.crash("gang-a1-1")  # every process of rank 1's container: SIGKILL
    status = cluster.wait_finished("gang", 2 * RUN_TIMEOUT)
    assert status["phase"] == "Succeeded", cluster.diagnostics()
    assert (status["attempt"], status["restarts"]) == (2, 1)
    assert cluster.runner.exit_codes["gang-a1-1"] == 137
    manifest = json.loads(s3.cat(f"{bucket}/gang/{contract.MANIFEST_FILE}"))
    assert manifest["resumedFromStep"] >= 10
    assert "resuming from" in cluster.runner.log("gang-a2-0")


def test_bad_dataset_row_exits_2_and_the_job_fails_naming_the_row(
        cluster: ContainerCluster, s3_server: MotoServer, s3: s3fs.S3FileSystem) -> None:
    bucket = create_bucket(s3_server.endpoint)
    rows = (images.ROOT / "examples/data/support.jsonl").read_text().splitlines()
    rows[2] = '{"no_text_here": 1}'  # line 3
    s3.pipe(f"{bucket}/bad.jsonl", ("\n".join(rows) + "\n").encode())
    manifest = s3_example("tiny-lora", name="bad", bucket=bucket, endpoint=s3_server.endpoint,
                          nodes=2, dataset={"train": f"s3://{bucket}/bad.jsonl"})
    manifest["spec"]["dataset"].pop("eval", None)
    assert "created" in cluster.apply(manifest)
    status = cluster.wait_finished("bad", RUN_TIMEOUT)
    assert status["phase"] == "Failed", cluster.diagnostics()
    assert cluster.runner is not None
    codes = {pod: code for pod, code in cluster.runner.exit_codes.items()
             if pod.startswith("bad-")}
    assert 2 in codes.values(), codes
    message = json.dumps(status)
    assert f"s3://{bucket}/bad.jsonl:3" in message, status  # the file and the line
