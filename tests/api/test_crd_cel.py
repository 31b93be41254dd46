"""Every CEL rule of the CRD (x-kubernetes-validations), evaluated with a CEL implementation
(cel-python) the way the API server does: on the object after the schema's defaults, at the
node the rule sits on, transition rules (oldSelf) only on updates. Good specs pass every rule,
each bad spec breaks exactly the rule it names, the pydantic contract agrees with CEL on each,
and every rule is broken by at least one case here (a new rule without a case fails)."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import celpy
import pytest
import yaml

from kubetune_api.crd import CRD_PATH
from kubetune_api.load import SpecError, validate_job

ROOT = Path(__file__).resolve().parents[2]
SCHEMA: dict[str, Any] = yaml.safe_load(CRD_PATH.read_text())["spec"]["versions"][0][
    "schema"]["openAPIV3Schema"]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
IMMUTABLE = "spec is immutable while the job is active"
Edit = Callable[[dict[str, Any]], object]  # changes a spec in place


@dataclass(frozen=True)
class Rule:
    path: tuple[str, ...]  # property names from the root; "[]" / "{}": every list item / map value
    text: str
    message: str

    @property
    def transition(self) -> bool:
        return "oldSelf" in self.text


def collect(schema: dict[str, Any], path: tuple[str, ...] = ()) -> Iterator[Rule]:
    for rule in schema.get("x-kubernetes-validations", []):
        yield Rule(path, rule["rule"], rule["message"])
    for name, sub in schema.get("properties", {}).items():
        yield from collect(sub, (*path, name))
    if "items" in schema:
        yield from collect(schema["items"], (*path, "[]"))
    if isinstance(schema.get("additionalProperties"), dict):
        yield from collect(schema["additionalProperties"], (*path, "{}"))


RULES = list(collect(SCHEMA))
ENV = celpy.Environment()
PROGRAMS = {rule: ENV.program(ENV.compile(rule.text)) for rule in RULES}


def defaulted(schema: dict[str, Any], value: Any) -> Any:
    """The schema's `default`s applied, as the API server does before validation."""
    if isinstance(value, dict) and "properties" in schema:
        for name, sub in schema["properties"].items():
            if name not in value and "default" in sub:
                value[name] = copy.deepcopy(sub["default"])
            if name in value:
                value[name] = defaulted(sub, value[name])
    elif isinstance(value, list) and "items" in schema:
        value = [defaulted(schema["items"], item) for item in value]
    return value


def nodes(value: Any, path: tuple[str, ...]) -> Iterator[Any]:
    if not path:
        yield value
    elif path[0] == "[]":
        for item in value if isinstance(value, list) else []:
            yield from nodes(item, path[1:])
    elif path[0] == "{}":
        for item in value.values() if isinstance(value, dict) else []:
            yield from nodes(item, path[1:])
    elif isinstance(value, dict) and path[0] in value:
        yield from nodes(value[path[0]], path[1:])


def evaluate(rule: Rule, new: Any, old: Any = None) -> bool:
    bindings = {"self": celpy.json_to_cel(new)}
    if old is not None:
        bindings["oldSelf"] = celpy.json_to_cel(old)
    # An evaluation error (no such key, wrong type) rejects the object on a real API server:
    # here it fails the test, so a rule cannot pass by erroring.
    try:
        result = PROGRAMS[rule].evaluate(bindings)
    except celpy.CELEvalError as exc:
        raise AssertionError(f"{rule.text}: {exc}") from None
    assert isinstance(result, celpy.celtypes.BoolType), f"{rule.text}: {result!r}"
    return bool(result)


def violations(new: dict[str, Any], old: dict[str, Any] | None = None) -> set[str]:
    """Messages of the rules the object breaks (create when `old` is None, else update)."""
    new = defaulted(SCHEMA, copy.deepcopy(new))
    old = defaulted(SCHEMA, copy.deepcopy(old)) if old is not None else None
    broken = set()
    for rule in RULES:
        if rule.transition:
            if old is None or {"[]", "{}"} & set(rule.path):
                continue  # (no transition rule sits under a list or map today)
            pairs = zip(nodes(new, rule.path), nodes(old, rule.path), strict=False)
            if not all(evaluate(rule, n, o) for n, o in pairs):
                broken.add(rule.message)
        elif not all(evaluate(rule, node) for node in nodes(new, rule.path)):
            broken.add(rule.message)
    return broken


def example(name: str = "tiny-lora") -> dict[str, Any]:
    body: dict[str, Any] = yaml.safe_load((ROOT / "examples" / f"{name}.yaml").read_text())
    body["metadata"]["namespace"] = "ml"
    return body


def changed(name: str, edit: Edit) -> dict[str, Any]:
    body = example(name)
    edit(body["spec"])
    return body


def rule_messages(fragment: str) -> str:
    [message] = {rule.message for rule in RULES if rule.message.startswith(fragment)}
    return message


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_every_example_passes_every_rule(path: Path) -> None:
    assert violations(yaml.safe_load(path.read_text())) == set()


PAIRS = {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected"}
# (id, spec edit, start of the one rule message it must break)
BAD: list[tuple[str, Edit, str]] = [
    ("classification-without-label", lambda s: (
        s["model"].update(task="sequence-classification", numLabels=2),
        s["dataset"].update(fields={"text": "text"})),
     "task sequence-classification needs dataset.fields text and label"),
    ("label-on-causal-lm", lambda s: s["dataset"].update(fields={"text": "t", "label": "l"}),
     "dataset.fields.label only applies"),
    ("masked-lm-without-text", lambda s: s["model"].update(task="masked-lm"),
     "task masked-lm needs dataset.fields text"),
    ("seq2seq-without-prompt", lambda s: (
        s["model"].update(task="seq2seq-lm"), s["dataset"].update(fields={"text": "text"})),
     "task seq2seq-lm needs dataset.fields prompt"),
    ("packing-on-masked-lm", lambda s: (
        s["model"].update(task="masked-lm"),
        s["dataset"].update(fields={"text": "text"}, packing=True)),
     "dataset.packing only applies to task causal-lm"),
    ("classification-without-numLabels", lambda s: (
        s["model"].update(task="sequence-classification"),
        s["dataset"].update(fields={"text": "text", "label": "label"})),
     "numLabels is required"),
    ("numLabels-on-causal-lm", lambda s: s["model"].update(numLabels=3),
     "numLabels only applies"),
    ("unknown-tiny-model", lambda s: s["model"].update(name="tiny://falcon"),
     "unknown tiny model"),
    ("qlora-without-quantization", lambda s: s["method"].update(type="qlora"),
     "quantization is required when type is qlora"),
    ("quantization-on-lora", lambda s: s["method"].update(quantization={"bits": 4}),
     "quantization only applies to type qlora"),
    ("lora-on-full", lambda s: s["method"].update(type="full"),
     "lora does not apply to type full"),
    ("targetModules-other-string", lambda s: s["method"]["lora"].update(targetModules="q_proj"),
     "targetModules is a list of module names"),
    ("text-and-prompt", lambda s: s["dataset"].update(
        fields={"text": "t", "prompt": "p", "completion": "c"}),
     "fields must be one of"),
    ("messages-and-label", lambda s: s["dataset"].update(
        fields={"messages": "m", "label": "l"}),
     "fields must be one of"),
    ("chosen-without-rejected", lambda s: s["dataset"].update(
        fields={"prompt": "p", "chosen": "c"}),
     "fields must be one of"),
    ("fields-with-no-role", lambda s: s["dataset"].update(fields={"role": "from"}),
     "fields must be one of"),
    ("sharegpt-with-text", lambda s: s["dataset"].update(type="sharegpt",
                                                           fields={"text": "t"}),
     "types sharegpt, alpaca and openai make conversations"),
    ("role-on-alpaca", lambda s: s["dataset"].update(type="alpaca", fields={"role": "from"}),
     "fields role, content, roles apply only to type sharegpt"),
    ("instruction-on-openai", lambda s: s["dataset"].update(
        type="openai", fields={"instruction": "q"}),
     "fields instruction, input, output apply only to type alpaca"),
    ("pairs-with-sft", lambda s: s["dataset"].update(fields=PAIRS),
     "dataset.fields chosen/rejected need training.objective"),
    ("dpo-without-pairs", lambda s: s["training"].update(objective="dpo"),
     "training.objective dpo/orpo needs"),
    ("dpo-with-packing", lambda s: (
        s["training"].update(objective="dpo"), s["dataset"].update(fields=PAIRS, packing=True)),
     "training.objective dpo/orpo needs"),
    ("orpo-on-seq2seq", lambda s: (
        s["model"].update(task="seq2seq-lm"), s["training"].update(objective="orpo"),
        s["dataset"].update(fields=PAIRS)),
     "training.objective dpo/orpo needs"),
]


@pytest.mark.parametrize(("edit", "fragment"), [case[1:] for case in BAD],
                         ids=[case[0] for case in BAD])
def test_each_bad_spec_breaks_its_rule_and_the_contract_agrees(
        edit: Edit, fragment: str) -> None:
    body = changed("tiny-lora", edit)
    broken = violations(body)
    assert rule_messages(fragment) in broken, broken
    # Other rules may fire too (e.g. label on causal-lm is also a bad layout) but only ones
    # this case is about: never the immutability rule, never more than two.
    assert len(broken) <= 2 and IMMUTABLE not in " ".join(broken), broken
    with pytest.raises(SpecError):
        validate_job(body)


def test_every_create_rule_is_broken_by_some_case() -> None:
    covered = {rule_messages(fragment) for _, _, fragment in BAD}
    create_rules = {rule.message for rule in RULES if not rule.transition}
    assert create_rules - covered == set(), "add a BAD case for these rules"


def test_the_good_side_of_each_rule() -> None:
    """Specs the rules must let through, beyond the examples."""
    good = [
        changed("tiny-lora", lambda s: s["method"]["lora"].update(targetModules=["q_proj"])),
        changed("tiny-lora", lambda s: (s["dataset"].pop("fields"),
                                        s["dataset"].update(type="sharegpt"))),
        changed("tiny-lora", lambda s: s["dataset"].update(
            type="sharegpt", fields={"roles": {"bot": "assistant"}, "content": "text"})),
        changed("tiny-lora", lambda s: s["dataset"].update(
            type="alpaca", fields={"output": "answer"})),
        changed("tiny-lora", lambda s: s["dataset"].update(
            type="openai", fields={"messages": "chat"})),
        changed("tiny-lora", lambda s: (s["dataset"].pop("fields"), s["dataset"].update(
            train=[{"path": "a.jsonl", "type": "sharegpt", "weight": 2.0},
                   {"path": "b.jsonl", "type": "alpaca", "samples": 10}]))),
        changed("tiny-lora", lambda s: s["dataset"].update(fields={"messages": "messages"})),
        changed("tiny-lora", lambda s: s["dataset"].update(fields={"text": "text"},
                                                           packing=True)),
        changed("tiny-lora", lambda s: s["method"].update(
            type="qlora", quantization={"bits": 4})),
        changed("tiny-lora", lambda s: s["model"].update(name="hf://org/model")),
        changed("tiny-lora", lambda s: s["method"].pop("lora")),
        changed("tiny-lora", lambda s: (
            s["training"].update(objective="orpo"),
            s["dataset"].update(fields={"chosen": "chosen", "rejected": "rejected"}))),
        changed("tiny-lora", lambda s: (
            s["training"].update(objective="dpo", preference={"loss": "ipo"}),
            s["dataset"].update(fields=PAIRS))),
    ]
    for body in good:
        assert violations(body) == set(), body["spec"]
        validate_job(body)


# --- the immutability rule: old/new pairs, as on an update --------------------------------

def with_phase(body: dict[str, Any], phase: str | None) -> dict[str, Any]:
    body = copy.deepcopy(body)
    if phase is not None:
        body["status"] = {"phase": phase}
    return body


ACTIVE = ["Pending", "Restarting", "Running", "Suspended"]
SPEC_EDITS: list[tuple[str, Edit]] = [
    ("model", lambda s: s["model"].update(name="tiny://gpt2")),
    ("method", lambda s: s["method"]["lora"].update(r=16)),
    ("dataset", lambda s: s["dataset"].update(maxSeqLength=128)),
    ("training", lambda s: s["training"].update(epochs=9)),
    ("resources", lambda s: s["resources"].update(nodes=2)),
    ("output", lambda s: s["output"].update(uri="out/elsewhere")),
    ("checkpoint", lambda s: s.update(checkpoint={"everySteps": 7})),
    ("pod", lambda s: s.update(pod={"nodeSelector": {"pool": "a100"}})),
    ("storage", lambda s: s.update(storage={"region": "eu-west-1"})),
    ("metrics", lambda s: s.update(metrics={"port": 9500})),
    ("backoffLimit", lambda s: s.update(runPolicy={"backoffLimit": 7})),
    ("add-deadline", lambda s: s.update(runPolicy={"activeDeadlineSeconds": 60})),
]


@pytest.mark.parametrize("phase", ACTIVE)
@pytest.mark.parametrize(("field", "edit"), SPEC_EDITS, ids=[e[0] for e in SPEC_EDITS])
def test_spec_is_immutable_while_active(field: str, edit: Edit,
                                        phase: str) -> None:
    old = with_phase(example(), phase)
    new = with_phase(changed("tiny-lora", edit), phase)
    assert violations(new, old) == {rule_messages(IMMUTABLE)}


def test_deadline_change_and_removal_are_rejected_while_active() -> None:
    old = with_phase(changed("tiny-lora", lambda s: s.update(
        runPolicy={"activeDeadlineSeconds": 60})), "Running")
    for run_policy in ({"activeDeadlineSeconds": 120}, {}):
        new = copy.deepcopy(old)
        new["spec"]["runPolicy"] = run_policy
        assert violations(new, old) == {rule_messages(IMMUTABLE)}, run_policy


@pytest.mark.parametrize("phase", ACTIVE)
def test_suspend_and_ttl_stay_editable_while_active(phase: str) -> None:
    old = with_phase(example(), phase)
    new = with_phase(changed("tiny-lora", lambda s: s.update(
        runPolicy={"suspend": True, "ttlSecondsAfterFinished": 30})), phase)
    assert violations(new, old) == set()


@pytest.mark.parametrize("phase", [None, "Succeeded", "Failed"])
def test_spec_is_editable_before_status_and_after_the_end(phase: str | None) -> None:
    old = with_phase(example(), phase)
    new = with_phase(changed("tiny-lora", lambda s: s["model"].update(name="tiny://gpt2")),
                     phase)
    assert violations(new, old) == set()


def test_unchanged_spec_passes_the_transition_rule() -> None:
    old = with_phase(example("tiny-qlora"), "Running")
    assert violations(copy.deepcopy(old), old) == set()


def test_the_evaluator_catches_a_rule_that_errors() -> None:
    """A rule reading a field that is absent errors (as on the API server) instead of passing:
    the evaluation above is not vacuous."""
    rule = Rule(("spec",), "self.nope == 1", "x")
    PROGRAMS[rule] = ENV.program(ENV.compile(rule.text))
    with pytest.raises(AssertionError, match=r"self\.nope"):
        evaluate(rule, {"a": 1})
    [qlora] = [r for r in RULES if r.message.startswith("quantization is required")]
    assert not evaluate(qlora, {"type": "qlora"})
    assert evaluate(qlora, {"type": "qlora", "quantization": {"bits": 4}})
