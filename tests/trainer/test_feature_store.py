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


# --- a restart reads no data: the dataset's facts are keyed on its files' identity ----------


def read_and_tokenize(pod: Path, spec: DatasetSpec, tok, store: str  # type: ignore[no-untyped-def]
                      ) -> tuple[data_module.LoadedData, list[dict[str, object]]]:
    """What a pod's setup does with the data: read it (or take its facts), then features."""
    data = data_module.read_data(spec, "causal-lm", 0, pod, store)
    train, _ = prepare_features(data, Tokenization(spec, "causal-lm", tok), pod, store=store)
    return data, [dict(r) for r in train]


def no_reading(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("read the data again")

    monkeypatch.setattr(data_module, "prepare_records", refuse)


def local_job(tmp_path: Path):  # type: ignore[no-untyped-def]
    train_tokenizer("llama", [" ".join(WORDS)] * 20).save_pretrained(tmp_path / "tok")
    tok = load_tokenizer(str(tmp_path / "tok"), None, "causal-lm")
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"text": " ".join(WORDS[: 1 + i % 9])}) + "\n"
                            for i in range(55)))
    return path, tok, DatasetSpec.model_validate({"train": str(path), "maxSeqLength": 16})


def test_a_restart_fetches_the_features_without_reading_the_data(
        tmp_path: Path, s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _, tok, spec = local_job(tmp_path)
    store = feature_store.store_uri(f"{s3_bucket}/checkpoints")
    first, expected = read_and_tokenize(tmp_path / "pod-1", spec, tok, store)
    no_reading(monkeypatch)
    no_tokenizing(monkeypatch)
    again, fetched = read_and_tokenize(tmp_path / "pod-2", spec, tok, store)
    assert fetched == expected
    assert (again.digest, again.counts) == (first.digest, first.counts)
    assert not (tmp_path / "pod-2" / data_module.RECORDS_DIR).exists()


def test_facts_without_features_read_the_data_when_tokenizing(
        tmp_path: Path, s3_bucket: str) -> None:
    _, tok, spec = local_job(tmp_path)
    store = feature_store.store_uri(f"{s3_bucket}/checkpoints")
    read_and_tokenize(tmp_path / "pod-1", spec, tok, store)
    other = tmp_path / "other-tok"  # another tokenizer: the facts match, the features do not
    train_tokenizer("llama", [" ".join(reversed(WORDS))] * 20).save_pretrained(other)
    other_tok = load_tokenizer(str(other), None, "causal-lm")
    data, built = read_and_tokenize(tmp_path / "pod-2", spec, other_tok, store)
    assert data.pending is None  # read on demand, once
    direct = data_module.load_records(spec, "causal-lm", 0, tmp_path / "direct")
    expected, _ = prepare_features(direct, Tokenization(spec, "causal-lm", other_tok),
                                   tmp_path / "direct-features")
    assert built == [dict(r) for r in expected]


def rewrite_one_byte(path: Path) -> None:
    """The same size, one byte different, the modification time set back: only the inode's
    change time shows the rewrite (waited for until the clock's tick moved on)."""
    before = path.stat()
    content = path.read_bytes()
    changed = content.replace(b"cat", b"bat", 1)
    assert len(changed) == len(content) and changed != content
    while True:
        with path.open("r+b") as handle:  # in place: same inode
            handle.write(changed)
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
        if path.stat().st_ctime_ns != before.st_ctime_ns:
            return


def test_a_same_size_rewrite_of_a_local_file_is_read_again(
        tmp_path: Path, s3_bucket: str) -> None:
    path, tok, spec = local_job(tmp_path)
    store = feature_store.store_uri(f"{s3_bucket}/checkpoints")
    first, before = read_and_tokenize(tmp_path / "pod-1", spec, tok, store)
    rewrite_one_byte(path)
    again, after = read_and_tokenize(tmp_path / "pod-2", spec, tok, store)
    assert again.digest != first.digest and after != before


def test_a_same_size_rewrite_of_an_object_is_read_again(
        tmp_path: Path, s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    local, tok, _ = local_job(tmp_path)
    uri = storage.join(s3_bucket, "data", "train.jsonl")
    fs, key = storage.filesystem(uri)
    fs.pipe_file(key, local.read_bytes())
    spec = DatasetSpec.model_validate({"train": uri, "maxSeqLength": 16})
    store = feature_store.store_uri(f"{s3_bucket}/checkpoints")
    first, before = read_and_tokenize(tmp_path / "pod-1", spec, tok, store)
    with monkeypatch.context() as unchanged:
        no_reading(unchanged)
        same, fetched = read_and_tokenize(tmp_path / "pod-2", spec, tok, store)
        assert (same.digest, fetched) == (first.digest, before)
    fs.pipe_file(key, local.read_bytes().replace(b"cat", b"bat", 1))  # same size, new ETag
    again, after = read_and_tokenize(tmp_path / "pod-3", spec, tok, store)
    assert again.digest != first.digest and after != before


def test_bytes_that_differ_from_their_stored_facts_are_a_data_error(
        tmp_path: Path, s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    path, tok, spec = local_job(tmp_path)
    store = feature_store.store_uri(f"{s3_bucket}/checkpoints")
    monkeypatch.setattr(data_module, "file_identity", lambda uri: {"size": 1})  # fooled
    read_and_tokenize(tmp_path / "pod-1", spec, tok, store)
    path.write_text(path.read_text().replace("cat", "bat", 1))
    other = tmp_path / "other-tok"  # the features must be built: the records are read
    train_tokenizer("llama", [" ".join(reversed(WORDS))] * 20).save_pretrained(other)
    with pytest.raises(data_module.DataError, match="kept the identity"):
        read_and_tokenize(tmp_path / "pod-2", spec, load_tokenizer(str(other), None,
                                                                   "causal-lm"), store)
