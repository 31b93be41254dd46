"""One source of truth for the images' Python dependencies, used by the Dockerfiles *and* by
the tests (so CI checks exactly what an image build checks).

    python pins.py requirements --extra operator       # pyproject deps + extra, one a line
    python pins.py check --extra trainer [--extra gpu] [--provided torch]

`requirements` prints the base dependencies of pyproject.toml plus the extras; images install
them with `pip install -c requirements/constraints.txt -r -`. `check` walks the installed
dependency closure of that list and fails unless every distribution in it is pinned in
requirements/constraints.txt at the installed version (local labels such as +cpu/+cu128
ignored). `--provided NAME` trusts a distribution the base image brings (the GPU image's CUDA
torch) without walking its own dependencies. Standard library only, plus `packaging` (or
pip's vendored copy) for `check`.
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path
from typing import Any

DEFAULT_ROOT = Path.cwd()
# `pip freeze` (make lock) leaves the packaging tools out of constraints.txt; torch requires
# setuptools at run time, so they are in the closure but can only be checked for presence.
PACKAGING_TOOLS = frozenset({"pip", "setuptools", "wheel"})


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def load_pins(constraints: Path) -> dict[str, str]:
    pins = {}
    for line in constraints.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = (part.strip() for part in line.split("==", 1))
            pins[normalize(name)] = version
    return pins


def requirements(pyproject: Path, *extras: str) -> list[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    return [*project["dependencies"],
            *(r for extra in extras for r in project["optional-dependencies"][extra])]


def _packaging() -> tuple[Any, Any]:
    try:
        from packaging.requirements import Requirement
        from packaging.utils import canonicalize_name
    except ImportError:  # a bare venv: pip vendors packaging
        from pip._vendor.packaging.requirements import Requirement  # type: ignore[no-redef]
        from pip._vendor.packaging.utils import canonicalize_name  # type: ignore[no-redef]
    return Requirement, canonicalize_name


def closure_problems(roots: list[str], pins: dict[str, str],
                     provided: frozenset[str] = frozenset()) -> tuple[list[str], set[str]]:
    """(problems, names walked) for the installed closure of the requirement strings."""
    requirement_cls, _ = _packaging()
    todo = [requirement_cls(text) for text in roots]
    seen: set[tuple[str, str]] = set()
    walked: set[str] = set()
    problems: list[str] = []
    while todo:
        req = todo.pop()
        name = normalize(req.name)
        for wanted in sorted(req.extras) or [""]:
            if (name, wanted) in seen:
                continue
            seen.add((name, wanted))
            try:
                dist = metadata.distribution(req.name)
            except metadata.PackageNotFoundError:
                problems.append(f"{req.name}: required but not installed")
                continue
            version = dist.version.split("+", 1)[0]
            if name not in walked:
                walked.add(name)
                if name not in pins:
                    if name not in provided | PACKAGING_TOOLS:
                        problems.append(f"{req.name} {dist.version}: not pinned in constraints")
                elif version != pins[name]:
                    problems.append(f"{req.name} {dist.version}: constraints pin {pins[name]}")
            if name in provided:
                continue
            for text in dist.requires or []:
                sub = requirement_cls(text)
                if sub.marker is None or sub.marker.evaluate({"extra": wanted}):
                    todo.append(sub)
    return problems, walked


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["requirements", "check"])
    parser.add_argument("--extra", required=True, action="append",
                        help="pyproject extra: operator, trainer, gpu (repeatable)")
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT,
                        help="directory with pyproject.toml and requirements/constraints.txt")
    parser.add_argument("--provided", action="append", default=[],
                        help="a distribution the base image provides (not walked)")
    args = parser.parse_args(argv)
    roots = requirements(args.root / "pyproject.toml", *args.extra)
    if args.command == "requirements":
        print("\n".join(roots))
        return 0
    pins: dict[str, str] = {}  # constraints.txt, and constraints-gpu.txt where present
    for constraints in sorted((args.root / "requirements").glob("constraints*.txt")):
        pins.update(load_pins(constraints))
    problems, walked = closure_problems(roots, pins,
                                        frozenset(normalize(p) for p in args.provided))
    if problems:
        print("requirements/constraints.txt does not cover what was installed:\n  "
              + "\n  ".join(sorted(problems)), file=sys.stderr)
        return 1
    print(f"{len(walked)} distributions of [{','.join(args.extra)}] match "
          "requirements/constraints.txt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
