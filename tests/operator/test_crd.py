"""The CRD file is the generator's output, structural, and documented."""

from __future__ import annotations

from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from kubetune_api import crd
from kubetune_api.crd import CRD_PATH, crd_manifest, render_crd
from kubetune_api.load import SpecError, validate_job
from support.jobs import MINIMAL_JOB_YAML


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
    # dataset.fields' default depends on dataset.type: the contract fills it, not the server
    assert "default" not in spec["dataset"]["properties"]["fields"]
    assert spec["dataset"]["properties"]["train"]["x-kubernetes-preserve-unknown-fields"]
    assert spec["resources"]["properties"]["nodes"]["minimum"] == 1
    assert spec["model"]["properties"]["numLabels"]["nullable"] is True
    assert spec["model"]["properties"]["task"]["enum"][0] == "causal-lm"
    assert spec["pod"]["properties"]["affinity"]["x-kubernetes-preserve-unknown-fields"]
    assert spec["pod"]["properties"]["tolerations"]["items"][
        "x-kubernetes-preserve-unknown-fields"]
    assert spec["pod"]["properties"]["nodeSelector"]["additionalProperties"] == \
        {"type": "string", "maxLength": 253}
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


def unbounded(node: dict[str, Any]) -> str | None:
    """What a free-form node lacks: the bound that caps what the API server stores."""
    if node.get("type") == "string" and "maxLength" not in node and "enum" not in node:
        return "maxLength"
    if node.get("type") == "array" and "maxItems" not in node:
        return "maxItems"
    free_map = isinstance(node.get("additionalProperties"), dict) or \
        (node.get("x-kubernetes-preserve-unknown-fields") and node.get("type") == "object")
    if free_map and "maxProperties" not in node:
        return "maxProperties"
    # A union without one structural type (targetModules: a list or "all-linear"; an env
    # value: a string or {valueFrom}): its shapes' bounds, which the API server applies by the
    # value's type.
    union = node.get("x-kubernetes-preserve-unknown-fields") and "type" not in node
    if union and not {"maxItems", "maxLength", "maxProperties"} & node.keys():
        return "maxItems/maxLength/maxProperties"
    return None


def test_every_free_form_spec_field_is_bounded() -> None:
    """An oversized spec is refused by the API server, field by field (the bounds come from
    the pydantic contract)."""
    spec = openapi()["properties"]["spec"]
    missing = [f"{path}: {what}" for path, node in walk(spec, "spec")
               if (what := unbounded(node)) is not None]
    assert missing == []


@pytest.mark.parametrize(("path", "value", "keyword"), [
    (("pod", "annotations"), {f"k{i}": "v" for i in range(65)}, "maxProperties"),
    (("pod", "tolerations"), [{"operator": "Exists"}] * 65, "maxItems"),
    (("dataset", "chatTemplate"), "x" * (64 * 1024 + 1), "maxLength"),
    (("output", "uri"), "s3://b/" + "x" * 2048, "maxLength"),
    (("method", "lora", "targetModules"), ["q_proj"] * 65, "maxItems"),
    (("method", "lora", "targetModules"), "all-linear" + "x" * 64, "maxLength"),
])
def test_an_oversized_field_is_refused_by_the_schema(path: tuple[str, str], value: Any,
                                                     keyword: str) -> None:
    schema = openapi()["properties"]["spec"]
    for name in path[:-1]:
        schema = schema["properties"][name]
    node = schema["properties"][path[-1]]
    with pytest.raises(jsonschema.ValidationError) as refused:
        jsonschema.validate(value, {k: v for k, v in node.items() if not k.startswith("x-")})
    assert refused.value.validator == keyword


def test_the_contract_enforces_the_same_bounds() -> None:
    body = yaml.safe_load(MINIMAL_JOB_YAML)
    body["spec"].setdefault("pod", {})["tolerations"] = [{"operator": "Exists"}] * 65
    with pytest.raises(SpecError, match=r"spec\.pod\.tolerations.*at most 64"):
        validate_job(body)


def test_a_spec_too_large_for_its_configmap_is_refused_with_its_size() -> None:
    body = yaml.safe_load(MINIMAL_JOB_YAML)
    body["spec"]["output"]["samples"] = {"prompts": ["p" * 60_000] * 8}  # each field in bounds
    with pytest.raises(SpecError, match=r"ml/big: spec: 48\d{4} bytes as JSON; at most 393216 "
                                        r"\(the job's ConfigMap must stay under"):
        validate_job(body, source="ml/big")
    body["spec"]["output"]["samples"] = {"prompts": ["p" * 60_000] * 4}
    assert validate_job(body).spec.output.samples is not None


# --- the runtimes' CRDs ------------------------------------------------------------------------

@pytest.mark.parametrize("kind", sorted(crd.RUNTIME_CRD_PATHS))
def test_runtime_crds_are_generated_valid_structural_and_described(kind: str) -> None:
    path = crd.RUNTIME_CRD_PATHS[kind]
    assert path.read_text() == crd.render_runtime_crd(kind), "stale CRD: run `make crds`"
    manifest = yaml.safe_load(path.read_text())
    kubernetes_validate.validate(manifest, "1.35", strict=True)
    assert manifest["spec"]["names"]["kind"] == kind
    assert manifest["spec"]["scope"] == ("Cluster" if kind.startswith("Cluster") else
                                         "Namespaced")
    spec = manifest["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    for field in ("image", "cpu", "memory", "nodeSelector", "tolerations", "affinity",
                  "schedulerName", "priorityClassName", "queue", "labels", "annotations",
                  "env", "policy"):
        assert field in spec["properties"], field
    assert set(spec["properties"]["policy"]["properties"]) == {
        "allowedMethods", "maxGpusPerJob", "allowedStoragePrefixes"}
    assert [f"{p}: {what}" for p, node in walk(spec, "spec")
            if (what := unbounded(node)) is not None] == []
    for node_path, node in walk(spec):
        assert {"$ref", "anyOf", "oneOf", "allOf", "const", "title"}.isdisjoint(node), node_path
        if node_path and not node_path.endswith(("[]", "{}")):
            assert node.get("description"), node_path


def test_a_job_names_its_runtime_and_may_not_change_it_while_active() -> None:
    ref = openapi()["properties"]["spec"]["properties"]["runtimeRef"]
    assert ref["properties"]["kind"]["enum"] == ["ClusterFineTuneRuntime", "FineTuneRuntime"]
    rule = openapi()["x-kubernetes-validations"][0]["rule"]
    assert "self.spec.runtimeRef == oldSelf.spec.runtimeRef" in rule
