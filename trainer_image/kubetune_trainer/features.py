"""Records → token features per task, packing, and the collators that batch them.

Labels are built here, explicitly, rather than by a collator that masks every pad token: when
pad == eos (Llama, GPT-2, Mistral) such a collator also masks every EOS, and the model never
learns to stop (trl#976, transformers#23530). Padding is masked by position instead.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import multiprocessing
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch
from datasets import Dataset, concatenate_datasets
from transformers import (
    DataCollatorForLanguageModeling,
    DataCollatorForSeq2Seq,
    DataCollatorWithPadding,
    PreTrainedTokenizerBase,
)

from kubetune_api.spec import DatasetSpec, FineTuneJobSpec, Task
from kubetune_trainer import data as data_module
from kubetune_trainer import feature_store
from kubetune_trainer.chat import chat_example
from kubetune_trainer.data import (
    IGNORE_INDEX,
    JSON_ROLES,
    ArrowWriter,
    DataError,
    LoadedData,
    Record,
    fresh_dir,
    node_once,
    used_roles,
)
from kubetune_trainer.feature_store import FEATURE_SPLITS, ready_facts
from kubetune_trainer.ranks import node_count, node_rank

Feature = dict[str, Any]
MLM_PROBABILITY = 0.15
FEATURES_VERSION = "3"  # bump when the tokenization changes: old caches are not reused
READY_FILE = "READY"  # written last: the features under it are complete
# Record batches (of WRITE_BATCH_ROWS records) per shard, the unit of parallel tokenization;
# each shard is packed on its own (one shorter last block per shard and split).
SHARD_BATCHES = 16
log = logging.getLogger("kubetune")


@dataclass(frozen=True)
class Tokenization:
    """What turns records into features for one job."""

    spec: DatasetSpec
    task: str
    tokenizer: PreTrainedTokenizerBase
    label_names: list[str] | None = None
    num_labels: int | None = None

    @property
    def packs(self) -> bool:
        return self.spec.packing and self.task == Task.CAUSAL_LM

    @property
    def truncates(self) -> bool:
        """Packed causal-LM documents are never cut: the rest continues in the next block."""
        return not self.packs

    def fingerprint(self, data_digest: str, seed: int = 0) -> str:
        """Cache key: the data, the seed (it orders a mixture and draws the evalFraction
        split), the tokenizer (vocabulary, specials, chat template) and every setting that
        changes the features."""
        tok = self.tokenizer
        backend = tok.backend_tokenizer.to_str() if tok.is_fast else json.dumps(tok.get_vocab())
        key = json.dumps([FEATURES_VERSION, SHARD_BATCHES, data_digest, seed, self.task,
                          self.label_names, self.num_labels, self.spec.model_dump(mode="json"),
                          type(tok).__name__, backend, str(tok.chat_template),
                          tok.special_tokens_map], sort_keys=True, default=str)
        return hashlib.sha256(key.encode()).hexdigest()[:24]


def tokenize(records: Sequence[Record], spec: DatasetSpec, task: str,
             tokenizer: PreTrainedTokenizerBase, label_names: list[str] | None = None,
             num_labels: int | None = None) -> list[Feature]:
    """Tokenize a few records in memory (the dataset path is `tokenize_dataset`)."""
    roles = used_roles(spec)
    batch: dict[str, list[Any]] = {"where": [r.where for r in records]}
    for role in roles:
        name = getattr(spec.fields, role)
        batch[role] = [json.dumps(r.values[name]) if role in JSON_ROLES else r.values[name]
                       for r in records]
    out = tokenize_batch(batch, Tokenization(spec, task, tokenizer, label_names, num_labels))
    return [dict(zip(out, values, strict=True)) for values in zip(*out.values(), strict=True)]


def tokenize_batch(batch: dict[str, list[Any]], how: Tokenization) -> dict[str, list[Any]]:
    """One `Dataset.map(batched=True)` call: stored record columns in, features out."""
    task, tok = how.task, how.tokenizer
    max_len = how.spec.max_seq_length
    wheres = batch["where"]
    out: dict[str, list[Any]] = {"input_ids": [], "labels": []}
    if task in (Task.SEQUENCE_CLASSIFICATION, Task.MASKED_LM):
        ids = tok(batch["text"], truncation=True, max_length=max_len)["input_ids"]
        if task == Task.MASKED_LM:
            return {"input_ids": [list(x) for x in ids if x]}
        for where, row_ids, label in zip(wheres, ids, batch["label"], strict=True):
            out["input_ids"].append(list(row_ids))
            out["labels"].append(_class_id(json.loads(label), where, how.label_names,
                                           how.num_labels))
        return out
    if task == Task.SEQ2SEQ_LM:
        sources = tok(batch["prompt"], truncation=True, max_length=max_len)["input_ids"]
        targets = tok(batch["completion"], truncation=True, max_length=max_len)["input_ids"]
        pairs = zip(sources, targets, strict=True)
        return {"input_ids": [list(s) for s, t in pairs if t],
                "labels": [list(t) for t in targets if t]}
    for ids, labels in _causal_examples(batch, how):
        if how.truncates:
            ids, labels = ids[:max_len], labels[:max_len]
        if learns(labels):
            out["input_ids"].append(ids)
            out["labels"].append(labels)
    return out


def learns(labels: list[int]) -> bool:
    """Whether any label is not masked (list.count runs in C: a generator over every token
    was a tenth of the tokenization time)."""
    return labels.count(IGNORE_INDEX) != len(labels)


def _causal_examples(batch: dict[str, list[Any]], how: Tokenization
                     ) -> Iterator[tuple[list[int], list[int]]]:
    tok, fields = how.tokenizer, how.spec.fields
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
    if fields.messages:
        for where, messages in zip(batch["where"], batch["messages"], strict=True):
            yield chat_example(json.loads(messages), tok, where)
    elif fields.prompt and fields.completion:
        # Loss on the completion (and its EOS) only; tokenized apart so the boundary is exact.
        prompts = encode_ids(tok, batch["prompt"])
        completions = encode_ids(tok, batch["completion"], add_special_tokens=False)
        for prompt, completion in zip(prompts, completions, strict=True):
            learned = completion + eos
            yield prompt + learned, [IGNORE_INDEX] * len(prompt) + learned
    else:
        for ids in encode_ids(tok, batch["text"]):
            if eos and (not ids or ids[-1] != eos[0]):
                ids += eos
            yield ids, list(ids)


def encode_ids(tok: PreTrainedTokenizerBase, texts: list[str],
               add_special_tokens: bool = True) -> list[list[int]]:
    """Token ids of many texts, untruncated. Fast tokenizers go straight to their Rust
    backend (the same call `tok(texts)` makes): converting each encoding back into Python
    objects took 85 % of the tokenization time."""
    if not tok.is_fast:
        return [list(ids) for ids in tok(texts, add_special_tokens=add_special_tokens)["input_ids"]]
    backend = tok.backend_tokenizer
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)  # no offsets needed
    return [e.ids for e in encode(texts, add_special_tokens=add_special_tokens)]


def _class_id(value: Any, where: str, names: list[str] | None, num_labels: int | None) -> int:
    label = names.index(value) if names else int(value)
    if num_labels is not None and not 0 <= label < num_labels:
        raise DataError(f"{where}: label {value!r} is outside 0..{num_labels - 1} "
                        f"(spec.model.numLabels is {num_labels})")
    return label


def arrow_lengths(features: Dataset) -> Any:
    """Tokens per row as a numpy array, from the Arrow list offsets (no row is decoded; 4 bytes
    a row where a list of Python ints would take 36)."""
    import pyarrow.compute as pc

    column = features.with_format("arrow")[:]["input_ids"]
    return pc.list_value_length(column).to_numpy(zero_copy_only=False)


# --- packing ---------------------------------------------------------------------------------


def pack(features: Iterable[Feature], block_size: int) -> list[Feature]:
    """Pack causal-LM examples into blocks of `block_size` tokens (see `Packer`)."""
    packer = Packer(block_size)
    blocks = [block for f in features for block in packer.add(f["input_ids"], f["labels"])]
    return blocks + packer.finish()


class Packer:
    """Concatenates examples (each ends in EOS) into blocks; nothing is cut off or dropped.

    A document longer than the room left continues in the next block. `position_ids` restart
    at 0 at every document (and every continuation), which is how transformers' padding-free
    attention finds the document boundaries: no token attends across them. The label of each
    document's first token is masked, so no document is asked to predict the next one's start.
    The last block may be shorter. Blocks with nothing to learn are dropped.
    """

    def __init__(self, block_size: int):
        self.block_size = block_size
        self.ids: list[int] = []
        self.labels: list[int] = []
        self.positions: list[int] = []

    def add(self, ids: list[int], labels: list[int]) -> list[Feature]:
        """The blocks this example completes."""
        full = []
        while ids:
            room = self.block_size - len(self.ids)
            piece, piece_labels = ids[:room], labels[:room]
            ids, labels = ids[room:], labels[room:]
            self.ids += piece
            self.labels += [IGNORE_INDEX, *piece_labels[1:]]
            self.positions += range(len(piece))
            if len(self.ids) == self.block_size:
                full += self._take()
        return full

    def finish(self) -> list[Feature]:
        """The last, shorter block, if any."""
        return self._take() if self.ids else []

    def _take(self) -> list[Feature]:
        block = {"input_ids": self.ids, "labels": self.labels, "position_ids": self.positions}
        self.ids, self.labels, self.positions = [], [], []
        return [block] if learns(block["labels"]) else []


def feature_schema(how: Tokenization) -> pa.Schema:
    tokens = pa.list_(pa.int32())
    if how.task == Task.MASKED_LM:
        return pa.schema([("input_ids", tokens)])
    if how.task == Task.SEQUENCE_CLASSIFICATION:
        return pa.schema([("input_ids", tokens), ("labels", pa.int64())])
    fields = [("input_ids", tokens), ("labels", tokens)]
    if how.packs:
        fields.append(("position_ids", tokens))
    return pa.schema(fields)


class CausalCollator:
    """Right-pads input_ids with the pad token and labels with IGNORE_INDEX, by position.

    Packed blocks (with `position_ids`) get no attention mask: transformers then reads the
    document boundaries from the position ids (padding-free attention). Their padding, in a
    short last block only, gets positions of its own, so it is a separate "document" that no
    real token attends to.
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, batch: list[Feature]) -> dict[str, torch.Tensor]:
        longest = max(len(f["input_ids"]) for f in batch)
        if self.pad_to_multiple_of:
            longest = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        ids = torch.full((len(batch), longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(batch), longest), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(batch), longest), dtype=torch.long)
        packed = "position_ids" in batch[0]
        positions = torch.zeros((len(batch), longest), dtype=torch.long)
        for row, feature in enumerate(batch):
            n = len(feature["input_ids"])
            ids[row, :n] = torch.tensor(feature["input_ids"])
            labels[row, :n] = torch.tensor(feature["labels"])
            mask[row, :n] = 1
            if packed:
                positions[row, :n] = torch.tensor(feature["position_ids"])
                positions[row, n:] = torch.arange(longest - n)
        if packed:
            return {"input_ids": ids, "position_ids": positions, "labels": labels}
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def padding_multiple(spec: FineTuneJobSpec, cuda: bool) -> int | None:
    """Batches padded to a multiple of this (None: to their longest sequence).

    Under training.compile every new batch shape recompiles (12 tiny LoRA steps took 497 s on
    CPU with per-batch lengths): pad every batch to maxSeqLength, one shape. On CUDA,
    multiples of 8 suit the tensor cores.
    """
    if spec.training.compile:
        return spec.dataset.max_seq_length
    return 8 if cuda else None


def collator_for(task: str, tokenizer: PreTrainedTokenizerBase, model: Any, seed: int,
                 pad_to_multiple_of: int | None = None) -> Any:
    if task == Task.MASKED_LM:
        return DataCollatorForLanguageModeling(tokenizer, mlm=True, seed=seed,
                                               mlm_probability=MLM_PROBABILITY,
                                               pad_to_multiple_of=pad_to_multiple_of)
    if task == Task.SEQ2SEQ_LM:
        return DataCollatorForSeq2Seq(tokenizer, model=model, label_pad_token_id=IGNORE_INDEX,
                                      pad_to_multiple_of=pad_to_multiple_of)
    if task == Task.SEQUENCE_CLASSIFICATION:
        return DataCollatorWithPadding(tokenizer, pad_to_multiple_of=pad_to_multiple_of)
    return CausalCollator(tokenizer.pad_token_id, pad_to_multiple_of)


def count_input_tokens(batch: Sequence[Feature]) -> int:
    """Non-pad tokens of a batch, counted on its features before collation (packed batches
    carry no attention mask to count on)."""
    return sum(len(f["input_ids"]) for f in batch)


# --- once per node, cached, on every core ----------------------------------------------------


def prepare_features(data: LoadedData, how: Tokenization, cache_root: Path,
                     workers: int | None = None, store: str | None = None
                     ) -> tuple[Dataset, Dataset | None]:
    """Tokenized (and packed) train and eval features, memory-mapped from Arrow shard files.

    The node's first rank makes them ready under `cache_root/features-<key>` (key: data
    digest, tokenizer, dataset settings): a complete local build is used as is; else, with a
    `store` URI, a verified copy published there is fetched (feature_store.py); else they are
    built with `workers` processes (default: every CPU this process may use) and published to
    the store. The node's other ranks wait for it and map the same files.
    """
    directory = cache_root / f"features-{how.fingerprint(data.digest, data.seed)}"

    def build() -> dict[str, Any]:
        if (directory / READY_FILE).exists():
            return dict(json.loads((directory / READY_FILE).read_text()))
        if store and (fetched := feature_store.fetch(store, directory, READY_FILE)):
            return fetched
        fresh_dir(directory)
        node, nodes = node_rank(), node_count()
        if store and nodes > 1:  # each node tokenizes 1/nodes of the shards, then swaps
            ready = feature_store.build_shared(
                directory, store, node, nodes, READY_FILE,
                lambda: write_features(data, how, directory, workers, (node, nodes)))
        else:
            ready = write_features(data, how, directory, workers)
            if store:
                feature_store.publish(directory, store, ready, READY_FILE)
        (directory / READY_FILE).write_text(json.dumps(ready))
        return ready

    ready = node_once(cache_root, "features", build)
    if not ready["counts"]["train"]:
        raise DataError(f"{how.spec.train_name}: no record has a token to learn from after "
                        f"truncation to {how.spec.max_seq_length}")
    train = open_features(directory, ready["files"], "train")
    if not ready["counts"]["eval"]:
        return train, None
    return train, open_features(directory, ready["files"], "eval")


def open_features(directory: Path, files: list[dict[str, Any]], split: str) -> Dataset:
    """One split's shard files, memory-mapped and concatenated in shard order."""
    parts = [Dataset.from_file(str(directory / f["name"]))
             for f in files if f["split"] == split and f["rows"]]
    return parts[0] if len(parts) == 1 else concatenate_datasets(parts)


@dataclass(frozen=True)
class Shard:
    """A run of consecutive record batches of one record file: the unit of parallel work.

    Its size is fixed (SHARD_BATCHES), never derived from the core count, so the features,
    and their cache key, are the same whichever machine builds them."""

    index: int
    split: str  # where its rows go ("train" or "eval"); the held-out mask may move some
    path: Path  # the record file (an Arrow stream)
    offsets: tuple[int, ...]  # byte offset of each of its record batches in `path`
    held_out: Any = None  # evalFraction: the mask's slice for this shard's records

    def output(self, split: str) -> str:
        return f"{split}-{self.index:05d}.arrow"


def plan_shards(data: LoadedData) -> list[Shard]:
    """Every record file cut into shards of SHARD_BATCHES record batches, in file order."""
    shards: list[Shard] = []
    for split, path, held_out in data.sources():
        first_row = 0
        batches = batch_offsets(path)
        for start in range(0, len(batches), SHARD_BATCHES):
            run = batches[start:start + SHARD_BATCHES]
            rows = sum(n for _, n in run)
            mask = None if held_out is None else held_out[first_row:first_row + rows]
            shards.append(Shard(len(shards), split, path, tuple(o for o, _ in run), mask))
            first_row += rows
    return shards


def batch_offsets(path: Path) -> list[tuple[int, int]]:
    """(byte offset, rows) of each record batch of an Arrow stream file: one pass over the
    message headers, so a worker can seek straight to its shard."""
    found: list[tuple[int, int]] = []
    with pa.OSFile(str(path)) as source:
        reader = pa.ipc.MessageReader.open_stream(source)
        schema = None
        while True:
            offset = source.tell()
            try:
                message = reader.read_next_message()
            except StopIteration:
                return found
            if message.type == "schema":
                schema = pa.ipc.read_schema(message)
            else:
                found.append((offset, pa.ipc.read_record_batch(message, schema).num_rows))


def shard_batches(shard: Shard) -> Iterator[dict[str, list[Any]]]:
    """The record batches of one shard, read (not memory-mapped) from their offsets."""
    with pa.OSFile(str(shard.path)) as source:
        schema = pa.ipc.open_stream(source).schema
        for offset in shard.offsets:
            source.seek(offset)
            yield pa.ipc.read_record_batch(pa.ipc.read_message(source), schema).to_pydict()


def write_features(data: LoadedData, how: Tokenization, directory: Path,
                   workers: int | None = None, share: tuple[int, int] = (0, 1)
                   ) -> dict[str, Any]:
    """Tokenize and pack every shard (with `share` = (node, nodes), every nodes-th from the
    node-th) into its own Arrow files under `directory`, in `workers` processes; returns the
    READY facts: row counts per split and the files in shard order (shard, name, split, rows,
    sha256). The same data gives the same files for any worker or node count."""
    node, nodes = share
    shards = plan_shards(data)[node::nodes]
    workers = min(workers or usable_cpus(), len(shards)) or 1
    # The record batch size is the parent's (workers start from a fresh interpreter): the
    # files, and their sha256, must not depend on where a shard was written.
    build = partial(write_shard, how=how, directory=directory,
                    batch_rows=data_module.WRITE_BATCH_ROWS)
    if workers == 1:  # less than two shards (small jobs, tests) or one CPU: no processes
        written = [build(shard) for shard in shards]
    else:
        written = list(_in_workers(build, shards, workers))
    return ready_facts([f for shard_files in written for f in shard_files])


def _in_workers(build: Callable[[Shard], list[dict[str, Any]]], shards: list[Shard],
                workers: int) -> Iterator[list[dict[str, Any]]]:
    """`build` over the shards in worker processes, results in shard order.

    Workers are forked from a forkserver: a clean process started for the purpose, with the ML
    stack imported once, that has none of this process's threads (torch's, the tokenizer's,
    s3fs's event loop, the metrics server) or the locks they may hold; forking this process
    itself crashed a worker beside rank 1's threads. A `ProcessPoolExecutor` notices a worker
    that dies (killed, out of memory) and fails its futures with BrokenProcessPool instead of
    waiting for it forever (as `multiprocessing.Pool` does): the shards not yet written are
    then written here, in this process, after a warning. The first failing shard's own error
    (a DataError naming file:line) is raised as is.
    """
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker,
                               initargs=(build,))
    try:
        futures = [pool.submit(_build_in_worker, shard) for shard in shards]
        broken = False
        for shard, future in zip(shards, futures, strict=True):
            try:
                yield future.result()
            except BrokenProcessPool as exc:
                if not broken:
                    log.warning("features: a tokenize worker process died (%s); writing shard "
                                "%d and the other unfinished ones in this process",
                                exc, shard.index)
                broken = True
                yield build(shard)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


_BUILD: Callable[[Shard], list[dict[str, Any]]] | None = None  # set in each worker


def _start_worker(build: Callable[[Shard], list[dict[str, Any]]]) -> None:
    global _BUILD
    _BUILD = build
    # The workers already use every core between them: the tokenizer's own thread pool would
    # only oversubscribe them.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    torch.set_num_threads(1)


def _build_in_worker(shard: Shard) -> list[dict[str, Any]]:
    assert _BUILD is not None
    return _BUILD(shard)


def usable_cpus(cgroup_cpu_max: Path = Path("/sys/fs/cgroup/cpu.max")) -> int:
    """CPUs this process may use: its affinity, capped by a cgroup v2 CPU limit (a pod's
    `resources.limits.cpu`, which the affinity does not show)."""
    cpus = len(os.sched_getaffinity(0))
    try:
        quota, period = cgroup_cpu_max.read_text().split()[:2]
    except (OSError, ValueError):
        return cpus
    if quota == "max":
        return cpus
    return max(1, min(cpus, math.ceil(int(quota) / int(period))))


def write_shard(shard: Shard, how: Tokenization, directory: Path,
                batch_rows: int | None = None) -> list[dict[str, Any]]:
    """Tokenize one shard's records, route each row to train or eval (its file's split, or the
    evalFraction mask), pack per split, write one Arrow file per split that got rows."""
    schema = feature_schema(how)
    writers: dict[str, ArrowWriter] = {}
    packers = {split: Packer(how.spec.max_seq_length) for split in FEATURE_SPLITS}

    def write(split: str, row: Feature) -> None:
        if split not in writers:
            writers[split] = ArrowWriter(directory / shard.output(split), schema, batch_rows)
        writers[split].write(row)

    def emit(split: str, rows: dict[str, list[Any]]) -> None:
        for values in zip(*rows.values(), strict=True):
            row = dict(zip(rows, values, strict=True))
            if how.packs:
                for block in packers[split].add(row["input_ids"], row["labels"]):
                    write(split, block)
            else:
                write(split, row)

    offset = 0
    for batch in shard_batches(shard):
        size = len(batch["where"])
        if shard.held_out is None:
            emit(shard.split, tokenize_batch(batch, how))
        else:
            mask = shard.held_out[offset:offset + size]
            for part, chosen in (("train", ~mask), ("eval", mask)):
                rows = {k: [v for v, keep in zip(column, chosen, strict=True) if keep]
                        for k, column in batch.items()}
                if rows["where"]:
                    emit(part, tokenize_batch(rows, how))
        offset += size
    for split, packer in packers.items():
        for block in packer.finish():
            write(split, block)
    return [{"shard": shard.index, "name": writers[split].path.name, "split": split,
             "rows": writers[split].close(),
             "sha256": feature_store.file_sha256(writers[split].path)}
            for split in FEATURE_SPLITS if split in writers]
