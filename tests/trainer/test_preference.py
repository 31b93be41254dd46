"""Preference objectives (dpo, orpo): pair checks with file:line, rewards in metrics and the
manifest, and real TRL training on CPU with tiny models (slow ones marked)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from prometheus_client import generate_latest
from transformers import TrainerCallback

from kubetune_api.contract import CHECKPOINTS_SUBDIR, MANIFEST_FILE
from kubetune_api.load import validate_job
from kubetune_trainer import checkpoints, objectives, preference, recipe
from kubetune_trainer.data import DataError, load_records
from kubetune_trainer.metrics import TrainerMetrics, metrics_callback
from kubetune_trainer.preemption import Preempted
from kubetune_trainer.tiny import train_tokenizer
from support.jobs import ROOT, example_dict, example_job

SYSTEM = {"role": "system", "content": "Be brief."}
USER = {"role": "user", "content": "Reset my password?"}


def answer(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def dpo_job(tmp_path: Path, rows: list[Any], fields: dict[str, str] | None = None) -> Any:
    data = example_dict("tiny-dpo")
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data["spec"]["dataset"] = {"train": str(path), "maxSeqLength": 64, "fields": fields or {
        "prompt": "prompt", "chosen": "chosen", "rejected": "rejected"}}
    data["spec"]["output"]["uri"] = str(tmp_path / "out")
    return validate_job(data)


def read_pairs(tmp_path: Path, rows: list[Any], fields: dict[str, str] | None = None
               ) -> list[dict[str, Any]]:
    spec = dpo_job(tmp_path, rows, fields).spec
    data = load_records(spec.dataset, spec.model.task, spec.training.seed)
    return preference.pairs(data.records("train"), spec.dataset.fields)


GOOD = {"prompt": "Q:", "chosen": " yes", "rejected": " no"}


def test_string_pairs_pass_through(tmp_path: Path) -> None:
    assert read_pairs(tmp_path, [GOOD]) == [GOOD]


@pytest.mark.parametrize(("bad", "message"), [
    ({"prompt": "Q:", "rejected": " no"}, "missing field 'chosen' (dataset.fields.chosen)"),
    ({"prompt": "Q:", "chosen": " yes", "rejected": ""}, "missing field 'rejected'"),
    ({"prompt": "Q:", "chosen": " same", "rejected": "same "}, "chosen and rejected are "
     "identical"),
    ({"prompt": "Q:", "chosen": 3, "rejected": " no"}, "must be a string, got int"),
    ({"chosen": " yes", "rejected": " no"}, "missing field 'prompt'"),
])
def test_bad_string_pairs_name_file_and_line(tmp_path: Path, bad: dict[str, Any],
                                             message: str) -> None:
    with pytest.raises(DataError) as caught:
        read_pairs(tmp_path, [GOOD, GOOD, bad])
    assert f"{tmp_path / 'pairs.jsonl'}:3: " in str(caught.value)
    assert message in str(caught.value)


def test_every_bad_record_is_listed_up_to_five(tmp_path: Path) -> None:
    bad = {"prompt": "Q:", "chosen": "x", "rejected": "x"}
    with pytest.raises(DataError) as caught:
        read_pairs(tmp_path, [bad] * 7)
    text = str(caught.value)
    assert text.count("identical") == 5 and "... and 2 more bad records" in text


CHAT = {"chosen": "chosen", "rejected": "rejected"}


def test_conversational_pairs_split_at_the_shared_turns(tmp_path: Path) -> None:
    row = {"chosen": [SYSTEM, USER, answer("Settings > Security.")],
           "rejected": [SYSTEM, USER, answer("No idea.")]}
    assert read_pairs(tmp_path, [row], CHAT) == [{
        "prompt": [SYSTEM, USER], "chosen": [answer("Settings > Security.")],
        "rejected": [answer("No idea.")]}]


@pytest.mark.parametrize(("chosen", "rejected", "message"), [
    ([USER, answer("a")], [SYSTEM, answer("b")], "must start with the same prompt turns"),
    ([USER, answer("a")], [USER, answer("a")], "identical"),
    ([USER, answer("a"), USER], [USER], "has no turn after the prompt"),
    ([USER, answer("a")], [USER, USER], "must be the assistant's, got 'user'"),
    ([USER, answer("a")], "text", "must be a non-empty list"),
    ([USER, {"role": "assistant"}], [USER, answer("b")], "message 1 must have string role"),
])
def test_bad_conversational_pairs(tmp_path: Path, chosen: Any, rejected: Any,
                                  message: str) -> None:
    with pytest.raises(DataError) as caught:
        read_pairs(tmp_path, [{"chosen": chosen, "rejected": rejected}], CHAT)
    assert f"{tmp_path / 'pairs.jsonl'}:1: " in str(caught.value)
    assert message in str(caught.value)


def test_conversations_need_a_chat_template(tmp_path: Path) -> None:
    row = {"chosen": [USER, answer("a")], "rejected": [USER, answer("b")]}
    spec = dpo_job(tmp_path, [row], CHAT).spec
    records = load_records(spec.dataset, spec.model.task, spec.training.seed).records("train")
    tokenizer = train_tokenizer("llama", ["a b c"] * 4)
    assert preference.checked_pairs(records, spec.dataset.fields, tokenizer)[0]["prompt"] == [
        USER]
    tokenizer.chat_template = None
    with pytest.raises(DataError, match="need a tokenizer with a chat template"):
        preference.checked_pairs(records, spec.dataset.fields, tokenizer)


def test_arguments_carry_beta_loss_and_length(tmp_path: Path) -> None:
    job = example_job("tiny-dpo", tmp_path, training={"preference": {"beta": 0.3,
                                                                     "loss": "ipo"}})
    args = recipe.training_arguments(job, recipe.resolve_precision("auto", False), tmp_path,
                                     has_eval=False, cuda=False,
                                     config=objectives.arguments_class(job.spec))
    assert type(args).__name__ == "DPOConfig"
    assert (args.beta, args.loss_type, args.max_length) == (0.3, ["ipo"], 64)
    # TRL defaults to checkpointing on; the spec's gradientCheckpointing (false) must win.
    assert args.activation_checkpointing is False and args.gradient_checkpointing is False
    assert args.train_sampling_strategy == "random"
    orpo = example_job("tiny-dpo", tmp_path, training={"objective": "orpo",
                                                       "preference": {"beta": 0.5}})
    args = recipe.training_arguments(orpo, recipe.resolve_precision("auto", False), tmp_path,
                                     has_eval=False, cuda=False,
                                     config=objectives.arguments_class(orpo.spec))
    assert type(args).__name__ == "ORPOConfig" and args.beta == 0.5
    assert args.activation_checkpointing is False


def test_compiled_dpo_pads_every_batch_to_max_seq_length(tmp_path: Path) -> None:
    """One shape under training.compile, as SFT (features.padding_multiple): DPO padded to
    multiples of 8 recompiled at every new length."""
    tokenizer = train_tokenizer("llama", ["a b c"] * 4)
    compiled = example_job("tiny-dpo", tmp_path, training={"compile": True}).spec
    _, collate = preference._trainer_and_collator(compiled, tokenizer)
    assert collate.pad_to_multiple_of == compiled.dataset.max_seq_length == 64
    _, collate = preference._trainer_and_collator(example_job("tiny-dpo", tmp_path).spec,
                                                  tokenizer)
    assert collate.pad_to_multiple_of is None  # on CPU without compile: the longest pair


def test_reward_facts_take_first_and_final_training_values() -> None:
    history = [{"loss": 0.7, "rewards/accuracies": 0.25, "rewards/margins": 0.0},
               {"eval_loss": 0.6, "eval_rewards/accuracies": 1.0},
               {"loss": 0.5, "rewards/accuracies": 0.75, "rewards/margins": 0.4}]
    assert preference.reward_facts(history) == {
        "rewardAccuracy": {"first": 0.25, "final": 0.75},
        "rewardMargin": {"first": 0.0, "final": 0.4}, "evalRewardAccuracy": 1.0}
    assert preference.reward_facts([{"loss": 1.0}]) == {
        "rewardAccuracy": {"first": None, "final": None},
        "rewardMargin": {"first": None, "final": None}, "evalRewardAccuracy": None}


def test_reward_gauges_follow_the_logs_and_stay_absent_for_sft() -> None:
    metrics = TrainerMetrics(0, model="m", method="lora", task="causal-lm")
    assert b"kubetune_trainer_reward_accuracy{" not in generate_latest(metrics.registry)
    callback = metrics_callback(metrics)
    callback.on_log(None, None, None, logs={"loss": 0.6, "rewards/accuracies": 0.75,
                                            "rewards/margins": 0.5, "rewards/chosen": 0.3,
                                            "rewards/rejected": -0.2})
    text = generate_latest(metrics.registry).decode()
    for name, value in (("reward_accuracy", 0.75), ("reward_margin", 0.5),
                        ("rewards_chosen", 0.3), ("rewards_rejected", -0.2)):
        assert f'kubetune_trainer_{name}{{rank="0"}} {value}' in text


def test_pair_tokens_count_both_sides() -> None:
    stacked = {"attention_mask": torch.tensor([[1, 1, 0], [1, 1, 1]])}
    split = {"chosen_attention_mask": torch.tensor([[1, 1]]),
             "rejected_attention_mask": torch.tensor([[1, 0]])}
    assert preference.count_pair_tokens(stacked) == 5
    assert preference.count_pair_tokens(split) == 3


# --- real training ---------------------------------------------------------------------------


def manifest_of(output: Path) -> dict[str, Any]:
    return json.loads((output / MANIFEST_FILE).read_text())


@pytest.mark.slow
def test_tiny_dpo_example_raises_reward_accuracy_above_half(tmp_path: Path) -> None:
    output = tmp_path / "out"
    result = recipe.run(example_job("tiny-dpo", output))
    assert result is not None
    manifest = manifest_of(output)
    metrics = manifest["metrics"]
    assert manifest["objective"] == "dpo"
    assert metrics["rewardAccuracy"]["final"] > 0.5, metrics["rewardAccuracy"]
    assert metrics["rewardMargin"]["final"] > metrics["rewardMargin"]["first"]
    assert metrics["evalRewardAccuracy"] > 0.5, metrics  # on the held-out pairs too
    assert metrics["trainLoss"] < metrics["firstTrainLoss"] and metrics["evalLoss"] < 0.69
    assert metrics["tokensPerSecond"] > 0
    # The reference is the adapter-disabled base: no "ref" adapter copy is published.
    assert not any(name.startswith("ref/") for name in manifest["files"])
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(manifest["files"])


def built_trainer(job: Any, tmp_path: Path) -> Any:
    ready = recipe.setup(job, str(tmp_path / "out"), tmp_path / "w")
    return ready, recipe.build_trainer(ready)


@pytest.mark.slow
def test_lora_reference_is_the_base_with_the_adapter_disabled(tmp_path: Path) -> None:
    _, trainer = built_trainer(example_job("tiny-dpo", tmp_path / "o"), tmp_path)
    assert trainer.ref_model is None
    assert list(trainer.model.peft_config) == ["default"]


@pytest.mark.slow
def test_full_weights_train_against_a_frozen_reference_copy(tmp_path: Path) -> None:
    job = example_job("tiny-dpo", tmp_path / "o", method={"type": "full", "lora": None},
                      training={"maxSteps": 12, "learningRate": 1e-3})
    ready, trainer = built_trainer(job, tmp_path)
    reference = trainer.ref_model
    assert reference is not None and reference is not ready.model
    assert not any(p.requires_grad for p in reference.parameters())
    before = {n: p.detach().clone() for n, p in reference.named_parameters()}
    trainer.train()
    assert all(torch.equal(before[n], p) for n, p in reference.named_parameters())
    assert not ready.model.is_activation_checkpointing  # gradientCheckpointing: false
    accuracies = [e["rewards/accuracies"] for e in trainer.state.log_history
                  if "rewards/accuracies" in e]
    assert accuracies[-1] > 0.5, accuracies


@pytest.mark.slow
def test_qlora_dpo_on_conversational_pairs_with_checkpointing(tmp_path: Path) -> None:
    output = tmp_path / "out"
    job = example_job("tiny-dpo", output, method={
        "type": "qlora", "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "quantization": {"bits": 4}}, dataset={
        "train": str(ROOT / "examples/data/chat-pairs.jsonl"), "eval": None,
        "evalFraction": 0.1, "fields": {"chosen": "chosen", "rejected": "rejected"},
        "maxSeqLength": 64}, training={"gradientCheckpointing": True})
    ready, trainer = built_trainer(job, output)
    assert any(type(m).__name__ == "Linear4bit" for m in ready.model.modules())
    # TRL casts a quantized model's adapters to bf16; the recipe's choice (fp32 masters) holds.
    trained = {p.dtype for p in trainer.model.parameters() if p.requires_grad}
    assert trained == {torch.float32}
    assert ready.model.get_base_model().is_activation_checkpointing
    assert isinstance(trainer.train_dataset[0]["prompt"], list)  # rendered by the template
    result = recipe.run(job)
    assert result is not None
    metrics = manifest_of(output)["metrics"]
    assert metrics["rewardAccuracy"]["final"] > 0.5, metrics


@pytest.mark.slow
def test_orpo_trains_without_a_reference_on_conversational_pairs(tmp_path: Path) -> None:
    output = tmp_path / "out"
    job = example_job("tiny-dpo", output, training={"objective": "orpo", "preference": None,
                                                    "epochs": 2}, dataset={
        "train": str(ROOT / "examples/data/chat-pairs.jsonl"), "eval": None,
        "fields": {"chosen": "chosen", "rejected": "rejected"}, "maxSeqLength": 64})
    result = recipe.run(job)
    assert result is not None
    manifest = manifest_of(output)
    assert manifest["objective"] == "orpo"
    metrics = manifest["metrics"]
    assert metrics["trainLoss"] < metrics["firstTrainLoss"]
    assert metrics["rewardAccuracy"]["final"] is not None


@pytest.mark.slow
def test_bad_pairs_stop_before_training_and_write_nothing(tmp_path: Path) -> None:
    job = dpo_job(tmp_path, [GOOD, {"prompt": "Q:", "chosen": "x", "rejected": "x"}])
    with pytest.raises(DataError, match=r"pairs\.jsonl:2: chosen and rejected are identical"):
        recipe.run(job)
    assert not (tmp_path / "out").exists()


class SigtermAtStep(TrainerCallback):
    """Sends this process SIGTERM at the end of a step, as the kubelet would mid-run."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


@pytest.mark.slow
def test_dpo_sigterm_checkpoints_and_the_rerun_resumes(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    output = tmp_path / "out"
    job = example_job("tiny-dpo", output, training={"maxSteps": 12, "logEverySteps": 1},
                      checkpoint={"everySteps": 100})
    plain = recipe.trainer_callbacks
    monkeypatch.setattr(recipe, "trainer_callbacks",
                        lambda ready, pre: [*plain(ready, pre), SigtermAtStep(3)])
    with pytest.raises(Preempted, match="at step 3"):  # seen before the next micro-batch
        recipe.run(job)
    assert checkpoints.complete_steps(str(output / CHECKPOINTS_SUBDIR)) == [3]
    assert not (output / MANIFEST_FILE).exists()

    monkeypatch.setattr(recipe, "trainer_callbacks", plain)
    assert recipe.run(job) is not None
    manifest = manifest_of(output)
    assert manifest["resumedFromStep"] == 3 and manifest["metrics"]["steps"] == 12
    steps = [step for step, _ in manifest["metrics"]["lossCurve"]]
    assert steps == list(range(1, 13))  # the restored history continues, nothing repeated
    assert manifest["metrics"]["rewardAccuracy"]["final"] is not None


@pytest.mark.slow
@pytest.mark.parametrize(("loss", "beta", "expected"), [
    ("sigmoid", 0.1, 0.6931),  # -log sigmoid(0)
    ("ipo", 0.1, 25.0),  # (0 - 1/(2*beta))^2
    ("ipo", 0.5, 1.0),
    ("hinge", 0.1, 1.0),  # relu(1 - 0)
])
def test_loss_and_beta_reach_trl(tmp_path: Path, loss: str, beta: float,
                                 expected: float) -> None:
    """At step 1 the adapter is zero, so policy = reference and every reward margin is 0: the
    first loss is the chosen loss function's value at 0, which depends on beta for ipo."""
    job = example_job("tiny-dpo", tmp_path / "o", training={
        "maxSteps": 1, "logEverySteps": 1, "preference": {"beta": beta, "loss": loss}})
    _, trainer = built_trainer(job, tmp_path)
    trainer.train()
    first = next(e for e in trainer.state.log_history if "loss" in e)
    assert first["loss"] == pytest.approx(expected, rel=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_orpo_beta_weights_the_odds_ratio_term(tmp_path: Path, beta: float) -> None:
    """ORPO's loss is the chosen answers' NLL minus beta times the mean log-sigmoid of the log
    odds ratio; TRL logs both parts, so the weight can be read back."""
    job = example_job("tiny-dpo", tmp_path / "o", training={
        "objective": "orpo", "maxSteps": 1, "logEverySteps": 1, "preference": {"beta": beta}})
    _, trainer = built_trainer(job, tmp_path)
    trainer.train()
    first = next(e for e in trainer.state.log_history if "loss" in e)
    assert first["loss"] == pytest.approx(first["nll_loss"] - beta * first["log_odds_ratio"],
                                          rel=1e-3)


@pytest.mark.slow
def test_full_dpo_under_deepspeed_zero2_on_two_ranks(tmp_path: Path) -> None:
    """The frozen reference copy goes through TRL's DeepSpeed preparation next to the policy."""
    output = tmp_path / "out"
    data = example_dict("tiny-dpo")
    data["spec"]["output"]["uri"] = str(output)
    data["spec"]["method"] = {"type": "full"}
    data["spec"]["training"].update(strategy="deepspeed-zero2", maxSteps=6, learningRate=1e-4)
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(data))
    # The documented path: the launcher sets threads and DS_ACCELERATOR itself.
    proc = subprocess.run([sys.executable, "-m", "kubetune", "run", str(config),
                           "--nodes", "2"], cwd=ROOT, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:]
    manifest = manifest_of(output)
    assert manifest["worldSize"] == 2 and manifest["metrics"]["steps"] == 6
    assert manifest["objective"] == "dpo" and "model.safetensors" in manifest["files"]
    assert manifest["parameters"]["trainable"] == manifest["parameters"]["total"]


@pytest.mark.slow
def test_prompts_longer_than_max_seq_length_are_a_data_error(tmp_path: Path) -> None:
    job = example_job("tiny-dpo", tmp_path / "out", dataset={"maxSeqLength": 8})
    with pytest.raises(DataError, match=r"every pair's prompt fills dataset.maxSeqLength \(8"):
        recipe.run(job)
    assert not (tmp_path / "out").exists()
