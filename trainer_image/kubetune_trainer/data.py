"""Datasets: read records from any fsspec URI, check them, tokenize them for the task.

Every record keeps where it came from (`file:line` or `file: row N`), so a bad row is reported
by its location before any training starts.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from kubetune_api.load import SpecError
from kubetune_api.spec import DatasetSpec, Task
from kubetune_trainer import storage

IGNORE_INDEX = -100  # label value the loss ignores
MAX_REPORTED_ERRORS = 5
FORMATS_BY_SUFFIX = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json",
                     ".parquet": "parquet", ".csv": "csv", ".txt": "text", ".text": "text"}


class DataError(SpecError):
    """The data cannot be trained on; the message names the file and line or row."""


@dataclass
class Record:
    values: dict[str, Any]
    where: str


@dataclass
class LoadedData:
    train: list[Record]
    eval: list[Record]
    digest: str  # sha256 over the raw bytes of the data files, for the manifest
    label_names: list[str] | None = field(default=None)


def load_records(spec: DatasetSpec, task: str, seed: int) -> LoadedData:
    """Read, check and split the job's data. Raises DataError naming the file:line."""
    digest = hashlib.sha256()
    train = _read_checked(spec.train, spec, digest)
    evaluation = _read_checked(spec.eval, spec, digest) if spec.eval else []
    if not spec.eval and spec.eval_fraction > 0:
        shuffled = train[:]
        random.Random(seed).shuffle(shuffled)
        held_out = max(1, round(len(shuffled) * spec.eval_fraction))
        if held_out >= len(shuffled):
            raise DataError(f"{spec.train}: dataset.evalFraction {spec.eval_fraction} leaves no "
                            f"training records out of {len(train)}")
        evaluation, train = shuffled[:held_out], shuffled[held_out:]
    data = LoadedData(train=train, eval=evaluation, digest=digest.hexdigest())
    if task == Task.SEQUENCE_CLASSIFICATION:
        data.label_names = _label_names(train + evaluation, spec.fields.label or "label")
    return data


def _read_checked(uri: str, spec: DatasetSpec, digest: Any) -> list[Record]:
    raw = _read_bytes(uri)
    digest.update(raw)
    fmt = spec.format if spec.format != "auto" else _format_of(uri)
    records = list(_parse(raw, fmt, uri, spec.fields.text or "text"))
    if not records:
        raise DataError(f"{uri}: no records (the file is empty)")
    errors = [f"{r.where}: {e}" for r in records if (e := _check_record(r.values, spec))]
    if errors:
        more = len(errors) - MAX_REPORTED_ERRORS
        tail = [f"... and {more} more bad records"] if more > 0 else []
        raise DataError("\n".join(errors[:MAX_REPORTED_ERRORS] + tail))
    return records


def _read_bytes(uri: str) -> bytes:
    """Through kubetune_trainer.storage, as checkpoints and artifacts are: the same endpoints
    (AWS_ENDPOINT_URL, STORAGE_EMULATOR_HOST), credentials and retries."""
    try:
        return storage.read_bytes(uri)
    except (storage.StorageError, OSError, ValueError, ImportError) as exc:
        raise DataError(f"{uri}: cannot read dataset: {exc}") from None


def _format_of(uri: str) -> str:
    name = uri.rsplit("/", 1)[-1].lower()
    for suffix, fmt in FORMATS_BY_SUFFIX.items():
        if name.endswith(suffix):
            return fmt
    raise DataError(f"{uri}: cannot tell the format from the file name; set dataset.format "
                    f"to one of jsonl, json, parquet, csv, text")


def _parse(raw: bytes, fmt: str, uri: str, text_field: str) -> Iterator[Record]:
    if fmt == "parquet":
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(io.BytesIO(raw)).to_pylist()
        except Exception as exc:  # pyarrow raises many types for a corrupt file
            raise DataError(f"{uri}: not a readable parquet file: {exc}") from None
        yield from (Record(row, f"{uri}: row {i + 1}") for i, row in enumerate(rows))
        return
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{uri}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if fmt == "jsonl":
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                yield Record(_json(line, f"{uri}:{number}"), f"{uri}:{number}")
    elif fmt == "json":
        rows = _json(text, uri)
        if isinstance(rows, dict) and isinstance(rows.get("data"), list):
            rows = rows["data"]
        if not isinstance(rows, list):
            raise DataError(f"{uri}: a json dataset must be a list of records")
        yield from (Record(row, f"{uri}: record {i + 1}") for i, row in enumerate(rows))
    elif fmt == "csv":
        reader = csv.DictReader(io.StringIO(text))
        for row in reader:
            yield Record(dict(row), f"{uri}:{reader.line_num}")
    else:  # text: one example per non-empty line
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                yield Record({text_field: line}, f"{uri}:{number}")


def _json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where}: invalid JSON: {exc.msg}") from None


def _check_record(row: Any, spec: DatasetSpec) -> str | None:
    if not isinstance(row, dict):
        return f"expected an object, got {type(row).__name__}"
    fields = spec.fields
    for role in ("text", "prompt", "completion", "messages", "label"):
        name = getattr(fields, role)
        if name is None:
            continue
        if name not in row or row[name] is None or row[name] == "":
            return f"missing field {name!r} (dataset.fields.{role})"
        if role == "messages":
            problem = _check_messages(row[name])
            if problem:
                return f"field {name!r}: {problem}"
        elif role == "label":
            if not isinstance(row[name], str | int) or isinstance(row[name], bool):
                return f"field {name!r} must be an integer or a string label"
        elif not isinstance(row[name], str):
            return f"field {name!r} must be a string, got {type(row[name]).__name__}"
    return None


def _check_messages(messages: Any) -> str | None:
    if not isinstance(messages, list) or not messages:
        return "must be a non-empty list of {role, content}"
    for i, message in enumerate(messages):
        if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)):
            return f"message {i} must have string role and content"
    if not any(m["role"] == "assistant" for m in messages):
        return "no assistant message to learn from"
    return None


def _label_names(records: list[Record], label_field: str) -> list[str] | None:
    """None when labels are integers; the sorted class names when they are strings."""
    labels = [r.values[label_field] for r in records]
    if all(isinstance(v, int) for v in labels):
        return None
    if all(isinstance(v, str) for v in labels):
        if all(v.lstrip("-").isdigit() for v in labels):  # csv gives numbers as strings
            return None
        return sorted(set(labels))
    raise DataError(f"{records[0].where}: labels in field {label_field!r} mix integers and "
                    f"strings")


def training_texts(data: LoadedData, spec: DatasetSpec) -> Iterator[str]:
    """All text the model will see (to train a tiny model's tokenizer)."""
    fields = spec.fields
    for record in data.train + data.eval:
        values = record.values
        if fields.messages:
            yield from (m["content"] for m in values[fields.messages])
        for name in (fields.text, fields.prompt, fields.completion):
            if name:
                yield str(values[name])
