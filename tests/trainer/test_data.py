"""Reading and checking datasets: every format, and bad rows reported by file:line."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kubetune_api.spec import DatasetSpec
from kubetune_trainer.data import DataError, load_records


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
    assert [r.values["text"] for r in data.train] == ["a b c", "d e", "f"]
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
    assert [r.values for r in again.eval] == [r.values for r in data.eval]
    assert load_records(spec(path), "causal-lm", seed=1).eval == []


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
    with pytest.raises(DataError, match=r"data\.txt: not UTF-8 text"):
        load_records(spec(binary), "causal-lm", seed=0)
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text('{"text": "a", "label": 1}\n{"text": "b", "label": "x"}\n')
    with pytest.raises(DataError, match="mix integers and strings"):
        load_records(spec(mixed, fields={"text": "text", "label": "label"}),
                     "sequence-classification", seed=0)
