"""`make fault-mutations`: every row of the fault table must fail without the handling it
proves. For each patch in tests/faults/mutations/ (its first line: `row: <scenario title>`),
copy the working tree to a scratch folder, apply the patch there, and run that one row of
tests/e2e/faults.py from the copy (PYTHONPATH puts the copy's packages before the installed
ones, in the operator and in every pod's process too). A row that fails is a mutation caught.

    python tests/faults/mutate.py [--only NAME ...]

Last line: `mutations: K/N caught`. Exit status 1 unless every mutation was caught.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MUTATIONS = Path(__file__).resolve().parent / "mutations"
PACKAGES = ("api", "client", "operator", "trainer_image")  # pyproject's package folders
ROW_TIMEOUT = 900


def row_of(patch: Path) -> str:
    first = patch.read_text().splitlines()[0]
    if not first.startswith("row: "):
        raise SystemExit(f"{patch}: line 1 must be `row: <scenario title>`, not {first!r}")
    return first.removeprefix("row: ")


def scratch_copy(target: Path) -> None:
    """The working tree's tracked and untracked-but-not-ignored files (what a commit would hold
    now), without .venv, .tools or caches."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others",
                             "--exclude-standard"], cwd=ROOT, capture_output=True,
                            check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)


def run_mutation(patch: Path, workdir: Path) -> tuple[bool, str]:
    """(caught, why) for one patch."""
    copy = workdir / patch.stem
    scratch_copy(copy)
    applied = subprocess.run(["git", "apply", str(patch)], cwd=copy,
                             capture_output=True, text=True)
    if applied.returncode != 0:
        return False, f"the patch does not apply: {applied.stderr.strip()}"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(copy / p) for p in PACKAGES)}
    try:
        result = subprocess.run([sys.executable, str(copy / "tests" / "e2e" / "faults.py"),
                                 "--only", row_of(patch), "--runs", "1"], cwd=copy, env=env,
                                capture_output=True, text=True, timeout=ROW_TIMEOUT)
    except subprocess.TimeoutExpired:
        return True, f"the row ran over {ROW_TIMEOUT}s"
    table = result.stdout.strip().splitlines()
    if not table or not re.fullmatch(r"faults: \d+/1 passed", table[-1]):
        return False, f"the row did not run: {result.stderr[-2000:]}"
    why = next((line for line in result.stderr.splitlines() if line.startswith("FAILED")), "")
    return result.returncode != 0, why or "the row passed"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", help="patch names (substrings) to run")
    args = parser.parse_args(argv)
    patches = [p for p in sorted(MUTATIONS.glob("*.patch"))
               if not args.only or any(o in p.stem for o in args.only)]
    caught = 0
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="kubetune-mutations-") as tmp:
        for patch in patches:
            hit, why = run_mutation(patch, Path(tmp))
            caught += hit
            print(f"{'caught' if hit else 'MISSED'} {patch.stem} ({row_of(patch)}): {why} "
                  f"({time.monotonic() - started:.0f}s)", flush=True)
    print(f"mutations: {caught}/{len(patches)} caught")
    return 0 if patches and caught == len(patches) else 1


if __name__ == "__main__":
    sys.exit(main())
