"""The CRD file is the generator's output, structural, and documented."""

from __future__ import annotations

from typing import Any

import kubernetes_validate
import yaml

from kubetune_api import crd
from kubetune_api.crd import CRD_PATH, crd_manifest, render_crd


def walk(schema: dict[str, Any], path: str = "") -> list[tuple[str, dict[str, Any]]]:
    nodes = [(path, schema)]
    for name, sub in schema.get("properties", {}).items():
        nodes += walk(sub, f"{path}.{name}")
    if "items" in schema:
        nodes += walk(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        nodes += walk(schema["additionalProperties"], f"{path}{{}}")
    return nodes


def openapi() -> dict[str, Any]:
    schema: dict[str, Any] = crd_manifest()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema


def test_file_is_up_to_date() -> None:
    assert CRD_PATH.read_text() == render_crd(), "stale CRD: run `make crds`"
    assert crd.main(["--check"]) == 0


def test_crd_is_a_valid_kubernetes_object() -> None:
    kubernetes_validate.validate(yaml.safe_load(CRD_PATH.read_text()), "1.35", strict=True)


def test_schema_is_structural() -> None:
    for path, node in walk(openapi()):
        assert {"$ref", "anyOf", "oneOf", "allOf", "const", "title"}.isdisjoint(node), path
        typed = "type" in node or node.get("x-kubernetes-preserve-unknown-fields")
        assert typed, f"{path} has no type"
        assert not ("properties" in node and "additionalProperties" in node), path
        assert node.get("additionalProperties") is not False, path
        for key in ("exclusiveMinimum", "exclusiveMaximum"):
            assert node.get(key) in (None, True), path


def test_every_spec_field_is_described_for_kubectl_explain() -> None:
    spec = openapi()["properties"]["spec"]
    missing = [path for path, node in walk(spec) if path and not path.endswith(("[]", "{}"))
               and not node.get("description")]
    assert missing == []


def test_defaults_optional_fields_and_free_form_objects() -> None:
    spec = openapi()["properties"]["spec"]["properties"]
    assert spec["training"]["default"] == {}
    assert spec["training"]["properties"]["learningRate"]["default"] == 2e-4
    assert spec["dataset"]["properties"]["fields"]["default"] == {"text": "text"}
    assert spec["resources"]["properties"]["nodes"]["minimum"] == 1
    assert spec["model"]["properties"]["numLabels"]["nullable"] is True
    assert spec["model"]["properties"]["task"]["enum"][0] == "causal-lm"
    assert spec["pod"]["properties"]["affinity"]["x-kubernetes-preserve-unknown-fields"]
    assert spec["pod"]["properties"]["tolerations"]["items"][
        "x-kubernetes-preserve-unknown-fields"]
    assert spec["pod"]["properties"]["nodeSelector"]["additionalProperties"] == \
        {"type": "string"}
    alpha = spec["method"]["properties"]["lora"]["properties"]["alpha"]
    assert (alpha["minimum"], alpha["exclusiveMinimum"]) == (0, True)
    assert set(openapi()["required"]) == {"spec"}
    assert set(openapi()["properties"]["spec"]["required"]) == {"model", "method", "dataset",
                                                                "output"}


# The CEL rules are evaluated, not read: tests/api/test_crd_cel.py.


def test_status_subresource_printer_columns_and_names() -> None:
    version = crd_manifest()["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    columns = [c["name"] for c in version["additionalPrinterColumns"]]
    assert columns == ["Phase", "Method", "Model", "Nodes", "Progress", "Loss", "ETA",
                       "Restarts", "Age"]
    names = crd_manifest()["spec"]["names"]
    assert names["shortNames"] == ["ftj"] and names["kind"] == "FineTuneJob"
    status = openapi()["properties"]["status"]["properties"]
    assert {"phase", "conditions", "restarts", "progress", "output", "observedGeneration",
            "attempt", "startTime", "completionTime"} <= set(status)
    assert status["conditions"]["x-kubernetes-list-map-keys"] == ["type"]
    assert set(status["progress"]["properties"]) >= {
        "step", "totalSteps", "percent", "loss", "tokensPerSecond", "etaSeconds",
        "lastUpdateTime"}
