"""Loaded by the operator process when bench/operator_scale.py --heap-top is given (this
folder first on PYTHONPATH): tracemalloc from the start, a snapshot to $KUBETUNE_HEAP_SNAPSHOT
on SIGUSR1. Not part of the operator; tracemalloc itself costs memory and time."""

import os
import signal
import tracemalloc

_PATH = os.environ.get("KUBETUNE_HEAP_SNAPSHOT", "")
if _PATH:
    tracemalloc.start(1)

    def _dump(*_: object) -> None:
        snapshot = tracemalloc.take_snapshot()
        snapshot.dump(_PATH + ".tmp")
        os.replace(_PATH + ".tmp", _PATH)

    signal.signal(signal.SIGUSR1, _dump)
