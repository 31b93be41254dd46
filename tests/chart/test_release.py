"""The release workflow pushes exactly what the chart's defaults and the docs name: the
operator, the GPU trainer in each CUDA variant, and the CPU trainer, at the pyproject version,
with SBOM and provenance; it checks the GPU base tags exist before building."""

from __future__ import annotations

import tomllib
from typing import Any

import yaml
from chartlib import CHART, ROOT, render
from test_images import CUDA_VARIANTS, PINS

from kubetune_operator import settings

RELEASE = ROOT / ".github" / "workflows" / "release.yaml"
WORKFLOW: dict[str, Any] = yaml.safe_load(RELEASE.read_text())
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def pushed() -> set[str]:
    """image:tag for every entry of the build matrix, at this version."""
    registry = WORKFLOW["env"]["REGISTRY"]
    matrix = WORKFLOW["jobs"]["images"]["strategy"]["matrix"]["include"]
    return {f"{registry}/{m['image']}:{VERSION}{m['suffix']}" for m in matrix}


def test_runs_on_version_tags_with_the_permissions_attestation_needs() -> None:
    triggers = WORKFLOW[True] if True in WORKFLOW else WORKFLOW["on"]  # YAML 1.1: on == True
    assert triggers["push"]["tags"] == ["v*"]
    assert WORKFLOW["permissions"] == {"contents": "read", "packages": "write",
                                       "id-token": "write", "attestations": "write"}


def test_pushes_the_images_the_chart_defaults_name() -> None:
    images = pushed()
    assert images == {f"ghcr.io/kubetune/operator:{VERSION}",
                      f"ghcr.io/kubetune/trainer:{VERSION}",
                      f"ghcr.io/kubetune/trainer:{VERSION}-cuda13.0",
                      f"ghcr.io/kubetune/trainer:{VERSION}-cpu"}
    objects = render()
    deployment = next(o for o in objects if o["kind"] == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert container["image"] in images
    assert env["KUBETUNE_TRAINER_IMAGE"] in images
    assert settings.DEFAULT_TRAINER_IMAGE in images
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["appVersion"] == VERSION


def test_every_cuda_variant_is_built_and_its_base_checked_first() -> None:
    matrix = WORKFLOW["jobs"]["images"]["strategy"]["matrix"]["include"]
    gpu = [m for m in matrix if m["dockerfile"] == "trainer_image/Dockerfile"]
    assert sorted(m["cuda"] for m in gpu) == sorted(CUDA_VARIANTS)
    default = next(m for m in gpu if m["suffix"] == "")
    assert default["cuda"] == CUDA_VARIANTS[0]
    assert {m["suffix"] for m in gpu} - {""} == {f"-cuda{c}" for c in CUDA_VARIANTS[1:]}
    check = next(s["run"] for s in WORKFLOW["jobs"]["prepare"]["steps"]
                 if "base images exist" in s.get("name", ""))
    assert f"for cuda in {' '.join(CUDA_VARIANTS)}; do" in check
    assert "docker buildx imagetools inspect" in check and "exit 1" in check
    assert "pytorch/pytorch:${{ steps.version.outputs.torch }}-cuda${cuda}-cudnn9-runtime" \
        in check
    assert WORKFLOW["jobs"]["images"]["needs"] == "prepare"
    assert PINS["torch"]


def test_each_image_gets_an_sbom_and_provenance() -> None:
    steps = WORKFLOW["jobs"]["images"]["steps"]
    build = next(s for s in steps if s.get("uses", "").startswith("docker/build-push-action"))
    assert build["with"]["push"] is True
    assert build["with"]["sbom"] is True and build["with"]["provenance"] == "mode=max"
    assert any(s.get("uses", "").startswith("actions/attest-build-provenance") for s in steps)


def test_the_tag_must_match_the_project_version() -> None:
    step = WORKFLOW["jobs"]["prepare"]["steps"][1]["run"]
    assert '"${GITHUB_REF_NAME}" != "v${version}"' in step
    assert '"${app}" != "${version}"' in step
