"""Features built in shards on every core: the same files for any worker count, rows in file
order, the evalFraction split kept, bad records still named by file:line, the cache reused."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import signal
from pathlib import Path

import pytest
from datasets import Dataset

from kubetune_api.spec import DatasetSpec
from kubetune_trainer import data as data_module
from kubetune_trainer import features
from kubetune_trainer.data import DataError, LoadedData
from kubetune_trainer.features import Tokenization, prepare_features, tokenize, usable_cpus
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


@pytest.mark.parametrize(("cpu_max", "expected"), [
    ("150000 100000\n", 2), ("50000 100000\n", 1), ("max 100000\n", None), (None, None)])
def test_usable_cpus_follow_a_cgroup_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           cpu_max: str | None, expected: int | None) -> None:
    monkeypatch.setattr(features.os, "sched_getaffinity", lambda pid: set(range(8)))
    limit = tmp_path / "cpu.max"
    if cpu_max is not None:
        limit.write_text(cpu_max)
    assert usable_cpus(limit) == (expected or 8)


def test_workers_default_to_the_usable_cpus(tmp_path: Path, tokenizer,  # type: ignore[no-untyped-def]
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    pools: list[int] = []
    in_workers = features._in_workers

    def counted(build, shards, workers):  # type: ignore[no-untyped-def]
        pools.append(workers)
        return in_workers(build, shards, workers)

    monkeypatch.setattr(features, "usable_cpus", lambda: 2)
    monkeypatch.setattr(features, "_in_workers", counted)
    _, _, default, _ = prepared(tmp_path, tokenizer, 0)  # 0: not given
    assert pools == [2]
    _, _, one, _ = prepared(tmp_path, tokenizer, 1)
    assert rows(default) == rows(one)


REAL_WRITE_SHARD = features.write_shard


def die_in_a_worker(shard: features.Shard, **kwargs: object) -> list[dict[str, object]]:
    """write_shard, except that the worker process given shard 2 is killed (SIGKILL, as the
    kernel's OOM killer does) before it writes anything."""
    if shard.index == 2 and multiprocessing.parent_process() is not None:
        os.kill(os.getpid(), signal.SIGKILL)
    return REAL_WRITE_SHARD(shard, **kwargs)  # type: ignore[arg-type]


def test_a_killed_worker_costs_time_not_the_run(tmp_path: Path, tokenizer,  # type: ignore[no-untyped-def]
                                                monkeypatch: pytest.MonkeyPatch,
                                                caplog: pytest.LogCaptureFixture) -> None:
    _, _, one, one_eval = prepared(tmp_path, tokenizer, 1, evalFraction=0.2)
    monkeypatch.setattr(features, "write_shard", die_in_a_worker)
    with caplog.at_level(logging.WARNING, logger="kubetune"):
        _, _, two, two_eval = prepared(tmp_path, tokenizer, 2, evalFraction=0.2)
    assert "a tokenize worker process died" in caplog.text
    assert rows(two) == rows(one) and rows(two_eval) == rows(one_eval)
    assert ready_files(tmp_path, 2) == ready_files(tmp_path, 1)


def test_the_seed_is_part_of_the_features_key(tmp_path: Path, tokenizer) -> None:  # type: ignore[no-untyped-def]
    # It orders a mixture and draws the evalFraction split: features of another seed differ.
    data, how, _, _ = prepared(tmp_path, tokenizer, 1, evalFraction=0.2)
    assert how.fingerprint(data.digest, 7) != how.fingerprint(data.digest, 8)
