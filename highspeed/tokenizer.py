"""Tokenizer loading and incremental detokenization.

The tokenizer and its chat template come from the checkpoint folder (transformers' AutoTokenizer reads
tokenizer.json / tokenizer_config.json / chat_template.jinja). Detokenization is incremental: each step decodes
only a small window of ids, so a long generation costs O(new tokens), and a multi-byte character split over
several tokens is held back until it is complete.
"""
from __future__ import annotations

from typing import Any


def load_tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as e:  # transformers raises many kinds; name the folder for the user
        raise ValueError(f"cannot load a tokenizer from {path!r}: {e}") from e


def apply_chat_template(tokenizer: Any, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                        **kwargs: Any) -> list[int]:
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("this model's tokenizer has no chat template; use the completions API instead")
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True, **kwargs)
    if isinstance(out, dict) or hasattr(out, "keys"):  # BatchEncoding in newer transformers
        out = out["input_ids"]
    return list(out)


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas.

    Keeps two offsets into the ids (as vLLM does): ``prefix`` marks a few tokens of context decoded again so
    that spacing rules of the tokenizer (e.g. SentencePiece's leading space) apply, and ``read`` marks what has
    already been emitted.
    """

    def __init__(self, tokenizer: Any, prompt_ids: list[int], skip_special_tokens: bool = True):
        self.tok = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        # Seed with the prompt's last tokens so the first output token's spacing is right.
        self._ctx = list(prompt_ids[-4:])
        self.prefix = 0
        self.read = len(self._ctx)
        self._all = list(self._ctx)
        self.text = ""

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=self.skip, clean_up_tokenization_spaces=False)

    def add(self, token_ids: list[int]) -> str:
        """Append tokens; return the newly completed text (possibly empty)."""
        self.ids.extend(token_ids)
        self._all.extend(token_ids)
        prefix_text = self._decode(self._all[self.prefix:self.read])
        new_text = self._decode(self._all[self.prefix:])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            delta = new_text[len(prefix_text):]
            self.prefix = self.read
            self.read = len(self._all)
            self.text += delta
            return delta
        return ""

    def flush(self) -> str:
        """At the end: emit whatever is held back, replacement characters included."""
        if self.read >= len(self._all):
            return ""
        prefix_text = self._decode(self._all[self.prefix:self.read])
        new_text = self._decode(self._all[self.prefix:])
        delta = new_text[len(prefix_text):]
        self.prefix = self.read = len(self._all)
        self.text += delta
        return delta
