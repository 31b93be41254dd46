"""Features built in shards on every core: the same files for any worker count, rows in file
order, the evalFraction split kept, bad records still named by file:line, the cache reused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from datasets import Dataset

from kubetune_api.spec import DatasetSpec
from kubetune_trainer import data as data_module
from kubetune_trainer import features
from kubetune_trainer.data import DataError, LoadedData
from kubetune_trainer.features import Tokenization, prepare_features, tokenize
from kubetune_trainer.modeling import load_tokenizer
from kubetune_trainer.tiny import train_tokenizer

WORDS = ["the", "cat", "sees", "a", "ball", "capital", "of", "France", "is", "Paris", "reset",
         "my", "password"]
RECORDS = 95  # with 10-record batches and 2 batches a shard: 5 shards, the last one short


@pytest.fixture(autouse=True)
def small_shards(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(data_module, "WRITE_BATCH_ROWS", 10)
    monkeypatch.setattr(features, "SHARD_BATCHES", 2)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    directory = tmp_path_factory.mktemp("tok")
    train_tokenizer("llama", [" ".join(WORDS)] * 20).save_pretrained(directory)
    return load_tokenizer(str(directory), None, "causal-lm")


def write_records(path: Path, rows: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def prompt_completion(count: int = RECORDS) -> list[dict[str, object]]:
    # Each record differs in length and content, so any reordering changes the features.
    return [{"p": " ".join(WORDS[: 1 + i % 7]), "c": " " + " ".join(WORDS[i % 5:][:1 + i % 9])}
            for i in range(count)]


def prepared(tmp_path: Path, tokenizer, workers: int, **settings: object  # type: ignore[no-untyped-def]
             ) -> tuple[LoadedData, Tokenization, Dataset, Dataset | None]:
    path = write_records(tmp_path / "train.jsonl", prompt_completion())
    spec = DatasetSpec.model_validate({"train": str(path), "maxSeqLength": 32,
                                       "fields": {"prompt": "p", "completion": "c"},
                                       **settings})
    cache = tmp_path / f"cache-{workers}"
    data = data_module.load_records(spec, "causal-lm", 7, cache / "records")
    how = Tokenization(spec, "causal-lm", tokenizer)
    train, evals = prepare_features(data, how, cache, workers=workers)
    return data, how, train, evals


def rows(dataset: Dataset | None) -> list[dict[str, object]]:
    assert dataset is not None
    return [dict(row) for row in dataset]


def ready_files(tmp_path: Path, workers: int) -> list[dict[str, object]]:
    [ready] = (tmp_path / f"cache-{workers}").glob(f"features-*/{features.READY_FILE}")
    return list(json.loads(ready.read_text())["files"])


@pytest.mark.parametrize("packing", [False, True])
def test_any_worker_count_writes_the_same_files(tmp_path: Path, tokenizer,  # type: ignore[no-untyped-def]
                                                packing: bool) -> None:
    _, _, one, one_eval = prepared(tmp_path, tokenizer, 1, packing=packing, evalFraction=0.2)
    _, _, three, three_eval = prepared(tmp_path, tokenizer, 3, packing=packing,
                                       evalFraction=0.2)
    assert rows(one) == rows(three) and rows(one_eval) == rows(three_eval)
    files = ready_files(tmp_path, 1)
    assert files == ready_files(tmp_path, 3)  # names, rows and sha256, shard by shard
    assert len({f["name"] for f in files if f["split"] == "train"}) == 5


def test_rows_keep_file_order_and_the_held_out_split(tmp_path: Path, tokenizer) -> None:  # type: ignore[no-untyped-def]
    data, how, train, evals = prepared(tmp_path, tokenizer, 2, evalFraction=0.2)
    for split, built in (("train", train), ("eval", evals)):
        expected = tokenize(data.records(split), how.spec, how.task, how.tokenizer)
        assert rows(built) == expected, split
    assert data.held_out[-5:].any()  # the last, short shard holds some out too


def test_a_bad_record_in_a_worker_names_its_file_and_line(tmp_path: Path) -> None:
    train_tokenizer("llama", [" ".join(WORDS)] * 20).save_pretrained(tmp_path / "tok")
    tok = load_tokenizer(str(tmp_path / "tok"), None, "sequence-classification")
    labels = [i % 2 for i in range(RECORDS)]
    labels[56] = 5  # line 57, in the third shard
    path = write_records(tmp_path / "cls.jsonl",
                         [{"t": WORDS[i % 9], "y": y} for i, y in enumerate(labels)])
    spec = DatasetSpec.model_validate({"train": str(path), "fields": {"text": "t", "label": "y"}})
    data = data_module.load_records(spec, "sequence-classification", 0, tmp_path / "records")
    how = Tokenization(spec, "sequence-classification", tok, None, 2)
    with pytest.raises(DataError, match=rf"{path}:57: label 5 is outside 0..1"):
        prepare_features(data, how, tmp_path / "cache", workers=2)


def test_a_complete_build_is_reused(tmp_path: Path, tokenizer,  # type: ignore[no-untyped-def]
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    data, how, train, _ = prepared(tmp_path, tokenizer, 2)

    def rebuild(*args: object, **kwargs: object) -> None:
        raise AssertionError("tokenized again")

    monkeypatch.setattr(features, "write_features", rebuild)
    again, _ = prepare_features(data, how, tmp_path / "cache-2", workers=2)
    assert rows(again) == rows(train)
