"""Record types (dataset.type: sharegpt, alpaca, openai) and mixtures (dataset.train as a list):
every record normalised and checked before the model loads, bad ones named by file:line and key."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from kubetune_api.spec import DatasetSpec
from kubetune_trainer import data as data_module
from kubetune_trainer import storage
from kubetune_trainer.data import DataError, LoadedData

SHAREGPT = [
    {"conversations": [{"from": "system", "value": "Be brief."},
                       {"from": "human", "value": "Capital of France?"},
                       {"from": "gpt", "value": "Paris"}]},
    {"conversations": [{"from": "human", "value": "Capital of Peru?"},
                       {"from": "gpt", "value": "Lima"},
                       {"from": "tool", "value": "{\"ok\": true}"},
                       {"from": "gpt", "value": "Done"}]},
]
ALPACA = [
    {"instruction": "Add the numbers.", "input": "1 2", "output": "3"},
    {"instruction": "Say hi.", "input": "", "output": "hi"},
    {"instruction": "Say bye.", "output": "bye"},  # input is optional
]
OPENAI = [{"messages": [{"role": "user", "content": f"q{i}"},
                        {"role": "assistant", "content": f"a{i}"}]} for i in range(5)]


def jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def load(spec: dict[str, Any], tmp_path: Path, seed: int = 0,
         cache: str = "cache") -> LoadedData:
    return data_module.load_records(DatasetSpec.model_validate(spec), "causal-lm", seed,
                                    tmp_path / cache)


def conversations(data: LoadedData) -> list[list[dict[str, str]]]:
    return [json.loads(m) for m in data.train["messages"]]


def test_sharegpt_roles_become_chat_roles(tmp_path: Path) -> None:
    path = jsonl(tmp_path / "sg.jsonl", SHAREGPT)
    data = load({"train": str(path), "type": "sharegpt"}, tmp_path)
    first, second = conversations(data)
    assert first == [{"role": "system", "content": "Be brief."},
                     {"role": "user", "content": "Capital of France?"},
                     {"role": "assistant", "content": "Paris"}]
    assert [m["role"] for m in second] == ["user", "assistant", "tool", "assistant"]


def test_sharegpt_keys_and_roles_come_from_fields(tmp_path: Path) -> None:
    rows = [{"chat": [{"speaker": "client", "text": "hello"},
                      {"speaker": "bot", "text": "hi there"}]}]
    path = jsonl(tmp_path / "sg.jsonl", rows)
    data = load({"train": str(path), "type": "sharegpt",
                 "fields": {"messages": "chat", "role": "speaker", "content": "text",
                            "roles": {"client": "user", "bot": "assistant"}}}, tmp_path)
    assert conversations(data) == [[{"role": "user", "content": "hello"},
                                    {"role": "assistant", "content": "hi there"}]]
    # The defaults still map: human/gpt are merged under the custom names.
    assert DatasetSpec.model_validate({"train": "x", "type": "sharegpt", "fields": {
        "roles": {"bot": "assistant"}}}).fields.roles == {
        "human": "user", "gpt": "assistant", "system": "system", "tool": "tool",
        "bot": "assistant"}


def test_alpaca_joins_the_input_to_the_instruction(tmp_path: Path) -> None:
    path = jsonl(tmp_path / "alpaca.jsonl", ALPACA)
    data = load({"train": str(path), "type": "alpaca"}, tmp_path)
    first, second, third = conversations(data)
    assert first == [{"role": "user", "content": "Add the numbers.\n\n1 2",
                      "instruction": "Add the numbers.", "input": "1 2"},
                     {"role": "assistant", "content": "3"}]
    assert second[0]["content"] == "Say hi." and third[0]["content"] == "Say bye."
    renamed = jsonl(tmp_path / "qa.jsonl", [{"q": "Why?", "a": "Because."}])
    data = load({"train": str(renamed), "type": "alpaca",
                 "fields": {"instruction": "q", "output": "a"}}, tmp_path)
    assert conversations(data)[0][1] == {"role": "assistant", "content": "Because."}


def test_openai_chat_jsonl_is_the_messages_field(tmp_path: Path) -> None:
    path = jsonl(tmp_path / "chat.jsonl", OPENAI)
    data = load({"train": str(path), "type": "openai"}, tmp_path)
    assert conversations(data)[2][1] == {"role": "assistant", "content": "a2"}


@pytest.mark.parametrize(("rows", "type_", "problem"), [
    ([{"conversations": "hi"}], "sharegpt",
     "sg.jsonl:1: field 'conversations' (dataset.fields.messages) must be a non-empty list "
     "of {from, value} turns"),
    ([SHAREGPT[0], {"conversations": [{"from": "bot", "value": "x"}]}], "sharegpt",
     "sg.jsonl:2: field 'conversations', turn 0: key 'from' is 'bot', not a role "
     "dataset.fields.roles maps (human, gpt, system, tool)"),
    ([{"conversations": [{"from": "human", "value": {"text": "x"}}]}], "sharegpt",
     "sg.jsonl:1: field 'conversations', turn 0: key 'value' must be a string, got dict"),
    ([{"conversations": [{"from": "human", "value": "x"}]}], "sharegpt",
     "sg.jsonl:1: field 'conversations': no assistant message to learn from"),
    ([{"conversations": ["human: x"]}], "sharegpt",
     "sg.jsonl:1: field 'conversations', turn 0: expected an object, got str"),
    ([{"input": "x", "output": "y"}], "alpaca",
     "sg.jsonl:1: missing field 'instruction' (dataset.fields.instruction)"),
    ([{"instruction": "x", "input": 3, "output": "y"}], "alpaca",
     "sg.jsonl:1: field 'input' (dataset.fields.input) must be a string, got int"),
    ([{"instruction": "x", "output": " "}], "alpaca",
     "sg.jsonl:1: field 'output' (dataset.fields.output) is empty"),
    ([{"messages": [{"role": "user", "content": None}]}], "openai",
     "sg.jsonl:1: field 'messages': message 0 must have string role and content"),
])
def test_a_bad_record_names_file_line_and_key(tmp_path: Path, rows: list[Any], type_: str,
                                              problem: str) -> None:
    path = jsonl(tmp_path / "sg.jsonl", rows)
    with pytest.raises(DataError) as info:
        load({"train": str(path), "type": type_}, tmp_path)
    assert str(info.value) == f"{path}{problem.removeprefix('sg.jsonl')}"


def test_a_record_nested_too_deep_is_a_data_error_not_retried(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """json.loads raises RecursionError on it: a permanent data error (exit 2), never a
    storage error retried until the gang restarts."""
    path = tmp_path / "deep.jsonl"
    path.write_text(json.dumps({"text": "fine"}) + "\n" + "[" * 100_000 + "]" * 100_000 + "\n")
    caplog.set_level("WARNING")
    with pytest.raises(DataError, match=r"deep\.jsonl:2: invalid JSON: nested too deeply"):
        load({"train": str(path)}, tmp_path)
    assert not [r for r in caplog.records if "retrying" in r.message]
    assert not isinstance(DataError("x"), storage.StorageError)


def test_a_csv_field_over_the_size_limit_is_a_data_error(tmp_path: Path) -> None:
    path = tmp_path / "big.csv"
    path.write_text("text\nshort\n" + "x" * 200_000 + "\n")
    with pytest.raises(DataError, match=r"big\.csv:3: not readable as CSV: field larger"):
        load({"train": str(path)}, tmp_path)


# --- mixtures ----------------------------------------------------------------------------


def mixture(tmp_path: Path, **weights: dict[str, Any]) -> dict[str, Any]:
    paths = {"sg": jsonl(tmp_path / "sg.jsonl", SHAREGPT),
             "alpaca": jsonl(tmp_path / "alpaca.jsonl", ALPACA),
             "openai": jsonl(tmp_path / "openai.jsonl", OPENAI)}
    types = {"sg": "sharegpt", "alpaca": "alpaca", "openai": "openai"}
    return {"train": [{"path": str(paths[k]), "type": types[k], **weights.get(k, {})}
                      for k in paths]}


def origins(data: LoadedData) -> list[str]:
    return [w.rsplit("/", 1)[1] for w in data.train["where"]]


def test_a_mixture_takes_each_sources_share(tmp_path: Path) -> None:
    spec = mixture(tmp_path, sg={"weight": 2.0}, alpaca={"samples": 2},
                   openai={"weight": 0.4})
    data = load(spec, tmp_path)
    files = [o.split(":")[0] for o in origins(data)]
    assert {f: files.count(f) for f in set(files)} == {
        "sg.jsonl": 4, "alpaca.jsonl": 2, "openai.jsonl": 2}
    assert sorted(o for o in origins(data) if o.startswith("sg")) == [
        "sg.jsonl:1", "sg.jsonl:1", "sg.jsonl:2", "sg.jsonl:2"]  # weight 2: each twice
    assert len(set(o for o in origins(data) if o.startswith("alpaca"))) == 2  # no repeat
    assert data.counts["train"] == 8
    facts = {Path(f["path"]).name: f for f in data.source_facts or []}
    assert facts["sg.jsonl"]["records"] == 2 and facts["sg.jsonl"]["examples"] == 4
    assert facts["alpaca.jsonl"]["examples"] == 2 and facts["openai.jsonl"]["examples"] == 2
    assert len({f["sha256"] for f in facts.values()}) == 3
    assert all(isinstance(m, list) for m in conversations(data))  # every type normalised


def test_a_mixture_is_the_same_for_a_seed_and_another_for_another_seed(
        tmp_path: Path) -> None:
    spec = mixture(tmp_path, openai={"weight": 0.6}, alpaca={"samples": 5})
    first = origins(load(spec, tmp_path, seed=1, cache="a"))
    assert origins(load(spec, tmp_path, seed=1, cache="b")) == first
    others = {tuple(origins(load(spec, tmp_path, seed=s, cache=f"s{s}"))) for s in range(2, 6)}
    assert others - {tuple(first)}  # the draw depends on the seed
    # Interleaved: the sources are not laid out one after another.
    files = [o.split(":")[0] for o in first]
    assert files != sorted(files, key=files.index)


def test_the_digest_covers_every_source(tmp_path: Path) -> None:
    spec = mixture(tmp_path)
    before = load(spec, tmp_path, cache="a").digest
    jsonl(tmp_path / "openai.jsonl", OPENAI[:4])
    assert load(spec, tmp_path, cache="b").digest != before


def test_a_bad_record_in_one_source_names_that_source(tmp_path: Path) -> None:
    spec = mixture(tmp_path)
    jsonl(tmp_path / "alpaca.jsonl", [*ALPACA, {"instruction": "x"}])
    with pytest.raises(DataError, match=r"alpaca\.jsonl:4: missing field 'output'"):
        load(spec, tmp_path)


def test_mixture_sources_must_give_the_same_roles() -> None:
    with pytest.raises(ValueError, match=r"train\[1\]: fields text differ from the "
                                         r"mixture's messages"):
        DatasetSpec.model_validate({"train": [{"path": "a", "type": "openai"},
                                              {"path": "b", "fields": {"text": "t"}}]})
    with pytest.raises(ValueError, match="set weight or samples, not both"):
        DatasetSpec.model_validate({"train": [{"path": "a", "weight": 1, "samples": 2}]})


def test_the_features_cache_key_covers_the_mixture(tmp_path: Path) -> None:
    """Same data bytes, another weight: another features key (the key holds the spec)."""
    from kubetune_trainer.features import Tokenization
    from kubetune_trainer.tiny import train_tokenizer

    tok = train_tokenizer("llama", ["a b c"] * 5)
    spec = mixture(tmp_path, openai={"weight": 0.5})
    key = Tokenization(DatasetSpec.model_validate(spec), "causal-lm", tok).fingerprint("d")
    spec["train"][2]["weight"] = 0.6
    assert Tokenization(DatasetSpec.model_validate(spec), "causal-lm",
                        tok).fingerprint("d") != key


@pytest.mark.parametrize("path", ["hf://datasets/acme/support", "hf://datasets/acme/support/"])
def test_a_hub_dataset_path_without_a_file_or_a_split_is_a_spec_error(path: str) -> None:
    """A repository is read through `datasets` by split; without one there is nothing to
    read (test_hf_datasets.py reads repositories with one)."""
    from kubetune_api.load import SpecError, parse_job
    from support.jobs import MINIMAL_JOB_YAML

    text = MINIMAL_JOB_YAML.replace("train: data.jsonl", f"train: {path}")
    with pytest.raises(SpecError, match=r"job.yaml:\d+: spec.dataset: .*names no file and no "
                       r"split: set dataset.split \(e.g. train\)"):
        parse_job(text, "job.yaml")
    mixture_text = MINIMAL_JOB_YAML.replace("train: data.jsonl", f"train: [{{path: {path}}}]")
    with pytest.raises(SpecError, match="names no file and no split: set split"):
        parse_job(mixture_text, "job.yaml")
    parse_job(text.replace(f"train: {path}", f"train: {path}\n    split: train"))
    with pytest.raises(SpecError, match="names no repository"):
        parse_job(MINIMAL_JOB_YAML.replace("train: data.jsonl", "train: hf://datasets/acme"))
    parse_job(MINIMAL_JOB_YAML.replace("train: data.jsonl",
                                       "train: hf://datasets/acme/support/train.jsonl"))
