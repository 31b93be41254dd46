"""A pacing seam for the e2e fault table (docs/e2e.md): every rank stops after a chosen
optimizer step while a gate file exists, so that a fault lands at a known step.

Inert unless both KUBETUNE_HOLD_AT_STEP and KUBETUNE_HOLD_FILE are set (the e2e pod runner
sets them; the operator never does). A held rank writes `<gate>.held-rank<R>` with its step,
and goes on when the gate file is removed. SIGTERM does not end the hold: the rank appends
" sigterm" to that file, so the harness knows the signal reached it (torchrun forwards it on
its next monitor tick), and the rank checkpoints once released (the harness releases well
within the pod's grace period). So a pod being deleted stays Terminating as long as the
harness needs it to.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from kubetune_trainer.preemption import PreemptionCallback
from kubetune_trainer.ranks import global_rank

HOLD_STEP_ENV = "KUBETUNE_HOLD_AT_STEP"
HOLD_FILE_ENV = "KUBETUNE_HOLD_FILE"
POLL_SECONDS = 0.05
SIGTERM_MARK = "sigterm"  # appended to the held file once SIGTERM reached the rank


class HoldCallback(TrainerCallback):
    def __init__(self, step: int, gate: Path, preemption: PreemptionCallback | None) -> None:
        self.step, self.gate, self.preemption = step, gate, preemption

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step != self.step or not self.gate.exists():
            return
        held = self.gate.with_name(f"{self.gate.name}.held-rank{global_rank()}")
        held.write_text(str(state.global_step))
        marked = False
        while self.gate.exists():
            if not marked and self.preemption is not None and self.preemption.requested:
                held.write_text(f"{state.global_step} {SIGTERM_MARK}")
                marked = True
            time.sleep(POLL_SECONDS)


def hold_callback(preemption: PreemptionCallback | None) -> HoldCallback | None:
    step, gate = os.environ.get(HOLD_STEP_ENV), os.environ.get(HOLD_FILE_ENV)
    if not step or not gate:
        return None
    return HoldCallback(int(step), Path(gate), preemption)
