"""A clean local run: progress bar or one line per logged step, --quiet, --json, the summary."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from kubetune_api.contract import MANIFEST_FILE
from kubetune_trainer import recipe
from kubetune_trainer.console import (
    Console,
    ProgressCallback,
    format_duration,
    summary_text,
)
from kubetune_trainer.env import PROGRESS_ENV, SUMMARY_ENV
from support.jobs import ROOT, example_job

SHORT = {"maxSteps": 6, "logEverySteps": 2}
RAW_DICT = re.compile(r"\{'(loss|train_runtime|eval_loss)'")


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_console_modes_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PROGRESS_ENV, raising=False)
    monkeypatch.delenv(SUMMARY_ENV, raising=False)
    console = Console.from_env()
    assert console.progress_mode(Terminal()) == "bar"
    assert console.progress_mode(io.StringIO()) == "lines"  # CI logs, pods
    monkeypatch.setenv(PROGRESS_ENV, "none")
    monkeypatch.setenv(SUMMARY_ENV, "json")
    assert Console.from_env() == Console("none", "json") and Console.from_env().quiet
    assert Console.from_env().progress_mode(Terminal()) == "none"


def test_format_duration() -> None:
    assert format_duration(None) == "?" and format_duration(float("inf")) == "?"
    assert (format_duration(5.4), format_duration(125), format_duration(3 * 3600 + 61)) == (
        "00:05", "02:05", "3:01:01")


MANIFEST = {
    "job": "j", "method": "lora", "task": "sequence-classification",
    "baseModel": {"name": "tiny://bert", "revision": None}, "precision": "fp32",
    "worldSize": 2, "parameters": {"trainable": 1234, "total": 56789},
    "metrics": {"steps": 10, "firstTrainLoss": 0.7, "trainLoss": 0.3, "evalLoss": 0.25,
                "evalPerplexity": None, "evalAccuracy": 0.875, "evalF1": 0.8571,
                "trainSeconds": 3.25, "tokensPerSecond": 1500.4, "lossCurve": []},
}


def test_summary_text_lists_what_the_run_measured() -> None:
    text = summary_text("out/x", MANIFEST)
    assert "lora sequence-classification on tiny://bert done in 10 steps (3.2 s, " \
           "1500 tokens/s, world size 2)" in text
    assert "train loss 0.7000 -> 0.3000, eval loss 0.2500, eval accuracy 0.8750, " \
           "eval macro-F1 0.8571" in text
    assert "perplexity" not in text  # not measured for a classifier
    assert "trainable parameters 1,234 of 56,789" in text and "artifact: out/x" in text


def test_terminal_gets_one_bar_with_rates_in_its_postfix(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PROGRESS_ENV, "auto")
    monkeypatch.setenv(SUMMARY_ENV, "none")
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    job = example_job("tiny-lora", tmp_path / "out", training={**SHORT, "evalEverySteps": 3})
    recipe.run(job)
    shown = terminal.getvalue()
    final = shown.split("\r")[-1]  # the bar's last state (tqdm redraws with \r)
    assert re.search(r"training: 100%\|.*\| 6/6 \[\d\d:\d\d, loss=\d+\.\d{4}, lr=5\.00e-03, "
                     r"tokens/s=\d+, eta=00:00\]", final), shown
    assert shown.count("eval at step 3: loss ") == 1  # periodic evaluation, above the bar
    assert "eval at step 6" in shown  # the last periodic one, not the final re-evaluation
    assert not RAW_DICT.search(shown)
    assert "it/s" not in shown  # the Trainer's own bar is gone


def test_quiet_prints_nothing_and_still_publishes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(PROGRESS_ENV, "none")
    monkeypatch.setenv(SUMMARY_ENV, "none")
    recipe.run(example_job("tiny-lora", tmp_path / "out", training=SHORT))
    out, err = capfd.readouterr()
    assert out == "" and "step " not in err and not RAW_DICT.search(err)
    assert (tmp_path / "out" / MANIFEST_FILE).is_file()


@pytest.mark.slow
def test_cli_json_summary_with_output_flag_and_no_output_section(tmp_path: Path) -> None:
    """The README flow for scripts: no spec.output in the file, --output on the command line,
    no terminal: one line per logged step on stderr, one JSON object on stdout."""
    text = (ROOT / "examples/tiny-lora.yaml").read_text()
    text = re.sub(r"\n  output: .*\n", "\n", text).replace("epochs: 8", "maxSteps: 6") \
        .replace("logEverySteps: 5", "logEverySteps: 2")
    assert "output" not in text
    config = tmp_path / "job.yaml"
    config.write_text(text)
    output = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "kubetune", "run", str(config), "--output", str(output),
         "--json"], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)  # nothing else on stdout
    manifest = json.loads((output / MANIFEST_FILE).read_text())
    assert summary["uri"] == str(output) and summary["metrics"] == manifest["metrics"]
    assert summary["metrics"]["steps"] == 6 and summary["metrics"]["evalPerplexity"] > 1
    steps = re.findall(r"^step (\d+)/6 loss \d+\.\d+ lr \S+ tokens/s \d+ eta \S+$",
                       proc.stderr, re.MULTILINE)
    assert steps == ["1", "2", "4", "6"], proc.stderr  # logging_first_step, then every 2
    assert not RAW_DICT.search(proc.stderr) and "%|" not in proc.stderr
    assert "Failed to load CPU gemm_4bit_forward" not in proc.stderr


def test_progress_lines_callback_unit() -> None:
    stream = io.StringIO()
    callback = ProgressCallback("lines", lambda: (1234.5, 65.0), stream)

    class State:
        is_world_process_zero, global_step, max_steps = True, 4, 10

    callback.on_train_begin(None, State(), None)
    callback.on_log(None, State(), None, logs={"loss": 1.5, "learning_rate": 1e-4,
                                               "grad_norm": 0.5})
    callback.on_log(None, State(), None, logs={"eval_loss": 1.25, "eval_perplexity": 3.49,
                                               "eval_runtime": 0.1})
    assert stream.getvalue().splitlines() == [
        "step 4/10 loss 1.5000 lr 1.00e-04 tokens/s 1234 eta 01:05",
        "eval at step 4: loss 1.2500 perplexity 3.4900",
    ]
