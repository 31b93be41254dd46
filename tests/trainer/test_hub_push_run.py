"""A trained job pushes to the Hub stand-in as a pod would (HF_TOKEN_PATH: model.tokenSecret's
file; HF_ENDPOINT: the stand-in), through `kubetune run`: the pushed adapter is pulled back
with huggingface_hub's snapshot_download and gives the trained model's logits; a refused token
is exit 2 naming the field and the Secret, with the artifact kept in object storage."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from kubetune_api import contract
from kubetune_trainer.hub import hub_card
from support.hub import HubStandIn
from support.jobs import example_dict

pytestmark = pytest.mark.slow

WRITER = "hf_" + "WriterToken0123456789abcdefghij"
WRONG = "hf_" + "WrongToken0123456789abcdefghijk"
PROMPT = "Customer: How do I reset my password?\nAgent:"


@pytest.fixture
def stand_in() -> Iterator[HubStandIn]:
    with HubStandIn(tokens={WRITER: ("acme",)}) as server:
        yield server


def run_job(tmp_path: Path, stand_in: HubStandIn, token: str) -> subprocess.CompletedProcess[str]:
    body = example_dict("tiny-lora")
    spec = body["spec"]
    spec["model"]["tokenSecret"] = {"name": "hf"}
    spec["training"] = {**spec["training"], "epochs": 1, "maxSteps": 3}
    spec["output"] = {"uri": str(tmp_path / "out"),
                      "pushToHub": {"repo": "acme/support-lora", "revision": "v1"}}
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(body))
    (tmp_path / "token").write_text(token)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    env |= {"HF_ENDPOINT": stand_in.endpoint, "HF_TOKEN_PATH": str(tmp_path / "token"),
            "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_DISABLE_TELEMETRY": "1"}
    return subprocess.run([str(Path(sys.executable).parent / "kubetune"), "run", "--quiet",
                           str(job_file)], env=env, capture_output=True, text=True,
                          cwd=tmp_path, timeout=600)


def logits(adapter: Path, base: Path) -> object:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(adapter)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)
    with torch.no_grad():
        return model.eval()(**tokenizer([PROMPT], return_tensors="pt")).logits


def test_a_pushed_adapter_is_pulled_back_and_gives_the_trained_logits(
        tmp_path: Path, stand_in: HubStandIn) -> None:
    import torch
    from huggingface_hub import snapshot_download

    result = run_job(tmp_path, stand_in, WRITER)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert WRITER not in result.stdout + result.stderr
    out = tmp_path / "out"
    pulled = Path(snapshot_download("acme/support-lora", revision="v1", token=WRITER,
                                    endpoint=stand_in.endpoint, cache_dir=tmp_path / "pull"))
    for name in ("adapter_model.safetensors", "adapter_config.json", contract.MANIFEST_FILE,
                 "tokenizer.json", "base_model/model.safetensors"):
        assert (pulled / name).read_bytes() == (out / name).read_bytes(), name
    # The card, less its base_model line (a local path is no Hub id).
    card = (out / "README.md").read_text()
    assert (pulled / "README.md").read_text() == hub_card(card, merged=False) != card
    # The repo is private: without the token it is not even visible.
    with pytest.raises(Exception, match=r"401|Repository Not Found"):
        snapshot_download("acme/support-lora", revision="v1", endpoint=stand_in.endpoint,
                          cache_dir=tmp_path / "anonymous", token=False)
    trained = logits(out, out / "base_model")
    assert torch.equal(logits(pulled, pulled / "base_model"), trained)


def test_a_refused_token_is_exit_2_naming_the_secret_and_the_artifact_is_kept(
        tmp_path: Path, stand_in: HubStandIn) -> None:
    result = run_job(tmp_path, stand_in, WRONG)
    printed = result.stdout + result.stderr
    assert result.returncode == contract.EXIT_INVALID_SPEC, printed[-3000:]
    assert ("output.pushToHub: the Hub refused the token from model.tokenSecret (Secret hf, "
            "key HF_TOKEN) (HTTP 401") in printed
    assert f"the artifact is kept at {tmp_path / 'out'}" in printed and WRONG not in printed
    assert (tmp_path / "out" / contract.MANIFEST_FILE).is_file()  # published, whole
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
    assert not stand_in.commits
