"""output.pushToHub against the local Hub stand-in (tests/support/hub.py): what each field
changes in what the Hub receives, which failures are permanent (exit 2, naming the field and
the token's Secret) and which are retried. The end-to-end run (a trained adapter pushed,
pulled back and reloaded with the same logits) is in test_hub_push_run.py."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kubetune_api import contract
from kubetune_api.load import SpecError
from kubetune_api.spec import FineTuneJob
from kubetune_trainer import hub
from support.hub import HubStandIn
from support.jobs import example_job

WRITER = "hf_" + "WriterToken0123456789abcdefghij"
OUTSIDER = "hf_" + "OutsiderToken0123456789abcdefg"
MANIFEST = b'{"kubetuneVersion": "test"}\n'
CARD = '---\nbase_model: "/tmp/run/out/base_model"\nlibrary_name: "peft"\n---\n\n# card\n'


@pytest.fixture
def stand_in() -> Iterator[HubStandIn]:
    with HubStandIn(tokens={WRITER: ("acme",), OUTSIDER: ("someone",)}) as server:
        yield server


@pytest.fixture
def staging(tmp_path: Path) -> Path:
    """An artifact as recipe.save stages it: adapter, card, tiny base, logs, merged model."""
    root = tmp_path / "artifact"
    files = {"adapter_config.json": b"{}", "adapter_model.safetensors": b"\x00weights\x01",
             "README.md": CARD.encode(), "tokenizer.json": b"{}",
             "base_model/config.json": b"{}", "logs/events.out": b"tb",
             "merged/config.json": b'{"merged": true}', "merged/model.safetensors": b"\x00m"}
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


@pytest.fixture(autouse=True)
def token_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The push token as the operator mounts output.pushToHub.tokenSecret's key."""
    path = tmp_path / "secrets" / "HF_TOKEN"
    path.parent.mkdir()
    path.write_text(WRITER + "\n")
    monkeypatch.setenv(contract.HUB_PUSH_TOKEN_PATH_ENV, str(path))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(hub, "PUSH_BASE_DELAY", 0.01)
    return path


def job(tmp_path: Path, **push: Any) -> FineTuneJob:
    target = {"repo": "acme/support-lora", "tokenSecret": {"name": "hub-writer"}, **push}
    return example_job("tiny-lora", tmp_path / "out", output={"pushToHub": target})


def test_the_adapter_is_committed_privately_to_main_with_its_manifest(
        tmp_path: Path, staging: Path, stand_in: HubStandIn) -> None:
    commit = hub.push(job(tmp_path), staging, "s3://m/out", MANIFEST,
                      endpoint=stand_in.endpoint)
    assert [c["visibility"] for c in stand_in.created] == ["private"]
    pushed = stand_in.files("model", "acme/support-lora")
    # The adapter and tiny mode's base beside it; never the merged model or TensorBoard logs.
    assert sorted(pushed) == ["README.md", "adapter_config.json", "adapter_model.safetensors",
                              "base_model/config.json", contract.MANIFEST_FILE,
                              "tokenizer.json"]
    assert pushed["adapter_model.safetensors"] == b"\x00weights\x01"
    assert pushed[contract.MANIFEST_FILE] == MANIFEST
    # The card: a local base (tiny mode's base_model/) is no Hub id, so it is left out.
    assert pushed["README.md"] == CARD.replace('base_model: "/tmp/run/out/base_model"\n',
                                               "").encode()
    assert commit.oid in commit.commit_url and stand_in.commits[-1]["revision"] == "main"


def test_private_false_and_a_revision_change_what_the_hub_receives(
        tmp_path: Path, staging: Path, stand_in: HubStandIn) -> None:
    hub.push(job(tmp_path, private=False, revision="exp/r1"), staging, "s3://m/out", MANIFEST,
             endpoint=stand_in.endpoint)
    assert [c["visibility"] for c in stand_in.created] == ["public"]
    assert "POST /api/models/acme/support-lora/branch/exp/r1" in stand_in.requests
    assert [c["revision"] for c in stand_in.commits] == ["exp/r1"]
    assert stand_in.files("model", "acme/support-lora", "main") == {}  # main untouched
    assert "adapter_model.safetensors" in stand_in.files("model", "acme/support-lora",
                                                         "exp/r1")
    # A second push to the same branch: repo and branch exist already; unchanged files are
    # left out of the commit (what makes a retried push harmless).
    hub.push(job(tmp_path, private=False, revision="exp/r1"), staging, "s3://m/out",
             b'{"kubetuneVersion": "second"}\n', endpoint=stand_in.endpoint)
    assert len(stand_in.created) == 1
    assert stand_in.commits[-1]["paths"] == [contract.MANIFEST_FILE]


def test_with_merge_adapter_the_merged_model_is_the_repository(
        tmp_path: Path, staging: Path, stand_in: HubStandIn) -> None:
    target = {"repo": "acme/support-merged", "tokenSecret": {"name": "hub-writer"}}
    merged = example_job("tiny-lora", tmp_path / "out",
                         output={"pushToHub": target, "mergeAdapter": True})
    hub.push(merged, staging, "s3://m/out", MANIFEST, endpoint=stand_in.endpoint)
    pushed = stand_in.files("model", "acme/support-merged")
    assert sorted(pushed) == ["README.md", "config.json", contract.MANIFEST_FILE,
                              "model.safetensors"]
    assert json.loads(pushed["config.json"]) == {"merged": True}
    assert b'library_name: "transformers"' in pushed["README.md"]


@pytest.mark.parametrize(("token", "repo", "status", "said"), [
    ("hf_" + "Wrong0123456789abcdefghijklmnop", "acme/support-lora", 401,
     "the Hub refused the token from output.pushToHub.tokenSecret (Secret hub-writer, key "
     "HF_TOKEN)"),
    (OUTSIDER, "acme/support-lora", 403,
     "the token from output.pushToHub.tokenSecret (Secret hub-writer, key HF_TOKEN) may not "
     "write to acme/support-lora"),
])
def test_a_refused_token_is_permanent_and_names_the_secret(
        tmp_path: Path, staging: Path, stand_in: HubStandIn, token_file: Path, token: str,
        repo: str, status: int, said: str) -> None:
    token_file.write_text(token)
    with pytest.raises(hub.HubPushError) as refused:
        hub.push(job(tmp_path, repo=repo), staging, "s3://m/out", MANIFEST,
                 endpoint=stand_in.endpoint)
    assert isinstance(refused.value, SpecError)  # exit 2: a restart cannot help
    message = str(refused.value)
    assert message.startswith(f"output.pushToHub: {said} (HTTP {status}")
    assert "the artifact is kept at s3://m/out" in message and token not in message
    assert stand_in.requests.count("POST /api/repos/create") == 1  # not retried
    assert not stand_in.commits


def test_the_model_token_is_named_when_the_push_has_none_of_its_own(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(contract.HUB_PUSH_TOKEN_PATH_ENV)
    monkeypatch.setenv("HF_TOKEN_PATH", str(tmp_path / "model-token"))
    shared = example_job("tiny-lora", tmp_path / "out",
                         model={"tokenSecret": {"name": "hf", "key": "token"}},
                         output={"pushToHub": {"repo": "acme/x"}})
    assert hub.token_source(shared) == (None, "model.tokenSecret (Secret hf, key token)")


def test_a_5xx_once_is_retried_and_the_push_succeeds(
        tmp_path: Path, staging: Path, stand_in: HubStandIn,
        caplog: pytest.LogCaptureFixture) -> None:
    # The commit itself: huggingface_hub does not retry it, the push does (whole, idempotent).
    stand_in.fail("POST", r"/commit/", 500, times=1)
    hub.push(job(tmp_path), staging, "s3://m/out", MANIFEST, endpoint=stand_in.endpoint)
    assert stand_in.requests.count("POST /api/models/acme/support-lora/commit/main") == 2
    assert len(stand_in.commits) == 1
    assert "attempt 1/4 failed (HfHubHTTPError" in caplog.text


def test_a_hub_that_keeps_failing_is_a_retryable_error_after_the_attempts(
        tmp_path: Path, staging: Path, stand_in: HubStandIn) -> None:
    stand_in.fail("POST", r"/commit/", 503, times=100)
    with pytest.raises(hub.HubPushRetryableError) as failed:
        hub.push(job(tmp_path), staging, "s3://m/out", MANIFEST, endpoint=stand_in.endpoint)
    assert not isinstance(failed.value, SpecError)  # exit 1: the gang is restarted
    assert "failed after 4 attempts" in str(failed.value)
    assert "the artifact is kept at s3://m/out" in str(failed.value)
    assert stand_in.requests.count("POST /api/models/acme/support-lora/commit/main") == 4


def test_the_spec_refuses_a_push_without_a_token_or_with_an_offline_hub(
        tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=re.escape(
            "output.pushToHub needs a token that may write to acme/x: set "
            "output.pushToHub.tokenSecret or model.tokenSecret")):
        example_job("tiny-lora", tmp_path, output={"pushToHub": {"repo": "acme/x"}})
    offline = re.escape("model.cache.readOnly runs the Hub client offline")
    with pytest.raises(SpecError, match=offline):
        example_job("tiny-lora", tmp_path, model={"cache": {"pvc": "c", "readOnly": True},
                                                  "tokenSecret": {"name": "hf"}},
                    output={"pushToHub": {"repo": "acme/x"}})
    for repo, field in (("no-owner", "repo"), ("acme/a--b", "repo")):
        with pytest.raises(SpecError, match=field):
            job(tmp_path, repo=repo)
    with pytest.raises(SpecError, match="revision"):
        job(tmp_path, revision="a..b")


def test_a_hub_base_model_stays_in_the_card() -> None:
    card = '---\nbase_model: "meta-llama/Llama-3.1-8B"\nlibrary_name: "peft"\n---\n# x\n'
    assert hub.hub_card(card, merged=False) == card
    assert hub.hub_card(card, merged=True) == card.replace('"peft"', '"transformers"')
    assert hub.hub_card("# no front matter\n", merged=True) == "# no front matter\n"
