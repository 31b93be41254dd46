"""Tiny-model mode: `tiny://llama|gpt2|bert|t5` becomes a small random model on local disk.

The model is built from a config (no download) and its tokenizer is a byte-level BPE trained
on the job's own dataset text, so the same YAML runs on a laptop CPU and in CI. The result is a
normal Hugging Face model directory: everything downstream (quantization, LoRA, saving,
reloading) takes exactly the path a real hub model takes.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForSeq2SeqLM,
    BertConfig,
    GPT2Config,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    T5Config,
)

VOCAB_SIZE = 512
CHAT_ROLES = ("system", "user", "assistant")
# A minimal chat template: role marker, content, EOS. The assistant marker is the generation
# prompt, so loss lands on the answer and its EOS only.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

# Special tokens per architecture, shaped like the real model families: Llama and GPT-2 have
# no pad token (the trainer must cope, as with the real ones); BERT and T5 have one.
SPECIALS: dict[str, dict[str, str]] = {
    "llama": {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"},
    "gpt2": {"unk_token": "<|endoftext|>", "bos_token": "<|endoftext|>",
             "eos_token": "<|endoftext|>"},
    "bert": {"unk_token": "[UNK]", "pad_token": "[PAD]", "cls_token": "[CLS]",
             "sep_token": "[SEP]", "mask_token": "[MASK]"},
    "t5": {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"},
}


def build_tiny_model(arch: str, texts: Iterable[str], directory: Path, *, max_positions: int,
                     seed: int) -> Path:
    """Write a random `arch` model and a tokenizer trained on `texts` to `directory`."""
    tokenizer = train_tokenizer(arch, texts)
    config = tiny_config(arch, tokenizer, max_positions)
    torch.manual_seed(seed)
    model = _BASE_CLASSES[arch].from_config(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def train_tokenizer(arch: str, texts: Iterable[str]) -> PreTrainedTokenizerFast:
    specials = SPECIALS[arch]
    special_tokens = list(dict.fromkeys(specials.values()))
    chat_markers = [f"<|{role}|>" for role in CHAT_ROLES]
    bpe = Tokenizer(models.BPE(unk_token=specials["unk_token"]))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=special_tokens + chat_markers,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    bpe.post_processor = _post_processor(arch, bpe)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, **specials)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _post_processor(arch: str, bpe: Tokenizer) -> processors.PostProcessor | None:
    """Real tokenizers add these tokens themselves; the tiny ones must behave alike."""
    def template(single: str, pair: str, tokens: list[str]) -> processors.TemplateProcessing:
        return processors.TemplateProcessing(
            single=single, pair=pair, special_tokens=[(t, bpe.token_to_id(t)) for t in tokens])

    if arch == "llama":
        return template("<s> $A", "<s> $A <s> $B", ["<s>"])
    if arch == "bert":
        return template("[CLS] $A [SEP]", "[CLS] $A [SEP] $B [SEP]", ["[CLS]", "[SEP]"])
    if arch == "t5":
        return template("$A </s>", "$A </s> $B </s>", ["</s>"])
    return None


def tiny_config(arch: str, tokenizer: PreTrainedTokenizerFast,
                max_positions: int) -> PretrainedConfig:
    ids = {"vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id,
           "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    positions = max(512, max_positions)
    if arch == "llama":
        return LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2,
                           max_position_embeddings=positions, tie_word_embeddings=False, **ids)
    if arch == "gpt2":
        return GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=positions, **ids)
    if arch == "bert":
        return BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                          intermediate_size=128, max_position_embeddings=positions, **ids)
    if arch == "t5":
        return T5Config(d_model=64, d_ff=128, d_kv=16, num_layers=2, num_heads=4,
                        decoder_start_token_id=tokenizer.pad_token_id,  # type: ignore[call-arg]
                        **ids)
    raise ValueError(f"unknown tiny architecture {arch!r}")


_BASE_CLASSES = {
    "llama": AutoModelForCausalLM,
    "gpt2": AutoModelForCausalLM,
    "bert": AutoModelForMaskedLM,
    "t5": AutoModelForSeq2SeqLM,
}
