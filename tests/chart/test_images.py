"""The Dockerfiles, read without Docker: pinned bases, non-root users that match the pods,
the launch contract as entrypoint, and Python dependencies from the very pins `make test`
installs (the closure check the image builds run is run here on the CI venv)."""

from __future__ import annotations

import fnmatch
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from chartlib import CHART, ROOT
from packaging.requirements import Requirement
from pins import closure_problems, load_pins, requirements

from kubetune_api import contract
from kubetune_operator import builders

OPERATOR = ROOT / "operator" / "Dockerfile"
TRAINER = ROOT / "trainer_image" / "Dockerfile"
TRAINER_CPU = ROOT / "trainer_image" / "Dockerfile.cpu"
# The pyproject extras each image installs (the GPU image adds the GPU kernels).
DOCKERFILES = {OPERATOR: ("operator",), TRAINER: ("trainer", "gpu"), TRAINER_CPU: ("trainer",)}
CONSTRAINTS = ROOT / "requirements" / "constraints.txt"
PINS = load_pins(CONSTRAINTS)


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, current = [], ""
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#"):
            continue
        current += line.rstrip()
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        if current.strip():
            word, _, rest = current.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
        current = ""
    return out


def args_of(path: Path) -> dict[str, str]:
    return dict(rest.split("=", 1) for word, rest in instructions(path) if word == "ARG"
                and "=" in rest)


def last(path: Path, word: str) -> str:
    return [rest for w, rest in instructions(path) if w == word][-1]


def expand(text: str, args: dict[str, str]) -> str:
    """${NAME} replaced by the build arg's value (the Dockerfile default unless given)."""
    return re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], text)


def base_image(path: Path, **build_args: str) -> str:
    """The final stage's base (earlier stages only build files it copies)."""
    args = {**args_of(path), **build_args}
    return expand(last(path, "FROM").split()[0], args)


def final_stage(path: Path) -> list[tuple[str, str]]:
    steps = instructions(path)
    start = max(i for i, (word, _) in enumerate(steps) if word == "FROM")
    return steps[start:]


def python_check(path: Path) -> str:
    return next(rest for word, rest in instructions(path)
                if word == "RUN" and "sys.version_info" in rest)


def test_bases_are_pinned_versions() -> None:
    for path in DOCKERFILES:
        arg_defaults = args_of(path)
        for word, rest in instructions(path):
            if word != "FROM":
                continue
            image = expand(rest.split()[0], arg_defaults)
            if image in ("build",):  # a stage name
                continue
            tag = image.partition(":")[2]
            assert tag and tag != "latest" and re.search(r"\d+\.\d+", tag), f"{path}: {image}"


def test_python_bases_match_the_ci_python() -> None:
    """constraints.txt was resolved on the CI venv's Python: the images use the same minor,
    and the GPU build fails on a base image with another one."""
    minor = f"{sys.version_info.major}.{sys.version_info.minor}"
    for path in (OPERATOR, TRAINER_CPU):
        assert re.fullmatch(rf"python:{re.escape(minor)}\.\d+-slim-\w+",
                            args_of(path)["PYTHON_IMAGE"]), path
    assert args_of(TRAINER)["PYTHON_VERSION"] == minor
    check = python_check(TRAINER)
    assert "sys.version_info[:2]" in check and "${PYTHON_VERSION}" in check


def test_the_gpu_python_check_refuses_another_minor() -> None:
    """The check's own code, run here with a PYTHON_VERSION this interpreter is not."""
    check = python_check(TRAINER)
    code = re.search(r'python -c "(.*?)"\s+&&', check)
    assert code, check
    for wanted, ok in ((f"{sys.version_info.major}.{sys.version_info.minor}", True),
                       ("3.99", False)):
        script = code.group(1).replace("${PYTHON_VERSION}", wanted)
        result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
        assert (result.returncode == 0) == ok, result.stderr
        assert ok or f"constraints.txt is for {wanted}" in result.stderr


# The CUDA variants of the pinned torch's release matrix the GPU image is built for
# (.github/workflows/release.yaml pushes both); the first is the default.
CUDA_VARIANTS = ("12.6", "13.0")


@pytest.mark.parametrize("cuda", CUDA_VARIANTS)
def test_gpu_base_carries_the_pinned_torch(cuda: str) -> None:
    base = base_image(TRAINER, CUDA_VERSION=cuda)
    assert base == f"pytorch/pytorch:{PINS['torch']}-cuda{cuda}-cudnn9-runtime"
    assert args_of(TRAINER)["CUDA_VERSION"] == CUDA_VARIANTS[0]
    assert base_image(TRAINER, BASE_FLAVOR="devel").endswith("-devel")
    # ... and the build refuses a base whose torch differs from the pin.
    assert any("s/^torch==//p' requirements/constraints.txt" in rest
               and "torch.__version__" in rest and "exit 1" in rest
               for word, rest in instructions(TRAINER) if word == "RUN")


def test_gpu_image_installs_into_a_venv_over_the_base() -> None:
    """pip never writes into the base's (conda) Python: a venv that sees its CUDA torch."""
    runs = " ".join(rest for word, rest in final_stage(TRAINER) if word == "RUN")
    assert "python -m venv --system-site-packages /opt/venv" in runs
    installs = re.findall(r"(\S*)pip install", runs)
    assert installs and all(prefix == "/opt/venv/bin/" for prefix in installs), installs
    assert "/opt/venv/bin/python /usr/local/bin/kubetune-pins check" in runs
    env = " ".join(rest for word, rest in instructions(TRAINER) if word == "ENV")
    assert "PATH=/opt/venv/bin:$PATH" in env


@pytest.mark.parametrize("cuda", CUDA_VARIANTS)
def test_gpu_kernels_are_pinned_and_built_for_the_image_torch(cuda: str) -> None:
    """flash-attn (no wheel on PyPI) is built in the devel image of the very torch and CUDA the
    final stage runs, at its pin; liger-kernel comes pinned with the gpu extra."""
    gpu_pins = load_pins(ROOT / "requirements" / "constraints-gpu.txt")
    base = requirements(ROOT / "pyproject.toml")
    wanted = [r for r in requirements(ROOT / "pyproject.toml", "gpu") if r not in base]
    assert sorted(Requirement(r).name for r in wanted) == sorted(gpu_pins) == [
        "flash-attn", "liger-kernel"]
    for text in wanted:  # each pin satisfies the extra's range
        requirement = Requirement(text)
        assert requirement.specifier.contains(gpu_pins[requirement.name]), text
    assert not set(gpu_pins) & set(PINS)  # the CPU stack's lock never holds them
    stages = [rest for word, rest in instructions(TRAINER) if word == "FROM"]
    build = expand(stages[0].split()[0], {**args_of(TRAINER), "CUDA_VERSION": cuda})
    assert stages[0].endswith("AS flash-attn")
    assert build == base_image(TRAINER, CUDA_VERSION=cuda).replace("-runtime", "-devel")
    runs = " ".join(rest for word, rest in instructions(TRAINER) if word == "RUN")
    assert re.search(r"pip wheel --no-deps --no-build-isolation --wheel-dir /wheels\s+"
                     r"\"flash-attn==\$\(sed -n 's/\^flash-attn==//p' /tmp/constraints-gpu.txt\)",
                     runs), runs
    final = " ".join(rest for _, rest in final_stage(TRAINER))
    assert "--from=flash-attn /wheels /tmp/wheels" in final
    assert "--find-links /tmp/wheels" in final and "-c requirements/constraints-gpu.txt" in final
    assert "--provided torch --provided triton" in final  # the base's CUDA build of both


def test_cpu_torch_comes_from_the_pin() -> None:
    args = [rest for word, rest in instructions(TRAINER_CPU) if word == "ARG"]
    assert "TORCH_SOURCE=https://download.pytorch.org/whl/cpu" in args  # or a wheel folder
    runs = " ".join(rest for word, rest in instructions(TRAINER_CPU) if word == "RUN")
    assert '--index-url $TORCH_SOURCE' in runs and '--find-links $TORCH_SOURCE' in runs
    assert "torch==$(sed -n 's/^torch==//p' requirements/constraints.txt)" in runs


@pytest.mark.parametrize("path", list(DOCKERFILES), ids=lambda p: p.name + p.parent.name)
def test_dependencies_come_from_pyproject_extras_and_constraints(path: Path) -> None:
    extras = " ".join(f"--extra {extra}" for extra in DOCKERFILES[path])
    runs = " ".join(rest for word, rest in instructions(path) if word == "RUN")
    copies = [rest for word, rest in instructions(path) if word == "COPY"]
    assert "tests/chart/pins.py /usr/local/bin/kubetune-pins" in copies
    constraints = (("requirements/constraints.txt requirements/constraints-gpu.txt "
                    "requirements/") if "gpu" in DOCKERFILES[path]
                   else "requirements/constraints.txt requirements/")
    assert constraints in copies
    assert re.search(rf"kubetune-pins requirements {extras}\s+> /tmp/requirements.txt", runs)
    assert re.search(r"pip install (--no-compile )?-c requirements/constraints.txt .*"
                     r"-r /tmp/requirements.txt", runs), runs
    assert f"kubetune-pins check {extras}" in runs
    # No other pip install of unpinned names.
    for install in re.findall(r"pip install ([^&]*)", runs):
        words = shlex.split(install)
        named = [w for w in words if not w.startswith(("-", "$")) and "/" not in w
                 and w not in ("-c", "-r")]
        assert all(w.startswith("torch==") for w in named), install


@pytest.mark.parametrize("extra", ["operator", "trainer"])
def test_constraints_pin_every_distribution_the_images_install(extra: str) -> None:
    """The same walk the image builds run after `pip install`, on the venv `make test` built:
    every distribution in the extra's dependency closure is pinned, at the installed version."""
    problems, walked = closure_problems(requirements(ROOT / "pyproject.toml", extra), PINS)
    assert problems == []
    assert len(walked) > 10


def test_pins_cli_prints_the_extras() -> None:
    result = subprocess.run([sys.executable, str(ROOT / "tests/chart/pins.py"), "requirements",
                             "--extra", "operator"], capture_output=True, text=True, cwd=ROOT,
                            check=True)
    assert result.stdout.split() == requirements(ROOT / "pyproject.toml", "operator")
    assert not any(r.startswith(("torch", "transformers")) for r in result.stdout.split())


def uid_of(path: Path) -> int:
    user = last(path, "USER")
    assert re.fullmatch(r"\d+:\d+", user), f"{path}: USER must be numeric uid:gid ({user})"
    uid = int(user.split(":")[0])
    assert uid != 0
    return uid


def test_images_run_as_the_uid_their_pods_ask_for() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert uid_of(OPERATOR) == values["podSecurityContext"]["runAsUser"]
    assert uid_of(TRAINER) == uid_of(TRAINER_CPU) == builders.NON_ROOT_UID


def exec_form(path: Path, word: str) -> list[str]:
    return list(yaml.safe_load(last(path, word)))


def test_trainer_entrypoint_is_the_pod_command() -> None:
    for path in (TRAINER, TRAINER_CPU):
        assert exec_form(path, "ENTRYPOINT") + exec_form(path, "CMD") == \
            list(contract.POD_COMMAND)
        assert last(path, "WORKDIR") == "/opt/kubetune"
        copies = " ".join(rest for word, rest in instructions(path) if word == "COPY")
        assert "trainer_image/kubetune_trainer /opt/kubetune/kubetune_trainer" in copies
        assert "api/kubetune_api /opt/kubetune/kubetune_api" in copies
        assert "operator/" not in copies
        env = " ".join(rest for word, rest in instructions(path) if word == "ENV")
        assert "PYTHONPATH=/opt/kubetune" in env and "HF_HOME=/tmp/" in env


def test_operator_image_holds_only_the_operator() -> None:
    copies = [rest for word, rest in instructions(OPERATOR) if word == "COPY"]
    sources = " ".join(copies)
    assert "operator/kubetune_operator" in sources and "api/kubetune_api" in sources
    assert "kubetune_trainer" not in sources
    assert exec_form(OPERATOR, "ENTRYPOINT") == ["python", "-m", "kubetune_operator"]
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    exposed = {int(p) for p in last(OPERATOR, "EXPOSE").split()}
    assert exposed == {values["metrics"]["port"], values["operator"]["healthPort"]}


def dockerignore_includes() -> list[str]:
    lines = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()]
    assert "*" in lines, ".dockerignore must start from an empty context"
    return [line[1:] for line in lines if line.startswith("!")]


def test_dockerignore_sends_only_what_the_images_copy() -> None:
    includes = dockerignore_includes()
    for path in DOCKERFILES:
        for word, rest in instructions(path):
            if word != "COPY" or rest.startswith("--from"):
                continue
            *sources, _ = rest.split()
            for source in sources:
                assert any(fnmatch.fnmatch(source, pattern) or source == pattern
                           or pattern.startswith(source.rstrip("/") + "/")
                           for pattern in includes), f"{path.name}: {source} is ignored"
                assert list(ROOT.glob(source)), f"{path.name}: {source} does not exist"
    for big in (".venv", ".tools", "out", ".git", "tests/trainer"):
        assert not any(p.startswith(big) for p in includes), big
