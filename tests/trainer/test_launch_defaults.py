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
