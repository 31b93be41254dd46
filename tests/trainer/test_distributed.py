"""Multi-node runs, resume after SIGKILL, SIGTERM checkpoints, metrics mid-run (the
strategies: test_strategy_matrix.py).

Every run here is real torchrun on loopback with gloo, through the same entry points a pod uses.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from kubetune_api import contract
from kubetune_trainer.launch import free_port, node_env
from support.jobs import ROOT, example_dict
from support.ranks import run_two_ranks

pytestmark = pytest.mark.slow
# The documented path: no test-only settings (the launcher sets threads, DS_ACCELERATOR).
ENV = dict(os.environ)


def write_job(tmp_path: Path, output: Path, **spec: dict) -> Path:
    data = example_dict("tiny-lora")
    data["spec"]["output"]["uri"] = str(output)
    for section, values in spec.items():
        data["spec"].setdefault(section, {}).update(values)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def kubetune_run(config: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "kubetune", "run", str(config), *args],
                            cwd=ROOT, env=ENV, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)


def complete_steps(root: Path) -> list[int]:
    return sorted(int(p.parent.name.removeprefix("checkpoint-"))
                  for p in root.glob(f"checkpoint-*/{contract.CHECKPOINT_MARKER_FILE}"))


def wait_for(condition, timeout: float, proc: subprocess.Popen[str]) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"run ended early ({proc.returncode}):\n{proc.stdout.read()[-3000:]}")  # type: ignore[union-attr]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def worker_of_rank(launcher: subprocess.Popen[str], rank: int) -> psutil.Process:
    for child in psutil.Process(launcher.pid).children(recursive=True):
        cmd = " ".join(child.cmdline())
        if "kubetune_trainer --config" in cmd and child.environ().get("RANK") == str(rank):
            return child
    raise AssertionError(f"no worker with RANK={rank}")


def test_two_nodes_resume_after_a_rank_is_killed(tmp_path: Path) -> None:
    output = tmp_path / "out"
    config = write_job(tmp_path, output, training={"maxSteps": 400, "logEverySteps": 5},
                       checkpoint={"everySteps": 10, "keepLast": 2},
                       resources={"nodes": 2})
    ckpt_root = output / contract.CHECKPOINTS_SUBDIR
    first = kubetune_run(config)
    wait_for(lambda: complete_steps(ckpt_root), timeout=240, proc=first)
    worker_of_rank(first, 1).send_signal(signal.SIGKILL)
    assert first.wait(timeout=120) != 0  # the gang stops as a whole, nobody hangs
    survived = complete_steps(ckpt_root)
    assert survived and not (output / contract.MANIFEST_FILE).exists()

    second = kubetune_run(config)
    log = second.communicate(timeout=600)[0]
    assert second.returncode == 0, log[-3000:]
    assert f"resuming from {ckpt_root} step {survived[-1]}" in log
    manifest = json.loads((output / contract.MANIFEST_FILE).read_text())
    assert manifest["worldSize"] == 2
    assert manifest["resumedFromStep"] == survived[-1]
    assert manifest["metrics"]["steps"] == 400
    steps = [step for step, _ in manifest["metrics"]["lossCurve"]]
    assert steps == sorted(set(steps)) and steps[-1] == 400  # the curve continues, no repeats
    assert len(complete_steps(ckpt_root)) == 2  # keepLast


def test_sigterm_saves_a_checkpoint_and_exits_75_and_metrics_move(tmp_path: Path) -> None:
    """The pod's own command: the node wrapper (torchrun) gets SIGTERM as from the kubelet."""
    output = tmp_path / "out"
    config = write_job(tmp_path, output, training={"maxSteps": 5000, "logEverySteps": 1})
    metrics_port = free_port()
    env = ENV | node_env(0, 1, 1, free_port(), metrics_port, tmp_path)
    command = [sys.executable, "-m", contract.NODE_LAUNCHER_MODULE, "-m",
               contract.TRAINER_MODULE, "--config", str(config), "--workdir", str(tmp_path / "w")]
    pod = subprocess.Popen(command, cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT)

    def scrape() -> dict[str, float]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics") as page:
                text = page.read().decode()
        except OSError:
            return {}
        return {s.name: s.value for f in text_string_to_metric_families(text)
                for s in f.samples if s.labels.get("rank") == "0"}

    wait_for(lambda: scrape().get(contract.METRIC_STEP, 0) >= 3, timeout=240, proc=pod)
    before = scrape()
    wait_for(lambda: scrape()[contract.METRIC_STEP] > before[contract.METRIC_STEP] + 2,
             timeout=60, proc=pod)
    after = scrape()
    assert after[contract.METRIC_TOTAL_STEPS] == 5000
    assert 0 < after[contract.METRIC_LOSS] < 20
    assert after[contract.METRIC_TOKENS_PER_SECOND] > 0 and after[contract.METRIC_ETA_SECONDS] > 0

    pod.send_signal(signal.SIGTERM)
    log = pod.communicate(timeout=120)[0]
    assert pod.returncode == contract.EXIT_PREEMPTED, log[-3000:]
    saved = complete_steps(output / contract.CHECKPOINTS_SUBDIR)
    assert len(saved) == 1 and saved[0] >= after[contract.METRIC_STEP]
    assert not (output / contract.MANIFEST_FILE).exists()


def test_sigterm_on_one_node_stops_every_rank_at_one_checkpoint(tmp_path: Path) -> None:
    """Two pods' commands (one rank each); only node 1 is drained (SIGTERM). The ranks agree
    through their per-step all-reduce: both stop at the same step, one checkpoint is saved
    (each rank reports the same step once), and both nodes exit 75 so the operator restarts
    the gang."""
    output = tmp_path / "out"
    config = write_job(tmp_path, output, training={"maxSteps": 5000, "logEverySteps": 1},
                       resources={"nodes": 2})
    master_port, metrics_port = free_port(), free_port()
    nodes = []
    for rank in range(2):
        workdir = tmp_path / f"node-{rank}"
        workdir.mkdir()
        env = ENV | node_env(rank, 2, 1, master_port, metrics_port, workdir)
        nodes.append(subprocess.Popen(
            [sys.executable, "-m", contract.NODE_LAUNCHER_MODULE, "-m", contract.TRAINER_MODULE,
             "--config", str(config), "--workdir", str(workdir / "w")],
            cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    try:
        def step() -> float:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics") as page:
                    text = page.read().decode()
            except OSError:
                return 0
            return next((s.value for f in text_string_to_metric_families(text)
                         for s in f.samples if s.name == contract.METRIC_STEP), 0)

        wait_for(lambda: step() >= 3, timeout=300, proc=nodes[0])
        reached = step()
        nodes[1].send_signal(signal.SIGTERM)
        logs = [node.communicate(timeout=180)[0] for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
    assert [node.returncode for node in nodes] == [contract.EXIT_PREEMPTED] * 2, \
        "\n---\n".join(log[-2000:] for log in logs)
    saved = complete_steps(output / contract.CHECKPOINTS_SUBDIR)
    assert len(saved) == 1 and saved[0] >= reached, saved
    for log in logs:
        stops = re.findall(r"kubetune: stopped by SIGTERM at step (\d+); checkpoint saved", log)
        assert stops == [str(saved[0])], log[-2000:]
    assert not (output / contract.MANIFEST_FILE).exists()


def test_invalid_spec_exits_2_through_the_node_wrapper(tmp_path: Path) -> None:
    config = write_job(tmp_path, tmp_path / "out", dataset={"train": str(tmp_path / "none.jsonl")})
    env = ENV | node_env(0, 1, 1, free_port(), free_port(), tmp_path)
    proc = subprocess.run([sys.executable, "-m", contract.NODE_LAUNCHER_MODULE, "-m",
                           contract.TRAINER_MODULE, "--config", str(config)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == contract.EXIT_INVALID_SPEC, proc.stderr[-2000:]
    assert "none.jsonl: cannot read dataset" in proc.stderr


GROUP_TIMEOUT = """
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from kubetune_api.load import load_job
from kubetune_trainer.modeling import Precision
from kubetune_trainer.recipe import training_arguments

job = load_job(sys.argv[1])
workdir = Path(sys.argv[2]) / f"rank{os.environ['RANK']}"
training_arguments(job, Precision("fp32"), workdir, has_eval=False, cuda=False)
group = dist.distributed_c10d._get_default_group()
dist.barrier()
print("timeout", group._get_backend(torch.device("cpu")).options._timeout.total_seconds())
"""


def test_the_collective_timeout_reaches_the_cpu_process_group(tmp_path: Path) -> None:
    """Two ranks create their gloo group through the trainer's own arguments: its timeout is
    spec.training.collectiveTimeoutSeconds (transformers passes ddp_timeout only on GPUs)."""
    config = write_job(tmp_path, tmp_path / "out", training={"collectiveTimeoutSeconds": 4321})
    for output in run_two_ranks([sys.executable, "-c", GROUP_TIMEOUT, str(config),
                                 str(tmp_path / "rank")], ROOT, 300, ENV):
        assert "timeout 4321.0" in output, output[-3000:]
