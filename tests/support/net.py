"""Loopback networking helpers for tests."""

from __future__ import annotations

import ctypes
import os
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager

import pytest


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


CLONE_NEWNET = 0x40000000


@contextmanager
def private_network() -> Iterator[None]:
    """Run the calling thread, the threads it starts and the processes it spawns in a network
    namespace of their own with only loopback up, so that documented fixed ports (the
    operator's 8000 and 8081) are free whatever else this machine runs. Needs root
    (CAP_SYS_ADMIN), which CI has; a test that needs it skips elsewhere.

    A network namespace belongs to a thread (setns(2)): sockets keep the namespace they were
    made in, so everything made inside the block stays reachable from inside it only."""
    if os.geteuid() != 0:
        pytest.skip("a private network namespace needs root (CAP_SYS_ADMIN)")
    holder = subprocess.Popen(
        ["unshare", "--net", "sh", "-c", "ip link set lo up && echo up && exec sleep infinity"],
        stdout=subprocess.PIPE)
    assert holder.stdout is not None
    if holder.stdout.readline().strip() != b"up":
        raise RuntimeError("unshare --net did not bring up a loopback")
    libc = ctypes.CDLL(None, use_errno=True)
    original = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    private = os.open(f"/proc/{holder.pid}/ns/net", os.O_RDONLY)
    try:
        if libc.setns(private, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns into the private network namespace")
        yield
    finally:
        if libc.setns(original, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns back to the original network namespace")
        os.close(private)
        os.close(original)
        holder.kill()
        holder.wait()
