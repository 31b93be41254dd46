"""Every pod the chart or the operator creates meets Pod Security Standards "restricted".

GPU trainer pods need no exception: GPUs come from the NVIDIA device plugin through the
`nvidia.com/gpu` resource (the device nodes are injected by the container runtime), so the
pods stay non-root, without privilege escalation, capabilities or host access."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from chartlib import ROOT, SCENARIOS, example_job, render, require_helm
from pss import pod_templates, violations

from kubetune_operator import builders
from kubetune_operator.builders import Owner
from kubetune_operator.settings import Settings

SCENARIO_IDS = [name for name, _ in SCENARIOS]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))

GOOD_POD: dict[str, Any] = {
    "securityContext": {"runAsNonRoot": True, "runAsUser": 1000,
                        "seccompProfile": {"type": "RuntimeDefault"}},
    "containers": [{"name": "c", "image": "x", "securityContext": {
        "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}}],
    "volumes": [{"name": "tmp", "emptyDir": {}}],
}


def patched(path: str, value: Any) -> dict[str, Any]:
    """GOOD_POD with one field set ("containers.0.securityContext.privileged" style)."""
    pod = copy.deepcopy(GOOD_POD)
    *parents, last = path.split(".")
    node: Any = pod
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node.setdefault(key, {})
    if value is None:
        del node[last]
    else:
        node[last] = value
    return pod


def test_checker_accepts_a_restricted_pod() -> None:
    assert violations(GOOD_POD) == []


@pytest.mark.parametrize(("path", "value", "control"), [
    ("hostNetwork", True, "host namespaces"),
    ("hostPID", True, "host namespaces"),
    ("containers.0.securityContext.privileged", True, "privileged"),
    ("containers.0.securityContext.allowPrivilegeEscalation", None, "privilege escalation"),
    ("containers.0.securityContext.allowPrivilegeEscalation", True, "privilege escalation"),
    ("containers.0.securityContext.capabilities", {"drop": ["NET_RAW"]}, "must drop ALL"),
    ("containers.0.securityContext.capabilities", {"drop": ["ALL"], "add": ["SYS_ADMIN"]},
     "capabilities"),
    ("containers.0.securityContext.capabilities", {"drop": ["ALL"], "add": ["CHOWN"]},
     "may only add NET_BIND_SERVICE"),
    ("securityContext.runAsNonRoot", None, "running as non-root"),
    ("containers.0.securityContext.runAsNonRoot", False, "running as non-root"),
    ("containers.0.securityContext.runAsUser", 0, "non-root user"),
    ("securityContext.seccompProfile", None, "seccomp"),
    ("containers.0.securityContext.seccompProfile", {"type": "Unconfined"}, "seccomp"),
    ("volumes", [{"name": "h", "hostPath": {"path": "/dev"}}], "hostPath"),
    ("volumes", [{"name": "n", "nfs": {"server": "s", "path": "/"}}], "volume types"),
    ("containers.0.ports", [{"containerPort": 80, "hostPort": 80}], "hostPorts"),
    ("securityContext.sysctls", [{"name": "kernel.msgmax", "value": "1"}], "sysctls"),
    ("containers.0.securityContext.seLinuxOptions", {"type": "spc_t"}, "SELinux"),
    ("containers.0.securityContext.procMount", "Unmasked", "/proc mount"),
    ("containers.0.securityContext.appArmorProfile", {"type": "Unconfined"}, "AppArmor"),
])
def test_checker_rejects_each_restricted_control(path: str, value: Any, control: str) -> None:
    found = violations(patched(path, value))
    assert any(control in v for v in found), found


def test_checker_sees_init_containers() -> None:
    pod = copy.deepcopy(GOOD_POD)
    pod["initContainers"] = [{"name": "init", "image": "x"}]
    assert any("'init'" in v for v in violations(pod))


@pytest.mark.parametrize(("scenario", "values"), SCENARIOS, ids=SCENARIO_IDS)
def test_every_chart_pod_is_restricted(scenario: str, values: Path | None) -> None:
    require_helm()
    pods = [p for obj in render(values) for p in pod_templates(obj)]
    assert {where.split("/")[0] for where, _, _ in pods} == {"Deployment", "Pod"}
    for where, spec, pod_annotations in pods:
        assert violations(spec, pod_annotations) == [], where


SETTINGS = Settings(trainer_image="registry.example/trainer:1", storage_secret="s3",
                    image_pull_secrets=("pull",), service_account="trainer")


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_every_trainer_pod_the_operator_builds_is_restricted(example: Path) -> None:
    """The operator's builders, as it calls them, for every shipped example (GPU and CPU,
    one and many nodes, with and without Kueue labels)."""
    job = example_job(example)
    for labels in ({}, {builders.LABEL_KUEUE_QUEUE: "gpu"}):
        owner = Owner(name=job_name(example), namespace="ml", uid="uid-1", labels=labels)
        for settings in (Settings(), SETTINGS, Settings(platform_assigns_uids=True)):
            manifest = builders.build_job(job, owner, 1, settings)
            [(where, spec, pod_annotations)] = list(pod_templates(manifest))
            assert violations(spec, pod_annotations) == [], f"{example.name}: {where}"


def job_name(example: Path) -> str:
    return str(yaml.safe_load(example.read_text())["metadata"]["name"])


def test_gpu_trainer_pods_need_no_exception() -> None:
    job = example_job(ROOT / "examples" / "llama2-7b-qlora.yaml")
    owner = Owner(name="llama2-7b-qlora", namespace="ml", uid="u", labels={})
    pod = builders.build_job(job, owner, 1, SETTINGS)["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["limits"][builders.GPU_RESOURCE] == "8"
    assert violations(pod) == []
    # The image runs as the uid the pod asks for (trainer_image/Dockerfile: USER 1000).
    assert pod["securityContext"]["runAsUser"] == builders.NON_ROOT_UID
