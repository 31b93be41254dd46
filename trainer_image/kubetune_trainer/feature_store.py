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
from pathlib import Path
from typing import Any

from kubetune_trainer import storage
from kubetune_trainer.data import HASH_CHUNK

FEATURES_SUBDIR = "features"  # under the checkpoint root
log = logging.getLogger("kubetune")


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
