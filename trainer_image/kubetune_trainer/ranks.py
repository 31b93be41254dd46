"""Where this process sits in the gang, from the variables torchrun sets (0 / 1 outside it)."""

from __future__ import annotations

import os


def global_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_rank0() -> bool:
    return global_rank() == 0


def is_local_leader() -> bool:
    """The first rank on this node: the one that touches the node's disk for all."""
    return local_rank() == 0


def node_rank() -> int:
    """This node's index in the gang (torchrun's GROUP_RANK)."""
    return int(os.environ.get("GROUP_RANK", "0"))


def node_count() -> int:
    """Nodes in the gang (kubetune starts the same number of ranks on every node)."""
    return max(1, world_size() // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
