"""A tenant floods the shared operator: labelled pods that no FineTuneJob owns.

    .venv/bin/python bench/foreign_pods.py [--pods 2000] [--annotation-kb 100]
                                           [--compare /work/main]

Anyone who may create pods can put the `kubetune.dev/finetunejob` label on them, so the
operator's watch (a server-side label selector) delivers them. Per operator tree (this one, and
with `--compare DIR` another checkout's `operator/` and `api/`, side by side in one run): a
fresh emulator and operator process; a probe FineTuneJob is timed (creation to its last child)
and the operator's RSS (VmRSS) read; then `--pods` bare pods with that label and one annotation
of `--annotation-kb` KB are created in the operator's namespace; once the operator's RSS has not
moved for 3 s, a second probe is timed and RSS read again. The last line per tree is

    tree=<dir> rss_before_mb=<> rss_after_mb=<> growth_mb=<> probe_ms_before=<> probe_ms_after=<>

Target: growth_mb well under the bytes the pods carry (2,000 x 100 KB = 195 MB): the index keeps
only pods a Job controls, and of those only what the planner reads (operator/slim.py).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

from operator_scale import (  # noqa: E402
    NAMESPACE,
    all_children,
    finetunejob,
    make_emulator,
)

from support.kube_emulator import EmulatorThread  # noqa: E402
from support.operator_process import FTJ, PODS, OperatorProcess, wait_for  # noqa: E402

LABEL_JOB = "kubetune.dev/finetunejob"


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc")


def foreign_pod(index: int, annotation_kb: int) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {
        "name": f"flood-{index:05d}", "namespace": NAMESPACE,
        "labels": {LABEL_JOB: f"victim-{index % 50}"},
        "annotations": {"example.com/blob": "x" * (annotation_kb * 1024)}},
        "spec": {"containers": [{"name": "c", "image": "busybox"}]},
        "status": {"phase": "Pending"}}


def settled_rss(pid: int, quiet: float = 3.0, timeout: float = 600.0) -> float:
    """RSS once it has not changed by more than 1 MB for `quiet` seconds."""
    deadline, last, since = time.monotonic() + timeout, rss_mb(pid), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = rss_mb(pid)
        if abs(now - last) > 1.0:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return now
    return rss_mb(pid)


def probe(api: EmulatorThread, emulator: Any, name: str) -> float:
    api.create(FTJ, finetunejob(name))
    wait_for(lambda: all_children(emulator, [name]), 300, interval=0.05, what=name)
    return (max(emulator.children_at[name].values()) - emulator.created_at[name]) * 1000


def run(tree: Path, pods: int, annotation_kb: int) -> str:
    emulator = make_emulator(0)
    code = {"PYTHONPATH": f"{tree / 'operator'}:{tree / 'api'}"}
    with EmulatorThread(emulator) as api, tempfile.TemporaryDirectory() as tmp:
        operator = OperatorProcess(api, Path(tmp), KUBETUNE_PROGRESS_INTERVAL="60",
                                   KUBETUNE_LOG_LEVEL="WARNING", **code)
        with operator:
            assert operator.process is not None
            pid = operator.process.pid
            probe(api, emulator, "warmup")
            before_ms = probe(api, emulator, "probe-before")
            before = settled_rss(pid)
            for index in range(pods):
                api.create(PODS, foreign_pod(index, annotation_kb))
            after = settled_rss(pid)
            after_ms = probe(api, emulator, "probe-after")
    return (f"tree={tree} rss_before_mb={before:.0f} rss_after_mb={after:.0f} "
            f"growth_mb={after - before:.0f} probe_ms_before={before_ms:.0f} "
            f"probe_ms_after={after_ms:.0f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pods", type=int, default=2000)
    parser.add_argument("--annotation-kb", type=int, default=100)
    parser.add_argument("--compare", type=Path, help="another checkout, run first")
    args = parser.parse_args()
    trees = [args.compare, ROOT] if args.compare else [ROOT]
    for tree in trees:
        print(run(tree, args.pods, args.annotation_kb), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
