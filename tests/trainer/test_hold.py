"""The e2e fault table's pacing seam (kubetune_trainer/hold.py): ranks stop after the chosen
step while the gate exists, say so, mark SIGTERM without leaving the hold, and go on once the
gate is gone. Inert without its two variables."""

from __future__ import annotations

import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

from kubetune_trainer import hold
from kubetune_trainer.hold import HoldCallback, hold_callback


def step_end(callback: HoldCallback, step: int) -> None:
    callback.on_step_end(None, SimpleNamespace(global_step=step), None)


def test_inert_unless_both_variables_are_set(monkeypatch: pytest.MonkeyPatch,
                                             tmp_path: Path) -> None:
    monkeypatch.delenv(hold.HOLD_STEP_ENV, raising=False)
    monkeypatch.setenv(hold.HOLD_FILE_ENV, str(tmp_path / "gate"))
    assert hold_callback(None) is None
    monkeypatch.setenv(hold.HOLD_STEP_ENV, "15")
    made = hold_callback(None)
    assert made is not None and (made.step, made.gate) == (15, tmp_path / "gate")


def test_a_rank_waits_at_its_step_until_the_gate_is_gone(monkeypatch: pytest.MonkeyPatch,
                                                          tmp_path: Path) -> None:
    monkeypatch.setenv("RANK", "1")
    gate = tmp_path / "gate"
    gate.touch()
    preemption = SimpleNamespace(requested=False)
    callback = HoldCallback(15, gate, preemption)  # type: ignore[arg-type]
    step_end(callback, 14)  # another step: no hold
    held = tmp_path / "gate.held-rank1"
    assert not held.exists()
    waiting = threading.Thread(target=step_end, args=(callback, 15))
    waiting.start()
    while not held.exists() or held.read_text() != "15":  # written, not just created
        waiting.join(0.01)
    assert waiting.is_alive()
    preemption.requested = True  # SIGTERM is marked; the rank stays held
    while held.read_text() != "15 sigterm":
        waiting.join(0.01)
    assert waiting.is_alive()
    gate.unlink()
    waiting.join(10)
    assert not waiting.is_alive()
    step_end(callback, 15)  # the gate is gone: a later attempt passes step 15
