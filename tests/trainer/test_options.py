"""Training options from TRL / axolotl habits (issue 13): each reaches the library that acts on
it and changes what training does. Real tiny models on CPU; GPU-only paths in test_gpu.py."""

from __future__ import annotations

import importlib.util
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry
from safetensors.torch import load_file
from transformers import Trainer, TrainerCallback
from transformers.optimization import Adafactor

from kubetune_api.load import SpecError
from kubetune_trainer import recipe
from kubetune_trainer.evaluation import add_perplexity, classification_metrics, macro_f1
from kubetune_trainer.factories import option_arguments, peft_config
from kubetune_trainer.features import padding_multiple
from kubetune_trainer.metrics import TrainerMetrics
from kubetune_trainer.modeling import Precision, attention_implementation
from support.jobs import example_job


def args_for(tmp_path: Path, example: str = "tiny-lora", **training: Any) -> Any:
    job = example_job(example, tmp_path / "out", training=training)
    return recipe.training_arguments(job, Precision("fp32"), tmp_path, has_eval=True, cuda=False)


# --- item 1: optimizer and schedule -----------------------------------------------------------

def _optimizer_class(args: Any) -> tuple[type, dict[str, Any]]:
    model = torch.nn.Linear(2, 2)
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    return cls, kwargs


def test_optimizers_map_to_their_implementations(tmp_path: Path) -> None:
    import bitsandbytes as bnb

    cls, kwargs = _optimizer_class(args_for(tmp_path))
    assert cls is torch.optim.AdamW and not kwargs.get("fused")
    cls, kwargs = _optimizer_class(args_for(tmp_path, optimizer="adamw_fused"))
    assert cls is torch.optim.AdamW and kwargs["fused"] is True
    cls, kwargs = _optimizer_class(args_for(tmp_path, optimizer="adamw_8bit"))
    assert cls is bnb.optim.AdamW and kwargs["optim_bits"] == 8
    cls, kwargs = _optimizer_class(args_for(tmp_path, optimizer="lion"))
    assert cls is bnb.optim.Lion and kwargs["optim_bits"] == 32
    cls, kwargs = _optimizer_class(args_for(tmp_path, optimizer="adafactor"))
    assert cls is Adafactor
    # the spec's learning rate is used as is, not Adafactor's relative-step schedule
    assert kwargs["scale_parameter"] is False and kwargs["relative_step"] is False
    assert kwargs["lr"] == 5e-3


def test_paged_optimizers_liger_and_flash_attention_are_refused_on_cpu(tmp_path: Path) -> None:
    for name in ("paged_adamw_8bit", "paged_adamw_32bit"):
        with pytest.raises(SpecError, match=f"spec.training.optimizer: {name} pages"):
            args_for(tmp_path, optimizer=name)
    with pytest.raises(SpecError, match=r"spec.training.ligerKernels: .* need a CUDA GPU"):
        args_for(tmp_path, ligerKernels=True)
    with pytest.raises(SpecError, match=r"spec.model.attention: flash_attention_2 needs a CUDA"):
        attention_implementation("flash_attention_2", cuda=False, precision=Precision("fp32"))
    # auto never picks FlashAttention-2 without CUDA or in fp32; explicit choices pass through
    assert attention_implementation("auto", cuda=False, precision=Precision("bf16")) is None
    assert attention_implementation("auto", cuda=True, precision=Precision("fp32")) is None
    assert attention_implementation("eager", cuda=False, precision=Precision("fp32")) == "eager"


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb installed")
def test_a_tracker_that_is_not_installed_is_named(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=r"spec.training.reportTo: wandb is not installed"):
        args_for(tmp_path, reportTo=["wandb"])


def test_speed_and_tracking_switches_reach_the_trainer(tmp_path: Path) -> None:
    args = args_for(tmp_path, compile=True, neftuneNoiseAlpha=5.0,
                    reportTo=["tensorboard", "mlflow"])
    assert args.torch_compile and args.neftune_noise_alpha == 5.0
    assert args.report_to == ["tensorboard", "mlflow"]
    default = args_for(tmp_path)
    assert default.report_to == [] and not default.torch_compile and not default.use_liger_kernel
    assert default.neftune_noise_alpha is None
    assert option_arguments(example_job("tiny-lora", "o").spec.training, cuda=True)[
        "optim"] == "adamw_torch"


def test_compile_pads_every_batch_to_one_shape(tmp_path: Path) -> None:
    spec = example_job("tiny-lora", tmp_path, training={"compile": True}).spec
    assert padding_multiple(spec, cuda=False) == spec.dataset.max_seq_length == 64
    plain = example_job("tiny-lora", tmp_path).spec
    assert padding_multiple(plain, cuda=False) is None
    assert padding_multiple(plain, cuda=True) == 8


def test_min_learning_rate_ratio_floors_the_cosine_decay(tmp_path: Path) -> None:
    def final_lr(**training: Any) -> float:
        args = args_for(tmp_path, lrScheduler="cosine", learningRate=1e-2, **training)
        trainer = Trainer(model=torch.nn.Linear(2, 2), args=args)
        trainer.create_optimizer_and_scheduler(num_training_steps=10)
        assert trainer.lr_scheduler is not None
        for _ in range(10):
            trainer.optimizer.step()
            trainer.lr_scheduler.step()
        return float(trainer.lr_scheduler.get_last_lr()[0])

    assert final_lr() == pytest.approx(0.0, abs=1e-9)
    assert final_lr(minLearningRateRatio=0.1) == pytest.approx(1e-3)


def _first_loss(tmp_path: Path, name: str, **training: Any) -> float:
    job = example_job("tiny-lora", tmp_path / name, training={"maxSteps": 1, **training})
    ready = recipe.setup(job, str(tmp_path / name), tmp_path / f"work-{name}")
    trainer = recipe.build_trainer(ready)
    trainer.train()
    return float(trainer.state.log_history[0]["loss"])


@pytest.mark.slow
def test_neftune_noise_changes_the_training_forward(tmp_path: Path) -> None:
    plain = _first_loss(tmp_path, "a")
    assert _first_loss(tmp_path, "b") == plain  # deterministic without noise
    assert _first_loss(tmp_path, "c", neftuneNoiseAlpha=50.0) != plain


# --- item 2: attention -----------------------------------------------------------------------

@pytest.mark.parametrize("attention", ["eager", "sdpa", "auto"])
def test_attention_implementation_is_loaded_and_said(tmp_path: Path, attention: str,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    job = example_job("tiny-lora", tmp_path / "out", model={"attention": attention})
    ready = recipe.setup(job, str(tmp_path / "out"), tmp_path / "work")
    used = "sdpa" if attention == "auto" else attention  # on CPU auto is transformers' pick
    assert ready.model.config._attn_implementation == used
    err = capsys.readouterr().err
    assert f"kubetune: attention: {used} (model.attention: {attention}" in err
    assert ("auto; FlashAttention-2 needs CUDA)" in err) == (attention == "auto")


def test_auto_attention_says_why_it_is_not_flash(monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    from kubetune_trainer import modeling

    def note(used: str, cuda: bool, precision: str, installed: bool = True) -> str:
        monkeypatch.setattr(modeling, "is_flash_attn_2_available", lambda: installed)
        model = SimpleNamespace(config=SimpleNamespace(_attn_implementation=used))
        return modeling.attention_note(model, "auto", cuda, Precision(precision))  # type: ignore[arg-type]

    assert note("sdpa", False, "bf16").endswith("auto; FlashAttention-2 needs CUDA)")
    assert note("sdpa", True, "fp32").endswith("no fp32 kernels)")
    assert note("sdpa", True, "bf16", installed=False).endswith("not in this image)")
    assert note("sdpa", True, "bf16").endswith("does not support FlashAttention-2)")
    assert note("flash_attention_2", True, "bf16").startswith("attention: flash_attention_2")


# --- item 3: LoRA variants, new tokens --------------------------------------------------------

def test_lora_variant_settings_reach_peft(tmp_path: Path) -> None:
    job = example_job("tiny-lora", tmp_path, method={"type": "lora", "lora": {
        "r": 4, "alpha": 8, "useDora": True, "useRslora": True,
        "modulesToSave": ["embed_tokens"]}})
    config = peft_config(job.spec.method, "causal-lm")
    assert config is not None and config.use_dora and config.use_rslora
    assert config.modules_to_save == ["embed_tokens"]
    plain = peft_config(example_job("tiny-lora", tmp_path).spec.method, "causal-lm")
    assert plain is not None and not plain.use_dora and not plain.use_rslora
    assert plain.modules_to_save is None


@pytest.mark.slow
def test_dora_rslora_and_new_tokens_train_and_reload(tmp_path: Path) -> None:
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    output = tmp_path / "out"
    job = example_job("tiny-lora", output, training={"maxSteps": 4},
                      dataset={"addSpecialTokens": ["<|tool|>"]},
                      method={"type": "lora", "lora": {
                          "r": 4, "alpha": 8, "dropout": 0.0, "useDora": True,
                          "useRslora": True, "modulesToSave": ["embed_tokens", "lm_head"]}})
    ready = recipe.setup(job, str(output), tmp_path / "work")
    tool = ready.tokenizer.convert_tokens_to_ids("<|tool|>")
    assert ready.tokenizer("a <|tool|> b")["input_ids"].count(tool) == 1  # never split
    assert ready.model.get_input_embeddings().weight.shape[0] == len(ready.tokenizer)
    names = {n for n, p in ready.model.named_parameters() if p.requires_grad}
    assert any("lora_magnitude_vector" in n for n in names)  # DoRA
    assert any("embed_tokens.modules_to_save" in n for n in names)
    layer = next(m for m in ready.model.modules() if isinstance(m, LoraLayer))
    assert layer.scaling["default"] == pytest.approx(8 / math.sqrt(4))  # rsLoRA: alpha/sqrt(r)
    trainer = recipe.build_trainer(ready)
    trainer.train()
    recipe.save(ready, trainer, recipe.summarize(ready, trainer, {}, 1.0))

    saved = load_file(str(output / "adapter_model.safetensors"))
    assert any("embed_tokens" in k for k in saved) and any("magnitude" in k for k in saved)
    tokenizer = AutoTokenizer.from_pretrained(output)
    assert tokenizer.convert_tokens_to_ids("<|tool|>") == tool
    base = AutoModelForCausalLM.from_pretrained(output / "base_model")
    base.resize_token_embeddings(len(tokenizer))  # as docs/trainer.md says
    reloaded = PeftModel.from_pretrained(base, output).eval()
    batch = tokenizer(["Customer: <|tool|> reset"], return_tensors="pt")
    ready.model.eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(**batch).logits, ready.model(**batch).logits, atol=1e-5)


def test_new_tokens_under_lora_need_the_embeddings_in_modules_to_save(tmp_path: Path) -> None:
    job = example_job("tiny-lora", tmp_path / "out", dataset={"addSpecialTokens": ["<x>"]})
    with pytest.raises(SpecError, match=r"spec.dataset.addSpecialTokens: .*'embed_tokens'"):
        recipe.setup(job, str(tmp_path / "out"), tmp_path / "work")


# --- item 4: evaluation that means something ------------------------------------------------

def test_macro_f1_and_accuracy_match_their_definitions() -> None:
    labels = np.array([0, 0, 1, 1, 2])
    predicted = np.array([0, 1, 1, 1, 0])
    # per class F1: 0 -> 2*1/(2+1+1)=0.5, 1 -> 2*2/(4+1)=0.8, 2 -> 0; macro = mean
    assert macro_f1(predicted, labels) == pytest.approx((0.5 + 0.8 + 0.0) / 3)

    class Prediction:
        predictions, label_ids = predicted, labels

    assert classification_metrics(Prediction()) == {
        "accuracy": pytest.approx(0.6), "f1": pytest.approx(1.3 / 3)}
    metrics = {"eval_loss": 2.0}
    add_perplexity(metrics)
    assert metrics["eval_perplexity"] == pytest.approx(math.exp(2.0))


def test_eval_metrics_become_prometheus_series() -> None:
    metrics = TrainerMetrics(0, model="m", method="lora", task="t",
                             registry=CollectorRegistry())
    metrics.on_eval({"eval_loss": 0.5, "eval_accuracy": 0.75, "eval_f1": 0.7})
    get = metrics.registry.get_sample_value
    assert get("kubetune_trainer_eval_accuracy", {"rank": "0"}) == 0.75
    assert get("kubetune_trainer_eval_f1", {"rank": "0"}) == 0.7
    assert get("kubetune_trainer_eval_loss", {"rank": "0"}) == 0.5
    assert get("kubetune_trainer_eval_perplexity", {"rank": "0"}) is None  # not measured


@pytest.mark.slow
def test_classifier_reports_accuracy_and_macro_f1_of_its_eval_set(tmp_path: Path) -> None:
    job = example_job("tiny-full-classification", tmp_path / "out", training={"epochs": 2})
    ready = recipe.setup(job, str(tmp_path / "out"), tmp_path / "work")
    trainer = recipe.build_trainer(ready)
    trainer.train()
    evaluated = recipe.evaluate(ready, trainer)
    # recompute by hand from the model's own predictions on the eval features
    model = ready.model.eval()
    features = ready.eval_features  # a list or a datasets.Dataset: index rows either way
    batch = trainer.data_collator([features[i] for i in range(len(features))])
    with torch.no_grad():
        predicted = model(input_ids=batch["input_ids"],
                          attention_mask=batch["attention_mask"]).logits.argmax(-1).numpy()
    labels = batch["labels"].numpy()
    assert evaluated["eval_accuracy"] == pytest.approx(float((predicted == labels).mean()))
    assert evaluated["eval_f1"] == pytest.approx(macro_f1(predicted, labels))
    facts = recipe.summarize(ready, trainer, evaluated, 1.0)["metrics"]
    assert facts["evalAccuracy"] == evaluated["eval_accuracy"]
    assert facts["evalF1"] == evaluated["eval_f1"] and facts["evalPerplexity"] is None
    get = ready.metrics.registry.get_sample_value
    assert get("kubetune_trainer_eval_accuracy", {"rank": "0"}) == evaluated["eval_accuracy"]


class ScriptedEvalLoss(TrainerCallback):
    """Makes one chosen step the best evaluation of training, whatever the machine's
    floating-point path does to the real losses: the Trainer picks the best checkpoint from the
    metrics dict that on_evaluate receives (after logging the real value). The final evaluation,
    after training, is left real."""

    def __init__(self, best_step: int) -> None:
        self.best_step, self.training = best_step, False

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.training = True

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.training = False

    def on_evaluate(self, args: Any, state: Any, control: Any, metrics: dict[str, float],
                    **kwargs: Any) -> None:
        if self.training:
            metrics["eval_loss"] = 1.0 if state.global_step == self.best_step else 100.0


@pytest.mark.slow
def test_early_stopping_stops_when_the_metric_stalls(tmp_path: Path) -> None:
    # No change can beat a threshold of 100: the second evaluation already counts as a stall.
    job = example_job("tiny-lora", tmp_path / "out", training={
        "maxSteps": 20, "evalEverySteps": 2, "earlyStopping": {"patience": 1,
                                                              "threshold": 100.0}})
    result = recipe.run(job)
    assert result is not None and result.manifest["metrics"]["steps"] == 4


@pytest.mark.slow
def test_load_best_at_end_publishes_the_best_checkpoint(tmp_path: Path) -> None:
    output = tmp_path / "out"
    job = example_job("tiny-lora", output, training={
        "maxSteps": 12, "evalEverySteps": 2, "loadBestAtEnd": True, "logEverySteps": 2},
        checkpoint={"keepLast": 10})
    ready = recipe.setup(job, str(output), tmp_path / "work")
    trainer = recipe.build_trainer(ready)
    best_step = 4  # scored best: the last weights are not the best ones
    trainer.add_callback(ScriptedEvalLoss(best_step))
    trainer.train()
    evals = {e["step"]: e["eval_loss"] for e in trainer.state.log_history if "eval_loss" in e}
    assert trainer.state.best_global_step == best_step, evals
    evaluated = recipe.evaluate(ready, trainer)
    assert evaluated["eval_loss"] == pytest.approx(evals[best_step], rel=1e-5)
    recipe.save(ready, trainer, recipe.summarize(ready, trainer, evaluated, 1.0))
    published = load_file(str(output / "adapter_model.safetensors"))
    best = load_file(str(output / "checkpoints" / f"checkpoint-{best_step}" /
                         "adapter_model.safetensors"))
    assert published.keys() == best.keys()
    assert all(torch.equal(published[k], best[k]) for k in published)
    assert not (tmp_path / "work" / "checkpoints").exists() or len(list(
        (tmp_path / "work" / "checkpoints").iterdir())) <= 1  # only the best stays locally


# --- items 5 and 6: tracking and samples ----------------------------------------------------

@pytest.mark.slow
def test_tensorboard_mlflow_perplexity_and_samples(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    from mlflow.tracking import MlflowClient
    from peft import PeftModel
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from transformers import AutoModelForCausalLM, AutoTokenizer

    store = tmp_path / "mlruns"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 wants a database else
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "never-printed-7d1f")
    output = tmp_path / "out"
    prompts = ["Customer: How do I reset my password?\nAgent:", "Customer: Export?\nAgent:"]
    job = example_job("tiny-lora", output, training={
        "maxSteps": 6, "logEverySteps": 2, "reportTo": ["tensorboard", "mlflow"]},
        output={"samples": {"prompts": prompts, "maxNewTokens": 5}})
    result = recipe.run(job)
    assert result is not None
    manifest, metrics = result.manifest, result.manifest["metrics"]
    assert metrics["evalPerplexity"] == pytest.approx(math.exp(metrics["evalLoss"]))
    assert metrics["evalAccuracy"] is None and metrics["evalF1"] is None

    # TensorBoard: event files published under logs/, readable by tensorboard's own reader
    event_files = [f for f in manifest["files"] if f.startswith("logs/events.out.tfevents")]
    assert event_files
    steps: list[int] = []
    for name in event_files:
        events = EventAccumulator(str(output / name))
        events.Reload()
        if "train/loss" in events.Tags()["scalars"]:
            steps += [e.step for e in events.Scalars("train/loss")]
    assert steps == [1, 2, 4, 6]

    # MLflow: one run named after the job, with the loss history and the final eval
    client = MlflowClient(store.as_uri())
    runs = client.search_runs(experiment_ids=["0"])
    assert len(runs) == 1 and runs[0].info.run_name == job.name
    assert runs[0].info.status == "FINISHED"
    history = client.get_metric_history(runs[0].info.run_id, "loss")
    assert [m.step for m in history] == [1, 2, 4, 6]
    assert "eval_loss" in runs[0].data.metrics
    out, err = capfd.readouterr()
    assert "never-printed-7d1f" not in out + err

    # samples.jsonl: the trained model's greedy completions, reproducible from the artifact
    lines = (output / "samples.jsonl").read_text().splitlines()
    assert "samples.jsonl" in manifest["files"] and len(lines) == 2
    import json

    samples = [json.loads(line) for line in lines]
    assert [s["prompt"] for s in samples] == prompts
    tokenizer = AutoTokenizer.from_pretrained(output)
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(output / "base_model"), output).eval()
    inputs = tokenizer(prompts[0], return_tensors="pt")
    generated = model.generate(**inputs, max_new_tokens=5, do_sample=False,
                               pad_token_id=tokenizer.pad_token_id)
    expected = tokenizer.decode(generated[0, inputs["input_ids"].shape[1]:],
                                skip_special_tokens=True)
    assert samples[0]["completion"] == expected


def test_load_best_at_end_saves_at_evaluations_and_on_every_node(tmp_path: Path) -> None:
    args = args_for(tmp_path, evalEverySteps=3, loadBestAtEnd=True)
    assert args.load_best_model_at_end and args.metric_for_best_model == "eval_loss"
    assert (args.save_strategy, args.save_steps) == ("steps", 3) and not args.greater_is_better
    assert not args.save_on_each_node  # one node
    job = example_job("tiny-lora", tmp_path / "out", resources={"nodes": 2},
                      training={"evalEverySteps": 3, "loadBestAtEnd": True},
                      checkpoint={"everySteps": 6})
    args = recipe.training_arguments(job, Precision("fp32"), tmp_path, has_eval=True,
                                     cuda=False)
    assert args.save_steps == 6 and args.save_on_each_node
    with pytest.raises(SpecError, match="earlyStopping and loadBestAtEnd need eval data"):
        recipe.training_arguments(job, Precision("fp32"), tmp_path, has_eval=False, cuda=False)
    classify = example_job("tiny-full-classification", tmp_path / "c", training={
        "evalEverySteps": 3, "earlyStopping": {"patience": 2}, "bestMetric": "f1"})
    args = recipe.training_arguments(classify, Precision("fp32"), tmp_path, has_eval=True,
                                     cuda=False)
    assert args.metric_for_best_model == "eval_f1" and args.greater_is_better
    assert not args.load_best_model_at_end and args.save_strategy == "no"


@pytest.mark.slow
def test_best_checkpoint_survives_pruning_and_a_restart(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """keepLast 1 must not prune the best checkpoint, and a resumed attempt (a new pod: other
    local disk) still publishes it."""
    best_step = 2
    callbacks = recipe.trainer_callbacks
    monkeypatch.setattr(recipe, "trainer_callbacks", lambda ready, preemption: [
        *callbacks(ready, preemption), ScriptedEvalLoss(best_step)])
    output = tmp_path / "out"
    training = {"evalEverySteps": 2, "loadBestAtEnd": True, "logEverySteps": 2}
    first = example_job("tiny-lora", output, training={**training, "maxSteps": 6},
                        checkpoint={"keepLast": 1})
    ready = recipe.setup(first, str(output), tmp_path / "pod-1")
    trainer = recipe.build_trainer(ready)
    trainer.train()  # stops at 6 without publishing, as a preempted attempt would
    evals = {e["step"]: e["eval_loss"] for e in trainer.state.log_history if "eval_loss" in e}
    assert trainer.state.best_global_step == best_step, evals
    remote = output / "checkpoints"
    assert sorted(p.name for p in remote.iterdir()) == [f"checkpoint-{best_step}",
                                                        "checkpoint-6"]
    best = load_file(str(remote / f"checkpoint-{best_step}" / "adapter_model.safetensors"))

    shutil.rmtree(tmp_path / "pod-1")  # the next attempt runs in another pod
    second = example_job("tiny-lora", output, training={**training, "maxSteps": 8},
                         checkpoint={"keepLast": 1})
    result = recipe.run(second, workdir=tmp_path / "pod-2")
    assert result is not None and result.manifest["resumedFromStep"] == 6
    # Step 8 scores worse than step 2, so the first attempt's best stays the best: without
    # fetching it on resume, the last weights would be published. The final evaluation is of
    # the published (best) weights: the real loss logged at that step.
    assert result.manifest["metrics"]["evalLoss"] == pytest.approx(evals[best_step], rel=1e-5)
    published = load_file(str(output / "adapter_model.safetensors"))
    assert all(torch.equal(published[k], best[k]) for k in best)
