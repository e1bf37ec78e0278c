"""The demo model's tokenizer: byte-level BPE trained on the corpus, with GLM-style chat special tokens.

Saved as ``tokenizer.json`` (the ``tokenizers`` model) plus ``tokenizer_config.json`` carrying the special tokens and a
Jinja chat template, which is what ``transformers.AutoTokenizer`` (and highspeed's own tokenizer front end) read.
"""
from __future__ import annotations

import json
import os
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOS = "<|endoftext|>"
# GLM's chat framing: "[gMASK]<sop>" opens a conversation and "<|role|>\n" opens each turn.
GMASK, SOP = "[gMASK]", "<sop>"
SYSTEM, USER, ASSISTANT = "<|system|>", "<|user|>", "<|assistant|>"
SPECIAL_TOKENS = [EOS, GMASK, SOP, SYSTEM, USER, ASSISTANT]

# A turn ends where the next role token (or eos) begins, as in GLM; generation stops at eos or at "<|user|>".
CHAT_TEMPLATE = (
    "{{- '[gMASK]<sop>' -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
    "{{- raise_exception('Only system, user and assistant roles are supported') -}}"
    "{%- endif -%}"
    "{{- '<|' + message['role'] + '|>\\n' + message['content'] -}}"
    "{%- if message['role'] == 'assistant' -%}{{- '<|endoftext|>' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>\\n' -}}{%- endif -%}"
)


def render_chat(messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    """The chat template's output, written out in Python for the training data (no jinja needed on the GPU)."""
    out = GMASK + SOP
    for m in messages:
        out += f"<|{m['role']}|>\n{m['content']}"
        if m["role"] == "assistant":
            out += EOS
    if add_generation_prompt:
        out += ASSISTANT + "\n"
    return out


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    # No prefix space: a prompt tokenizes the same whether or not it starts a document.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def save_tokenizer(tok: Tokenizer, out_dir: str, model_max_length: int) -> None:
    os.makedirs(out_dir, exist_ok=True)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    added = {
        str(tok.token_to_id(t)): {
            "content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True,
        }
        for t in SPECIAL_TOKENS
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": added,
        "bos_token": None,
        "eos_token": EOS,
        "pad_token": EOS,
        "unk_token": None,
        "additional_special_tokens": [GMASK, SOP, SYSTEM, USER, ASSISTANT],
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "chat_template": CHAT_TEMPLATE,
    }
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)
        f.write("\n")
