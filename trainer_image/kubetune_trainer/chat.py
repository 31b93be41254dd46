"""Chat records → tokens and labels with the model's real chat template; loss on assistant turns.

Two ways to find the assistant tokens, both driven by the template itself:

- templates with `{% generation %}` blocks mark them: the tokenizer's assistant mask is used;
- otherwise the conversation is rendered once and each assistant message is located in the
  text (its content, then the turn's closing text, e.g. `<|eot_id|>`, `</s>`,
  `<|im_end|>`, `<end_of_turn>`, which the model must learn to emit). Tokens are then picked
  by their character offsets. This works for templates that render history differently from
  the last turn (Mistral v0.3 moves the system prompt into the last user turn, Qwen 3 drops
  the reasoning of earlier turns), where comparing partial renders as prefixes fails.

A template that rejects a conversation (Gemma and a system role, roles that do not alternate)
is a data error naming the record and the template's own message.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from transformers import PreTrainedTokenizerBase

from kubetune_api.spec import CHAT_TEMPLATE_NAMES
from kubetune_trainer.data import IGNORE_INDEX, DataError

log = logging.getLogger("kubetune")
_warned_dropped_system = False
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
