"""torchrun with kubetune's exit codes: what each pod (one per node) runs.

    python -m kubetune_trainer.node -m kubetune_trainer --config /etc/kubetune/finetunejob.yaml

Arguments and PET_* variables are torchrun's own (this *is* torch.distributed.run). Plain
torchrun exits 1 for every failure, including SIGTERM, so the operator could not tell a
preempted node (retryable) from a bad spec (permanent). This wrapper maps them:

- a worker exited with EXIT_INVALID_SPEC (2)      -> 2
- the agent got SIGTERM / a worker exited 75       -> EXIT_PREEMPTED (75), or 0 when rank 0
                                                     had already published the artifact
- any other worker failure                         -> that worker's exit code (1 if signalled)
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from kubetune_api import contract


def exit_code_of(worker_codes: list[int]) -> int:
    """One exit code for the node from its failed workers' codes (negative = signal)."""
    for code in (contract.EXIT_INVALID_SPEC, contract.EXIT_PREEMPTED):
        if code in worker_codes:
            return code
    return next((c for c in worker_codes if c > 0), 1)


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    from kubetune_trainer.credentials import use_storage_credentials

    use_storage_credentials()  # the storage Secret's files, for every worker torchrun starts
    try:
        run(parse_args(argv if argv is not None else sys.argv[1:]))
    except ChildFailedError as failed:
        return exit_code_of([f.exitcode for f in failed.failures.values()])
    except SignalException:
        # torchrun forwarded the signal; workers saved a checkpoint if they had time. If rank 0
        # had already published, the job is done: a retry would only train it again.
        return contract.EXIT_OK if already_published() else contract.EXIT_PREEMPTED
    return contract.EXIT_OK


def already_published() -> bool:
    """Rank 0 writes its success summary to the termination log only after publishing."""
    path = os.environ.get(contract.TERMINATION_LOG_ENV, contract.DEFAULT_TERMINATION_LOG)
    try:
        return "manifestSha256" in json.loads(Path(path).read_text())
    except (OSError, ValueError, TypeError):
        return False


if __name__ == "__main__":
    sys.exit(main())
