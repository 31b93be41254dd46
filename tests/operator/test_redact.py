"""Credentials never reach status or events through a failing rank's log tail."""

from __future__ import annotations

import pytest

from kubetune_api.redact import MASK, redact
from kubetune_operator.status import MESSAGE_TAIL, pod_failure
from support.canaries import CANARIES, PEM_BODY

HF = "hf_" + "Ab3" * 12
AWS_ID = "AKIAABCDEFGHIJKLMNOP"
AWS_KEY = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"


@pytest.mark.parametrize(("text", "secret"), [
    (f"HF_TOKEN={HF}", HF),
    (f"401 Client Error: token {HF} is invalid", HF),
    (f"os.environ: {{'AWS_SECRET_ACCESS_KEY': '{AWS_KEY}', 'HOME': '/home/kubetune'}}", AWS_KEY),
    (f'"aws_secret_access_key": "{AWS_KEY}"', AWS_KEY),
    (f"botocore: credentials for {AWS_ID} rejected", AWS_ID),
    ("WANDB_API_KEY=0123456789abcdef0123", "0123456789abcdef0123"),
    ("Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.payload.sig", "eyJhbGciOiJIUzI1NiJ9"),
    ("s3fs: cannot reach https://minio:Sup3rS3cret@minio.local:9000", "Sup3rS3cret"),
    ("DB_PASSWORD: hunter2hunter2", "hunter2hunter2"),
    *((f"while reading {text}", secret) for text, secret in CANARIES.values()),
    (f"key file:\n{PEM_BODY[:80]}", PEM_BODY[40:80]),  # cut short by the log tail
])
def test_credentials_are_masked(text: str, secret: str) -> None:
    masked = redact(text)
    assert secret not in masked and MASK in masked, masked


def test_ordinary_failure_text_is_kept() -> None:
    text = ("RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB; tokens_per_second "
            "fell; loss=nan at step 12")
    assert redact(text) == text


def test_a_failed_rank_condition_is_capped_and_redacted() -> None:
    log = "x" * 5000 + f"\nTraceback: HF_TOKEN={HF} AWS_SECRET_ACCESS_KEY={AWS_KEY}\nboom"
    pod = {"metadata": {"annotations": {"batch.kubernetes.io/job-completion-index": "1"}},
           "status": {"phase": "Failed", "containerStatuses": [{"name": "trainer", "state": {
               "terminated": {"exitCode": 1, "message": log}}}]}}
    failure = pod_failure(pod)
    assert failure is not None
    assert HF not in failure.message and AWS_KEY not in failure.message
    assert "boom" in failure.message
    assert len(failure.message) < MESSAGE_TAIL + 100
