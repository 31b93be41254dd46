"""values.yaml is documented key by key, the README lists every value, and values.schema.json
turns bad values into clear install-time errors."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
from chartlib import CHART, CI_VALUES, require_helm, run_helm, template_args, values_of
from values_doc import render_readme, schema_paths, value_keys

SCHEMA = json.loads((CHART / "values.schema.json").read_text())
VALUES_TEXT = (CHART / "values.yaml").read_text()


def test_every_schema_key_has_a_default_and_a_doc_comment() -> None:
    keys, paths = value_keys(VALUES_TEXT), schema_paths(SCHEMA)
    missing = sorted(set(paths) - set(keys) - {"global", "resources.claims"})
    assert missing == [], "schema keys without a default in values.yaml"
    undocumented = sorted(f"{k.path} (line {k.line})" for k in keys.values()
                          if k.path in paths and not k.doc)
    assert undocumented == [], "keys without a `# --` comment"


def test_values_yaml_has_no_key_the_schema_does_not_know() -> None:
    paths = schema_paths(SCHEMA)
    for key in value_keys(VALUES_TEXT):
        parent = key.rpartition(".")[0]
        closed = SCHEMA if not parent else paths.get(parent)
        if closed is not None and closed.get("additionalProperties") is False:
            assert key in paths, f"values.yaml key {key} is not in values.schema.json"


def test_schema_describes_every_key() -> None:
    for path, schema in schema_paths(SCHEMA).items():
        assert schema.get("description"), path


def test_readme_lists_every_value() -> None:
    readme = (CHART / "README.md").read_text()
    assert render_readme(readme) == readme, \
        "charts/kubetune/README.md values table is stale: .venv/bin/python " \
        "tests/chart/values_doc.py --write"
    for path in value_keys(VALUES_TEXT):
        if path in schema_paths(SCHEMA):
            assert f"| `{path}` |" in readme, path


@pytest.mark.parametrize("values", [None, *CI_VALUES],
                         ids=["default", *[p.stem for p in CI_VALUES]])
def test_shipped_values_pass_the_schema(values: Path | None) -> None:
    jsonschema.Draft7Validator(SCHEMA).validate(values_of(values))


BAD_VALUES = [
    (["replicas=0"], "/replicas", "minimum"),
    (["replicas=two"], "/replicas", "want integer"),
    (["watchNamespaces={Team_A}"], "/watchNamespaces/0", "does not match pattern"),
    (["watchNamespaces={team-a,team-a}"], "/watchNamespaces", "items at 0 and 1 are equal"),
    (["operator.logLevel=verbose"], "/operator/logLevel", "value must be one of"),
    (["metrics.port=70000"], "/metrics/port", "maximum"),
    (["operator.healthPort=0"], "/operator/healthPort", "minimum"),
    (["image.digest=latest"], "/image/digest", "does not match pattern"),
    (["trainer.image.tag=v1 beta"], "/trainer/image/tag", "does not match pattern"),
    (["trainer.image.repository="], "/trainer/image/repository", "minLength"),
    (["image.registry=https://registry.example.com"], "/image/registry", "does not match pattern"),
    (["trainer.image.registry=registry.example.com/team/"], "/trainer/image/registry",
     "does not match pattern"),
    (["storage.defaultSecretName=S3_Creds"], "/storage/defaultSecretName", "pattern"),
    (["monitoring.prometheusRule.stalledWindow=half an hour"],
     "/monitoring/prometheusRule/stalledWindow", "pattern"),
    (["monitoring.serviceMonitor.enabled=yes-please"], "/monitoring/serviceMonitor/enabled",
     "want boolean"),
    (["operator.progressInterval=0"], "/operator/progressInterval", "exclusiveMinimum"),
    (["replica=2"], "at ''", "additional properties 'replica' not allowed"),
    (["trainer.imagePullSecret=x"], "/trainer", "additional properties 'imagePullSecret'"),
    (["crds.install=maybe"], "/crds/install", "want boolean"),
]


@pytest.mark.parametrize(("sets", "where", "message"), BAD_VALUES,
                         ids=[s[0][0] for s in BAD_VALUES])
def test_bad_values_fail_the_install_with_a_clear_message(sets: list[str], where: str,
                                                          message: str) -> None:
    require_helm()
    result = run_helm(*template_args(None, tuple(sets), include_crds=False))
    assert result.returncode != 0, f"helm accepted {sets}"
    assert "values don't meet the specifications of the schema" in result.stderr
    assert where in result.stderr and message in result.stderr, result.stderr
