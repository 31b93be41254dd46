"""`kubetune describe` (client/kubetune/output.py): pure text from a FineTuneJob object."""

from __future__ import annotations

from kubetune.output import describe
from kubetune.sdk import Job


def test_describe_shows_what_was_pushed_by_digest() -> None:
    obj = {"metadata": {"name": "llama", "namespace": "ml"},
           "spec": {"model": {"name": "tiny://llama"}, "method": {"type": "lora"},
                    "dataset": {"train": "d.jsonl"}, "output": {"uri": "s3://b/out"}},
           "status": {"phase": "Succeeded", "output": {
               "uri": "s3://b/out", "manifestSha256": "abc123",
               "oci": {"reference": "registry.example.com:5000/team/a:v1",
                       "digest": "sha256:d1"}}}}
    text = describe(Job.from_object(obj), [])
    assert ("Pushed:       registry.example.com:5000/team/a@sha256:d1 "
            "(tag registry.example.com:5000/team/a:v1)") in text
    del obj["status"]["output"]["oci"]  # type: ignore[attr-defined]
    assert "Pushed:" not in describe(Job.from_object(obj), [])
