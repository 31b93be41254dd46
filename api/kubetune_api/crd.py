"""The FineTuneJob CustomResourceDefinition, generated from the pydantic contract.

`python -m kubetune_api.crd` (or `make crds`) writes crds/finetunejobs.kubetune.dev.yaml;
`--check` exits 1 when the file is stale. Torch-free and kopf-free on purpose.

Pydantic's JSON Schema becomes a *structural* OpenAPI v3 schema: $refs inlined, `anyOf` with
null turned into `nullable`, `exclusiveMinimum: x` into `minimum: x, exclusiveMinimum: true`,
free-form dicts marked `x-kubernetes-preserve-unknown-fields`, object defaults filled in so the
API server defaults nested fields. Cross-field rules of the pydantic validators are repeated as
CEL rules, so `kubectl apply` rejects them before the operator sees them. The status models the
operator writes live here too: one schema, one place.
"""

from __future__ import annotations

import argparse
import copy
import sys
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from kubetune_api.runtime import RUNTIME_KINDS, FineTuneRuntimeSpec
from kubetune_api.spec import (
    ALPACA_KEYS,
    CLUSTER_RUNTIME_KIND,
    GROUP,
    KIND,
    PLURAL,
    SHAREGPT_KEYS,
    SHORT_NAME,
    TINY_ARCHITECTURES,
    TINY_SCHEME,
    VERSION,
    DatasetSpec,
    FineTuneJobSpec,
    RuntimeRef,
)

CRD_NAME = f"{PLURAL}.{GROUP}"
CRD_DIR = Path(__file__).resolve().parents[2] / "crds"
CRD_PATH = CRD_DIR / f"{CRD_NAME}.yaml"
RUNTIME_CRD_PATHS = {kind: CRD_DIR / f"{plural}.{GROUP}.yaml"
                     for kind, plural in RUNTIME_KINDS.items()}


# --- status (written by the operator) ----------------------------------------------------------

class Phase(StrEnum):
    PENDING = "Pending"
    RUNNING = "Running"
    RESTARTING = "Restarting"
    SUSPENDED = "Suspended"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"


TERMINAL_PHASES = frozenset({Phase.SUCCEEDED, Phase.FAILED})
ACTIVE_PHASES = frozenset({Phase.PENDING, Phase.RUNNING, Phase.RESTARTING, Phase.SUSPENDED})


class StatusModel(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True,
                              use_enum_values=True)


class Condition(StatusModel):
    """A metav1.Condition."""

    type: str = Field(description="Running, Restarting, Suspended, Succeeded or Failed.")
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str = Field(description="CamelCase reason (see docs/operator.md).")
    message: str = Field("", description="Human-readable details.")
    last_transition_time: str = Field(description="When status last changed (RFC 3339).")
    observed_generation: int | None = Field(None, description="metadata.generation seen.")


class Progress(StatusModel):
    step: int | None = Field(None, description="Optimizer steps done.")
    total_steps: int | None = Field(None, description="Optimizer steps planned.")
    percent: float | None = Field(None, description="step / totalSteps, in percent.")
    loss: float | None = Field(None, description="Latest training loss.")
    tokens_per_second: float | None = Field(None, description="Training throughput.")
    eta_seconds: int | None = Field(None, description="Estimated seconds to finish.")
    eta: str | None = Field(None, description="etaSeconds for humans (e.g. 1h20m).")
    last_update_time: str | None = Field(None, description="When rank 0 was last scraped.")
    last_step_time: str | None = Field(None, description="When the step last advanced (or "
                                       "rank 0 was busy other than training): the stall "
                                       "watchdog's clock.")


class OciPushed(StatusModel):
    reference: str = Field(description="spec.output.oci.reference as pushed.")
    digest: str = Field(description="Digest of the OCI manifest pushed (pull by "
                        "registry/repository@digest).")


class Output(StatusModel):
    uri: str = Field(description="Where the artifact was written.")
    manifest_sha256: str | None = Field(None, description="SHA-256 of the artifact manifest.")
    oci: OciPushed | None = Field(None, description="The artifact pushed to spec.output.oci.")


class Runtime(StatusModel):
    """What the operator added to the spec when the first attempt started; later attempts reuse
    it, so an operator upgrade mid-job never resumes a checkpoint under another trainer."""

    trainer_image: str = Field(description="Trainer image when spec.pod.image is not set.")
    termination_grace_seconds: int = Field(description="Pods' termination grace period.")
    storage_secret: str | None = Field(None, description="Storage Secret when "
                                       "spec.storage.secretName is not set.")
    image_pull_secrets: list[str] = Field(default_factory=list, description="Pull secrets "
                                          "added to every pod.")
    service_account: str | None = Field(None, description="Trainer pods' service account.")
    ref: RuntimeRef | None = Field(None, description="The curated runtime spec.runtimeRef "
                                   "resolved to (docs/runtimes.md).")
    uid: str | None = Field(None, description="That runtime's metadata.uid.")
    generation: int | None = Field(None, description="That runtime's metadata.generation.")
    spec: dict[str, Any] | None = Field(None, description="That runtime's spec as the first "
                                        "attempt resolved it; later attempts reuse it.")


class FineTuneJobStatus(StatusModel):
    phase: Phase | None = Field(None, description="Pending, Running, Restarting, Suspended, "
                                "Succeeded or Failed.")
    conditions: list[Condition] = Field(default_factory=list, description="Latest "
                                        "observations, one per type.")
    attempt: int | None = Field(None, description="Current gang attempt, from 1.")
    restarts: int = Field(0, description="Gang restarts so far (attempt - 1).")
    observed_generation: int | None = Field(None, description="metadata.generation seen.")
    start_time: str | None = Field(None, description="When all ranks last started running "
                                   "(unset while they do not all run).")
    completion_time: str | None = Field(None, description="When the job succeeded or failed.")
    progress: Progress | None = Field(None, description="Training progress from rank 0.")
    output: Output | None = Field(None, description="The artifact, once succeeded.")
    active_seconds: int = Field(0, description="Seconds all ranks ran before startTime, over "
                                "all attempts: with it, what activeDeadlineSeconds counts.")
    preemptions: int = Field(0, description="Gang restarts that were not the training's "
                             "fault (preemption, eviction, node loss, a checkpointed SIGTERM, "
                             "a deleted Job); they do not count against backoffLimit.")
    attempt_start_time: str | None = Field(None, description="When the current attempt's "
                                           "Job was created.")
    runtime: Runtime | None = Field(None, description="Trainer image and operator defaults "
                                    "pinned by the first attempt.")
    admitted_spec_hash: str | None = Field(None, max_length=80, description="sha256 of the "
                                           "spec (without runPolicy) the first attempt "
                                           "admitted; every later attempt must match it.")


# --- JSON Schema → structural OpenAPI v3 --------------------------------------------------------

_DROPPED_KEYS = {"title", "additionalProperties", "$defs", "const"}


def structural_schema(model: type[BaseModel]) -> dict[str, Any]:
    """A pydantic model's schema as a structural OpenAPI v3 schema (CRD dialect)."""
    schema = model.model_json_schema(by_alias=True, mode="validation")
    return _convert(schema, schema.get("$defs", {}))


def _convert(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    node = _resolve(node, defs)
    if "anyOf" in node:
        node = _collapse_any_of(node, defs)
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROPPED_KEYS:
            continue
        if key == "properties":
            out[key] = {name: _convert(sub, defs) for name, sub in value.items()}
        elif key == "items":
            out[key] = _convert(value, defs)
        elif key in ("exclusiveMinimum", "exclusiveMaximum"):
            out["minimum" if key == "exclusiveMinimum" else "maximum"] = value
            out[key] = True
        elif key == "default" and value is None:
            continue
        else:
            out[key] = value
    if "const" in node:
        out["enum"] = [node["const"]]
    _mark_free_form(node, out, defs)
    return out


def _resolve(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """Inline a $ref; keys next to it (description, default) win over the definition's."""
    if "$ref" not in node:
        return node
    # A deep copy: a definition used twice must not share lists (YAML would alias them).
    target = copy.deepcopy(defs[node["$ref"].split("/")[-1]])
    target.update({k: v for k, v in node.items() if k != "$ref"})
    return _resolve(target, defs)


def _collapse_any_of(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    options = [_resolve(o, defs) for o in node["anyOf"] if o.get("type") != "null"]
    nullable = len(options) < len(node["anyOf"])
    rest = {k: v for k, v in node.items() if k != "anyOf"}
    if len(options) == 1:
        merged = {**options[0], **rest}
        if nullable:
            merged["nullable"] = True
        return merged
    # A real union (e.g. a list or "all-linear"): no single structural type; a CEL rule checks
    # the shape, and each option's size bound stays (the API server applies maxItems to arrays
    # and maxLength to strings only, so both can sit on the one node).
    return {**rest, **_union_bounds(options), "x-kubernetes-preserve-unknown-fields": True}


def _union_bounds(options: list[dict[str, Any]]) -> dict[str, int]:
    bounds: dict[str, int] = {}
    for option in options:
        if option.get("type") == "array" and "maxItems" in option:
            bounds["maxItems"] = max(bounds.get("maxItems", 0), option["maxItems"])
        if option.get("type") == "string":
            words = [option["const"]] if "const" in option else option.get("enum", [])
            longest = option.get("maxLength", max((len(w) for w in words), default=None))
            if longest is not None:
                bounds["maxLength"] = max(bounds.get("maxLength", 0), longest)
        if option.get("type") == "object" and "properties" in option:
            bounds["maxProperties"] = max(bounds.get("maxProperties", 0),
                                          len(option["properties"]))
    return bounds


def _mark_free_form(source: dict[str, Any], out: dict[str, Any], defs: dict[str, Any]) -> None:
    extra = _resolve(source, defs).get("additionalProperties")
    if out.get("type") == "object" and "properties" not in out:
        if isinstance(extra, dict) and extra:
            out["additionalProperties"] = _convert(extra, defs)
        else:  # dict[str, Any]: core/v1 structures passed through to the pod
            out["x-kubernetes-preserve-unknown-fields"] = True


# Defaults that depend on other fields (dataset.fields on dataset.type): the API server must
# leave them out, the contract's validators fill them in.
_DEFAULTED_BY_VALIDATOR = {(DatasetSpec, "fields")}


def _fill_object_defaults(schema: dict[str, Any], model: type[BaseModel]) -> None:
    """Give sub-objects built by default_factory a default, so nested defaults apply."""
    for name, info in model.model_fields.items():
        if info.default_factory is None or (model, name) in _DEFAULTED_BY_VALIDATOR:
            continue
        alias = info.alias or to_camel(name)
        value = info.default_factory()  # type: ignore[call-arg]
        if isinstance(value, BaseModel):
            default = value.model_dump(by_alias=True, exclude_none=True, exclude_defaults=True,
                                       mode="json")
            _fill_object_defaults(schema["properties"][alias], type(value))
        else:
            default = value
        schema["properties"][alias]["default"] = default
    for name, info in model.model_fields.items():
        sub = info.annotation
        alias = info.alias or to_camel(name)
        if isinstance(sub, type) and issubclass(sub, BaseModel) and info.default_factory is None:
            _fill_object_defaults(schema["properties"][alias], sub)


# --- CEL rules (the pydantic validators, for the API server) ------------------------------------

def _rule(rule: str, message: str, field_path: str | None = None) -> dict[str, str]:
    out = {"rule": rule, "message": message}
    if field_path:
        out["fieldPath"] = field_path
    return out


_TINY_NAMES = ", ".join(f"'{TINY_SCHEME}{a}'" for a in TINY_ARCHITECTURES)
_FIELDS_TEXT = "has(self.text) && !has(self.prompt) && !has(self.completion) " \
               "&& !has(self.messages)"
_FIELDS_PAIR = "has(self.prompt) && has(self.completion) && !has(self.text) " \
               "&& !has(self.label) && !has(self.messages)"
_FIELDS_CHAT = "has(self.messages) && !has(self.text) && !has(self.label) " \
               "&& !has(self.prompt) && !has(self.completion)"

_NO_PAIRS = "!has(self.chosen) && !has(self.rejected)"
# Record types other than `fields` fill fields.messages themselves: no training role given.
_NO_SIGNAL = " && ".join(f"!has(self.{k})" for k in
                         ("text", "prompt", "completion", "messages", "label", "chosen",
                          "rejected"))
_FIELDS_MESSAGE = ("fields must be one of: text; text+label; prompt+completion; messages; "
                   "prompt+chosen+rejected; chosen+rejected")


def _dataset_field(key: str) -> str:
    """has(self.dataset.fields.<key>), also when fields is left out (then only text is there,
    the default of type fields)."""
    given = f"(has(self.dataset.fields) && has(self.dataset.fields.{key}))"
    if key != "text":
        return given
    return (f"({given} || (!has(self.dataset.fields) && (!has(self.dataset.type) || "
            f"self.dataset.type == 'fields')))")


def _type_keys_rule(record_type: str, keys: tuple[str, ...]) -> dict[str, str]:
    absent = " && ".join(f"!has(self.fields.{k})" for k in keys)
    return _rule(f"!has(self.fields) || (has(self.type) && self.type == '{record_type}') || "
                 f"({absent})",
                 f"fields {', '.join(keys)} apply only to type {record_type}")
_FIELDS_PREFERENCE = "has(self.chosen) && has(self.rejected) && !has(self.text) " \
                     "&& !has(self.label) && !has(self.messages) && !has(self.completion)"
_OBJECTIVE_SFT = "!has(self.training) || !has(self.training.objective) || " \
                 "self.training.objective == 'sft'"

CEL_RULES: dict[str, list[dict[str, str]]] = {
    "model": [
        _rule("self.task != 'sequence-classification' || has(self.numLabels)",
              "numLabels is required when task is sequence-classification", ".numLabels"),
        _rule("self.task == 'sequence-classification' || !has(self.numLabels)",
              "numLabels only applies to task sequence-classification", ".numLabels"),
        _rule(f"!self.name.startsWith('{TINY_SCHEME}') || self.name in [{_TINY_NAMES}]",
              f"unknown tiny model; use one of {_TINY_NAMES}", ".name"),
    ],
    "method": [
        _rule("self.type != 'qlora' || has(self.quantization)",
              "quantization is required when type is qlora", ".quantization"),
        _rule("self.type == 'qlora' || !has(self.quantization)",
              "quantization only applies to type qlora", ".quantization"),
        _rule("self.type != 'full' || !has(self.lora)", "lora does not apply to type full",
              ".lora"),
    ],
    "method.lora": [
        _rule("!has(self.targetModules) || (type(self.targetModules) == string ? "
              "self.targetModules == 'all-linear' : type(self.targetModules) == list)",
              "targetModules is a list of module names or the string all-linear",
              ".targetModules"),
    ],
    "dataset.fields": [
        _rule(f"({_NO_PAIRS} && (({_FIELDS_TEXT}) || ({_FIELDS_PAIR}) || ({_FIELDS_CHAT})))"
              f" || ({_FIELDS_PREFERENCE}) || ({_NO_SIGNAL})", _FIELDS_MESSAGE),
    ],
    "dataset": [
        _rule("!has(self.fields) || (has(self.type) && self.type != 'fields') || "
              f"!({_NO_SIGNAL.replace('self.', 'self.fields.')})", _FIELDS_MESSAGE),
        _rule("!has(self.type) || self.type == 'fields' || !has(self.fields) || ("
              + " && ".join(f"!has(self.fields.{k})" for k in
                            ("text", "prompt", "completion", "label", "chosen", "rejected"))
              + ")", "types sharegpt, alpaca and openai make conversations: fields may name "
              "messages and the type's keys only"),
        _type_keys_rule("sharegpt", SHAREGPT_KEYS),
        _type_keys_rule("alpaca", ALPACA_KEYS),
    ],
    "": [
        _rule("self.model.task != 'sequence-classification' || "
              "(" + _dataset_field("text") + " && " + _dataset_field("label") + ")",
              "task sequence-classification needs dataset.fields text and label"),
        _rule("self.model.task == 'sequence-classification' || !" + _dataset_field("label"),
              "dataset.fields.label only applies to task sequence-classification"),
        _rule("self.model.task != 'masked-lm' || " + _dataset_field("text"),
              "task masked-lm needs dataset.fields text"),
        _rule("self.model.task != 'seq2seq-lm' || " + _dataset_field("prompt"),
              "task seq2seq-lm needs dataset.fields prompt and completion"),
        _rule("!has(self.dataset.packing) || !self.dataset.packing || "
              "self.model.task == 'causal-lm'", "dataset.packing only applies to task causal-lm"),
        _rule(f"({_OBJECTIVE_SFT}) || (self.model.task == 'causal-lm' && "
              + _dataset_field("chosen") + " && (!has(self.dataset.packing) || "
              "!self.dataset.packing))",
              "training.objective dpo/orpo needs model.task causal-lm, dataset.fields "
              "chosen+rejected (with or without prompt) and no packing"),
        _rule(f"!{_dataset_field('chosen')} || !({_OBJECTIVE_SFT})",
              "dataset.fields chosen/rejected need training.objective dpo or orpo"),
    ],
}

# While the job is active, the spec may change only in runPolicy.suspend and the TTL: a change
# would not reach pods already started, so it is refused instead of silently ignored.
_MUTABLE_RUN_POLICY = ("suspend", "ttlSecondsAfterFinished")
_IMMUTABLE_SPEC_FIELDS = tuple(
    (info.alias or to_camel(name)) for name, info in FineTuneJobSpec.model_fields.items()
    if name not in ("run_policy", "runtime_ref"))


def _immutability_rule() -> dict[str, str]:
    same = " && ".join(f"self.spec.{f} == oldSelf.spec.{f}" for f in _IMMUTABLE_SPEC_FIELDS)
    same += (" && has(self.spec.runtimeRef) == has(oldSelf.spec.runtimeRef)"
             " && (!has(self.spec.runtimeRef) || self.spec.runtimeRef == oldSelf.spec.runtimeRef)")
    same += (" && self.spec.runPolicy.backoffLimit == oldSelf.spec.runPolicy.backoffLimit"
             " && has(self.spec.runPolicy.activeDeadlineSeconds) == "
             "has(oldSelf.spec.runPolicy.activeDeadlineSeconds)"
             " && (!has(self.spec.runPolicy.activeDeadlineSeconds) || "
             "self.spec.runPolicy.activeDeadlineSeconds == "
             "oldSelf.spec.runPolicy.activeDeadlineSeconds)")
    active = ", ".join(f"'{p.value}'" for p in sorted(ACTIVE_PHASES, key=lambda p: p.value))
    return _rule(f"!has(oldSelf.status) || !has(oldSelf.status.phase) || "
                 f"!(oldSelf.status.phase in [{active}]) || ({same})",
                 "spec is immutable while the job is active, except runPolicy."
                 + " and runPolicy.".join(_MUTABLE_RUN_POLICY))


def _attach_rules(spec_schema: dict[str, Any]) -> None:
    for path, rules in CEL_RULES.items():
        node = spec_schema
        for part in filter(None, path.split(".")):
            node = node["properties"][part]
        node["x-kubernetes-validations"] = rules


# --- the CRD ------------------------------------------------------------------------------------

PRINTER_COLUMNS = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Method", "type": "string", "jsonPath": ".spec.method.type"},
    {"name": "Model", "type": "string", "jsonPath": ".spec.model.name"},
    {"name": "Nodes", "type": "integer", "jsonPath": ".spec.resources.nodes"},
    {"name": "Progress", "type": "number", "jsonPath": ".status.progress.percent",
     "description": "Percent of optimizer steps done."},
    {"name": "Loss", "type": "number", "jsonPath": ".status.progress.loss"},
    {"name": "ETA", "type": "string", "jsonPath": ".status.progress.eta"},
    {"name": "Restarts", "type": "integer", "jsonPath": ".status.restarts"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def spec_schema() -> dict[str, Any]:
    schema = structural_schema(FineTuneJobSpec)
    schema["description"] = "What to fine-tune, on what data, how, and where the result goes."
    _fill_object_defaults(schema, FineTuneJobSpec)
    _attach_rules(schema)
    return schema


def status_schema() -> dict[str, Any]:
    schema = structural_schema(FineTuneJobStatus)
    schema["description"] = "Observed state, written by the operator."
    conditions = schema["properties"]["conditions"]
    conditions.pop("default", None)
    conditions["x-kubernetes-list-type"] = "map"
    conditions["x-kubernetes-list-map-keys"] = ["type"]
    schema["properties"]["restarts"].pop("default", None)
    return schema


def crd_manifest() -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": CRD_NAME},
        "spec": {
            "group": GROUP,
            "names": {"kind": KIND, "listKind": f"{KIND}List", "plural": PLURAL,
                      "singular": KIND.lower(), "shortNames": [SHORT_NAME],
                      "categories": ["kubetune"]},
            "scope": "Namespaced",
            "versions": [{
                "name": VERSION, "served": True, "storage": True,
                "subresources": {"status": {}},
                "additionalPrinterColumns": PRINTER_COLUMNS,
                "schema": {"openAPIV3Schema": {
                    "type": "object",
                    "description": "A distributed fine-tuning run: a gang of torchrun pods "
                                   "that trains a model and writes the result to storage.",
                    "required": ["spec"],
                    "properties": {
                        "apiVersion": {"type": "string"},
                        "kind": {"type": "string"},
                        "metadata": {"type": "object"},
                        "spec": spec_schema(),
                        "status": status_schema(),
                    },
                    "x-kubernetes-validations": [_immutability_rule()],
                }},
            }],
        },
    }


RUNTIME_PRINTER_COLUMNS = [
    {"name": "Image", "type": "string", "jsonPath": ".spec.image"},
    {"name": "Queue", "type": "string", "jsonPath": ".spec.queue"},
    {"name": "MaxGPUs", "type": "integer", "jsonPath": ".spec.policy.maxGpusPerJob"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def runtime_crd_manifest(kind: str) -> dict[str, Any]:
    """ClusterFineTuneRuntime (cluster-scoped) or FineTuneRuntime (namespaced): one schema."""
    plural = RUNTIME_KINDS[kind]
    schema = structural_schema(FineTuneRuntimeSpec)
    schema["description"] = "Image, placement, defaults and policy for the jobs naming it."
    _fill_object_defaults(schema, FineTuneRuntimeSpec)
    cluster = kind == CLUSTER_RUNTIME_KIND
    where = "any namespace" if cluster else "its own namespace"
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "names": {"kind": kind, "listKind": f"{kind}List", "plural": plural,
                      "singular": kind.lower(), "categories": ["kubetune"]},
            "scope": "Cluster" if cluster else "Namespaced",
            "versions": [{
                "name": VERSION, "served": True, "storage": True,
                "additionalPrinterColumns": RUNTIME_PRINTER_COLUMNS,
                "schema": {"openAPIV3Schema": {
                    "type": "object",
                    "description": f"A fine-tuning runtime curated by admins, for FineTuneJobs "
                                   f"in {where} (spec.runtimeRef).",
                    "properties": {
                        "apiVersion": {"type": "string"},
                        "kind": {"type": "string"},
                        "metadata": {"type": "object"},
                        "spec": schema,
                    },
                }},
            }],
        },
    }


_HEADER = "# Generated by `make crds` (python -m kubetune_api.crd) from kubetune_api.spec.\n"


def render_crd() -> str:
    return _HEADER + yaml.safe_dump(crd_manifest(), sort_keys=False, width=100)


def render_runtime_crd(kind: str) -> str:
    return _HEADER + yaml.safe_dump(runtime_crd_manifest(kind), sort_keys=False, width=100)


def rendered_crds(output: Path = CRD_PATH) -> dict[Path, str]:
    """Every generated CRD by path (the runtimes' next to the FineTuneJob's)."""
    files = {output: render_crd()}
    for kind, path in RUNTIME_CRD_PATHS.items():
        files[output.parent / path.name] = render_runtime_crd(kind)
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the file is stale")
    parser.add_argument("--output", type=Path, default=CRD_PATH,
                        help="the FineTuneJob CRD; the runtimes' go next to it")
    args = parser.parse_args(argv)
    files = rendered_crds(args.output)
    if args.check:
        stale = [path for path, text in files.items()
                 if not path.exists() or path.read_text() != text]
        for path in stale:
            print(f"{path} is stale; run `make crds`", file=sys.stderr)
        return int(bool(stale))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    for path, text in files.items():
        path.write_text(text)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
