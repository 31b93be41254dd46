"""Install the CPU build of the torch that requirements/constraints.txt pins (make venv).

    .venv/bin/python requirements/cpu_torch.py [--dry-run] [--download DIR]

PyPI's Linux torch wheels are CUDA builds: `pip install torch==X` on an ordinary laptop or CI
runner pulls several GB of nvidia-* wheels that a CPU stack never uses (and that
constraints.txt does not pin). So ask pip first what it *would* install (`pip install
--dry-run --report`, metadata only): where that is already a CPU build (a `+cpu` wheel from a
local mirror, or the CPU-only wheels PyPI serves on macOS), install it as is; where it is a
CUDA build, pin `torch==X+cpu` and add PyTorch's CPU wheel index, the only place that version
exists. Afterwards the installed torch is checked: no CUDA requirements, or this fails.
`--download DIR` puts that same CPU wheel into DIR instead (make images hands it to
trainer_image/Dockerfile.cpu as TORCH_SOURCE), and checks the wheel's name is not a CUDA build.
Standard library only (runs in a venv that holds nothing but pip).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

CPU_INDEX = "https://download.pytorch.org/whl/cpu"
CONSTRAINTS = Path(__file__).resolve().parent / "constraints.txt"


def pinned_torch(constraints: Path = CONSTRAINTS) -> str:
    match = re.search(r"^torch==([^\s#]+)", constraints.read_text(), re.MULTILINE)
    if match is None:
        raise SystemExit(f"{constraints}: no torch==<version> line")
    return match.group(1)


def is_cuda_build(version: str, requires: list[str]) -> bool:
    """A torch distribution's metadata says CUDA: a +cuXXX label or nvidia-* requirements."""
    local = version.partition("+")[2]
    if local.startswith("cpu"):
        return False
    return local.startswith("cu") or any(r.lower().startswith("nvidia-") for r in requires)


def resolved_torch(version: str) -> dict[str, Any]:
    """The metadata of the torch wheel pip would pick for torch==version, nothing installed."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--quiet",
                        "--ignore-installed", "--no-deps", "--report", str(report),
                        f"torch=={version}"], check=True)
        found: dict[str, Any] = json.loads(report.read_text())["install"][0]["metadata"]
        return found


def install_args(version: str, wheel: dict[str, Any]) -> list[str]:
    """pip install arguments for the CPU build, given what pip resolves by default."""
    if is_cuda_build(wheel["version"], wheel.get("requires_dist", [])):
        return [f"torch=={version}+cpu", "--extra-index-url", CPU_INDEX]
    return [f"torch=={version}"]


def check_installed() -> str:
    dist = metadata.distribution("torch")
    if is_cuda_build(dist.version, dist.requires or []):
        raise SystemExit(f"installed torch {dist.version} is a CUDA build; expected the CPU one")
    return dist.version


def download(pip_args: list[str], folder: Path) -> Path:
    """The CPU wheel pip_args name, in folder (pip reuses one already there)."""
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary",
                    ":all:", "-d", str(folder), *pip_args], check=True)
    version = pip_args[0].removeprefix("torch==").partition("+")[0]
    wheels = sorted(folder.glob(f"torch-{version}*.whl"))
    if not wheels:
        raise SystemExit(f"cpu_torch: pip download left no torch-{version} wheel in {folder}")
    cuda = [w.name for w in wheels if is_cuda_build(w.name.split("-")[1], [])]
    if cuda:
        raise SystemExit(f"cpu_torch: {folder} holds CUDA builds {cuda}; expected the CPU one")
    return wheels[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true",
                        help="print the pip arguments instead of installing")
    parser.add_argument("--download", type=Path, metavar="DIR",
                        help="download the CPU wheel into DIR instead of installing it")
    args = parser.parse_args(argv)
    version = pinned_torch()
    pip_args = install_args(version, resolved_torch(version))
    print("cpu_torch: pip install", " ".join(pip_args), flush=True)
    if args.dry_run:
        return 0
    if args.download is not None:
        print(f"cpu_torch: downloaded {download(pip_args, args.download).name}")
        return 0
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", *pip_args], check=True)
    print(f"cpu_torch: installed torch {check_installed()} (CPU build)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
