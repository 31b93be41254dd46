"""The contract of training.objective / training.preference and the pair field layouts."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from kubetune_api.crd import crd_manifest
from kubetune_api.spec import FineTuneJob
from support.jobs import ROOT, example_dict

PAIRS = {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected"}


def job(*, fields: dict[str, str] | None = None, **training: Any) -> dict[str, Any]:
    data = example_dict("tiny-dpo")
    spec = data["spec"]
    if fields is not None:
        spec["dataset"]["fields"] = fields
    spec["training"] = {k: v for k, v in {**spec["training"], **training}.items()
                        if v is not None}
    return data


def error_of(data: dict[str, Any]) -> str:
    with pytest.raises(ValidationError) as caught:
        FineTuneJob.model_validate(data)
    return str(caught.value)


def test_objective_defaults_to_sft_and_preference_defaults_for_dpo() -> None:
    sft = FineTuneJob.model_validate(example_dict("tiny-lora"))
    assert sft.spec.training.objective == "sft" and sft.spec.training.preference is None
    dpo = FineTuneJob.model_validate(job(preference=None))
    assert dpo.spec.training.preference is not None
    assert (dpo.spec.training.preference.beta, dpo.spec.training.preference.loss) == (
        0.1, "sigmoid")
    assert dpo.spec.dataset.fields.layout == "preference"


def test_conversational_pairs_are_chosen_and_rejected_alone() -> None:
    parsed = FineTuneJob.model_validate(job(fields={"chosen": "c", "rejected": "r"},
                                            objective="orpo", preference=None))
    assert parsed.spec.dataset.fields.layout == "conversational-preference"


@pytest.mark.parametrize(("change", "message"), [
    ({"objective": "sft", "preference": None}, "chosen/rejected need training.objective"),
    ({"fields": {"prompt": "p", "completion": "c"}}, "needs dataset.fields prompt+chosen"),
    ({"fields": {"chosen": "c"}}, "fields must be one of"),
    ({"objective": "orpo", "preference": {"loss": "ipo"}}, "applies to objective dpo only"),
    ({"preference": {"beta": 0}}, "greater than 0"),
    ({"preference": {"loss": "kto"}}, "sigmoid"),
    ({"objective": "ppo"}, "sft"),
    ({"pretrain": True}, "pretrain does not apply"),
    ({"bestMetric": "perplexity"}, "bestMetric perplexity does not apply"),
])
def test_bad_preference_specs_are_rejected(change: dict[str, Any], message: str) -> None:
    fields = change.pop("fields", None)
    assert message in error_of(job(fields=fields, **change))


def test_sft_rejects_preference_settings() -> None:
    data = example_dict("tiny-lora")
    data["spec"]["training"]["preference"] = {"beta": 0.2}
    assert "preference applies to objective dpo or orpo only" in error_of(data)


def test_dpo_needs_causal_lm_and_no_packing() -> None:
    data = job()
    data["spec"]["dataset"]["packing"] = True
    assert "dataset.packing does not apply" in error_of(data)
    data = example_dict("tiny-seq2seq-lora")
    data["spec"]["training"]["objective"] = "dpo"
    data["spec"]["dataset"]["fields"] = PAIRS
    assert "needs model.task causal-lm" in error_of(data)


def test_crd_documents_objective_and_preference() -> None:
    training = crd_manifest()["spec"]["versions"][0]["schema"]["openAPIV3Schema"][
        "properties"]["spec"]["properties"]["training"]["properties"]
    assert training["objective"]["enum"] == ["sft", "dpo", "orpo"]
    preference = training["preference"]["properties"]
    assert preference["loss"]["enum"] == ["sigmoid", "ipo", "hinge"]
    assert "reference" in preference["beta"]["description"]


def test_validate_names_the_objective(capsys: pytest.CaptureFixture[str]) -> None:
    from kubetune.cli import main

    assert main(["validate", str(ROOT / "examples" / "tiny-dpo.yaml")]) == 0
    assert "(lora, causal-lm, dpo, tiny://llama)" in capsys.readouterr().out
