"""Loaded by the operator process when bench/operator_scale.py --profile-top is given (this
folder first on PYTHONPATH): cProfile on the main thread (kopf's event loop) from the start,
its stats written to $KUBETUNE_CPU_PROFILE on SIGUSR2. Not part of the operator; cProfile
itself slows every call. Work sent to threads (asyncio.to_thread) is not in it."""

import cProfile
import os
import signal

_PATH = os.environ.get("KUBETUNE_CPU_PROFILE", "")
if _PATH:
    _profiler = cProfile.Profile()
    _profiler.enable()

    def _dump(*_: object) -> None:
        _profiler.disable()
        _profiler.dump_stats(_PATH + ".tmp")
        os.replace(_PATH + ".tmp", _PATH)
        _profiler.enable()

    signal.signal(signal.SIGUSR2, _dump)
