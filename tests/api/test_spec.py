"""The FineTuneJob contract: defaults, cross-field rules, and errors that name file:line."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from kubetune_api.load import SpecError, load_job, parse_job
from kubetune_api.spec import FineTuneJob
from support.jobs import MINIMAL_JOB_YAML as VALID


def test_defaults_fill_a_minimal_job() -> None:
    job = parse_job(VALID)
    spec = job.spec
    assert job.name == "t"
    assert spec.model.task == "causal-lm"
    assert spec.method.lora is not None and spec.method.lora.target_modules == "all-linear"
    assert spec.dataset.fields.layout == "text"
    assert spec.training.precision == "auto"
    assert spec.training.strategy == "ddp"
    assert spec.resources.nodes == 1
    assert spec.checkpoint.keep_last == 2
    assert spec.run_policy.backoff_limit == 3


def test_camel_case_round_trip() -> None:
    job = parse_job(VALID)
    dumped = job.model_dump(by_alias=True, mode="json")
    assert "maxSeqLength" in dumped["spec"]["dataset"]
    assert FineTuneJob.model_validate(dumped) == job


def test_examples_are_valid() -> None:
    examples = sorted(Path(__file__).resolve().parents[2].glob("examples/*.yaml"))
    assert len(examples) >= 11
    for path in examples:
        load_job(path)


# Hub organisations whose models are gated (a licence to accept, then a token): meta-llama's
# Llama 2/3 and mistralai's instruct models. Without a token their download fails with 401.
GATED_ORGS = ("meta-llama/", "mistralai/", "google/gemma")


def test_examples_of_gated_models_carry_a_token_secret() -> None:
    gated = []
    for path in sorted(Path(__file__).resolve().parents[2].glob("examples/*.yaml")):
        model = load_job(path).spec.model
        if model.name.startswith(GATED_ORGS):
            gated.append(path.name)
            assert model.token_secret is not None, f"{path.name}: no spec.model.tokenSecret"
    assert len(gated) == 3, gated


def _error(yaml_text: str) -> str:
    with pytest.raises(SpecError) as info:
        parse_job(textwrap.dedent(yaml_text), source="job.yaml")
    return str(info.value)


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        # unknown method
        (("type: lora", "type: adapters"), "job.yaml:6: spec.method.type: Input should be "
         "'full', 'lora' or 'qlora' (got 'adapters')"),
        # a typo is not silently ignored
        (("type: lora}", "type: lora, lroa: {r: 4}}"),
         "job.yaml:6: spec.method.lroa: Extra inputs"),
        # qlora without quantization
        (("type: lora", "type: qlora"), "job.yaml:6: spec.method: quantization is required"),
        # qlora with 3 bits
        (("type: lora}", "type: qlora, quantization: {bits: 3}}"),
         "job.yaml:6: spec.method.quantization.bits: Input should be 4 or 8 (got 3)"),
        # classification without numLabels
        (('name: "tiny://llama"}', 'name: "tiny://bert", task: sequence-classification}'),
         "job.yaml:5: spec.model: numLabels is required"),
        # missing dataset field
        (("    train: data.jsonl\n", "    eval: e.jsonl\n"),
         "job.yaml:8: spec.dataset.train: Field required"),
        # fields that fit no layout
        (("    train: data.jsonl\n", "    train: d.jsonl\n    fields: {prompt: p}\n"),
         "job.yaml:9: spec.dataset.fields: fields must be one of"),
        # a layout that does not fit the task
        (('name: "tiny://llama"}', 'name: "tiny://t5", task: seq2seq-lm}'),
         "job.yaml:5: spec: dataset.fields text does not fit task seq2seq-lm"),
        # unknown tiny model
        (('"tiny://llama"', '"tiny://gpt5"'), "unknown tiny model 'tiny://gpt5'"),
        (("type: lora}", "type: full}\n  training: {pretrain: true, epochs: 0}"),
         "job.yaml:7: spec.training.epochs: Input should be greater than 0"),
    ],
)
def test_bad_specs_name_the_line_and_field(edit: tuple[str, str], expected: str) -> None:
    old, new = edit
    assert old in VALID
    assert expected in _error(VALID.replace(old, new))


def test_masked_lm_with_prompt_fields_is_rejected() -> None:
    bad = VALID.replace('name: "tiny://llama"}', 'name: "tiny://bert", task: masked-lm}')
    bad = bad.replace("    train: data.jsonl\n",
                      "    train: d.jsonl\n    fields: {prompt: p, completion: c}\n")
    assert "dataset.fields prompt-completion does not fit task masked-lm" in _error(bad)


def test_pretrain_needs_full_and_packing_needs_causal_lm() -> None:
    pretrain = VALID + "  training: {pretrain: true}\n"
    assert "training.pretrain trains every weight" in _error(pretrain)
    packing = VALID.replace('name: "tiny://llama"}', 'name: "tiny://bert", task: masked-lm}')
    packing = packing.replace("    train: data.jsonl\n", "    train: d.jsonl\n    packing: true\n")
    assert "dataset.packing only applies to task causal-lm" in _error(packing)


def test_invalid_yaml_names_the_line() -> None:
    assert _error(VALID + "  training: {epochs: [1\n").startswith("job.yaml:11: invalid YAML")


def test_document_count() -> None:
    assert "expected exactly one FineTuneJob document, found 2" in _error(VALID + "---\n" + VALID)


def test_cli_validate_is_fast_and_exits_2_on_bad_input(tmp_path: Path) -> None:
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text(VALID)
    bad.write_text(VALID.replace("type: lora", "type: qlora"))
    ok = subprocess.run([sys.executable, "-m", "kubetune", "validate", str(good)],
                        capture_output=True, text=True)
    assert ok.returncode == 0 and "valid FineTuneJob 't'" in ok.stdout
    fail = subprocess.run([sys.executable, "-m", "kubetune", "validate", str(bad)],
                          capture_output=True, text=True)
    assert fail.returncode == 2
    assert f"{bad}:6: spec.method: quantization is required" in fail.stderr
    probe = subprocess.run(
        [sys.executable, "-c", "import sys, kubetune.cli, kubetune_api.load; "
         "print('torch' in sys.modules)"], capture_output=True, text=True)
    assert probe.stdout.strip() == "False"


@pytest.mark.parametrize(("extra", "expected"), [
    ("  pod: {cpu: 8 cores}\n", "pod.cpu '8 cores' is not a Kubernetes quantity"),
    ("  pod: {memory: 64gb}\n", "pod.memory '64gb' is not a Kubernetes quantity"),
    ("  pod: {shmSize: -1Gi}\n", "pod.shmSize '-1Gi' is not a Kubernetes quantity"),
    ("  pod: {env: {'1BAD': x}}\n", "pod.env name '1BAD' is not a valid environment variable"),
    ("  metrics: {port: 29500}\n", "would clash with torchrun's port 29500"),
    ("  resources: {gpusPerNode: 8}\n  metrics: {port: 29495}\n",
     "metrics.port 29495 (ports 29495-29502, one per rank of a node) would clash"),
    ("  resources: {gpusPerNode: 8}\n  metrics: {port: 65530}\n", "goes past 65535"),
])
def test_what_the_api_server_would_reject_is_rejected_first(extra: str, expected: str) -> None:
    """A Job the API server refuses would fail after the ConfigMap and Service exist."""
    assert expected in _error(VALID + extra)


def test_api_limits_accept_ordinary_values() -> None:
    job = parse_job(VALID + "  pod: {cpu: 500m, memory: 1.5Gi, shmSize: 1e9, env: {A.b-C: x}}\n"
                    "  resources: {gpusPerNode: 8}\n  metrics: {port: 29501}\n")
    assert job.spec.pod.memory == "1.5Gi" and job.spec.metrics.port == 29501


def test_run_policy_timeouts() -> None:
    job = parse_job(VALID)
    assert job.spec.run_policy.scheduling_timeout_seconds == 600
    assert job.spec.run_policy.stall_timeout_seconds is None
    assert "greater than or equal to 1" in _error(
        VALID + "  runPolicy: {schedulingTimeoutSeconds: 0}\n")
    assert "greater than or equal to 1" in _error(VALID + "  runPolicy: {stallTimeoutSeconds: 0}\n")
