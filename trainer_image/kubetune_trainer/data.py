"""Datasets: read records from any fsspec URI as a stream, check them, keep them as Arrow.

Files are read record by record (never whole, except `json` arrays), each record checked and
written in batches to an Arrow file that Hugging Face `datasets` memory-maps: memory stays flat
whatever the data size. Every record keeps where it came from (`file:line` or `file: row N`)
in a `where` column, so a bad row is reported by its location before any training starts.

The job's fields are stored under their role names (`text`, `prompt`, `completion`,
`messages`, `label`); `messages` and `label` as JSON text, so any message shape and both label
types survive Arrow's one-type-per-column rule.

`node_once` runs a step on the node's first rank while the node's other ranks wait for its
result (data is read and tokenized once per node, not once per rank).
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from datasets import Dataset, load_dataset

from kubetune_api.load import SpecError
from kubetune_api.spec import DatasetSpec, SourceSpec, Task, hub_repo
from kubetune_trainer import storage
from kubetune_trainer.ranks import is_local_leader

IGNORE_INDEX = -100  # label value the loss ignores
MAX_REPORTED_ERRORS = 5
ROLES = ("text", "prompt", "completion", "messages", "label", "chosen", "rejected")
JSON_ROLES = frozenset({"messages", "label", "chosen", "rejected"})
PAIR_ROLES = frozenset({"chosen", "rejected"})  # strings or conversations: preference.py checks
WRITE_BATCH_ROWS = 1000  # records per Arrow record batch: bounds memory while writing
HASH_CHUNK = 8 << 20
FORMATS_BY_SUFFIX = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json",
                     ".parquet": "parquet", ".csv": "csv", ".txt": "text", ".text": "text"}
NODE_WAIT_LOG_SECONDS = 60.0
TRAIN_FILE, EVAL_FILE = "train.arrow", "eval.arrow"
RECORDS_DIR = "records"
log = logging.getLogger("kubetune")


class DataError(SpecError):
    """The data cannot be trained on; the message names the file and line or row."""


def bad_records(errors: list[str]) -> DataError:
    """One error for the bad records found: the first MAX_REPORTED_ERRORS, then a count."""
    more = len(errors) - MAX_REPORTED_ERRORS
    tail = [f"... and {more} more bad records"] if more > 0 else []
    return DataError("\n".join(errors[:MAX_REPORTED_ERRORS] + tail))


@dataclass
class Record:
    """One raw record (the user's field names) and where it came from."""

    values: dict[str, Any]
    where: str


@dataclass
class LoadedData:
    """The checked records of a job: Arrow files on the node's disk, and facts about them.

    Training never maps the record files (tokenization streams them); `train` and `eval`
    memory-map them on demand (tests, inspection)."""

    directory: Path  # the record files
    digest: str  # sha256 over the raw bytes of the data files, for the manifest and caches
    counts: dict[str, int]  # records per split
    label_names: list[str] | None = None
    held_out: Any = None  # evalFraction: numpy bool mask over the train file's records
    fields: Any = None  # the job's dataset.fields (role -> the record's field name)
    source_facts: list[dict[str, Any]] | None = None  # per training source: digest, counts
    seed: int = 0  # orders a mixture and draws the evalFraction split: part of the features
    # Set when the facts came from the store (the files' identity matched) and the records
    # were not read: reads them on first use (see `read`).
    pending: Callable[[], dict[str, Any]] | None = None

    def read(self) -> None:
        """Read the records now if their reading was deferred; the bytes read must be the
        ones the stored facts describe."""
        if self.pending is None:
            return
        pending, self.pending = self.pending, None
        facts = pending()
        if facts["digest"] != self.digest:
            raise DataError(
                f"the dataset files kept the identity (size, mtime/ctime or ETag) stored with "
                f"digest {self.digest}, but their bytes now have sha256 {facts['digest']}: "
                f"delete the stored sources-*.json facts next to the features")

    @property
    def train(self) -> Dataset:
        return self._split("train")

    @property
    def eval(self) -> Dataset:
        return self._split("eval")

    def _split(self, split: str) -> Dataset:
        self.read()
        if self.held_out is not None:
            records = Dataset.from_file(str(self.directory / TRAIN_FILE))
            chosen = self.held_out if split == "eval" else ~self.held_out
            return records.select(np.flatnonzero(chosen))
        if split == "eval" and not self.counts["eval"]:
            return Dataset.from_file(str(self.directory / TRAIN_FILE)).select([])
        return Dataset.from_file(str(self.directory / (TRAIN_FILE if split == "train"
                                                       else EVAL_FILE)))

    def records(self, split: str) -> list[Record]:
        """A split's records in memory under the job's own field names (preference pairs,
        which TRL tokenizes itself)."""
        fields = {role: name for role in ROLES if (name := getattr(self.fields, role, None))}
        out = []
        for batch in self._split(split).iter(batch_size=WRITE_BATCH_ROWS):
            for i, where in enumerate(batch["where"]):
                values = {name: decode_role(role, batch[role][i]) for role, name in fields.items()}
                out.append(Record({k: v for k, v in values.items() if v is not None}, where))
        return out

    def sources(self) -> list[tuple[str, Path, Any]]:
        """(split, record file, held-out mask or None) to stream the records from."""
        self.read()
        if self.held_out is not None:
            return [("train", self.directory / TRAIN_FILE, self.held_out)]
        files = [("train", self.directory / TRAIN_FILE, None)]
        if self.counts["eval"]:
            files.append(("eval", self.directory / EVAL_FILE, None))
        return files


# --- reading ---------------------------------------------------------------------------------


def read_data(spec: DatasetSpec, task: str, seed: int, cache_root: Path,
              store: str | None = None) -> LoadedData:
    """The job's records: read and checked by the node's first rank, mapped by every rank.

    With a `store` URI (the features' folder next to the checkpoints), the facts of a read
    (digest, counts, label names) are published there under the data files' identity (see
    `source_identities`); a restart or a later job whose files have the same identity takes
    the facts from there and reads the records only if it has to tokenize them (`LoadedData.
    read`): fetching finished features then needs no pass over the data."""
    directory = cache_root / RECORDS_DIR

    def prepare() -> dict[str, Any]:
        identity = source_identities(spec, task) if store else None
        if identity and (known := _stored_facts(store, identity)):  # type: ignore[arg-type]
            return {**known, "deferred": True}
        facts = prepare_records(spec, task, directory, seed)
        if identity and source_identities(spec, task) == identity:  # unchanged while read
            _store_facts(store, identity, facts)  # type: ignore[arg-type]
        return facts

    facts = node_once(cache_root, "records", prepare)
    data = open_records(spec, seed, directory, facts)
    if facts.get("deferred"):
        data.pending = lambda: node_once(cache_root, "records-read", lambda: prepare_records(
            spec, task, directory, seed))
    return data


RECORDS_VERSION = "1"  # bump when reading or checking records changes their facts
# File metadata that changes whenever the content does: object stores' ETag (an MD5 of the
# bytes, or of the parts' MD5s) and version ids, GCS's generation and checksums, the Hub's
# blob ids. Without one of these a remote file has no cheap identity and is always read.
CONTENT_KEYS = ("ETag", "etag", "VersionId", "version_id", "generation", "md5Hash", "crc32c",
                "blob_id", "lfs", "sha256")


def source_identities(spec: DatasetSpec, task: str) -> str | None:
    """A key for the job's data files that needs no read: each file's size and, locally,
    inode, mtime_ns and ctime_ns (a rewrite changes mtime, and ctime even when a tool sets
    mtime back), remotely its content metadata (CONTENT_KEYS), plus the dataset settings and
    the task. None when a file has no such identity (then the data is always read)."""
    sources = [*spec.sources, *([spec.eval_source] if spec.eval else [])]
    found = []
    for source in sources:
        if source is None or source.is_hub_repo:  # a Hub split read through `datasets`
            return None
        try:
            identity = file_identity(source.read_path)
        except Exception:  # only a shortcut: reading the data reports any problem properly
            return None
        if identity is None:
            return None
        found.append([source.read_path, identity])
    key = json.dumps([RECORDS_VERSION, task, spec.model_dump(mode="json"), found],
                     sort_keys=True, default=str)
    return hashlib.sha256(key.encode()).hexdigest()[:24]


def file_identity(uri: str) -> dict[str, Any] | None:
    fs, path = storage.filesystem(uri)
    if storage.is_local(uri):
        stat = os.stat(path)
        return {"size": stat.st_size, "inode": stat.st_ino, "device": stat.st_dev,
                "mtimeNs": stat.st_mtime_ns, "ctimeNs": stat.st_ctime_ns}
    info = fs.info(path)
    content = {k: info[k] for k in CONTENT_KEYS if info.get(k) not in (None, "")}
    return {"size": info.get("size"), **content} if content else None


def _facts_uri(store: str, identity: str) -> str:
    return storage.join(store, f"sources-{identity}.json")


def _stored_facts(store: str, identity: str) -> dict[str, Any] | None:
    try:
        if storage.exists(uri := _facts_uri(store, identity)):
            facts = json.loads(storage.read_text(uri))
            log.info("dataset facts from %s: the data is read only if it must be tokenized",
                     uri)
            return dict(facts)
    except (storage.StorageError, ValueError) as exc:
        log.warning("dataset facts in %s unreadable (%s); reading the data", store, exc)
    return None


def _store_facts(store: str, identity: str, facts: dict[str, Any]) -> None:
    try:
        storage.write_text(_facts_uri(store, identity), json.dumps(facts))
    except storage.StorageError as exc:
        log.warning("dataset facts: cannot store them in %s (%s)", store, exc)


def load_records(spec: DatasetSpec, task: str, seed: int,
                 cache_dir: Path | None = None) -> LoadedData:
    """Read, check and split the job's data in one process (tests, tools); the record files go
    to `cache_dir`, or a new temporary directory."""
    directory = cache_dir or Path(tempfile.mkdtemp(prefix="kubetune-records-"))
    return open_records(spec, seed, directory, prepare_records(spec, task, directory, seed))


def prepare_records(spec: DatasetSpec, task: str, cache_dir: Path,
                    seed: int = 0) -> dict[str, Any]:
    """Stream the data files into Arrow files under `cache_dir` (one rank per node does this);
    returns the facts every rank needs: digest, record counts, label names, and per training
    source its digest and the examples it gave.

    Raises DataError naming the file:line of bad records (up to MAX_REPORTED_ERRORS of them).
    """
    fresh_dir(cache_dir)
    digest = hashlib.sha256()
    files = [cache_dir / TRAIN_FILE]
    schema = _record_schema(spec)
    sources = spec.sources
    if len(sources) == 1 and sources[0].weight is None and sources[0].samples is None:
        count, source_digest = _read_checked(sources[0], schema, files[0])
        source_facts = [_source_facts(sources[0], source_digest, count, count)]
        digest.update(bytes.fromhex(source_digest))
        train_count = count
    else:
        source_facts, train_count = mix_sources(sources, schema, cache_dir, seed, digest)
    counts = {"train": train_count, "eval": 0}
    if spec.eval:
        files.append(cache_dir / EVAL_FILE)
        eval_source = spec.eval_source
        assert eval_source is not None
        counts["eval"], eval_digest = _read_checked(eval_source, schema, files[1])
        digest.update(bytes.fromhex(eval_digest))
    label_names = None
    if task == Task.SEQUENCE_CLASSIFICATION:
        label_names = _label_names(files, spec.fields.label or "label")
    return {"digest": digest.hexdigest(), "counts": counts, "labelNames": label_names,
            "sources": source_facts}


def _source_facts(source: SourceSpec, digest: str, records: int, used: int) -> dict[str, Any]:
    hub = {k: v for k, v in (("config", source.config), ("split", source.split),
                             ("revision", source.revision)) if v is not None}
    return {"path": source.path, **hub, "type": source.type, "sha256": digest,
            "records": records, "examples": used}


def mix_sources(sources: list[SourceSpec], schema: pa.Schema, cache_dir: Path, seed: int,
                digest: Any) -> tuple[list[dict[str, Any]], int]:
    """Read each source to its own record file, then write the mixture to TRAIN_FILE: each
    source's `taken` examples (a random subset below its size, whole repeats and a random
    subset above it), interleaved in one random order. Both draws come from `seed` alone,
    so every rank and every rerun trains on the same mixture."""
    rng = np.random.default_rng(seed)
    parts, facts = [], []
    for i, source in enumerate(sources):
        path = cache_dir / f"source-{i}.arrow"
        count, source_digest = _read_checked(source, schema, path)
        taken = source.taken(count)
        repeats, rest = divmod(taken, count)
        times = np.full(count, repeats, dtype=np.int64)
        times[rng.choice(count, size=rest, replace=False)] += 1
        parts.append((path, times))
        facts.append(_source_facts(source, source_digest, count, taken))
        digest.update(bytes.fromhex(source_digest))
    # (source, row) of every example, then one shuffle: sources interleave, also in packing.
    order = np.concatenate([np.stack([np.full(int(t.sum()), i), np.repeat(np.arange(len(t)), t)],
                                     axis=1) for i, (_, t) in enumerate(parts)])
    order = order[rng.permutation(len(order))]
    tables = [Dataset.from_file(str(path)).data.table for path, _ in parts]
    writer = ArrowWriter(cache_dir / TRAIN_FILE, schema)
    for start in range(0, len(order), WRITE_BATCH_ROWS):
        for source_index, row in order[start:start + WRITE_BATCH_ROWS]:
            writer.write(tables[source_index].slice(int(row), 1).to_pylist()[0])
    return facts, writer.close()


def open_records(spec: DatasetSpec, seed: int, cache_dir: Path,
                 facts: dict[str, Any]) -> LoadedData:
    """The records `prepare_records` wrote, with the evalFraction split decided."""
    counts = dict(facts["counts"])
    held_out = None
    if not spec.eval and spec.eval_fraction > 0:
        held_out = held_out_mask(counts["train"], spec, seed)
        counts = {"train": int((~held_out).sum()), "eval": int(held_out.sum())}
    return LoadedData(directory=cache_dir, digest=facts["digest"], counts=counts,
                      label_names=facts["labelNames"], held_out=held_out, fields=spec.fields,
                      source_facts=facts["sources"], seed=seed)


def held_out_mask(count: int, spec: DatasetSpec, seed: int) -> Any:
    """Which of `count` training records `evalFraction` holds out (a numpy bool array, one
    byte a record); the same for every rank and every run of the same seed."""
    held_out = max(1, round(count * spec.eval_fraction))
    if held_out >= count:
        raise DataError(f"{spec.train_name}: dataset.evalFraction {spec.eval_fraction} leaves no "
                        f"training records out of {count}")
    mask = np.zeros(count, dtype=bool)
    mask[np.random.default_rng(seed).permutation(count)[:held_out]] = True
    return mask


def record_batches(path: Path) -> Iterator[dict[str, list[Any]]]:
    """The batches of an Arrow stream file, read (not memory-mapped): one pass over a large
    file leaves no mapped pages behind in this process's resident memory."""
    with pa.OSFile(str(path)) as source:
        for batch in pa.ipc.open_stream(source):
            yield batch.to_pydict()


class ArrowWriter:
    """Rows to an Arrow stream file in record batches of `batch_rows` (default
    WRITE_BATCH_ROWS; flat memory); the file appears under its name only when closed (a crash
    leaves no half file)."""

    def __init__(self, path: Path, schema: pa.Schema, batch_rows: int | None = None):
        self.path, self.schema, self.count = path, schema, 0
        self.batch_rows = batch_rows or WRITE_BATCH_ROWS
        self._tmp = path.with_suffix(".partial")
        self._sink = pa.OSFile(str(self._tmp), "wb")
        self._writer = pa.ipc.new_stream(self._sink, schema)
        self._rows: list[dict[str, Any]] = []

    def write(self, row: dict[str, Any]) -> None:
        self._rows.append(row)
        if len(self._rows) >= self.batch_rows:
            self._flush()

    def _flush(self) -> None:
        if self._rows:
            self._writer.write_batch(pa.RecordBatch.from_pylist(self._rows, schema=self.schema))
            self.count += len(self._rows)
            self._rows = []

    def close(self) -> int:
        self._flush()
        self._writer.close()
        self._sink.close()
        self._tmp.replace(self.path)
        return self.count


def _read_checked(source: SourceSpec, schema: pa.Schema, path: Path) -> tuple[int, str]:
    """Stream a source into the Arrow file `path`, each record normalised from the source's
    type and checked on the way; (records, sha256 hex of the source's bytes)."""
    uri = source.read_path
    fmt = "hub" if source.is_hub_repo else (
        source.format if source.format != "auto" else _format_of(uri))
    try:
        storage.filesystem(uri)  # an unknown scheme or a missing driver: no retry helps
    except (ValueError, ImportError) as exc:
        raise DataError(f"{uri}: cannot read dataset: {exc}") from None

    def attempt() -> tuple[int, list[str], str]:
        file_digest = hashlib.sha256()
        records = (_hub_records(source, file_digest) if fmt == "hub"
                   else _parse(uri, fmt, source.fields.text or "text", file_digest))
        count, errors = _write_arrow(_checked_rows(records, source), schema, path)
        if fmt == "parquet":  # read by row group, not as a byte stream: hash the bytes apart
            _hash_file(uri, file_digest)
        return count, errors, file_digest.hexdigest()

    try:
        count, errors, file_digest = storage.read_with_retries(
            f"reading dataset {uri}", attempt, fatal=(DataError,))
    except storage.StorageError as exc:
        if isinstance(exc.__cause__, storage.PERMANENT_ERRORS):  # retrying cannot help
            raise DataError(f"{uri}: cannot read dataset: {exc.__cause__}") from None
        raise
    if errors:
        raise bad_records(errors)
    if not count:
        raise DataError(f"{source.label}: no records (the file is empty)" if fmt != "hub"
                        else f"{source.label}: no records (the split is empty)")
    return count, file_digest


def _record_schema(spec: DatasetSpec) -> pa.Schema:
    return pa.schema([("where", pa.string())]
                     + [(role, pa.string()) for role in used_roles(spec)])


def used_roles(spec: DatasetSpec) -> list[str]:
    return [role for role in ROLES if getattr(spec.fields, role)]


def _checked_rows(records: Iterator[Record], source: SourceSpec
                  ) -> Iterator[dict[str, Any] | str]:
    """Column values of good records; a `file:line: problem` string for each bad one."""
    fields = source.fields
    roles = [role for role in ROLES if getattr(fields, role)]
    for record in records:
        try:
            values, problem = normalised(record.values, source)
            problem = problem or _check_record(values, fields)
            if problem:
                yield f"{record.where}: {problem}"
                continue
            row: dict[str, Any] = {"where": record.where}
            for role in roles:
                value = values.get(getattr(fields, role))
                row[role] = json.dumps(value) if role in JSON_ROLES else value
        except RecursionError:  # a value nested deeper than Python's stack
            yield f"{record.where}: the record is nested too deeply to read"
            continue
        yield row


def _write_arrow(rows: Iterable[dict[str, Any] | str], schema: pa.Schema,
                 path: Path) -> tuple[int, list[str]]:
    """Write good rows to an Arrow stream file in batches; (rows written, error lines)."""
    errors: list[str] = []
    writer = ArrowWriter(path, schema)
    for row in rows:
        if isinstance(row, str):
            errors.append(row)
        elif not errors:  # a bad file is not trained on: only count what follows
            writer.write(row)
    return writer.close(), errors


def _format_of(uri: str) -> str:
    name = uri.rsplit("/", 1)[-1].lower()
    for suffix, fmt in FORMATS_BY_SUFFIX.items():
        if name.endswith(suffix):
            return fmt
    raise DataError(f"{uri}: cannot tell the format from the file name; set dataset.format "
                    f"to one of jsonl, json, parquet, csv, text")


def _parse(uri: str, fmt: str, text_field: str, digest: Any) -> Iterator[Record]:
    if fmt == "parquet":
        yield from _parquet_records(uri)
        return
    if fmt == "json":  # one JSON document: it has to be read whole (use jsonl for large data)
        text = "".join(line for _, line in _text_lines(uri, digest))
        rows = _json(text, uri)
        if isinstance(rows, dict) and isinstance(rows.get("data"), list):
            rows = rows["data"]
        if not isinstance(rows, list):
            raise DataError(f"{uri}: a json dataset must be a list of records")
        yield from (Record(row, f"{uri}: record {i + 1}") for i, row in enumerate(rows))
    elif fmt == "csv":
        numbered = _text_lines(uri, digest)
        # csv reads lines lazily and counts them itself (a quoted field may span lines).
        reader = csv.DictReader(line for _, line in numbered)
        try:
            for row in reader:
                yield Record(dict(row), f"{uri}:{reader.line_num}")
        except csv.Error as exc:  # e.g. a field over csv's size limit: the file, not the wire
            raise DataError(f"{uri}:{reader.line_num + 1}: not readable as CSV: {exc}") from None
    else:
        for number, line in _text_lines(uri, digest):
            if not line.strip():
                continue
            if fmt == "jsonl":
                yield Record(_json(line, f"{uri}:{number}"), f"{uri}:{number}")
            else:  # text: one example per non-empty line
                yield Record({text_field: line.rstrip("\r\n")}, f"{uri}:{number}")


def _hub_records(source: SourceSpec, digest: Any) -> Iterator[Record]:
    """A split of a Hub dataset repository through `datasets` (streamed: our Arrow file is the
    only copy kept), at HF_ENDPOINT like every Hub read. The digest covers the records
    themselves (canonical JSON): another revision's content is another digest."""
    repo, _ = hub_repo(source.path) or ("", None)
    try:
        rows = load_dataset(repo, name=source.config, split=source.split,
                            revision=source.revision, streaming=True)
    except ValueError as exc:  # an unknown split or config: permanent
        raise DataError(f"{source.label}: {exc}") from None
    except FileNotFoundError as exc:  # no such repository or revision (or not visible)
        raise DataError(f"{source.label}: cannot read dataset: {exc}") from None
    number = 0
    try:
        for number, values in enumerate(rows, start=1):
            digest.update(json.dumps(values, sort_keys=True, default=str).encode() + b"\n")
            yield Record(values, f"{source.label}: row {number}")
    except (ValueError, pa.ArrowException) as exc:  # a data file `datasets` cannot parse
        raise DataError(f"{source.label}: row {number + 1}: cannot read: {exc}") from None


def _text_lines(uri: str, digest: Any) -> Iterator[tuple[int, str]]:
    """(line number, line) of a UTF-8 file, read as a stream; hashes the raw bytes."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with _open(uri) as handle:
        for number, raw in enumerate(handle, start=1):
            digest.update(raw)
            try:
                line = decoder.decode(raw)
            except UnicodeDecodeError as exc:
                raise DataError(f"{uri}:{number}: not UTF-8 text ({exc.reason} at byte "
                                f"{offset + exc.start})") from None
            offset += len(raw)
            yield number, line


def _parquet_records(uri: str) -> Iterator[Record]:
    import pyarrow.parquet as pq

    row = 0
    with _open(uri) as handle:
        try:
            batches = pq.ParquetFile(handle).iter_batches(batch_size=WRITE_BATCH_ROWS)
            for batch in batches:
                for values in batch.to_pylist():
                    row += 1
                    yield Record(values, f"{uri}: row {row}")
        except (pa.ArrowException, ValueError) as exc:  # a corrupt or non-parquet file
            raise DataError(f"{uri}: not a readable parquet file: {exc}") from None


def _open(uri: str) -> Any:
    """Through kubetune_trainer.storage, as checkpoints and artifacts are: the same endpoints
    (AWS_ENDPOINT_URL, STORAGE_EMULATOR_HOST, HF_ENDPOINT) and credentials."""
    fs, path = storage.filesystem(uri)
    return fs.open(path, "rb")


def _hash_file(uri: str, digest: Any) -> None:
    with _open(uri) as handle:
        while chunk := handle.read(HASH_CHUNK):
            digest.update(chunk)


def _json(text: str, where: str) -> Any:
    """A permanent DataError for anything the decoder refuses: no retry reads it better."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where}: invalid JSON: {exc.msg}") from None
    except RecursionError:
        raise DataError(f"{where}: invalid JSON: nested too deeply to decode") from None
    except ValueError as exc:  # e.g. an integer longer than Python converts
        raise DataError(f"{where}: invalid JSON: {exc}") from None


# --- record types: each source's shape to the job's roles -----------------------------------


def normalised(values: Any, source: SourceSpec) -> tuple[Any, str | None]:
    """A record of the source's type in the shape the checks and the features read (a
    ShareGPT or alpaca record becomes OpenAI chat messages under fields.messages); or the
    problem, naming the key that is wrong."""
    if source.type not in ("sharegpt", "alpaca") or not isinstance(values, dict):
        return values, None
    make = _sharegpt_messages if source.type == "sharegpt" else _alpaca_messages
    messages, problem = make(values, source.fields)
    if problem:
        return values, problem
    return {**values, source.fields.messages: messages}, None


def _sharegpt_messages(values: dict[str, Any], fields: Any) -> tuple[Any, str | None]:
    name, role_key, content_key = fields.messages, fields.role, fields.content
    roles: dict[str, str] = fields.roles or {}
    turns = values.get(name)
    if not isinstance(turns, list) or not turns:
        return None, (f"field {name!r} (dataset.fields.messages) must be a non-empty list of "
                      f"{{{role_key}, {content_key}}} turns")
    messages = []
    for i, turn in enumerate(turns):
        where = f"field {name!r}, turn {i}"
        if not isinstance(turn, dict):
            return None, f"{where}: expected an object, got {type(turn).__name__}"
        role = turn.get(role_key)
        if not isinstance(role, str) or role not in roles:
            known = ", ".join(roles)
            return None, (f"{where}: key {role_key!r} is {role!r}, not a role dataset.fields."
                          f"roles maps ({known})")
        content = turn.get(content_key)
        if not isinstance(content, str):
            return None, (f"{where}: key {content_key!r} must be a string, got "
                          f"{type(content).__name__}")
        messages.append({"role": roles[role], "content": content})
    return messages, None


def _alpaca_messages(values: dict[str, Any], fields: Any) -> tuple[Any, str | None]:
    """One user turn (the instruction, then the input after a blank line) and the answer.

    The user turn also keeps `instruction` and `input` apart: the built-in alpaca template
    renders them in Stanford Alpaca's two prompt forms; model templates read `content`."""
    texts: dict[str, str] = {}
    for key in ("instruction", "input", "output"):
        name = getattr(fields, key)
        value = values.get(name)
        if key == "input" and value is None:
            value = ""
        if not isinstance(value, str):
            return None, (f"missing field {name!r} (dataset.fields.{key})" if value is None
                          else f"field {name!r} (dataset.fields.{key}) must be a string, got "
                          f"{type(value).__name__}")
        if key != "input" and not value.strip():
            return None, f"field {name!r} (dataset.fields.{key}) is empty"
        texts[key] = value
    prompt = texts["instruction"] + (f"\n\n{texts['input']}" if texts["input"].strip() else "")
    return [{"role": "user", "content": prompt, "instruction": texts["instruction"],
             "input": texts["input"]},
            {"role": "assistant", "content": texts["output"]}], None


# --- checks ----------------------------------------------------------------------------------


def _check_record(row: Any, fields: Any) -> str | None:
    if not isinstance(row, dict):
        return f"expected an object, got {type(row).__name__}"
    for role in ROLES:
        name = getattr(fields, role)
        if name is None:
            continue
        if role in PAIR_ROLES:
            continue  # preference.pairs checks them, with their own messages
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


def message_list_problem(messages: Any) -> str | None:
    """What is wrong with a conversation's shape (None when it is a list of string
    {role, content} messages); also checks each side of a preference pair."""
    if not isinstance(messages, list) or not messages:
        return "must be a non-empty list of {role, content} messages"
    for i, message in enumerate(messages):
        if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)):
            return f"message {i} must have string role and content"
    return None


def _check_messages(messages: Any) -> str | None:
    if problem := message_list_problem(messages):
        return problem
    if not any(m["role"] == "assistant" for m in messages):
        return "no assistant message to learn from"
    return None


def _label_names(files: list[Path], label_field: str) -> list[str] | None:
    """None when labels are integers; the sorted class names when they are strings."""
    kinds: set[type] = set()
    names: set[str] = set()
    for path in files:
        for batch in record_batches(path):
            for where, encoded in zip(batch["where"], batch["label"], strict=True):
                value = json.loads(encoded)
                kinds.add(type(value))
                if len(kinds) > 1:
                    raise DataError(f"{where}: labels in field {label_field!r} mix integers "
                                    f"and strings")
                if isinstance(value, str):
                    names.add(value)
    if not names or all(v.lstrip("-").isdigit() for v in names):  # csv gives numbers as text
        return None
    return sorted(names)


def decode_role(role: str, value: Any) -> Any:
    """A stored column value back to the record's value (JSON roles are stored as text)."""
    return json.loads(value) if role in JSON_ROLES else value


def training_texts(data: LoadedData, spec: DatasetSpec) -> Iterator[str]:
    """All text the model will see, streamed (to train a tiny model's tokenizer)."""
    roles = [r for r in ("messages", "text", "prompt", "completion") if getattr(spec.fields, r)]
    for _, path, _ in data.sources():
        for batch in record_batches(path):
            for role in roles:
                for value in batch[role]:
                    if role == "messages":
                        yield from (m["content"] for m in json.loads(value))
                    else:
                        yield str(value)


# --- once per node ---------------------------------------------------------------------------


def node_once(cache_root: Path, name: str, build: Callable[[], dict[str, Any]]
              ) -> dict[str, Any]:
    """Run `build` on the node's first rank; the node's other ranks wait and get its result.

    The result (JSON) or the error travels through a hand-off file in `cache_root`, named
    after the torchrun agent that started this node's ranks, so a stale file of an earlier
    launch is never read. A DataError on the first rank is a DataError on every rank (exit 2
    everywhere, one message), any other failure a RuntimeError.
    """
    agent = f"{os.getppid()}-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    handoff = cache_root / f"handoff-{name}-{agent}.json"
    if is_local_leader():
        cache_root.mkdir(parents=True, exist_ok=True)
        try:
            result = build()
        except DataError as exc:
            _write_json(handoff, {"dataError": str(exc)})
            raise
        except BaseException as exc:
            _write_json(handoff, {"error": f"{type(exc).__name__}: {exc}"})
            raise
        _write_json(handoff, {"result": result})
        return result
    waited_since = time.monotonic()
    logged = waited_since
    while not handoff.exists():
        if time.monotonic() - logged > NODE_WAIT_LOG_SECONDS:
            log.info("waiting for the node's first rank to prepare the data (%.0f s)",
                     time.monotonic() - waited_since)
            logged = time.monotonic()
        time.sleep(0.2)
    message = json.loads(handoff.read_text())
    if "dataError" in message:
        raise DataError(message["dataError"])
    if "error" in message:
        raise RuntimeError(f"the node's first rank failed preparing the data: "
                           f"{message['error']}")
    return dict(message["result"])


def _write_json(path: Path, value: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value))
    tmp.replace(path)  # atomic: a waiting rank sees all of it or nothing


def fresh_dir(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path
