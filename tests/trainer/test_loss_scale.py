"""One optimizer step with gradient accumulation gives the gradient (and logged loss) of the
same examples in one unaccumulated batch, for every task."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import TrainerCallback

from kubetune_trainer import recipe
from kubetune_trainer.losses import summed_label_loss
from support.jobs import example_job

pytestmark = pytest.mark.slow

RECORDS = {
    "tiny-full-classification": ("data.csv", "text,label\nthe meal was great,positive\n"
                                 "awful hotel and a rude host,negative\nfine,positive\n"
                                 "the room was cold and the food bad,negative\n"),
    "tiny-seq2seq-lora": ("data.jsonl", "".join(json.dumps({"question": q, "answer": a}) + "\n"
                                                for q, a in [("capital of France?", "Paris"),
                                                             ("capital of Peru?", "Lima"),
                                                             ("capital of Japan and its river?",
                                                              "Tokyo on the Sumida"),
                                                             ("capital of Chad?", "N'Djamena")])),
    "tiny-lora": ("data.jsonl", "".join(json.dumps({"prompt": p, "completion": c}) + "\n"
                                        for p, c in [("Say hi", " hi"),
                                                     ("Count to five", " one two three four"),
                                                     ("Name a colour", " red"),
                                                     ("Greet the team", " hello everyone")])),
}


class GradientCapture(TrainerCallback):
    def __init__(self) -> None:
        self.grads: dict[str, torch.Tensor] = {}

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None,
                              **kwargs: Any) -> None:
        self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()
                      if p.grad is not None}


def one_step(example: str, data: Path, workdir: Path, batch: int,
             accumulation: int) -> tuple[dict[str, torch.Tensor], float]:
    job = example_job(example, workdir / "out",
                      dataset={"train": str(data), "evalFraction": 0.0},
                      training={"maxSteps": 1, "perDeviceBatchSize": batch,
                                "gradientAccumulationSteps": accumulation, "maxGradNorm": 0.0,
                                "logEverySteps": 1})
    ready = recipe.setup(job, str(workdir / "out"), workdir)
    for module in ready.model.modules():  # no dropout: the same computation in both runs
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "dropout", None), float):  # T5 attention's own rate
            module.dropout = 0.0
    trainer = recipe.build_trainer(ready)
    capture = GradientCapture()
    trainer.add_callback(capture)
    trainer.train()
    [loss] = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    return capture.grads, loss


@pytest.mark.parametrize("example", sorted(RECORDS))
def test_accumulated_step_equals_one_big_batch(example: str, tmp_path: Path) -> None:
    name, content = RECORDS[example]
    data = tmp_path / name
    data.write_text(content)
    reference, reference_loss = one_step(example, data, tmp_path / "big", batch=4,
                                         accumulation=1)
    accumulated, accumulated_loss = one_step(example, data, tmp_path / "acc", batch=1,
                                             accumulation=4)
    assert reference and reference.keys() == accumulated.keys()
    for name_, grad in reference.items():
        torch.testing.assert_close(accumulated[name_], grad, rtol=1e-4, atol=1e-6,
                                   msg=f"{example}: gradient of {name_}")
    assert accumulated_loss == pytest.approx(reference_loss, rel=1e-4)


def test_summed_label_loss_divides_by_the_steps_label_count() -> None:
    logits = torch.randn(2, 3, 5)
    labels = torch.tensor([[1, -100, 2], [4, 0, -100]])
    mean = torch.nn.functional.cross_entropy(logits.reshape(-1, 5), labels.reshape(-1))
    assert torch.allclose(summed_label_loss({"logits": logits}, labels), mean)
    # Half of a step's 8 labels are in this micro-batch: it contributes half the mean's weight.
    assert torch.allclose(summed_label_loss({"logits": logits}, labels, torch.tensor(8)),
                          mean * 4 / 8)


RANK_SCRIPT = """
import sys, torch
sys.path.insert(0, {tests!r})
from test_loss_scale import one_step
from pathlib import Path
grads, loss = one_step({example!r}, Path({data!r}), Path({workdir!r}), batch=1, accumulation=2)
import torch.distributed as dist
if dist.get_rank() == 0:
    torch.save({{"grads": grads, "loss": loss}}, {result!r})
"""


@pytest.mark.parametrize("example", ["tiny-full-classification", "tiny-lora"])
def test_two_ranks_accumulating_equal_one_big_batch(example: str, tmp_path: Path) -> None:
    """2 ranks x 2 micro-batches of 1 = the reference batch of 4; the two ranks of this one
    node also share the data preparation (the second waits for the first's hand-off)."""
    import subprocess
    import sys

    from kubetune_trainer.launch import free_port

    name, content = RECORDS[example]
    data = tmp_path / name
    data.write_text(content)
    reference, reference_loss = one_step(example, data, tmp_path / "big", batch=4,
                                         accumulation=1)
    script = tmp_path / "rank.py"
    result = tmp_path / "rank0.pt"
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
    ranks = torch.load(result)
    for name_, grad in reference.items():
        torch.testing.assert_close(ranks["grads"][name_], grad, rtol=1e-4, atol=1e-6,
                                   msg=f"{example}: gradient of {name_}")
    # The Trainer logs the mean over ranks of each rank's share: the reference's loss.
    assert ranks["loss"] == pytest.approx(reference_loss, rel=1e-4)
