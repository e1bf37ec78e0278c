"""Token streams for training and evaluation, built from the corpus and the trained tokenizer."""
from __future__ import annotations

import random

import torch
from tokenizers import Tokenizer

from .corpus import Corpus
from .tokenizer import EOS, render_chat

# A share of the training text is framed as chat turns (a passage from the user, the passage that follows it from
# the assistant, then eos), so that `highspeed serve`'s chat endpoint gets answers that stop on their own.
INSTRUCTIONS = ["", "", "Continue the story.\n\n", "What happens next?\n\n", "Go on.\n\n", "Please continue:\n\n"]
SYSTEM_PROMPTS = ["You are a helpful assistant.", "You are a storyteller.", "Answer in the style of an old novel."]


def chat_examples(corpus: Corpus, fraction_of_pairs: float, rng: random.Random) -> list[str]:
    out = []
    for paras in corpus.train:
        for a, b in zip(paras, paras[1:]):
            if not (40 <= len(a) <= 800 and 40 <= len(b) <= 800) or rng.random() >= fraction_of_pairs:
                continue
            messages = []
            if rng.random() < 0.25:
                messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
            messages.append({"role": "user", "content": rng.choice(INSTRUCTIONS) + a})
            messages.append({"role": "assistant", "content": b})
            out.append(render_chat(messages, add_generation_prompt=False))
    return out


def train_stream(tok: Tokenizer, corpus: Corpus, chat_fraction_of_pairs: float, seed: int) -> tuple[torch.Tensor, int]:
    """One token stream: each book as one document, then chat examples, eos between documents.
    Returns (tokens, number of chat tokens)."""
    rng = random.Random(seed)
    eos = tok.token_to_id(EOS)
    docs = ["\n\n".join(paras) for paras in corpus.train]
    ids: list[int] = []
    for enc in tok.encode_batch(docs):
        ids.extend(enc.ids)
        ids.append(eos)
    chats = chat_examples(corpus, chat_fraction_of_pairs, rng)
    rng.shuffle(chats)
    n_chat = 0
    for enc in tok.encode_batch(chats):
        ids.extend(enc.ids)
        n_chat += len(enc.ids)
    return torch.tensor(ids, dtype=torch.long), n_chat


def heldout_windows(tok: Tokenizer, corpus: Corpus, seq_len: int) -> torch.Tensor:
    """Non-overlapping windows [N, seq_len] over the held-out passages of every book (plain text)."""
    eos = tok.token_to_id(EOS)
    ids: list[int] = []
    for enc in tok.encode_batch(["\n\n".join(paras) for paras in corpus.heldout]):
        ids.extend(enc.ids)
        ids.append(eos)
    n = len(ids) // seq_len
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)
