"""The pod spec → `podman run` options translation (tests/support/containers.py), on the pod
specs the operator builds: every field honoured or refused by name, never dropped."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from kubetune_api import contract
from kubetune_api.load import validate_job
from kubetune_operator import builders
from kubetune_operator.builders import Owner
from kubetune_operator.settings import Settings
from support.containers import PodFiles, Unsupported, pod_options, prepare_volume
from support.jobs import ftj_body

SETTINGS = Settings(trainer_image="127.0.0.1:5000/kubetune/trainer@sha256:ab")
OWNER = Owner(name="lora", namespace="default", uid="u-1", labels={})


def operator_pod(**spec: Any) -> dict[str, Any]:
    """The pod of rank 0 as the operator builds it for examples/tiny-lora.yaml."""
    body = ftj_body("lora", output={"uri": "s3://b/lora"},
                    storage={"secretName": "s3-credentials", "endpointUrl": "http://x:1"},
                    **spec)
    template = builders.build_job(validate_job(body), OWNER, 1, SETTINGS)["spec"]["template"]
    return {"metadata": {"name": "lora-a1-0", "namespace": "default", "uid": "p-1",
                         **template["metadata"]}, "spec": template["spec"]}


def files_for(pod: dict[str, Any], tmp_path: Path) -> PodFiles:
    mounts = pod["spec"]["containers"][0]["volumeMounts"]
    return PodFiles({m["name"]: tmp_path / m["name"] for m in mounts}, tmp_path / "termlog")


def options(pod: dict[str, Any], tmp_path: Path, env: list[str] | None = None) -> list[str]:
    return pod_options(pod, env or [], files_for(pod, tmp_path))


def pairs(opts: list[str], flag: str) -> list[str]:
    return [opts[i + 1] for i, o in enumerate(opts) if o == flag]


def test_the_operator_pod_becomes_the_options_a_kubelet_would_apply(tmp_path: Path) -> None:
    pod = operator_pod(pod={"memory": "3Gi", "cpu": "1500m"})
    opts = options(pod, tmp_path, ["PET_NNODES", "AWS_ACCESS_KEY_ID"])
    assert pairs(opts, "--user") == [f"{builders.NON_ROOT_UID}:{builders.NON_ROOT_UID}"]
    assert pairs(opts, "--group-add") == [str(builders.NON_ROOT_UID)]  # fsGroup
    assert {"--read-only", "--read-only-tmpfs=false", "--cap-drop=ALL"} <= set(opts)
    assert pairs(opts, "--security-opt") == ["no-new-privileges"]
    assert pairs(opts, "--network") == ["host"]
    assert pairs(opts, "--hostname") == [pod["spec"].get("hostname", "lora-a1-0")]
    assert pairs(opts, "--memory") == [str(3 * 2**30)]
    assert pairs(opts, "--cpus") == ["1.5"] and pairs(opts, "--cpu-shares") == ["1536"]
    assert pairs(opts, "-e") == ["PET_NNODES", "AWS_ACCESS_KEY_ID"]
    assert pairs(opts, "--entrypoint") == [json.dumps(list(contract.POD_COMMAND))]
    volumes = pairs(opts, "-v")
    assert f"{tmp_path / 'config'}:{contract.CONFIG_DIR}:ro" in volumes
    assert f"{tmp_path / 'tmp'}:{contract.SCRATCH_DIR}" in volumes
    assert f"{tmp_path / 'termlog'}:{contract.DEFAULT_TERMINATION_LOG}" in volumes
    shm = pairs(opts, "--tmpfs")
    assert len(shm) == 1 and shm[0].startswith("/dev/shm:rw,mode=1777,size=")


def test_a_writable_root_filesystem_is_left_writable(tmp_path: Path) -> None:
    pod = operator_pod()
    pod["spec"]["containers"][0]["securityContext"]["readOnlyRootFilesystem"] = False
    assert "--read-only" not in options(pod, tmp_path)


@pytest.mark.parametrize(("edit", "field"), [
    (lambda s: s.update(nodeSelector={"gpu": "h100"}), "spec.nodeSelector"),
    (lambda s: s.update(tolerations=[{"key": "k"}]), "spec.tolerations"),
    (lambda s: s.update(imagePullSecrets=[{"name": "p"}]), "spec.imagePullSecrets"),
    (lambda s: s.update(restartPolicy="OnFailure"), "spec.restartPolicy"),
    (lambda s: s.update(automountServiceAccountToken=True), "spec.automountServiceAccountToken"),
    (lambda s: s["containers"].append(copy.deepcopy(s["containers"][0])), "spec.containers"),
    (lambda s: s["containers"][0].update(livenessProbe={}), "spec.containers[0].livenessProbe"),
    (lambda s: s["containers"][0]["resources"]["limits"].update({"nvidia.com/gpu": "1"}),
     "spec.containers[0].resources.limits.nvidia.com/gpu"),
    (lambda s: s["containers"][0]["ports"].append({"containerPort": 1, "hostPort": 1}),
     "hostPort"),
    (lambda s: s["containers"][0]["volumeMounts"][0].update(subPath="x"), "subPath"),
    (lambda s: s["volumes"].__setitem__(0, {"name": s["volumes"][0]["name"],
                                            "persistentVolumeClaim": {"claimName": "c"}}),
     "persistentVolumeClaim"),
    (lambda s: s["securityContext"].update(runAsUser=0), "runAsNonRoot"),
    (lambda s: s["securityContext"].update(sysctls=[]), "spec.securityContext.sysctls"),
    (lambda s: s["containers"][0]["securityContext"].update(privileged=True), "privileged"),
    (lambda s: s["containers"][0]["securityContext"]["capabilities"].update(bpf=1), "bpf"),
    (lambda s: s["securityContext"].update(seccompProfile={"type": "Unconfined"}),
     "seccompProfile"),
    (lambda s: s["containers"][0].update(imagePullPolicy="Always"), "imagePullPolicy"),
])
def test_a_field_it_cannot_honour_is_refused_by_name(tmp_path: Path, edit: Any,
                                                      field: str) -> None:
    pod = operator_pod()
    edit(pod["spec"])
    with pytest.raises(Unsupported, match=field.replace("[", r"\[").replace("]", r"\]")):
        options(pod, tmp_path)


def test_volumes_are_laid_out_as_the_kubelet_does(tmp_path: Path) -> None:
    secret = {"name": "hf-token", "secret": {"secretName": "hf", "defaultMode": 0o440,
                                             "items": [{"key": "token", "path": "token"}]}}
    folder = tmp_path / "hf"
    folder.mkdir()
    prepare_volume(secret, folder, {"token": "t0k", "other": "x"}, fs_group=1000)
    assert [p.name for p in folder.iterdir()] == ["token"]  # only the listed items
    stat = (folder / "token").stat()
    assert (stat.st_mode & 0o777, stat.st_gid) == (0o440, 1000)
    empty = tmp_path / "tmp"
    empty.mkdir()
    prepare_volume({"name": "tmp", "emptyDir": {}}, empty, {}, None)
    assert empty.stat().st_mode & 0o777 == 0o777
