"""Contract of the training options (issue 13): defaults, cross-field rules, --output."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from kubetune.cli import main
from kubetune_api.load import SpecError, load_job, parse_job
from support.jobs import MINIMAL_JOB_YAML as BASE

NO_OUTPUT = BASE.replace("  output: {uri: out}\n", "")


def job_with(extra: str, base: str = BASE):  # type: ignore[no-untyped-def]
    return parse_job(base + extra, source="job.yaml")


def error_of(extra: str, base: str = BASE) -> str:
    with pytest.raises(SpecError) as info:
        job_with(extra, base)
    return str(info.value)


def test_defaults_change_nothing_for_existing_jobs() -> None:
    spec = parse_job(BASE).spec
    t = spec.training
    assert (t.optimizer, t.min_learning_rate_ratio, t.neftune_noise_alpha) == ("adamw", None,
                                                                                 None)
    assert (t.liger_kernels, t.compile, t.early_stopping, t.load_best_at_end) == (
        False, False, None, False)
    assert (t.best_metric, t.report_to) == ("loss", [])
    assert spec.model.attention == "auto"
    assert spec.method.lora is not None
    assert (spec.method.lora.use_dora, spec.method.lora.use_rslora) == (False, False)
    assert spec.method.lora.modules_to_save == []
    assert spec.dataset.add_special_tokens == []
    assert spec.output.samples is None


def test_every_option_parses_from_camel_case() -> None:
    spec = parse_job(textwrap.dedent("""\
        apiVersion: kubetune.dev/v1alpha1
        kind: FineTuneJob
        metadata: {name: t}
        spec:
          model: {name: "tiny://llama", attention: eager}
          method:
            type: lora
            lora: {useDora: true, useRslora: true, modulesToSave: [embed_tokens, lm_head]}
          dataset: {train: data.jsonl, addSpecialTokens: ["<|tool|>"]}
          training:
            optimizer: paged_adamw_8bit
            minLearningRateRatio: 0.1
            neftuneNoiseAlpha: 5
            ligerKernels: true
            compile: true
            evalEverySteps: 10
            earlyStopping: {patience: 2, threshold: 0.01}
            loadBestAtEnd: true
            bestMetric: perplexity
            reportTo: [tensorboard, mlflow, wandb]
          output: {uri: out, samples: {prompts: [hi], maxNewTokens: 9}}
        """)).spec
    t = spec.training
    assert t.optimizer == "paged_adamw_8bit" and t.min_learning_rate_ratio == 0.1
    assert t.neftune_noise_alpha == 5 and t.liger_kernels and t.compile
    assert t.early_stopping is not None
    assert (t.early_stopping.patience, t.early_stopping.threshold) == (2, 0.01)
    assert t.load_best_at_end and t.best_metric == "perplexity"
    assert t.report_to == ["tensorboard", "mlflow", "wandb"]
    assert spec.model.attention == "eager"
    assert spec.method.lora is not None and spec.method.lora.use_dora
    assert spec.method.lora.modules_to_save == ["embed_tokens", "lm_head"]
    assert spec.dataset.add_special_tokens == ["<|tool|>"]
    assert spec.output.samples is not None and spec.output.samples.max_new_tokens == 9


@pytest.mark.parametrize(("extra", "message"), [
    ("  training: {optimizer: sgd}\n", "spec.training.optimizer: Input should be"),
    ("  training: {lrScheduler: linear, minLearningRateRatio: 0.1}\n",
     "minLearningRateRatio only applies to lrScheduler cosine"),
    ("  training: {minLearningRateRatio: 1.0}\n", "spec.training.minLearningRateRatio"),
    ("  training: {neftuneNoiseAlpha: 0}\n", "spec.training.neftuneNoiseAlpha"),
    ("  training: {earlyStopping: {patience: 2}}\n", "set evalEverySteps"),
    ("  training: {loadBestAtEnd: true}\n", "set evalEverySteps"),
    ("  training: {evalEverySteps: 5, earlyStopping: {patience: 0}}\n",
     "spec.training.earlyStopping.patience"),
    ("  training: {evalEverySteps: 5, loadBestAtEnd: true, bestMetric: accuracy}\n",
     "bestMetric accuracy needs task sequence-classification"),
    ("  training: {reportTo: [tensorboard, tensorboard]}\n", "reportTo lists a tracker twice"),
    ("  training: {reportTo: [comet]}\n", "spec.training.reportTo.0"),
    ("  training: {evalEverySteps: 4, loadBestAtEnd: true}\n  checkpoint: {everySteps: 6}\n",
     "checkpoint.everySteps (6) must be a multiple of training.evalEverySteps (4)"),
])
def test_bad_options_are_named(extra: str, message: str) -> None:
    assert message in error_of(extra)


def test_attention_and_samples_rules() -> None:
    with pytest.raises(SpecError, match=r"spec\.model\.attention"):
        parse_job(BASE.replace('"tiny://llama"}', '"tiny://llama", attention: flash3}'))
    classify = BASE.replace('{name: "tiny://llama"}',
                            '{name: "tiny://bert", task: sequence-classification, numLabels: 2}'
                            ).replace("    train: data.jsonl\n",
                                      "    train: data.jsonl\n    fields: {text: t, label: l}\n")
    assert "output.samples generates text" in error_of("", classify.replace(
        "{uri: out}", "{uri: out, samples: {prompts: [hi]}}"))
    assert "prompts" in error_of("", BASE.replace("{uri: out}",
                                                   "{uri: out, samples: {prompts: []}}"))
    assert "bestMetric perplexity needs a language-modelling task" in error_of(
        "  training: {evalEverySteps: 5, earlyStopping: {}, bestMetric: perplexity}\n", classify)


def test_output_flag_satisfies_a_missing_output(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(NO_OUTPUT)
    with pytest.raises(SpecError, match=r"job.yaml:\d+: spec.output: Field required"):
        load_job(path)
    assert load_job(path, output_uri="s3://b/x").spec.output.uri == "s3://b/x"
    path.write_text(BASE.replace("{uri: out}", "{uri: out, mergeAdapter: true}"))
    job = load_job(path, output_uri="elsewhere")
    assert job.spec.output.uri == "elsewhere" and job.spec.output.merge_adapter  # rest kept


def test_validate_accepts_output_too(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(NO_OUTPUT)
    assert main(["validate", str(path)]) == 2
    assert "spec.output: Field required" in capsys.readouterr().err
    assert main(["validate", str(path), "--output", str(tmp_path / "out")]) == 0
