"""Two gloo ranks of one script on this machine, as torchrun would start them (RANK,
WORLD_SIZE, a free MASTER_PORT on loopback), for tests of what the trainer does across ranks."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping
from pathlib import Path

from kubetune_trainer.launch import free_port


def run_two_ranks(argv: list[str], cwd: Path, timeout: float,
                  env: Mapping[str, str] | None = None) -> list[str]:
    """Each rank's output, once both exited 0 (a failing rank fails with its output's tail)."""
    port = free_port()
    ranks = [subprocess.Popen(
        argv, cwd=cwd, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        env={**(os.environ if env is None else env), "RANK": str(r), "LOCAL_RANK": str(r),
             "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
             "MASTER_PORT": str(port), "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"})
        for r in range(2)]
    outputs = []
    for proc in ranks:
        output, _ = proc.communicate(timeout=timeout)
        assert proc.returncode == 0, output[-4000:]
        outputs.append(output)
    return outputs
