"""Settings the launcher gives every run, so users get what the tests run (no test sets
them): CPU threads per rank, DeepSpeed's accelerator on CPU-only hosts."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from kubetune_trainer import launch


@pytest.mark.parametrize(("cores", "ranks", "threads"),
                         [(8, 1, "8"), (8, 2, "4"), (8, 3, "2"), (2, 4, "1"), (1, 1, "1")])
def test_each_local_rank_gets_an_even_share_of_the_cores(
        cores: int, ranks: int, threads: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)))
    assert launch.threads_per_rank(ranks) == threads


def test_node_env_sets_threads_unless_the_user_did(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert launch.node_env(0, 2, 2, 1, 9400, tmp_path)["OMP_NUM_THREADS"] == "2"  # 8 // 4
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert launch.node_env(0, 2, 2, 1, 9400, tmp_path)["OMP_NUM_THREADS"] == "3"


def test_node_env_binds_gloo_to_loopback_for_local_nodes(tmp_path: Path) -> None:
    env = launch.node_env(1, 2, 1, 29500, 9400, tmp_path)
    assert env["GLOO_SOCKET_IFNAME"] == "lo"
    assert env["PET_MASTER_ADDR"] == "127.0.0.1" and env["KUBETUNE_METRICS_PORT"] == "9401"


def test_deepspeed_uses_the_cpu_accelerator_without_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    launch.use_cpu_accelerator_without_cuda()
    assert os.environ["DS_ACCELERATOR"] == "cpu"
    monkeypatch.setenv("DS_ACCELERATOR", "xpu")  # a user's choice stands
    launch.use_cpu_accelerator_without_cuda()
    assert os.environ["DS_ACCELERATOR"] == "xpu"


def test_with_cuda_deepspeed_is_left_to_detect(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    launch.use_cpu_accelerator_without_cuda()
    assert "DS_ACCELERATOR" not in os.environ


@pytest.mark.parametrize(("strategy", "via"), [
    ("ddp", "in-process"),
    # DeepSpeed needs a process group even for one rank: in-process it went looking for MPI
    # ("No module named 'mpi4py'") and failed at the model load.
    ("deepspeed-zero2", "torchrun"),
    ("deepspeed-zero3", "torchrun"),
])
def test_one_local_rank_runs_in_process_only_under_ddp(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, strategy: str, via: str) -> None:
    import yaml

    from support.jobs import example_dict

    data = example_dict("tiny-lora")
    data["spec"]["training"]["strategy"] = strategy
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(data))
    taken: list[str] = []
    monkeypatch.setattr(launch, "train_rank", lambda *a, **k: taken.append("in-process") or 0)
    monkeypatch.setattr(launch, "run_nodes", lambda *a, **k: taken.append("torchrun") or 0)
    assert launch.run_local(str(config), workdir=str(tmp_path)) == 0
    assert taken == [via]
