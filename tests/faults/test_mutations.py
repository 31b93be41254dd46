"""The patches `make fault-mutations` applies (tests/faults/mutations/, tests/faults/mutate.py)
stay usable as the code moves: each still applies to the tree, and its first line names
exactly one row of the fault table (a title that is also a word of another row's title ran
both rows, and the mutation run could not read the result)."""

from __future__ import annotations

import functools
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MUTATIONS = sorted((ROOT / "tests" / "faults" / "mutations").glob("*.patch"))


@functools.cache
def fault_table() -> object:
    spec = importlib.util.spec_from_file_location("faults", ROOT / "tests" / "e2e" / "faults.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_there_is_a_mutation_for_every_row() -> None:
    faults = fault_table()
    rows = {patch.read_text().splitlines()[0].removeprefix("row: ") for patch in MUTATIONS}
    assert rows == set(faults.TITLES)  # type: ignore[attr-defined]


@pytest.mark.parametrize("patch", MUTATIONS, ids=[p.stem for p in MUTATIONS])
def test_each_mutation_applies_and_names_one_row(patch: Path) -> None:
    row = patch.read_text().splitlines()[0].removeprefix("row: ")
    chosen = fault_table().choose([row])  # type: ignore[attr-defined]
    assert [title for title, _, _ in chosen] == [row]
    check = subprocess.run(["git", "apply", "--check", str(patch)], cwd=ROOT,
                           capture_output=True, text=True)
    assert check.returncode == 0, f"{patch.name} no longer applies: {check.stderr}"
