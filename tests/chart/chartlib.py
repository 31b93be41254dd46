"""Render the Helm chart with the real helm binary and look things up in the result."""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from support.tools import tool_path

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "kubetune"
CI_VALUES = sorted(CHART.glob("ci/*-values.yaml"))
# (scenario id, values file or None for the defaults)
SCENARIOS: list[tuple[str, Path | None]] = [("default", None)] + [
    (path.name.removesuffix("-values.yaml"), path) for path in CI_VALUES]
RELEASE = "kubetune"
NAMESPACE = "kubetune"
# Kubernetes minors every rendered object is validated against: the oldest the chart declares
# (Chart.yaml kubeVersion) and the current ones kubernetes-validate bundles.
KUBE_VERSIONS = ("1.29", "1.35", "1.36", "1.37")

Manifest = dict[str, Any]


def helm_path() -> str | None:
    return tool_path("helm")


def require_helm() -> str:
    helm = helm_path()
    if helm is None:
        pytest.skip("helm not found: `make helm` fetches it into .tools/helm (make test does), "
                    "or put a helm binary on PATH")
    return helm


def run_helm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([require_helm(), *args], capture_output=True, text=True, timeout=120,
                          cwd=ROOT)


def template_args(values: Path | None = None, sets: tuple[str, ...] = (),
                  include_crds: bool = True, api_versions: tuple[str, ...] = ()) -> list[str]:
    args = ["template", RELEASE, str(CHART), "--namespace", NAMESPACE]
    if include_crds:
        args.append("--include-crds")
    if values is not None:
        args += ["--values", str(values)]
    for item in sets:
        args += ["--set", item]
    for version in api_versions:  # what the cluster serves, as helm's Capabilities sees it
        args += ["--api-versions", version]
    return args


@functools.cache
def render(values: Path | None = None, sets: tuple[str, ...] = (),
           api_versions: tuple[str, ...] = ()) -> tuple[Manifest, ...]:
    """Every object `helm template` renders (CRDs from crds/ included), in order."""
    result = run_helm(*template_args(values, sets, api_versions=api_versions))
    assert result.returncode == 0, f"helm template failed:\n{result.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def values_of(values: Path | None) -> dict[str, Any]:
    """The chart defaults merged with a values file (as helm does for maps)."""
    merged: dict[str, Any] = yaml.safe_load((CHART / "values.yaml").read_text())
    if values is not None:
        _deep_merge(merged, yaml.safe_load(values.read_text()) or {})
    return merged


def _deep_merge(base: dict[str, Any], override: dict[str, Any]) -> None:
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_merge(base[key], value)
        else:
            base[key] = value


def find(objects: tuple[Manifest, ...] | list[Manifest], kind: str,
         name: str | None = None) -> list[Manifest]:
    return [o for o in objects if o["kind"] == kind
            and (name is None or o["metadata"]["name"] == name)]


def one(objects: tuple[Manifest, ...] | list[Manifest], kind: str,
        name: str | None = None) -> Manifest:
    found = find(objects, kind, name)
    assert len(found) == 1, f"expected one {kind} {name or ''}, got {len(found)}"
    return found[0]


def operator_container(objects: tuple[Manifest, ...]) -> Manifest:
    deployment = one(objects, "Deployment")
    containers: list[Manifest] = deployment["spec"]["template"]["spec"]["containers"]
    return next(c for c in containers if c["name"] == "operator")


def operator_env(objects: tuple[Manifest, ...]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom"))
            for e in operator_container(objects)["env"]}


def example_job(path: Path, namespace: str = "ml") -> Any:
    """A shipped example (examples/*.yaml) as the operator sees it: validated, in a namespace."""
    from kubetune_api.load import validate_job

    body = yaml.safe_load(path.read_text())
    body["metadata"]["namespace"] = namespace
    return validate_job(body)
