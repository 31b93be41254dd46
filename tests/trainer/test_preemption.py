"""SIGTERM in the middle of a gradient accumulation: a checkpoint of the last whole step, exit
75, and a resume that redoes the interrupted step from its first micro-batch."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest
import yaml
from transformers import TrainerCallback

from kubetune_api import contract
from kubetune_trainer import launch, recipe
from kubetune_trainer.checkpoints import complete_steps
from support.jobs import example_dict

pytestmark = pytest.mark.slow


class SigtermMidAccumulation(TrainerCallback):
    """Sends this process SIGTERM after micro-batch 2 of 4 of optimizer step 3."""

    def __init__(self) -> None:
        self.micro_steps = 0
        self.sent_at_step: int | None = None

    def on_substep_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.micro_steps += 1
        if state.global_step == 2 and self.micro_steps == 2 * 3 + 2 and not self.sent_at_step:
            self.sent_at_step = state.global_step
            os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_mid_accumulation_checkpoints_the_last_step_and_exits_75(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    data = example_dict("tiny-lora")
    output = tmp_path / "out"
    data["spec"]["output"]["uri"] = str(output)
    data["spec"]["training"].update({"maxSteps": 6, "gradientAccumulationSteps": 4,
                                     "perDeviceBatchSize": 2, "logEverySteps": 1})
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(data))
    trigger = SigtermMidAccumulation()
    build = recipe.build_trainer

    def with_trigger(ready: recipe.Setup, preemption: Any = None) -> Any:
        trainer = build(ready, preemption)
        trainer.add_callback(trigger)
        return trainer

    monkeypatch.setattr(recipe, "build_trainer", with_trigger)
    assert launch.train_rank(str(config), workdir=str(tmp_path / "w1")) == contract.EXIT_PREEMPTED
    assert trigger.sent_at_step == 2
    root = output / contract.CHECKPOINTS_SUBDIR
    assert complete_steps(str(root)) == [2]  # the last whole step, not the interrupted one
    state = json.loads((root / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    assert not (output / contract.MANIFEST_FILE).exists()

    monkeypatch.setattr(recipe, "build_trainer", build)
    # The same URI, an edited spec: another job's checkpoint, never resumed nor pruned.
    data["spec"]["training"]["learningRate"] = 1e-3
    edited = tmp_path / "edited.yaml"
    edited.write_text(yaml.safe_dump(data))
    with caplog.at_level("WARNING", logger="kubetune"):
        assert launch.train_rank(str(edited), workdir=str(tmp_path / "we")) == contract.EXIT_OK
    assert "checkpoint-2: it belongs to another job" in caplog.text
    assert json.loads((output / contract.MANIFEST_FILE).read_text())["resumedFromStep"] is None
    assert complete_steps(str(root)) == [2]

    assert launch.train_rank(str(config), workdir=str(tmp_path / "w2")) == contract.EXIT_OK
    manifest = json.loads((output / contract.MANIFEST_FILE).read_text())
    assert manifest["resumedFromStep"] == 2 and manifest["metrics"]["steps"] == 6
    assert [s for s, _ in manifest["metrics"]["lossCurve"]] == [1, 2, 3, 4, 5, 6]  # no repeats
