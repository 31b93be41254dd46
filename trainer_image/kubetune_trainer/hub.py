"""output.pushToHub: the published artifact, committed to a Hugging Face Hub model repository.

Rank 0 pushes after `storage.publish` has written the artifact (manifest last) to object
storage, so a failed push loses nothing: the artifact stays where output.uri says. One commit
per run, through huggingface_hub (create_repo, create_branch, create_commit); a retried push is
idempotent (the repo and the branch may already exist; files the Hub already holds with the
same content are left out of the commit by huggingface_hub itself).

What a failure means (docs/trainer.md, "Pushing to the Hub"):
- the Hub refuses the request (401, 403, 404, other 4xx except 408/429): permanent, a
  HubPushError (a SpecError: exit 2) naming the field and the token's Secret;
- 5xx, 408, 429 or no connection: retried PUSH_ATTEMPTS times with backoff, then
  HubPushRetryableError (exit 1: the gang is restarted).
"""

from __future__ import annotations

import logging
import os
import random
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from huggingface_hub import CommitInfo, CommitOperationAdd, HfApi
from huggingface_hub.errors import HfHubHTTPError

from kubetune_api import contract
from kubetune_api.load import SpecError
from kubetune_api.spec import FineTuneJob, PushToHubSpec
from kubetune_trainer import artifacts

log = logging.getLogger("kubetune")

# Read at call time, so tests can shorten them: attempt n (from 0) that fails with a transient
# error waits PUSH_BASE_DELAY * 2**n (+-20 %) before the next; 4 attempts ride out ~15 s.
PUSH_ATTEMPTS = 4
PUSH_BASE_DELAY = 2.0
RETRYABLE_STATUSES = frozenset({408, 429})  # and every 5xx
LEFT_OUT = (artifacts.MERGED_DIR, "logs")  # an adapter push: the merged model and TensorBoard
HUB_MODEL_ID = r"[A-Za-z0-9][-A-Za-z0-9_.]*(/[A-Za-z0-9][-A-Za-z0-9_.]*)?"  # gpt2, org/name


class HubPushError(SpecError):
    """The Hub refused the push for good (token, permissions, repository): exit 2."""


class HubPushRetryableError(RuntimeError):
    """The Hub could not be reached or failed (5xx) on every attempt: exit 1."""


def pushed_files(staging: Path, merged: bool) -> dict[str, Path]:
    """path in the repo -> local file. With mergeAdapter the merged model is what serving
    engines load, so it is the repository's root; otherwise the adapter (and, in tiny mode,
    base_model/ beside it)."""
    if merged:
        root = staging / artifacts.MERGED_DIR
        files = {p.relative_to(root).as_posix(): p for p in root.rglob("*") if p.is_file()}
        if artifacts.MODEL_CARD not in files and (staging / artifacts.MODEL_CARD).is_file():
            files[artifacts.MODEL_CARD] = staging / artifacts.MODEL_CARD
        return dict(sorted(files.items()))
    return {rel: p for p in sorted(staging.rglob("*")) if p.is_file()
            and (rel := p.relative_to(staging).as_posix()).split("/")[0] not in LEFT_OUT}


def token_source(job: FineTuneJob) -> tuple[str | None, str]:
    """(token, how messages name where it came from). None: huggingface_hub's own lookup
    (HF_TOKEN, HF_TOKEN_PATH: model.tokenSecret's file in a pod, or a local login)."""
    spec = job.spec
    push = spec.output.push_to_hub
    path = os.environ.get(contract.HUB_PUSH_TOKEN_PATH_ENV)
    if path and push is not None and push.token_secret is not None:
        where = (f"output.pushToHub.tokenSecret (Secret {push.token_secret.name}, key "
                 f"{push.token_secret.key})")
        try:
            return Path(path).read_text().strip(), where
        except OSError as exc:
            raise HubPushError(f"{where}: cannot read the token file {path}: {exc}") from exc
    if os.environ.get("HF_TOKEN_PATH") and spec.model.token_secret is not None:
        secret = spec.model.token_secret
        return None, f"model.tokenSecret (Secret {secret.name}, key {secret.key})"
    return None, "this environment's Hub token (HF_TOKEN, HF_TOKEN_PATH or `hf auth login`)"


def push(job: FineTuneJob, staging: Path, output_uri: str, manifest: bytes, *,
         endpoint: str | None = None) -> CommitInfo:
    """Commit the artifact in `staging` (and the manifest published with it) to
    output.pushToHub.repo; returns the commit."""
    spec = job.spec
    target = spec.output.push_to_hub
    assert target is not None
    token, where = token_source(job)
    files = pushed_files(staging, spec.output.merge_adapter)
    api = HfApi(endpoint=endpoint, token=token)
    what = "merged model" if spec.output.merge_adapter else (
        "model" if spec.method.type == "full" else "adapter")
    message = f"kubetune: {job.name} ({spec.method.type} fine-tune of {spec.model.name})"

    def attempt() -> CommitInfo:
        api.create_repo(target.repo, private=target.private, exist_ok=True)
        if target.revision and target.revision != "main":
            api.create_branch(target.repo, branch=target.revision, exist_ok=True)
        operations = [CommitOperationAdd(rel, _content(path, spec.output.merge_adapter))
                      for rel, path in files.items()]
        operations.append(CommitOperationAdd(contract.MANIFEST_FILE, manifest))
        return api.create_commit(target.repo, operations, commit_message=message,
                                 commit_description=f"Artifact: {output_uri}",
                                 revision=target.revision)

    commit = _with_retries(attempt, target, where, output_uri)
    log.info("pushed the %s to %s (revision %s): %s", what, target.repo,
             target.revision or "main", commit.commit_url)
    return commit


def _content(path: Path, merged: bool) -> bytes | str:
    """A file's bytes as pushed: the model card adjusted for the Hub, the rest as written."""
    if path.name == artifacts.MODEL_CARD and path.parent.name != artifacts.MERGED_DIR:
        return hub_card(path.read_text(), merged).encode()
    return str(path)


def hub_card(card: str, merged: bool) -> str:
    """The model card's front matter as the Hub reads it: a merged model's library is
    transformers (the adapter's card says peft), and a `base_model` that is no Hub id (tiny
    mode's published base_model/, a local directory) is left out: the Hub links it as a model
    page and refuses ids that do not exist."""
    lines = card.split("\n")
    end = lines.index("---", 1) if lines[:1] == ["---"] and "---" in lines[1:] else 0
    for i in range(1, end):
        key, _, value = lines[i].partition(": ")
        if key == "library_name" and merged:
            lines[i] = 'library_name: "transformers"'
        elif key == "base_model" and not re.fullmatch(HUB_MODEL_ID, value.strip('"')):
            lines[i] = ""
    return "\n".join(line for i, line in enumerate(lines) if i >= end or line)


def _with_retries(attempt: Callable[[], CommitInfo], target: PushToHubSpec, where: str,
                  output_uri: str) -> CommitInfo:
    kept = f"the artifact is kept at {output_uri}"
    for n in range(PUSH_ATTEMPTS):
        try:
            return attempt()
        except Exception as exc:  # sorted into permanent and transient below
            status = _status(exc)
            if status is not None and not _transient(status):
                raise HubPushError(_refusal(status, exc, target, where, kept)) from exc
            if status is None and not isinstance(exc, (OSError, *_transport_errors())):
                raise
            if n + 1 >= PUSH_ATTEMPTS:
                raise HubPushRetryableError(
                    f"output.pushToHub: pushing to {target.repo} failed after {n + 1} "
                    f"attempts ({_describe(exc)}); {kept}") from exc
            delay = PUSH_BASE_DELAY * 2**n * random.uniform(0.8, 1.2)
            log.warning("output.pushToHub: attempt %d/%d failed (%s); retrying in %.1fs",
                        n + 1, PUSH_ATTEMPTS, _describe(exc), delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def _refusal(status: int, exc: BaseException, target: PushToHubSpec, where: str,
             kept: str) -> str:
    reason = {401: f"the Hub refused the token from {where}",
              403: f"the token from {where} may not write to {target.repo}",
              404: f"{target.repo} (revision {target.revision or 'main'}) was not found"}
    said = _server_message(exc)
    return (f"output.pushToHub: {reason.get(status, f'the Hub refused the push to {target.repo}')}"
            f" (HTTP {status}{': ' + said if said else ''}); {kept}")


def _status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None) if isinstance(exc, HfHubHTTPError) else None
    return None if response is None else int(response.status_code)


def _transient(status: int) -> bool:
    return status >= 500 or status in RETRYABLE_STATUSES


def _server_message(exc: BaseException) -> str:
    response: Any = getattr(exc, "response", None)
    said = response.headers.get("X-Error-Message", "") if response is not None else ""
    return str(said)[:200]


def _transport_errors() -> tuple[type[BaseException], ...]:
    """The HTTP client's connection and timeout errors (huggingface_hub's own client)."""
    import httpx2  # huggingface_hub's HTTP client

    return (httpx2.TransportError,)


def _describe(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
