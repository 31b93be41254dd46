"""prometheus-operator's monitoring.coreos.com/v1 kinds, as strict JSON schemas of the fields
this chart uses (transcribed from the ServiceMonitor, PodMonitor and PrometheusRule CRDs:
types, enums, required fields and patterns). kubernetes-validate has no custom resources; a
field the chart starts to use must be added here, which keeps typos out of the templates."""

from __future__ import annotations

from typing import Any

DURATION = (r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?"
            r"(([0-9]+)ms)?)$")
LABEL_NAME = r"^[a-zA-Z_][a-zA-Z0-9_]*$"


def _strict(properties: dict[str, Any], required: list[str] | None = None) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "additionalProperties": False,
                              "properties": properties}
    if required:
        schema["required"] = required
    return schema


STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
METADATA = _strict({"name": {"type": "string"}, "namespace": {"type": "string"},
                    "labels": STRING_MAP, "annotations": STRING_MAP}, ["name"])
LABEL_SELECTOR = _strict({
    "matchLabels": STRING_MAP,
    "matchExpressions": {"type": "array", "items": _strict({
        "key": {"type": "string"}, "operator": {"type": "string"},
        "values": {"type": "array", "items": {"type": "string"}}}, ["key", "operator"])},
})
NAMESPACE_SELECTOR = _strict({"any": {"type": "boolean"},
                              "matchNames": {"type": "array", "items": {"type": "string"}}})
RELABEL = _strict({
    "sourceLabels": {"type": "array", "items": {"type": "string", "pattern": LABEL_NAME}},
    "separator": {"type": "string"},
    "targetLabel": {"type": "string"},
    "regex": {"type": "string"},
    "modulus": {"type": "integer"},
    "replacement": {"type": "string"},
    "action": {"type": "string", "enum": [
        "replace", "Replace", "keep", "Keep", "drop", "Drop", "hashmod", "HashMod", "labelmap",
        "LabelMap", "labeldrop", "LabelDrop", "labelkeep", "LabelKeep", "lowercase", "Lowercase",
        "uppercase", "Uppercase", "keepequal", "KeepEqual", "dropequal", "DropEqual"]},
})
ENDPOINT = {
    "port": {"type": "string"},
    "path": {"type": "string"},
    "scheme": {"type": "string", "enum": ["http", "https", "HTTP", "HTTPS"]},
    "interval": {"type": "string", "pattern": DURATION},
    "scrapeTimeout": {"type": "string", "pattern": DURATION},
    "relabelings": {"type": "array", "items": RELABEL},
    "metricRelabelings": {"type": "array", "items": RELABEL},
}
RULE = _strict({
    "alert": {"type": "string"},
    "record": {"type": "string"},
    "expr": {"type": ["string", "integer"]},
    "for": {"type": "string", "pattern": DURATION},
    "labels": STRING_MAP,
    "annotations": STRING_MAP,
}, ["expr"])


def _kind(kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    return _strict({"apiVersion": {"const": "monitoring.coreos.com/v1"}, "kind": {"const": kind},
                    "metadata": METADATA, "spec": spec}, ["apiVersion", "kind", "metadata", "spec"])


MONITORING_SCHEMAS: dict[tuple[str, str], dict[str, Any]] = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): _kind("ServiceMonitor", _strict({
        "selector": LABEL_SELECTOR, "namespaceSelector": NAMESPACE_SELECTOR,
        "jobLabel": {"type": "string"},
        "endpoints": {"type": "array", "items": _strict(ENDPOINT)},
    }, ["selector"])),
    ("monitoring.coreos.com/v1", "PodMonitor"): _kind("PodMonitor", _strict({
        "selector": LABEL_SELECTOR, "namespaceSelector": NAMESPACE_SELECTOR,
        "jobLabel": {"type": "string"},
        "podTargetLabels": {"type": "array", "items": {"type": "string"}},
        "podMetricsEndpoints": {"type": "array", "items": _strict(ENDPOINT)},
    }, ["selector"])),
    ("monitoring.coreos.com/v1", "PrometheusRule"): _kind("PrometheusRule", _strict({
        "groups": {"type": "array", "items": _strict({
            "name": {"type": "string", "minLength": 1},
            "interval": {"type": "string", "pattern": DURATION},
            "rules": {"type": "array", "items": RULE},
        }, ["name"])},
    })),
}
