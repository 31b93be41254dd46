"""Records → token features per task, packing, and the collators that batch them.

Labels are built here, explicitly, rather than by a collator that masks every pad token: when
pad == eos (Llama, GPT-2, Mistral) such a collator also masks every EOS, and the model never
learns to stop (trl#976, transformers#23530). Padding is masked by position instead.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch
from datasets import Dataset
from transformers import (
    DataCollatorForLanguageModeling,
    DataCollatorForSeq2Seq,
    DataCollatorWithPadding,
    PreTrainedTokenizerBase,
)

from kubetune_api.spec import DatasetSpec, Task
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
    record_batches,
    used_roles,
)

Feature = dict[str, Any]
MLM_PROBABILITY = 0.15
FEATURES_VERSION = "2"  # bump when the tokenization changes: old caches are not reused
READY_FILE = "READY"  # written last: the features under it are complete
FEATURE_FILES = {"train": "train-features.arrow", "eval": "eval-features.arrow"}


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

    def fingerprint(self, data_digest: str) -> str:
        """Cache key: the data, the tokenizer (vocabulary, specials, chat template) and every
        setting that changes the features."""
        tok = self.tokenizer
        backend = tok.backend_tokenizer.to_str() if tok.is_fast else json.dumps(tok.get_vocab())
        key = json.dumps([FEATURES_VERSION, data_digest, self.task, self.label_names,
                          self.num_labels, self.spec.model_dump(mode="json"),
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
        if any(label != IGNORE_INDEX for label in labels):
            out["input_ids"].append(ids)
            out["labels"].append(labels)
    return out


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
        return [block] if any(label != IGNORE_INDEX for label in block["labels"]) else []


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


# --- once per node, cached -------------------------------------------------------------------


def prepare_features(data: LoadedData, how: Tokenization, cache_root: Path
                     ) -> tuple[Dataset, Dataset | None]:
    """Tokenized (and packed) train and eval features, memory-mapped from Arrow files.

    The node's first rank builds them under `cache_root/features-<key>` (key: data digest,
    tokenizer, dataset settings) unless a complete build is already there; the node's other
    ranks wait for it and map the same files.
    """
    directory = cache_root / f"features-{how.fingerprint(data.digest)}"

    def build() -> dict[str, Any]:
        if (directory / READY_FILE).exists():
            return dict(json.loads((directory / READY_FILE).read_text()))
        fresh_dir(directory)
        counts = write_features(data, how, directory)
        (directory / READY_FILE).write_text(json.dumps(counts))
        return counts

    counts = node_once(cache_root, "features", build)
    if not counts["train"]:
        raise DataError(f"{how.spec.train_name}: no record has a token to learn from after "
                        f"truncation to {how.spec.max_seq_length}")
    train = Dataset.from_file(str(directory / FEATURE_FILES["train"]))
    if not counts["eval"]:
        return train, None
    return train, Dataset.from_file(str(directory / FEATURE_FILES["eval"]))


def write_features(data: LoadedData, how: Tokenization, directory: Path) -> dict[str, int]:
    """One streamed pass over the record files: tokenize each batch, route its rows to the
    train or eval file (by the eval file they came from, or the evalFraction mask), pack on
    the way. Nothing is memory-mapped here, so memory stays flat in the data size."""
    schema = feature_schema(how)
    writers = {split: ArrowWriter(directory / name, schema)
               for split, name in FEATURE_FILES.items()}
    packers = {split: Packer(how.spec.max_seq_length) for split in writers}

    def emit(split: str, rows: dict[str, list[Any]]) -> None:
        for values in zip(*rows.values(), strict=True):
            row = dict(zip(rows, values, strict=True))
            if how.packs:
                for block in packers[split].add(row["input_ids"], row["labels"]):
                    writers[split].write(block)
            else:
                writers[split].write(row)

    for split, path, held_out in data.sources():
        offset = 0
        for batch in record_batches(path):
            size = len(batch["where"])
            if held_out is None:
                emit(split, tokenize_batch(batch, how))
            else:
                mask = held_out[offset:offset + size]
                for part, chosen in (("train", ~mask), ("eval", mask)):
                    rows = {k: [v for v, keep in zip(column, chosen, strict=True) if keep]
                            for k, column in batch.items()}
                    if rows["where"]:
                        emit(part, tokenize_batch(rows, how))
            offset += size
    for split, packer in packers.items():
        for block in packer.finish():
            writers[split].write(block)
    return {split: writer.close() for split, writer in writers.items()}
