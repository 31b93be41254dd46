"""Features published to object storage (a real moto S3 server) and fetched, verified, by a
restarted pod or a later job instead of being tokenized again."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
from pathlib import Path

import pytest

from kubetune_api.spec import DatasetSpec
from kubetune_trainer import data as data_module
from kubetune_trainer import feature_store, features, storage
from kubetune_trainer.features import Tokenization, prepare_features
from kubetune_trainer.modeling import load_tokenizer
from kubetune_trainer.tiny import train_tokenizer

WORDS = ["the", "cat", "sees", "a", "ball", "capital", "of", "France", "is", "Paris"]


@pytest.fixture(autouse=True)
def small_shards(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(data_module, "WRITE_BATCH_ROWS", 10)
    monkeypatch.setattr(features, "SHARD_BATCHES", 2)


@pytest.fixture
def job(tmp_path: Path) -> tuple[data_module.LoadedData, Tokenization]:
    train_tokenizer("llama", [" ".join(WORDS)] * 20).save_pretrained(tmp_path / "tok")
    tok = load_tokenizer(str(tmp_path / "tok"), None, "causal-lm")
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"text": " ".join(WORDS[: 1 + i % 9])}) + "\n"
                            for i in range(55)))
    spec = DatasetSpec.model_validate({"train": str(path), "maxSeqLength": 16})
    data = data_module.load_records(spec, "causal-lm", 0, tmp_path / "records")
    return data, Tokenization(spec, "causal-lm", tok)


def no_tokenizing(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("tokenized again")

    monkeypatch.setattr(features, "write_features", refuse)


def test_a_restarted_pod_fetches_the_published_features(
        tmp_path: Path, s3_bucket: str, job, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    data, how = job
    store = feature_store.store_uri(f"{s3_bucket}/run/checkpoints")
    first, _ = prepare_features(data, how, tmp_path / "pod-1", workers=2, store=store)
    [published] = storage.list_subdirs(store)
    assert storage.exists(storage.join(store, published, features.READY_FILE))
    no_tokenizing(monkeypatch)
    again, _ = prepare_features(data, how, tmp_path / "pod-2", store=store)  # an empty /tmp
    assert [dict(r) for r in again] == [dict(r) for r in first]
    assert not list((tmp_path / "pod-2").glob("*.fetching"))


def test_a_corrupt_shard_in_the_store_is_not_used(
        tmp_path: Path, s3_bucket: str, job, monkeypatch: pytest.MonkeyPatch,  # type: ignore[no-untyped-def]
        caplog: pytest.LogCaptureFixture) -> None:
    data, how = job
    store = feature_store.store_uri(f"{s3_bucket}/checkpoints")
    first, _ = prepare_features(data, how, tmp_path / "pod-1", store=store)
    [published] = storage.list_subdirs(store)
    fs, path = storage.filesystem(storage.join(store, published, "train-00001.arrow"))
    fs.pipe_file(path, b"not the features")
    with caplog.at_level(logging.WARNING, "kubetune"):
        rebuilt, _ = prepare_features(data, how, tmp_path / "pod-2", store=store)
    assert "train-00001.arrow has sha256" in caplog.text
    assert [dict(r) for r in rebuilt] == [dict(r) for r in first]
    no_tokenizing(monkeypatch)  # the rebuild published a good copy again
    fetched, _ = prepare_features(data, how, tmp_path / "pod-3", store=store)
    assert [dict(r) for r in fetched] == [dict(r) for r in first]


def test_different_settings_never_fetch_each_others_features(
        tmp_path: Path, s3_bucket: str, job, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    data, how = job
    store = feature_store.store_uri(f"{s3_bucket}/checkpoints")
    prepare_features(data, how, tmp_path / "pod-1", store=store)
    longer = Tokenization(how.spec.model_copy(update={"max_seq_length": 32}), how.task,
                          how.tokenizer)
    no_tokenizing(monkeypatch)
    with pytest.raises(AssertionError, match="tokenized again"):
        prepare_features(data, longer, tmp_path / "pod-2", store=store)


def node_process(node: int, nodes: int, cache: Path, store: str, data, how,  # type: ignore[no-untyped-def]
                 tokenized: Path) -> None:
    """One node's first rank, as torchrun starts it on a gang of `nodes` nodes."""
    os.environ.update({"GROUP_RANK": str(node), "WORLD_SIZE": str(nodes),
                       "LOCAL_WORLD_SIZE": "1", "LOCAL_RANK": "0", "RANK": str(node)})
    build_shard = features.write_shard

    def counted(shard, *args, **kwargs):  # type: ignore[no-untyped-def]
        with tokenized.open("a") as log:
            log.write(f"{shard.index}\n")
        return build_shard(shard, *args, **kwargs)

    features.write_shard = counted  # type: ignore[assignment]
    prepare_features(data, how, cache, workers=1, store=store)


def test_two_nodes_split_the_work_and_end_with_identical_features(
        tmp_path: Path, s3_bucket: str, job, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    data, how = job
    store = feature_store.store_uri(f"{s3_bucket}/checkpoints")
    monkeypatch.setattr(feature_store, "NODE_POLL_SECONDS", 0.1)
    fork = multiprocessing.get_context("fork")
    nodes = [fork.Process(target=node_process, args=(
        k, 2, tmp_path / f"node-{k}", store, data, how, tmp_path / f"tokenized-{k}"))
        for k in range(2)]
    for process in nodes:
        process.start()
    for process in nodes:
        process.join()
    assert [p.exitcode for p in nodes] == [0, 0]
    shards = [sorted(int(i) for i in (tmp_path / f"tokenized-{k}").read_text().split())
              for k in range(2)]
    assert shards == [[0, 2], [1]]  # 3 shards: nobody repeats another's work
    one_node, _ = prepare_features(data, how, tmp_path / "one-node", workers=1)
    expected = [dict(r) for r in one_node]
    [one_ready] = (tmp_path / "one-node").glob(f"features-*/{features.READY_FILE}")
    for k in range(2):
        [ready] = (tmp_path / f"node-{k}").glob(f"features-*/{features.READY_FILE}")
        assert ready.read_text() == one_ready.read_text()
        on_node, _ = prepare_features(data, how, tmp_path / f"node-{k}", workers=1)
        assert [dict(r) for r in on_node] == expected
    no_tokenizing(monkeypatch)  # node 0 published the whole set: a restart fetches it
    fetched, _ = prepare_features(data, how, tmp_path / "restart", store=store)
    assert [dict(r) for r in fetched] == expected
