"""Finished features shared through object storage: tokenize once per dataset, not per pod.

A node that built `features-<key>/` publishes its shard files, then its READY file last, under
`<checkpoint root>/features/features-<key>/`. A restarted gang (new pods, an empty /tmp) or a
later job whose data, tokenizer and settings give the same key fetches them instead of
tokenizing again: into a side folder, every file checked against the sha256 that READY lists,
then renamed into place, so a half or corrupt download is never used. The key is a content
digest, so a features set is the same for any job that computes it: sharing it is safe.

Publishing and fetching only save time: when either fails, the log says so and the node
tokenizes (or keeps) its own copy.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kubetune_trainer import storage
from kubetune_trainer.data import HASH_CHUNK

FEATURES_SUBDIR = "features"  # under the checkpoint root
FEATURE_SPLITS = ("train", "eval")
NODE_POLL_SECONDS = 1.0
NODE_WAIT_LOG_SECONDS = 60.0
log = logging.getLogger("kubetune")


def ready_facts(files: list[dict[str, Any]]) -> dict[str, Any]:
    """READY's content: the files in shard order (train before eval), rows per split."""
    files = sorted(files, key=lambda f: (f["shard"], FEATURE_SPLITS.index(f["split"])))
    counts = {split: sum(f["rows"] for f in files if f["split"] == split)
              for split in FEATURE_SPLITS}
    return {"counts": counts, "files": files}


def store_uri(checkpoint_root: str) -> str:
    return storage.join(checkpoint_root, FEATURES_SUBDIR)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def fetch(store: str, directory: Path, ready_file: str) -> dict[str, Any] | None:
    """The READY facts of `directory`'s features, downloaded from `store` and verified; None
    when the store has no complete copy, or its copy does not match its digests."""
    uri = storage.join(store, directory.name)
    try:
        if not storage.exists(storage.join(uri, ready_file)):
            return None
        ready = json.loads(storage.read_text(storage.join(uri, ready_file)))
        incoming = directory.with_name(directory.name + ".fetching")
        shutil.rmtree(incoming, ignore_errors=True)
        storage.download_dir(uri, incoming)
    except (storage.StorageError, ValueError) as exc:
        log.warning("features %s: cannot fetch them (%s); tokenizing here", uri, exc)
        return None
    for listed in ready["files"]:
        found = incoming / listed["name"]
        digest = file_sha256(found) if found.is_file() else "missing"
        if digest != listed["sha256"]:
            log.warning("features %s: %s has sha256 %s, READY lists %s; tokenizing here",
                        uri, listed["name"], digest, listed["sha256"])
            shutil.rmtree(incoming, ignore_errors=True)
            return None
    (incoming / ready_file).write_text(json.dumps(ready))
    shutil.rmtree(directory, ignore_errors=True)
    incoming.rename(directory)
    log.info("features %s: fetched %d verified files", uri, len(ready["files"]))
    return dict(ready)


def publish(directory: Path, store: str, ready: dict[str, Any], ready_file: str) -> None:
    """Upload `directory`'s shard files, then READY last (a reader never sees a partial set)."""
    uri = storage.join(store, directory.name)
    try:
        storage.remove(storage.join(uri, ready_file), recursive=False)
        storage.upload_dir(directory, uri, exclude={ready_file})
        storage.write_text(storage.join(uri, ready_file), json.dumps(ready))
    except storage.StorageError as exc:
        log.warning("features %s: cannot publish them (%s); other pods tokenize again", uri, exc)
        return
    log.info("features published to %s", uri)


def build_shared(directory: Path, store: str, node: int, nodes: int, ready_file: str,
                 build_mine: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """The whole features set, this node having tokenized only its share of the shards.

    Each node uploads its shard files, then `node-<k>-of-<n>.json` (its files and their
    sha256) last; then waits for every other node's list and downloads their files, each
    checked against that list. Every node ends with the same files and READY facts as a
    one-node build; node 0 then writes READY to the store, so restarts and later jobs fetch
    the whole set. A node that dies makes the gang restart (its peers wait for it here, as
    they would at the first collective); a restart reuses whatever lists are already up.
    """
    uri = storage.join(store, directory.name)
    mine = build_mine()["files"]
    storage.upload_dir(directory, uri, exclude={ready_file})
    storage.write_text(storage.join(uri, _node_list(node, nodes)), json.dumps(mine))
    files = list(mine)
    for other in range(nodes):
        if other == node:
            continue
        listed = json.loads(storage.read_text(_wait_for(uri, _node_list(other, nodes))))
        for entry in listed:
            found = directory / entry["name"]
            storage.download_file(storage.join(uri, entry["name"]), found)
            if file_sha256(found) != entry["sha256"]:
                raise storage.StorageError(
                    f"features {uri}: {entry['name']} from node {other} does not match the "
                    f"sha256 its node listed")
        files += listed
    ready = ready_facts(files)
    if node == 0:  # the whole set is in the store now: restarts and later jobs fetch it
        storage.write_text(storage.join(uri, ready_file), json.dumps(ready))
    return ready


def _node_list(node: int, nodes: int) -> str:
    return f"node-{node}-of-{nodes}.json"


def _wait_for(uri: str, name: str) -> str:
    target = storage.join(uri, name)
    waited_since = logged = time.monotonic()
    while not storage.exists(target):
        if time.monotonic() - logged > NODE_WAIT_LOG_SECONDS:
            log.info("waiting for %s (%.0f s)", target, time.monotonic() - waited_since)
            logged = time.monotonic()
        time.sleep(NODE_POLL_SECONDS)
    return target
