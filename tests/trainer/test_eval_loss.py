"""The reported eval loss is the loss per label of the whole eval set, each example counted
once: the same for any eval batch size and any number of ranks (losses.py). The Trainer's own
is a mean of batch means, and on several ranks it also counts the examples accelerate repeats
to give the ranks equal batch counts (a 2-rank run reported 0.990 for a model whose loss on
its eval set is 1.023)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kubetune_trainer import recipe
from kubetune_trainer.launch import free_port
from support.jobs import example_job

pytestmark = pytest.mark.slow

# Five examples of different lengths: no eval batch size above 1 divides them evenly.
RECORDS = {
    "tiny-full-classification": ("data.csv", "text,label\nthe meal was great,positive\n"
                                 "awful hotel and a rude host who shouted,negative\nfine,positive\n"
                                 "the room was cold and the food bad,negative\nok,positive\n"),
    "tiny-seq2seq-lora": ("data.jsonl", "".join(json.dumps({"question": q, "answer": a}) + "\n"
                                                for q, a in [("capital of France?", "Paris"),
                                                             ("capital of Peru?", "Lima"),
                                                             ("capital of Japan and its river?",
                                                              "Tokyo on the Sumida river"),
                                                             ("capital of Chad?", "N'Djamena"),
                                                             ("capital of Mali?", "Bamako")])),
    "tiny-lora": ("data.jsonl", "".join(json.dumps({"prompt": p, "completion": c}) + "\n"
                                        for p, c in [("Say hi", " hi"),
                                                     ("Count to nine", " one two three four five"
                                                                       " six seven eight nine"),
                                                     ("Name a colour", " red"),
                                                     ("Greet the team", " hello everyone"),
                                                     ("Say bye", " bye")])),
}


def setup(example: str, data: Path, workdir: Path, eval_batch: int) -> recipe.Setup:
    job = example_job(example, workdir / "out",
                      dataset={"train": str(data), "eval": str(data)},
                      training={"maxSteps": 1, "perDeviceBatchSize": eval_batch})
    return recipe.setup(job, str(workdir / "out"), workdir)


def by_hand(ready: recipe.Setup) -> float:
    """Each eval example alone through the model (its own loss, a mean over its labels),
    weighted by its label count."""
    trainer = recipe.build_trainer(ready)
    trainer.args.per_device_eval_batch_size = 1
    causal = ready.job.spec.model.task == "causal-lm"
    total = count = 0.0
    ready.model.eval()
    with torch.no_grad():
        for batch in trainer.get_eval_dataloader():
            labels = batch["labels"][:, 1:] if causal else batch["labels"]
            labelled = float((labels != -100).sum())
            total += float(ready.model(**batch).loss) * labelled
            count += labelled
    return total / count


def evaluated(ready: recipe.Setup, exact: bool = True) -> float:
    trainer = recipe.build_trainer(ready)
    if not exact:
        trainer.label_task = None  # type: ignore[attr-defined]  # the Trainer's own mean
    return float(trainer.evaluate()["eval_loss"])


@pytest.mark.parametrize("example", sorted(RECORDS))
def test_eval_loss_is_per_label_whatever_the_batch_size(example: str, tmp_path: Path) -> None:
    name, content = RECORDS[example]
    data = tmp_path / name
    data.write_text(content)
    ready = setup(example, data, tmp_path, eval_batch=2)
    expected = by_hand(ready)
    assert evaluated(ready) == pytest.approx(expected, rel=1e-5)
    ready.args.per_device_eval_batch_size = 3
    assert evaluated(ready) == pytest.approx(expected, rel=1e-5)
    if ready.job.spec.model.task != "sequence-classification":
        # The scenario tells the two apart: the Trainer weighs each batch by its examples, not
        # its tokens. (With one label per example it is right on one rank; the two-rank test
        # below is where the classifier's went wrong.)
        assert evaluated(ready, exact=False) != pytest.approx(expected, rel=1e-4)


RANK_SCRIPT = """
import json, sys
sys.path.insert(0, {tests!r})
from pathlib import Path
import torch.distributed as dist
from test_eval_loss import evaluated, setup
loss = evaluated(setup({example!r}, Path({data!r}), Path({workdir!r}), eval_batch=2))
if dist.get_rank() == 0:
    Path({result!r}).write_text(json.dumps(loss))
"""


def test_two_ranks_report_the_loss_of_one(tmp_path: Path) -> None:
    """5 eval examples, batches of 2 on 2 ranks: accelerate repeats the first example to give
    rank 1 a second batch; the reported loss must not count it."""
    example = "tiny-full-classification"
    name, content = RECORDS[example]
    data = tmp_path / name
    data.write_text(content)
    expected = by_hand(setup(example, data, tmp_path / "one", eval_batch=2))
    script, result = tmp_path / "rank.py", tmp_path / "rank0.json"
    script.write_text(RANK_SCRIPT.format(tests=str(Path(__file__).parent), example=example,
                                         data=str(data), workdir=str(tmp_path / "ddp"),
                                         result=str(result)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]),
                                          os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
                          f"--master-port={free_port()}", str(script)], env=env,
                         capture_output=True, text=True, timeout=600, check=False)
    assert run.returncode == 0, run.stderr[-4000:]
    assert json.loads(result.read_text()) == pytest.approx(expected, rel=1e-5)
