"""Mixture-of-experts references: routing (expert selection) and the weighted expert sum."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from highspeed.ops.activation import silu_and_mul
from highspeed.ops.dispatch import triton_kernel
from highspeed.ops.norm import DeferredNorm, ResidualSum, materialize, unnormed


def select_experts(
    router_logits: torch.Tensor,
    top_k: int,
    scoring: str = "softmax",
    renormalize: bool = True,
    correction_bias: torch.Tensor | None = None,
    n_group: int = 1,
    topk_group: int = 1,
    routed_scaling_factor: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick ``top_k`` experts per token from fp32 ``router_logits[T, E]``.

    softmax (Qwen3-MoE, Mixtral): ``p = softmax(logits)``, top-k of p, optionally renormalised.
    sigmoid (DeepSeek-V3 / GLM ``noaux_tc``): ``s = sigmoid(logits)``; the correction bias shifts only the
    *selection* (``s + b``), optionally restricted to the best ``topk_group`` of ``n_group`` groups (group score =
    sum of its top-2); weights are the unbiased ``s`` of the chosen experts, renormalised with a 1e-20 guard.
    Both then multiply by ``routed_scaling_factor``. Returns ``(weights[T, k] fp32, ids[T, k] int32)``.
    """
    kernel = triton_kernel("moe", "select_experts", router_logits)
    if kernel is not None:
        return kernel(router_logits, top_k, scoring, renormalize, correction_bias, n_group, topk_group,
                      routed_scaling_factor)
    logits = router_logits.float()
    if scoring == "softmax":
        probs = torch.softmax(logits, dim=-1)
        weights, ids = torch.topk(probs, top_k, dim=-1)
        if renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
    elif scoring == "sigmoid":
        scores = logits.sigmoid()
        choice = scores if correction_bias is None else scores + correction_bias.float()
        if n_group > 1:
            num_tokens, num_experts = choice.shape
            grouped = choice.view(num_tokens, n_group, num_experts // n_group)
            group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
            group_ids = group_scores.topk(topk_group, dim=-1).indices
            keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, group_ids, True)
            choice = grouped.masked_fill(~keep[..., None], float("-inf")).view(num_tokens, num_experts)
        ids = torch.topk(choice, top_k, dim=-1).indices
        weights = scores.gather(1, ids)
        if renormalize:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    else:
        raise ValueError(f"unknown expert scoring {scoring!r} (expected 'softmax' or 'sigmoid')")
    if routed_scaling_factor != 1.0:
        weights = weights * routed_scaling_factor
    return weights, ids.to(torch.int32)


def moe_experts(
    x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor
) -> torch.Tensor:
    """``sum_k weights[t, k] * down(silu(gate(x_t)) * up(x_t))`` over the experts ``ids[t, :]``.

    ``w13[E, 2I, H]`` holds gate rows then up rows (transformers 5.x fused layout), ``w2[E, H, I]``. Only the
    experts some token chose are computed. Accumulates in fp32, returns x's dtype. Differentiable.
    """
    kernel = triton_kernel("moe", "moe_experts", x)
    if kernel is not None:
        return kernel(x, w13, w2, weights, ids)
    num_tokens, top_k = ids.shape
    flat_ids = ids.reshape(-1).long()
    order = torch.argsort(flat_ids, stable=True)
    counts = torch.bincount(flat_ids, minlength=w13.shape[0]).tolist()
    out = torch.zeros(num_tokens, x.shape[-1], dtype=torch.float32, device=x.device)
    flat_weights = weights.reshape(-1).float()
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        sel = order[start : start + count]
        start += count
        tokens = sel // top_k
        gate, up = F.linear(x[tokens], w13[expert]).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, w2[expert])
        out = out.index_add(0, tokens, y.float() * flat_weights[sel, None])
    return out.to(x.dtype)


def fused_moe(
    x: torch.Tensor | DeferredNorm,
    gate_weight: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    top_k: int,
    scoring: str = "softmax",
    renormalize: bool = True,
    correction_bias: torch.Tensor | None = None,
    n_group: int = 1,
    topk_group: int = 1,
    routed_scaling_factor: float = 1.0,
    shared_w13: torch.Tensor | None = None,
    shared_w2: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | ResidualSum:
    """A whole MoE block on the normalised hidden state ``x[T, H]``: the fp32 router (``gate_weight[E, H]``),
    expert selection (see ``select_experts``), the routed experts (see ``moe_experts``) and, when given, the
    always-on shared expert ``down(silu(gate(x)) * up(x))`` with ``shared_w13[2Is, H]`` (gate rows then up rows)
    and ``shared_w2[H, Is]``. One op so that a kernel can fuse the router into the expert launches (decode), and
    the norm before the block into the router (``x`` a ``DeferredNorm``: its output is the input, and its
    ``residual_out`` is set). With ``residual`` (the residual stream, [T, H]) the result is a ``ResidualSum`` of
    it and the block's output, which the decode kernel adds in its last launch."""
    kernel = triton_kernel("moe", "fused_moe", unnormed(x))
    if kernel is not None:
        return kernel(x, gate_weight, w13, w2, top_k, scoring, renormalize, correction_bias, n_group, topk_group,
                      routed_scaling_factor, shared_w13, shared_w2, residual)
    y = moe_block(materialize(x), gate_weight, w13, w2, top_k, scoring, renormalize, correction_bias, n_group,
                  topk_group, routed_scaling_factor, shared_w13, shared_w2)
    return y if residual is None else ResidualSum(y, residual)


def moe_block(
    x: torch.Tensor, gate_weight: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, top_k: int, scoring: str,
    renormalize: bool, correction_bias: torch.Tensor | None, n_group: int, topk_group: int,
    routed_scaling_factor: float, shared_w13: torch.Tensor | None, shared_w2: torch.Tensor | None,
) -> torch.Tensor:
    """``fused_moe`` as separate ops, each dispatching to its own kernel: the reference, and the kernel's path for
    token counts too large for its fused decode launches."""
    logits = F.linear(x.float(), gate_weight.float())
    weights, ids = select_experts(logits, top_k, scoring, renormalize, correction_bias, n_group, topk_group,
                                  routed_scaling_factor)
    y = moe_experts(x, w13, w2, weights, ids)
    if shared_w13 is not None and shared_w2 is not None:
        y = y + F.linear(silu_and_mul(F.linear(x, shared_w13)), shared_w2)
    return y
