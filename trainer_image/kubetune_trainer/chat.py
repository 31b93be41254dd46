"""Chat records → tokens and labels with the model's real chat template; loss on assistant turns.

Two ways to find the assistant tokens, both driven by the template itself:

- templates with `{% generation %}` blocks mark them: the tokenizer's assistant mask is used;
- otherwise the conversation is rendered once and each assistant message is located in the
  text (its content, then the turn's closing text, e.g. `<|eot_id|>`, `</s>`,
  `<|im_end|>`, `<end_of_turn>`, which the model must learn to emit). Tokens are then picked
  by their character offsets. This works for templates that render history differently from
  the last turn (Mistral v0.3 moves the system prompt into the last user turn, Qwen 3 drops
  the reasoning of earlier turns), where comparing partial renders as prefixes fails.

A template that rejects the system role (Gemma's: "System role not supported") gets the
system prompt folded into the first user turn, as LLaMA-Factory's Gemma template does, with one
log line saying so. A template that rejects a conversation otherwise (roles that do not
alternate) is a data error naming the record and the template's own message.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from transformers import PreTrainedTokenizerBase

from kubetune_api.spec import CHAT_TEMPLATE_NAMES, DatasetSpec
from kubetune_trainer.data import IGNORE_INDEX, DataError

log = logging.getLogger("kubetune")
_warned_dropped_system = False
_folded_system_templates: set[str] = set()  # templates already reported as folding
GENERATION_BLOCK = re.compile(r"{%-?\s*generation\s*-?%}")

# Built-in templates for `dataset.chatTemplate: <name>`, with generation blocks so the
# assistant mask comes from the template. Written for kubetune (the formats are public).
BUILTIN_TEMPLATES: dict[str, str] = {
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\n' }}"
        "{% if message['role'] == 'assistant' %}"
        "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
        "{% else %}{{ message['content'] + '<|im_end|>\n' }}{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    # Stanford Alpaca's prompt (github.com/tatsu-lab/stanford_alpaca, PROMPT_DICT): its two
    # forms for records with and without an input; a system message replaces the preamble.
    "alpaca": (
        "{{ bos_token }}"
        "{% set preamble = 'Below is an instruction that describes a task' %}"
        "{% for message in messages %}"
        "{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
        "{% elif message['role'] == 'user' %}"
        "{% if loop.first %}"
        "{% if message['input'] is defined and message['input'] %}"
        "{{ preamble + ', paired with an input that provides further context. Write a response "
        "that appropriately completes the request.\n\n' }}"
        "{% else %}{{ preamble + '. Write a response that appropriately completes the "
        "request.\n\n' }}{% endif %}{% endif %}"
        "{% if message['instruction'] is defined %}"
        "{{ '### Instruction:\n' + message['instruction'] + '\n\n' }}"
        "{% if message['input'] %}{{ '### Input:\n' + message['input'] + '\n\n' }}{% endif %}"
        "{% else %}{{ '### Instruction:\n' + message['content'] + '\n\n' }}{% endif %}"
        "{{ '### Response:\n' }}"
        "{% elif message['role'] == 'assistant' %}"
        "{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}{{ '\n\n' }}"
        "{% endif %}"
        "{% endfor %}"
    ),
    "llama3": (
        "{{ bos_token }}"
        "{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
        "{% if message['role'] == 'assistant' %}"
        "{% generation %}{{ message['content'] | trim + '<|eot_id|>' }}{% endgeneration %}"
        "{% else %}{{ message['content'] | trim + '<|eot_id|>' }}{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}"
        "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    ),
}
assert set(BUILTIN_TEMPLATES) == set(CHAT_TEMPLATE_NAMES)


def resolve_template(value: str | None) -> str | None:
    """`dataset.chatTemplate`: a built-in's name or the Jinja text itself (None: keep the
    tokenizer's)."""
    if value is None:
        return None
    return BUILTIN_TEMPLATES.get(value, value)


def job_template(spec: DatasetSpec, tokenizer: PreTrainedTokenizerBase) -> str | None:
    """The template the job sets on the tokenizer (None: keep the tokenizer's):
    `dataset.chatTemplate`, else the built-in alpaca template for alpaca records when the
    tokenizer has none."""
    template = resolve_template(spec.chat_template)
    if not template and not tokenizer.chat_template and any(
            source.type == "alpaca" for source in spec.sources):
        log.info("the tokenizer has no chat template: alpaca records use the built-in alpaca "
                 "template (Stanford Alpaca's prompt)")
        template = BUILTIN_TEMPLATES["alpaca"]
    return template


def chat_example(messages: list[dict[str, Any]], tokenizer: PreTrainedTokenizerBase,
                 where: str) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one conversation; labels are IGNORE_INDEX outside assistant
    turns."""
    template = tokenizer.chat_template
    if not template:
        raise DataError("dataset.fields.messages needs a chat template: this model's "
                        "tokenizer has none; set dataset.chatTemplate")
    if not tokenizer.is_fast:
        raise DataError("dataset.fields.messages needs a fast tokenizer (character offsets "
                        "locate the assistant turns)")
    messages = fit_system_role(messages, tokenizer)
    if GENERATION_BLOCK.search(str(template)):
        encoded = _apply(tokenizer, messages, where, tokenize=True)
        ids = list(encoded["input_ids"])
        mask = encoded["assistant_masks"]
        return ids, [t if m else IGNORE_INDEX for t, m in zip(ids, mask, strict=True)]
    text = str(_apply(tokenizer, messages, where, tokenize=False))
    spans = _assistant_spans(messages, text, tokenizer, where)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoded["input_ids"])
    labels = [IGNORE_INDEX] * len(ids)
    span = 0
    for i, (start, end) in enumerate(encoded["offset_mapping"]):
        while span < len(spans) and start >= spans[span][1]:
            span += 1
        if span == len(spans):
            break
        if end > spans[span][0]:
            labels[i] = ids[i]
    return ids, labels


def fit_system_role(messages: list[dict[str, Any]], tokenizer: PreTrainedTokenizerBase
                    ) -> list[dict[str, Any]]:
    """`messages`, or, when the template rejects a system role it would accept the rest
    without, the system prompt folded into the first user turn (blank line between)."""
    if not messages or messages[0]["role"] != "system" or len(messages) < 2 \
            or messages[1]["role"] != "user" or _accepts_system(tokenizer):
        return messages
    template = str(tokenizer.chat_template)
    if template not in _folded_system_templates:
        _folded_system_templates.add(template)
        log.info("the chat template does not support a system role: the system prompt is "
                 "folded into the first user turn")
    first = messages[1]
    folded = {**first, "content": f"{messages[0]['content']}\n\n{first['content']}"}
    return [folded, *messages[2:]]


_ACCEPTS_SYSTEM: dict[str, bool] = {}


def _accepts_system(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the template renders a system message (tried once per template, on a
    probe conversation that it renders without one)."""
    template = str(tokenizer.chat_template)
    if template not in _ACCEPTS_SYSTEM:
        probe = [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]
        try:
            tokenizer.apply_chat_template([{"role": "system", "content": "s"}, *probe],
                                          tokenize=False)
            accepts = True
        except Exception:  # jinja2.TemplateError and whatever raise_exception raises
            try:
                tokenizer.apply_chat_template(probe, tokenize=False)
            except Exception:
                accepts = True  # rejects more than the system role: let the record say what
            else:
                accepts = False
        _ACCEPTS_SYSTEM[template] = accepts
    return _ACCEPTS_SYSTEM[template]


def _apply(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]], where: str,
           *, tokenize: bool) -> Any:
    try:
        if tokenize:
            return tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                                 return_assistant_tokens_mask=True)
        return tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception as exc:  # jinja2.TemplateError and whatever a template raises
        raise DataError(f"{where}: the chat template rejects this conversation: "
                        f"{exc}") from None


def _assistant_spans(messages: list[dict[str, Any]], text: str,
                     tokenizer: PreTrainedTokenizerBase, where: str) -> list[tuple[int, int]]:
    """Character spans of each assistant turn in the rendered `text`: content + closing text.

    Messages are found in order (a cursor moves past each user and assistant content), so a
    reply that repeats words of the question is found where the reply is. System messages do
    not move the cursor: templates put them in different places.
    """
    spans: list[tuple[int, int]] = []
    cursor = 0
    for i, message in enumerate(messages):
        content = message["content"].strip()
        if message["role"] == "system" and content and content not in text:
            _warn_dropped_system(where)
        if message["role"] not in ("user", "assistant") or not content:
            continue
        start = text.find(content, cursor)
        if start < 0:
            if message["role"] == "user":
                continue  # rendered elsewhere or rewritten; the assistant turns still anchor
            raise DataError(f"{where}: the chat template does not render assistant message "
                            f"{i} verbatim, so its tokens cannot be located")
        cursor = start + len(content)
        if message["role"] == "assistant":
            closing = _closing_text(messages[: i + 1], content, tokenizer, where)
            cursor += _common_prefix(closing, text[cursor:])
            spans.append((start, cursor))
    return spans


def _warn_dropped_system(where: str) -> None:
    """Once per process: Mistral v0.3's template, for one, renders the system prompt only when
    a user turn ends the conversation, so training data loses it."""
    global _warned_dropped_system
    if not _warned_dropped_system:
        _warned_dropped_system = True
        log.warning("%s: the chat template drops the system message of this conversation "
                    "(and perhaps others); the model trains without it", where)


def _closing_text(turns: list[dict[str, Any]], content: str,
                  tokenizer: PreTrainedTokenizerBase, where: str) -> str:
    """What the template writes after an assistant message that ends the conversation (its
    end-of-turn token), without trailing whitespace."""
    rendered = str(_apply(tokenizer, turns, where, tokenize=False))
    position = rendered.rfind(content)
    return rendered[position + len(content):].rstrip() if position >= 0 else ""


def _common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n
