"""Token features: EOS stays learned when pad == eos, completion-only and chat masking,
packing, MLM masking rate, classification and seq2seq labels."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kubetune_api.spec import DatasetSpec
from kubetune_trainer.data import IGNORE_INDEX, DataError, Record
from kubetune_trainer.features import CausalCollator, collator_for, pack, tokenize
from kubetune_trainer.modeling import load_tokenizer
from kubetune_trainer.tiny import train_tokenizer

TEXTS = ["the cat sees the ball", "Customer: reset my password", "Open Settings now",
         "capital of France", "Paris", "hello there"] * 20


@pytest.fixture(scope="module")
def llama_tokenizer(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    directory = tmp_path_factory.mktemp("tok")
    train_tokenizer("llama", TEXTS).save_pretrained(directory)
    return load_tokenizer(str(directory), None, "causal-lm")


def dataset(**kwargs: object) -> DatasetSpec:
    return DatasetSpec.model_validate({"train": "x.jsonl", **kwargs})


def records(*rows: dict[str, object]) -> list[Record]:
    return [Record(dict(r), f"x.jsonl:{i + 1}") for i, r in enumerate(rows)]


def test_pad_equals_eos_and_eos_stays_in_labels(llama_tokenizer) -> None:  # type: ignore[no-untyped-def]
    tok = llama_tokenizer
    assert tok.pad_token_id == tok.eos_token_id  # the Llama/GPT-2 situation
    feats = tokenize(records({"text": "hello there"}, {"text": "the cat sees the ball"}),
                     dataset(), "causal-lm", tok)
    assert all(f["input_ids"][-1] == tok.eos_token_id for f in feats)
    batch = CausalCollator(tok.pad_token_id)(feats)
    short = batch["attention_mask"][0].sum().item()
    assert batch["labels"][0, short - 1] == tok.eos_token_id  # EOS learned
    assert (batch["labels"][0, short:] == IGNORE_INDEX).all()  # padding (also EOS id) ignored
    assert (batch["input_ids"][0, short:] == tok.eos_token_id).all()


def test_completion_only_loss(llama_tokenizer) -> None:  # type: ignore[no-untyped-def]
    tok = llama_tokenizer
    spec = dataset(fields={"prompt": "p", "completion": "c"})
    [feat] = tokenize(records({"p": "Customer: reset my password", "c": " Open Settings"}),
                      spec, "causal-lm", tok)
    prompt_len = len(tok("Customer: reset my password")["input_ids"])
    assert feat["labels"][:prompt_len] == [IGNORE_INDEX] * prompt_len
    learned = feat["labels"][prompt_len:]
    assert learned == feat["input_ids"][prompt_len:] and learned[-1] == tok.eos_token_id
    assert tok.decode(learned, skip_special_tokens=True) == " Open Settings"


def test_chat_loss_on_assistant_turns_only(llama_tokenizer) -> None:  # type: ignore[no-untyped-def]
    tok = llama_tokenizer
    messages = [{"role": "system", "content": "hello there"},
                {"role": "user", "content": "capital of France"},
                {"role": "assistant", "content": "Paris"},
                {"role": "user", "content": "reset my password"},
                {"role": "assistant", "content": "Open Settings now"}]
    [feat] = tokenize(records({"m": messages}), dataset(fields={"messages": "m"}),
                      "causal-lm", tok)
    learned = [t for t, lab in zip(feat["input_ids"], feat["labels"], strict=True)
               if lab != IGNORE_INDEX]
    assert tok.decode(learned) == "Paris</s>Open Settings now</s>"


def test_packing_cuts_nothing_and_restarts_positions_per_document() -> None:
    feats = [{"input_ids": list(range(10)), "labels": [IGNORE_INDEX] * 4 + list(range(4, 10))}
             for _ in range(5)]
    blocks = pack(feats, block_size=16)
    # 50 tokens -> 3 full blocks and the 2 left over; documents continue across blocks.
    assert [len(b["input_ids"]) for b in blocks] == [16, 16, 16, 2]
    assert [t for b in blocks for t in b["input_ids"]] == list(range(10)) * 5
    assert blocks[0]["position_ids"] == list(range(10)) + list(range(6))
    assert blocks[1]["position_ids"] == list(range(4)) + list(range(10)) + list(range(2))
    # Labels keep the prompt masking; each document's (or continuation's) first token is never
    # predicted from the previous document.
    flat_labels = [t for b in blocks for t in b["labels"]]
    flat_positions = [p for b in blocks for p in b["position_ids"]]
    expected = [IGNORE_INDEX if pos == 0 else lab for pos, lab in
                zip(flat_positions, [t for f in feats for t in f["labels"]], strict=True)]
    assert flat_labels == expected
    assert pack(feats[:1], block_size=16)[0]["input_ids"] == list(range(10))  # < one block


def test_long_documents_are_not_truncated_when_packing(llama_tokenizer) -> None:  # type: ignore[no-untyped-def]
    long_text = " ".join(TEXTS[:6] * 4)
    spec = dataset(maxSeqLength=16, packing=True)
    [feat] = tokenize(records({"text": long_text}), spec, "causal-lm", llama_tokenizer)
    assert len(feat["input_ids"]) > 16  # kept whole until packing
    blocks = pack([feat], 16)
    assert [t for b in blocks for t in b["input_ids"]] == feat["input_ids"]
    [cut] = tokenize(records({"text": long_text}), dataset(maxSeqLength=16), "causal-lm",
                     llama_tokenizer)
    assert len(cut["input_ids"]) == 16  # without packing, maxSeqLength cuts


def test_packing_removes_padding_and_the_attention_mask(llama_tokenizer) -> None:  # type: ignore[no-untyped-def]
    tok = llama_tokenizer
    rows = records(*({"text": t} for t in TEXTS))
    plain = tokenize(rows, dataset(), "causal-lm", tok)
    packed = pack(plain, 32)
    collate = CausalCollator(tok.pad_token_id)
    batches = [collate(packed[i:i + 8]) for i in range(0, len(packed), 8)]
    assert all("attention_mask" not in b for b in batches)  # boundaries come from positions
    learned = sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in batches)
    unpacked = sum(sum(1 for lab in f["labels"][1:] if lab != IGNORE_INDEX) for f in plain)
    assert unpacked - len(packed) <= learned <= unpacked  # at most one token per block split
    last = batches[-1]
    real = len(packed[-1]["input_ids"])
    if real < 32:  # the short last block's padding is a position run of its own
        assert last["position_ids"][-1, real:].tolist() == list(range(32 - real))


def test_mlm_masks_about_15_percent(tmp_path: Path) -> None:
    train_tokenizer("bert", TEXTS).save_pretrained(tmp_path)
    tok = load_tokenizer(str(tmp_path), None, "masked-lm")
    feats = tokenize(records(*({"text": t} for t in TEXTS * 10)), dataset(), "masked-lm", tok)
    batch = collator_for("masked-lm", tok, None, seed=0)(feats)
    special = (batch["input_ids"] == tok.pad_token_id) | (batch["labels"] == tok.cls_token_id)
    real = (batch["attention_mask"] == 1).sum().item() - 2 * len(feats)  # minus [CLS] [SEP]
    masked = (batch["labels"] != IGNORE_INDEX).sum().item()
    assert 0.11 < masked / real < 0.19
    assert not special[batch["labels"] != IGNORE_INDEX].any()


def test_classification_and_seq2seq_labels(tmp_path: Path) -> None:
    train_tokenizer("t5", TEXTS).save_pretrained(tmp_path)
    tok = load_tokenizer(str(tmp_path), None, "seq2seq-lm")
    [pair] = tokenize(records({"q": "capital of France", "a": "Paris"}),
                      dataset(fields={"prompt": "q", "completion": "a"}), "seq2seq-lm", tok)
    assert pair["labels"][-1] == tok.eos_token_id
    assert tok.decode(pair["labels"], skip_special_tokens=True) == "Paris"
    cls = dataset(fields={"text": "t", "label": "y"})
    rows = records({"t": "hello", "y": "neg"}, {"t": "hello there", "y": "pos"})
    feats = tokenize(rows, cls, "sequence-classification", tok, ["neg", "pos"], 2)
    assert [f["labels"] for f in feats] == [0, 1]
    with pytest.raises(DataError, match=r"x.jsonl:1: label 5 is outside 0..1"):
        tokenize(records({"t": "a", "y": 5}), cls, "sequence-classification", tok, None, 2)
    batch = collator_for("sequence-classification", tok, None, seed=0)(feats)
    assert batch["labels"].tolist() == [0, 1] and batch["input_ids"].dtype == torch.long


def test_long_prompts_without_completion_left_are_dropped(llama_tokenizer) -> None:  # type: ignore[no-untyped-def]
    spec = dataset(fields={"prompt": "p", "completion": "c"}, maxSeqLength=8)
    rows = records({"p": "the cat sees the ball " * 5, "c": "Paris"}, {"p": "hi", "c": "Paris"})
    feats = tokenize(rows, spec, "causal-lm", llama_tokenizer)
    assert len(feats) == 1 and len(feats[0]["input_ids"]) <= 8


def test_chat_template_that_renders_history_differently_still_masks(tmp_path: Path) -> None:
    tokenizer = train_tokenizer("llama", TEXTS)
    # Renders the message count first: no partial conversation is a prefix of the whole.
    tokenizer.chat_template = "{{ messages|length }}" + tokenizer.chat_template
    tokenizer.save_pretrained(tmp_path)
    tok = load_tokenizer(str(tmp_path), None, "causal-lm")
    messages = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "Paris"}]
    [feat] = tokenize(records({"m": messages}), dataset(fields={"messages": "m"}), "causal-lm",
                      tok)
    learned = [t for t, lab in zip(feat["input_ids"], feat["labels"], strict=True)
               if lab != IGNORE_INDEX]
    assert tok.decode(learned) == "Paris</s>"
