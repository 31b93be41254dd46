"""Hub datasets against a local stand-in for the Hub (tests/support/hub.py, reached with
HF_ENDPOINT): `hf://datasets/<org>/<name>/<file>` through huggingface_hub's HfFileSystem, and
`hf://datasets/<org>/<name>` with config, split and revision through `datasets`. What the
stand-in does not emulate (gated repos, xet/LFS storage) is listed in docs/storage.md."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from support.hub import HubStandIn
from support.jobs import ROOT

DATA = ROOT / "examples" / "data"
LOAD = """
import json, sys
from kubetune_api.load import validate_job
from kubetune_trainer.data import DataError, load_records
import yaml
body = yaml.safe_load(open(sys.argv[1]))
train = json.loads(sys.argv[2]) if sys.argv[2].startswith("[") else sys.argv[2]
body["spec"]["dataset"].update({"train": train, "eval": sys.argv[3], **json.loads(sys.argv[4])})
job = validate_job(body)
try:
    data = load_records(job.spec.dataset, job.spec.model.task, 0)
except DataError as exc:
    print(json.dumps({"error": str(exc)}))
else:
    print(json.dumps({"train": len(data.train), "eval": len(data.eval), "digest": data.digest,
                      "first": data.train[0]["completion"], "where": data.train[0]["where"],
                      "sources": data.source_facts}))
"""


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[HubStandIn]:
    repo = tmp_path / "hub" / "acme" / "support"
    repo.mkdir(parents=True)
    shutil.copy(DATA / "support.jsonl", repo / "train.jsonl")
    (repo / "splits").mkdir()
    shutil.copy(DATA / "support-eval.jsonl", repo / "splits" / "eval.jsonl")
    with HubStandIn(tmp_path / "hub") as server:
        yield server


def load(hub: HubStandIn | None, train: str, evaluation: str, token: str | None = None,
         **dataset: object) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_HUB_OFFLINE",
                                                                     "HF_TOKEN"))}
    if token is not None:
        env["HF_TOKEN"] = token
    if hub is not None:
        env |= {"HF_ENDPOINT": hub.endpoint, "HF_HUB_DISABLE_TELEMETRY": "1",
                "HF_HOME": str(hub.root or ROOT) + "-hf-home"}
    result = subprocess.run([sys.executable, "-c", LOAD, str(ROOT / "examples/tiny-lora.yaml"),
                             train, evaluation, json.dumps(dataset)], capture_output=True,
                            text=True, cwd=ROOT, env=env, timeout=180, check=True)
    loaded: dict[str, object] = json.loads(result.stdout.strip().splitlines()[-1])
    return {**loaded, "log": result.stderr}


@pytest.mark.slow
def test_hf_dataset_files_load_like_the_local_ones(hub: HubStandIn) -> None:
    remote = load(hub, "hf://datasets/acme/support/train.jsonl",
                  "hf://datasets/acme/support/splits/eval.jsonl")
    local = load(None, str(DATA / "support.jsonl"), str(DATA / "support-eval.jsonl"))
    same = ("train", "eval", "digest", "first")
    assert {k: remote[k] for k in same} == {k: local[k] for k in same} and remote["train"]
    assert "GET /datasets/acme/support/resolve/main/train.jsonl" in hub.requests


@pytest.mark.slow
def test_a_missing_hf_file_is_a_clear_error_at_once(hub: HubStandIn) -> None:
    loaded = load(hub, "hf://datasets/acme/support/nope.jsonl",
                  "hf://datasets/acme/support/splits/eval.jsonl")
    assert "hf://datasets/acme/support/nope.jsonl: cannot read dataset" in str(loaded["error"])
    assert "retrying" not in str(loaded["log"])  # not retried as if it were an outage
    assert hub.requests.count("GET /api/datasets/acme/support/tree/main") == 1


# A repository as people publish them: a card whose YAML declares two configs (subsets), each
# with train and test splits, in folders `datasets` reads by the card.
CARD = b"""---
configs:
- config_name: support
  data_files:
  - {split: train, path: support/train.jsonl}
  - {split: test, path: support/test.jsonl}
- config_name: short
  data_files:
  - {split: train, path: short/*.jsonl}
---
# acme/helpdesk
"""


@pytest.fixture
def helpdesk(hub: HubStandIn) -> HubStandIn:
    train = (DATA / "support.jsonl").read_bytes()
    files = {"README.md": CARD, "support/train.jsonl": train,
             "support/test.jsonl": (DATA / "support-eval.jsonl").read_bytes(),
             "short/part-0.jsonl": b"".join(train.splitlines(keepends=True)[:10])}
    hub.put("dataset", "acme/helpdesk", files)
    # v2: the support config's train split lost its first 12 records.
    revised = b"".join(train.splitlines(keepends=True)[12:])
    hub.put("dataset", "acme/helpdesk", {**files, "support/train.jsonl": revised},
            revision="v2")
    return hub


@pytest.mark.slow
def test_a_hub_repository_is_read_by_config_and_split_like_the_local_files(
        helpdesk: HubStandIn) -> None:
    remote = load(helpdesk, "hf://datasets/acme/helpdesk", "hf://datasets/acme/helpdesk",
                  config="support", split="train", evalSplit="test")
    local = load(None, str(DATA / "support.jsonl"), str(DATA / "support-eval.jsonl"))
    assert (remote["train"], remote["eval"], remote["first"]) == \
        (local["train"], local["eval"], local["first"]) == (72, 8, local["first"])
    assert remote["where"] == ("hf://datasets/acme/helpdesk (config support, split train): "
                               "row 1")
    assert remote["sources"] == [{"path": "hf://datasets/acme/helpdesk", "config": "support",
                                  "split": "train", "type": "fields", "records": 72,
                                  "examples": 72, "sha256": remote["sources"][0]["sha256"]}]
    # config picks the files: the short config's train split has 10 records.
    short = load(helpdesk, "hf://datasets/acme/helpdesk", str(DATA / "support-eval.jsonl"),
                 config="short", split="train")
    assert short["train"] == 10 and short["digest"] != remote["digest"]
    sliced = load(helpdesk, "hf://datasets/acme/helpdesk", str(DATA / "support-eval.jsonl"),
                  config="support", split="train[:25%]")
    # Splits are streamed whole: a slice is a clear error (a mixture's weight takes a part).
    assert str(sliced["error"]).startswith("hf://datasets/acme/helpdesk (config support, split "
                                           "train[:25%]): Bad split: train[:25%]")


@pytest.mark.slow
def test_revision_changes_which_files_are_read(helpdesk: HubStandIn) -> None:
    main = load(helpdesk, "hf://datasets/acme/helpdesk", str(DATA / "support-eval.jsonl"),
                config="support", split="train")
    v2 = load(helpdesk, "hf://datasets/acme/helpdesk", str(DATA / "support-eval.jsonl"),
              config="support", split="train", revision="v2")
    assert (main["train"], v2["train"]) == (72, 60)
    assert main["digest"] != v2["digest"] and main["first"] != v2["first"]
    v2_sha = helpdesk.repos[("dataset", "acme/helpdesk")].sha("v2")
    assert f"GET /datasets/acme/helpdesk/resolve/{v2_sha}/support/train.jsonl" in \
        helpdesk.requests
    # A file path at a revision reads that revision's file (HfFileSystem's <name>@<rev>).
    file_v2 = load(helpdesk, "hf://datasets/acme/helpdesk/support/train.jsonl",
                   str(DATA / "support-eval.jsonl"), revision="v2")
    assert file_v2["train"] == 60 and file_v2["first"] == v2["first"]


@pytest.mark.slow
def test_an_unknown_split_or_revision_is_a_clear_error_at_once(helpdesk: HubStandIn) -> None:
    split = load(helpdesk, "hf://datasets/acme/helpdesk", str(DATA / "support-eval.jsonl"),
                 config="support", split="validation")
    assert str(split["error"]).startswith(
        "hf://datasets/acme/helpdesk (config support, split validation): Bad split: "
        "validation. Available splits: ['train', 'test']")
    revision = load(helpdesk, "hf://datasets/acme/helpdesk", str(DATA / "support-eval.jsonl"),
                    config="support", split="train", revision="v9")
    assert "hf://datasets/acme/helpdesk (config support, split train, revision v9): cannot " \
        "read dataset: Revision 'v9' doesn't exist" in str(revision["error"])
    assert "retrying" not in str(split["log"]) + str(revision["log"])


def test_kubetune_validate_refuses_a_repository_path_without_a_split(tmp_path: Path) -> None:
    from support.jobs import example_dict

    body = example_dict("tiny-lora")
    body["spec"]["dataset"]["train"] = "hf://datasets/acme/helpdesk"
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(body))
    result = subprocess.run([str(Path(sys.executable).parent / "kubetune"), "validate",
                             str(job)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert ("spec.dataset: 'hf://datasets/acme/helpdesk' names no file and no split: set "
            "dataset.split (e.g. train)") in result.stderr


@pytest.mark.slow
def test_a_mixture_takes_a_hub_repository_split_as_a_source(helpdesk: HubStandIn) -> None:
    sources = [{"path": "hf://datasets/acme/helpdesk", "config": "short", "split": "train",
                "revision": "v2", "weight": 2}, {"path": str(DATA / "support-eval.jsonl")}]
    mixed = load(helpdesk, json.dumps(sources), str(DATA / "support-eval.jsonl"))
    assert mixed["train"] == 2 * 10 + 8
    assert [(s["path"], s.get("split"), s.get("revision"), s["examples"])
            for s in mixed["sources"]] == [("hf://datasets/acme/helpdesk", "train", "v2", 20),
                                           (str(DATA / "support-eval.jsonl"), None, None, 8)]


@pytest.mark.slow
def test_a_private_repository_reads_with_the_token_only(helpdesk: HubStandIn) -> None:
    token = "hf_" + "ReaderToken0123456789abcdefghij"
    helpdesk.tokens[token] = ("acme",)
    helpdesk.put("dataset", "acme/internal", helpdesk.files("dataset", "acme/helpdesk"),
                  private=True)
    args = ("hf://datasets/acme/internal", str(DATA / "support-eval.jsonl"))
    hidden = load(helpdesk, *args, config="support", split="train")
    assert "hf://datasets/acme/internal (config support, split train): cannot read dataset: " \
        "Dataset 'acme/internal' doesn't exist on the Hub or cannot be accessed" in \
        str(hidden["error"])
    assert load(helpdesk, *args, token=token, config="support", split="train")["train"] == 72
