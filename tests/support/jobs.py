"""Build FineTuneJobs for tests from the shipped examples, with overrides."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from kubetune_api.load import validate_job
from kubetune_api.spec import FineTuneJob

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"

# The smallest FineTuneJob the contract accepts, as a user writes it (tests check file:line
# errors against its lines).
MINIMAL_JOB_YAML = """\
apiVersion: kubetune.dev/v1alpha1
kind: FineTuneJob
metadata: {name: t}
spec:
  model: {name: "tiny://llama"}
  method: {type: lora}
  dataset:
    train: data.jsonl
  output: {uri: out}
"""


def example_dict(name: str) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((EXAMPLES / f"{name}.yaml").read_text())
    dataset = data["spec"]["dataset"]
    for key in ("train", "eval"):  # make data paths independent of the test's cwd
        if isinstance(dataset.get(key), str):
            dataset[key] = str(ROOT / dataset[key])
    for source in dataset["train"] if isinstance(dataset["train"], list) else []:
        source["path"] = str(ROOT / source["path"])
    return data


def example_job(name: str, output_uri: Path | str, **overrides: dict[str, Any]) -> FineTuneJob:
    """The example `name` writing to `output`; overrides merge into spec sections."""
    data = example_dict(name)
    data["spec"]["output"]["uri"] = str(output_uri)
    for section, values in overrides.items():
        data["spec"].setdefault(section, {}).update(values)
    return validate_job(data)


def ftj_body(name: str, namespace: str = "default", **spec_overrides: Any) -> dict[str, Any]:
    """examples/tiny-lora.yaml as a FineTuneJob object named `name`; dict overrides merge into
    spec sections, other values replace them."""
    body: dict[str, Any] = yaml.safe_load((EXAMPLES / "tiny-lora.yaml").read_text())
    body["metadata"] = {"name": name, "namespace": namespace}
    for key, value in spec_overrides.items():
        body["spec"][key] = {**body["spec"].get(key, {}), **value} \
            if isinstance(value, dict) else value
    return body
