"""Reading and checking datasets: every format, and bad rows reported by file:line."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kubetune_api.spec import DatasetSpec
from kubetune_trainer import data as data_module
from kubetune_trainer.data import DataError, LoadedData


def load_records(s: DatasetSpec, task: str, seed: int) -> LoadedData:
    cache = Path(s.train.removeprefix("file://")).parent / "cache"
    return data_module.load_records(s, task, seed, cache)


def spec(train: Path | str, **fields: object) -> DatasetSpec:
    return DatasetSpec.model_validate({"train": str(train), **fields})


ROWS = [{"text": "a b c", "label": "pos"}, {"text": "d e", "label": "neg"},
        {"text": "f", "label": "pos"}]


def write(tmp_path: Path, fmt: str) -> Path:
    path = tmp_path / f"data.{fmt}"
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    elif fmt == "json":
        path.write_text(json.dumps(ROWS))
    elif fmt == "csv":
        path.write_text("text,label\n" + "".join(f"{r['text']},{r['label']}\n" for r in ROWS))
    elif fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(ROWS), path)
    elif fmt == "txt":
        path.write_text("".join(r["text"] + "\n\n" for r in ROWS))
    return path


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "parquet", "txt"])
def test_every_format_reads_the_same_texts(tmp_path: Path, fmt: str) -> None:
    data = load_records(spec(write(tmp_path, fmt)), "causal-lm", seed=0)
    assert data.train["text"] == ["a b c", "d e", "f"]
    assert len(data.digest) == 64


def test_file_uri_and_explicit_format(tmp_path: Path) -> None:
    path = write(tmp_path, "jsonl").rename(tmp_path / "data.records")
    with pytest.raises(DataError, match="cannot tell the format"):
        load_records(spec(path), "causal-lm", seed=0)
    data = load_records(spec(f"file://{path}", format="jsonl"), "causal-lm", seed=0)
    assert len(data.train) == 3


def test_string_labels_become_sorted_class_names(tmp_path: Path) -> None:
    s = spec(write(tmp_path, "csv"), fields={"text": "text", "label": "label"})
    assert load_records(s, "sequence-classification", seed=0).label_names == ["neg", "pos"]


def test_eval_fraction_holds_out_records(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"text": f"t{i}"}) + "\n" for i in range(20)))
    data = load_records(spec(path, evalFraction=0.25), "causal-lm", seed=1)
    assert (len(data.train), len(data.eval)) == (15, 5)
    again = load_records(spec(path, evalFraction=0.25), "causal-lm", seed=1)
    assert again.eval["text"] == data.eval["text"]
    assert sorted([*data.train["text"], *data.eval["text"]]) == sorted(f"t{i}" for i in range(20))
    assert len(load_records(spec(path), "causal-lm", seed=1).eval) == 0


@pytest.mark.parametrize(
    ("content", "fields", "message"),
    [
        ("", {}, "data.jsonl: no records (the file is empty)"),
        ('{"text": "ok"}\n{"txt": "typo"}\n', {}, "data.jsonl:2: missing field 'text' "
         "(dataset.fields.text)"),
        ('{"text": "ok"}\n\n{"text": 3}\n', {}, "data.jsonl:3: field 'text' must be a string"),
        ('{"text": "ok"}\n{not json}\n', {}, "data.jsonl:2: invalid JSON"),
        ('{"p": "x", "c": ""}\n', {"prompt": "p", "completion": "c"},
         "data.jsonl:1: missing field 'c' (dataset.fields.completion)"),
        ('{"m": [{"role": "user", "content": "hi"}]}\n', {"messages": "m"},
         "data.jsonl:1: field 'm': no assistant message to learn from"),
        ('{"m": [{"role": "user"}]}\n', {"messages": "m"},
         "data.jsonl:1: field 'm': message 0 must have string role and content"),
    ],
)
def test_bad_rows_name_file_and_line(tmp_path: Path, content: str, fields: dict[str, str],
                                     message: str) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text(content)
    with pytest.raises(DataError) as info:
        load_records(spec(path, fields=fields or {"text": "text"}), "causal-lm", seed=0)
    assert f"{tmp_path}/{message}" in str(info.value)


def test_many_bad_rows_are_summarised(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text('{"x": 1}\n' * 9)
    with pytest.raises(DataError) as info:
        load_records(spec(path), "causal-lm", seed=0)
    lines = str(info.value).splitlines()
    assert len(lines) == 6 and lines[-1] == "... and 4 more bad records"


def test_unreadable_and_mixed_label_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"missing\.jsonl: cannot read dataset"):
        load_records(spec(tmp_path / "missing.jsonl"), "causal-lm", seed=0)
    binary = tmp_path / "data.txt"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(DataError, match=r"data\.txt:1: not UTF-8 text"):
        load_records(spec(binary), "causal-lm", seed=0)
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text('{"text": "a", "label": 1}\n{"text": "b", "label": "x"}\n')
    with pytest.raises(DataError, match="mix integers and strings"):
        load_records(spec(mixed, fields={"text": "text", "label": "label"}),
                     "sequence-classification", seed=0)


def test_node_once_runs_on_the_first_rank_and_hands_the_result_over(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert data_module.node_once(tmp_path, "x", lambda: calls.append(1) or {"n": 1}) == {"n": 1}
    monkeypatch.setenv("LOCAL_RANK", "1")  # another rank of the same node (same agent)
    assert data_module.node_once(tmp_path, "x", lambda: calls.append(2) or {"n": 2}) == {"n": 1}
    assert calls == [1]


def test_a_data_error_on_the_first_rank_is_a_data_error_on_every_rank(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"x": 1}\n')
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    with pytest.raises(DataError, match=r"bad\.jsonl:1: missing field 'text'"):
        data_module.read_data(spec(bad), "causal-lm", 0, tmp_path / "cache")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(DataError, match=r"bad\.jsonl:1: missing field 'text'"):
        data_module.read_data(spec(bad), "causal-lm", 0, tmp_path / "cache")


def test_a_transient_read_error_is_retried_and_a_missing_file_is_not(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kubetune_trainer import storage

    path = write(tmp_path, "jsonl")
    monkeypatch.setattr(storage, "RETRY_BASE_DELAY", 0.01)
    real_open = data_module._open
    failures = [ConnectionResetError("connection reset by peer")]

    def flaky_open(uri: str) -> object:
        if failures:
            raise failures.pop()
        return real_open(uri)

    monkeypatch.setattr(data_module, "_open", flaky_open)
    assert len(load_records(spec(path), "causal-lm", seed=0).train) == 3  # retried, whole
    monkeypatch.setattr(storage, "RETRY_ATTEMPTS", 2)
    failures.extend([TimeoutError("read timed out")] * 2)
    with pytest.raises(storage.StorageError, match="failed after 2 attempt"):
        load_records(spec(path), "causal-lm", seed=0)  # retryable: not exit 2


def test_records_are_memory_mapped_not_held(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"text": f"t{i}"}) + "\n" for i in range(2500)))
    data = load_records(spec(path), "causal-lm", seed=0)
    assert data.train.cache_files and not data.train._data.table.__class__.__name__.startswith(
        "InMemory")
    assert data.train[2499]["where"] == f"{path}:2500"
