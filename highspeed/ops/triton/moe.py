"""Mixture-of-experts kernels: routing (``select_experts``), the routed expert MLP (``moe_experts``) and the whole
MoE block (``fused_moe``).

``select_experts`` is one program per token: scoring, bias, group selection, top-k, renormalisation and scaling
all happen in registers, so the router costs one read of the logits and one write of ``k`` pairs.

``moe_experts`` groups tokens by expert: (token, slot) pairs are sorted by expert id and padded so that each
block of ``BLOCK_M`` rows belongs to one expert; two grouped GEMMs (tensor cores via ``tl.dot``) compute the fused
gate/up/SiLU and the weighted down projection; the ``k`` weighted outputs of each token are then summed in a fixed
order (deterministic, no atomics).

``fused_moe`` at decode (``FUSED_MAX_TOKENS``) runs router, routing, routed and shared experts in three launches
that read only the chosen experts' rows (see the section below); above that it is ``select_experts`` +
``moe_experts`` + the shared MLP. It replaced run 2's per-(token, slot) GEMV path of ``moe_experts``, which the
models no longer reached (benchmarks/KERNEL_NOTES.md).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from highspeed.ops.norm import DeferredNorm, ResidualSum, materialize, unnormed
from highspeed.ops.triton import (fence_gpu, gdc_launch_dependents, gdc_wait, interpreting, l2_prefetch,
                                  next_power_of_2, pdl, prefetch_l2, tuned)
from highspeed.ops.triton import linear as lin
from highspeed.ops.triton.linear import norm_weights_load, tile_rows_dot, whole_rows_dot, whole_rows_load
from highspeed.ops.triton.norm import (addable_norm, fold_residual, foldable_norm, folded_sum, norm_values,
                                       residual_epilogue, self_normable, sumsq_load, sumsq_rstd)

# Launch shapes, kept here so benchmarks can override them without touching the kernels.
# Grouped GEMM tiles: 64x64 while few rows share an expert (memory-bound: small tiles, more programs); 128x128
# once most experts have >= 128 rows (compute-bound: run 1 measured 128x128x64 fastest at T=2048 on both models).
GROUPED = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=3)
GROUPED_LARGE = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3)
# Pairs per expert (T * k / E) from which GROUPED_LARGE is used.
GROUPED_LARGE_MIN_ROWS_PER_EXPERT: int = 64


# ----------------------------------------------------------------------------------------------------------------
# Routing
# ----------------------------------------------------------------------------------------------------------------

@triton.jit
def _expert_axis(n_group, per_group, BLOCK_G: tl.constexpr, BLOCK_PG: tl.constexpr):
    """The expert axis viewed as [group, expert-in-group] (so group selection needs no reshape): (g, j, valid,
    flat expert index)."""
    g = tl.arange(0, BLOCK_G)
    j = tl.arange(0, BLOCK_PG)
    valid = (g[:, None] < n_group) & (j[None, :] < per_group)
    return g, j, valid, g[:, None] * per_group + j[None, :]


@triton.jit
def _softmax_stats(logits, valid):
    """(max, sum of exp(logit - max)) over the valid logits of a [G, PG] tile."""
    mx = tl.max(tl.max(logits, 1), 0)
    return mx, tl.sum(tl.sum(tl.where(valid, tl.exp(logits - mx), 0.0), 1), 0)


@triton.jit
def _route_ids(
    logits_ptr, bias_ptr, n_group, per_group, picks,
    TOP_K: tl.constexpr, TOPK_GROUP: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_PG: tl.constexpr,
    SIGMOID: tl.constexpr, HAS_BIAS: tl.constexpr, USE_GROUPS: tl.constexpr,
):
    """The chosen experts of one token, from its contiguous fp32 logits row: [BLOCK_K] ids, best first (equal
    scores: lowest index). This sits on the critical path of every expert program of the fused decode MoE, so it
    is written for latency: each of the k picks is ONE max-reduction over a packed (order-preserving score bits,
    lowest index) int64 key, only the first ``picks`` are made (the rest of the ids stay 0: a program that needs
    the s-th expert stops there), and the weights are left to ``_route_weights`` (one program needs them)."""
    g, j, valid, flat = _expert_axis(n_group, per_group, BLOCK_G, BLOCK_PG)
    logits = tl.load(logits_ptr + flat, mask=valid, other=float("-inf")).to(tl.float32)
    if HAS_BIAS or USE_GROUPS:
        if SIGMOID:
            sel = tl.sigmoid(logits)
        else:
            mx, denom = _softmax_stats(logits, valid)
            sel = tl.exp(logits - mx) / denom
        if HAS_BIAS:
            # The correction bias steers which experts are chosen; the weights stay the unbiased scores.
            sel = sel + tl.load(bias_ptr + flat, mask=valid, other=0.0).to(tl.float32)
    else:
        # Softmax and sigmoid both increase with the logit: the same experts, without the exp and the two
        # reductions of the softmax on every program's critical path.
        sel = logits
    sel = tl.where(valid, sel, float("-inf"))

    if USE_GROUPS:
        # Group score = sum of the group's two best biased scores; keep the TOPK_GROUP best groups.
        top1 = tl.max(sel, 1)
        first = tl.min(tl.where(sel == top1[:, None], j[None, :], BLOCK_PG), 1)
        top2 = tl.max(tl.where(j[None, :] == first[:, None], float("-inf"), sel), 1)
        gscore = tl.where(g < n_group, top1 + top2, float("-inf"))
        keep = g < 0
        for _ in tl.static_range(TOPK_GROUP):
            gbest = tl.max(gscore, 0)
            gi = tl.min(tl.where(gscore == gbest, g, BLOCK_G), 0)
            keep = keep | (g == gi)
            gscore = tl.where(g == gi, float("-inf"), gscore)
        sel = tl.where(keep[:, None], sel, float("-inf"))

    # Packed key: high 32 bits order like the fp32 score (flip the magnitude bits of negatives), low 32 bits are
    # (big - index) so that among equal scores the lowest index wins, like torch.topk on distinct values.
    big = BLOCK_G * BLOCK_PG
    bits = sel.to(tl.int32, bitcast=True)
    ordered = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    key = ordered.to(tl.int64) * 4294967296 + (big - flat).to(tl.int64)
    key = tl.where(valid, key, -9223372036854775807)
    kk = tl.arange(0, BLOCK_K)
    ivec = tl.zeros([BLOCK_K], dtype=tl.int32)
    for i in tl.static_range(TOP_K):
        if i < picks:
            best = tl.max(tl.max(key, 1), 0)
            fi = (big - (best - (best >> 32) * 4294967296)).to(tl.int32)
            ivec = tl.where(kk == i, fi, ivec)
            key = tl.where(flat == fi, -9223372036854775807, key)
    return ivec


@triton.jit
def _route_weights(
    logits_ptr, ivec, n_group, per_group, scaling,
    TOP_K: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_PG: tl.constexpr,
    SIGMOID: tl.constexpr, RENORM: tl.constexpr,
):
    """The routing weights of the experts ``ivec`` (from ``_route_ids``): their unbiased scores, gathered from the
    logits row, renormalised and scaled."""
    kk = tl.arange(0, BLOCK_K)
    kmask = kk < TOP_K
    lv = tl.load(logits_ptr + ivec, mask=kmask, other=float("-inf")).to(tl.float32)
    if SIGMOID:
        wvec = tl.where(kmask, tl.sigmoid(lv), 0.0)
    else:
        g, j, valid, flat = _expert_axis(n_group, per_group, BLOCK_G, BLOCK_PG)
        logits = tl.load(logits_ptr + flat, mask=valid, other=float("-inf")).to(tl.float32)
        mx, denom = _softmax_stats(logits, valid)
        wvec = tl.where(kmask, tl.exp(lv - mx) / denom, 0.0)
    if RENORM:
        wvec = wvec / (tl.sum(wvec, 0) + 1e-20)
    return wvec * scaling


@triton.jit
def _select_experts_kernel(
    logits_ptr, bias_ptr, w_out_ptr, id_out_ptr,
    stride_lt, n_group, per_group, scaling,
    TOP_K: tl.constexpr, TOPK_GROUP: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_PG: tl.constexpr,
    SIGMOID: tl.constexpr, HAS_BIAS: tl.constexpr, USE_GROUPS: tl.constexpr, RENORM: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    ivec = _route_ids(logits_ptr + row * stride_lt, bias_ptr, n_group, per_group, TOP_K,
                      TOP_K, TOPK_GROUP, BLOCK_K, BLOCK_G, BLOCK_PG, SIGMOID, HAS_BIAS, USE_GROUPS)
    wvec = _route_weights(logits_ptr + row * stride_lt, ivec, n_group, per_group, scaling,
                          TOP_K, BLOCK_K, BLOCK_G, BLOCK_PG, SIGMOID, RENORM)
    kk = tl.arange(0, BLOCK_K)
    out_mask = kk < TOP_K
    tl.store(w_out_ptr + row * TOP_K + kk, wvec, mask=out_mask)
    tl.store(id_out_ptr + row * TOP_K + kk, ivec, mask=out_mask)


def _routing_meta(E: int, top_k: int, scoring: str, renormalize: bool, correction_bias: torch.Tensor | None,
                  n_group: int, topk_group: int) -> dict:
    """Validated compile-time routing parameters for ``_route_ids`` / ``_route_weights``."""
    if scoring not in ("softmax", "sigmoid"):
        raise ValueError(f"unknown scoring function {scoring!r}; expected 'softmax' or 'sigmoid'")
    if E % n_group != 0:
        raise ValueError(f"{E} experts do not split into {n_group} groups")
    if not 1 <= top_k <= E:
        raise ValueError(f"top_k={top_k} must be in [1, {E}]")
    use_groups = n_group > 1
    return dict(
        TOP_K=top_k, TOPK_GROUP=topk_group if use_groups else 1, BLOCK_K=next_power_of_2(top_k),
        BLOCK_G=next_power_of_2(n_group), BLOCK_PG=next_power_of_2(E // n_group),
        SIGMOID=scoring == "sigmoid", HAS_BIAS=correction_bias is not None, USE_GROUPS=use_groups,
        RENORM=bool(renormalize),
    )


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
    """Routing in one launch: returns (weights [T, k] fp32, expert ids [T, k] int32), best expert first."""
    T, E = router_logits.shape
    meta = _routing_meta(E, top_k, scoring, renormalize, correction_bias, n_group, topk_group)
    logits = router_logits if router_logits.stride(-1) == 1 else router_logits.contiguous()
    weights = torch.empty(T, top_k, dtype=torch.float32, device=logits.device)
    ids = torch.empty(T, top_k, dtype=torch.int32, device=logits.device)
    if T == 0:
        return weights, ids
    bias = correction_bias if correction_bias is not None else logits  # dummy pointer when absent
    _select_experts_kernel[(T,)](
        logits, bias, weights, ids,
        logits.stride(0), n_group, E // n_group, float(routed_scaling_factor),
        **meta, num_warps=4 if E >= 256 else 2,
    )
    return weights, ids


# ----------------------------------------------------------------------------------------------------------------
# The whole MoE block at decode (``fused_moe``, T <= FUSED_MAX_TOKENS): three launches in place of seven.
#   1. ``_router_kernel``: fp32 router logits, many programs (the router weight is 1-6 MB: one program would
#      read it at a fraction of the bandwidth). With a foldable ``DeferredNorm`` (the post-attention norm, its
#      sums of squares stored by o_proj) this kernel and the next normalise the row as they load it.
#   2. ``_fused_gate_up_kernel``: each program picks its token's experts from the logits (``_route_ids``, in
#      registers), then computes SiLU(gate) * up for one row block of one chosen expert -- or of the shared
#      expert, whose rows are just more row blocks. Program 0 of each token then computes the routing weights and
#      stores the routing for step 3.
#   3. ``_fused_down_kernel``: each program owns a block of output columns and reads that block of rows of ALL the
#      token's chosen experts in one 2-D tile ([k * BLOCK_N, BLOCK_K]: k times the loads in flight of a
#      per-expert loop), sums them with the routing weights in registers, then adds the shared expert's rows,
#      and with ``residual`` the residual stream, storing its sums of squares for the next layer's norm.
# ----------------------------------------------------------------------------------------------------------------

# Gate/up programs make the routing picks only up to their own slot: the slot-0 programs start streaming after one
# max-reduction instead of k. H200 run 15 (batch-1 graph replay, in the decode chain): Qwen3-30B-A3B 2.453 ->
# 2.397 ms (gate/up 16.75 -> 16.19 us per layer in the chain timeline, down 12.91 -> 12.42), GLM-4.7-Flash (4
# routed experts) 3.276 -> 3.265 ms. HIGHSPEED_PARTIAL_PICKS=0: every program makes all k.
PARTIAL_PICKS: bool = os.environ.get("HIGHSPEED_PARTIAL_PICKS", "1") != "0"
# The routing ids handed to the down kernel before its PDL wait (HIGHSPEED_EARLY_IDS, default 1). Without it a
# down program's wait is followed by two chained round trips: the ids (L2), then its first weight tile (HBM).
# With it, gate/up's program 0 stores the ids right after routing, fences, and only then lets the down kernel
# launch (every other gate/up program triggers at its start, as before); so the ids are in L2 before any down
# program starts, and each down program loads them and its first weight tile before its wait. After the wait
# only the activations (L2) remain. The fence and trigger need PDL; without it only where the ids are stored
# moves. H200 batch-1 decode chain, two passes each: Qwen3-30B-A3B 2.092 / 2.090 ms per step against 2.121 /
# 2.122 (run 61), 2.079 / 2.080 against 2.104 / 2.106 (run 62; down 10.9 -> 9.3 us per layer, gate/up 15.6 ->
# 16.5: the early tiles share HBM with its stream); GLM-4.7-Flash 2.779 / 2.778 against 2.799 / 2.799, 2.765 /
# 2.767 against 2.784 / 2.785. Asking L2 for the rest of each program's rows as well: 2.202 and 2.880 (run 61).
# An extra routing-only program publishing ids and weights instead of program 0: Qwen3 2.088 / 2.085, GLM
# 2.761 / 2.763 (run 62), so program 0 it is.
EARLY_IDS: bool = os.environ.get("HIGHSPEED_EARLY_IDS", "1") != "0"
# H200 (benchmarks/kernels.py ``fused_moe``, results/kernels-h200-run5-fused-moe-linear.json, CUDA-graph times):
# fused vs unfused at T=1 Qwen3-30B-A3B 33.5 vs 45.0 us, GLM-4.7-Flash 35.9 vs 56.7, GLM-5 201 vs 217; T=2 56 vs
# 68, 62 vs 91, 365 vs 385; T=4 a tie, 104 vs 119, 685 vs 616 (GLM-5 re-reads its 75 MB experts per token).
FUSED_MAX_TOKENS: int = 2
# Launch shapes: the sweep's best router on all three models; the expert shapes are within 2-3% of each model's
# best (no one shape won everywhere).
# Run 10 (H200, batch-1 graph replay, in the whole decode chain): with row-sum accumulators (ROW_SUMS, below) the
# double-buffered tiles (PREFETCH) are needed -- Qwen3-30B-A3B's down kernel without them 2.621 ms, with them
# 2.457 ms; GLM-4.7-Flash's gate/up 3.805 vs 3.224 ms; 128-wide K tiles were slower (2.646, 3.891 ms).
# The router with two experts per program (64 programs for Qwen3-30B-A3B's 128): H200 batch-1 decode chain, two
# passes in each of runs 60 and 61, against one: Qwen3-30B-A3B 2.119 / 2.118 and 2.118 / 2.117 ms per step against
# 2.120 / 2.122 and 2.121 / 2.122; GLM-4.7-Flash 2.792 / 2.791 and 2.793 / 2.794 against 2.797 / 2.797 and 2.799 /
# 2.799. Small, but the same sign in all eight pairs.
ROUTER = tuned("ROUTER", dict(BLOCK_E=2, BLOCK_K=1024, num_warps=4))
# PREFETCH_ALL: with PREFETCH, the tiles of x / the activations (and the shared expert's rows in the down loop) are
# also loaded one iteration ahead, so no iteration waits on a round trip of its own. H200 batch-1 decode chain
# (run 38, two interleaved passes): Qwen3-30B-A3B with it in both narrow shapes 2.209 / 2.207 ms per step against
# 2.288 / 2.291 (down 11.6 -> 10.5 us, gate/up 15.5 -> 15.1 us per layer), hence on there; GLM-4.7-Flash with it
# in FUSED_GATE_UP and FUSED_DOWN_WIDE_SHARED_IN_LOOP 2.909 / 2.911 against 2.909 / 2.909, so off for the wide
# shapes (8 more registers in the down kernel for nothing). Two tiles ahead instead of one (commit ce94827, removed)
# lost everywhere, by the registers it takes (run 39, against 2.211 / 2.212 ms): Qwen3 down 2.316 (126 registers),
# down with one column 2.343 (70), gate/up 2.455 (89-93); GLM-4.7-Flash down 2.912 / 2.914 against 2.897 / 2.901.
FUSED_GATE_UP = tuned("FUSED_GATE_UP", dict(BLOCK_N=16, BLOCK_K=256, num_warps=4, PREFETCH=True, PREFETCH_ALL=False,
                                            ROW_SUMS=True))
# Narrow experts' down kernel (Qwen3-30B-A3B): 2 output columns per program, i.e. 1024 programs of [16, 256] tiles
# (56 registers on Triton 3.6, against 96 for 4 columns): H200 batch-1 decode chain 2.301 against 2.378 ms per step
# (run 35; down 12.6 -> 11.7 us and gate/up 16.1 -> 15.5 us per layer in the timeline: the smaller programs find
# room beside gate/up's sooner). 8 columns with 128-wide K tiles: 2.557 against 2.372 (run 33).
# One column with PREFETCH_ALL: 2.267 / 2.270 against 2.211 / 2.212 (run 39). 3-D tiles loading each activation once
# instead of once per column took 78-80 registers against 64 (offline compile), so were not run.
FUSED_DOWN = tuned("FUSED_DOWN", dict(BLOCK_N=2, BLOCK_K=256, num_warps=4, PREFETCH=True, PREFETCH_ALL=True,
                                      ROW_SUMS=True))
# Wide experts (I > NARROW_I: GLM-4.7-Flash 1536, GLM-5 2048): double-buffered down tiles, 2 output columns per
# program. Run 5's sweep (results/kernels-h200-run5.json, block in a CUDA graph): GLM-4.7-Flash 31.8 vs 34.2 us with
# FUSED_DOWN, GLM-5 179 vs 193 us; at Qwen3's 768 the plain loop won (27.7 vs 29.0 us).
FUSED_DOWN_WIDE = tuned("FUSED_DOWN_WIDE", dict(BLOCK_N=2, BLOCK_K=256, num_warps=4, PREFETCH=True,
                                                PREFETCH_ALL=False, ROW_SUMS=True))
# Wide experts whose shared expert has the routed width, so its down rows load in the routed loop (GLM-4.7-Flash,
# GLM-4.5-Air, GLM-5): one output column per program (32 registers on Triton 3.6). H200 batch-1 decode chain,
# against FUSED_DOWN_WIDE: GLM-4.7-Flash 2.913 / 2.902 ms per step against 2.947 / 2.941 (runs 36, 37),
# GLM-4.5-Air (20 layers) 3.543 against 3.574, GLM-5 (5 layers) 1.728 against 1.729 (run 37). DeepSeek-V2-Lite,
# whose two shared experts (twice the routed width) run a separate loop after the routed one, lost with it: 2.295
# against 2.129 ms (run 37) -- hence FUSED_DOWN_WIDE there.
FUSED_DOWN_WIDE_SHARED_IN_LOOP = tuned("FUSED_DOWN_WIDE_SHARED_IN_LOOP",
                                       dict(BLOCK_N=1, BLOCK_K=256, num_warps=4, PREFETCH=True, PREFETCH_ALL=False,
                                            ROW_SUMS=True))
# Narrow experts (I <= 1024, e.g. Qwen3-30B-A3B's 768): 8-row blocks with double-buffered weight tiles measured
# 27.5 us for the block against 29.8 with FUSED_GATE_UP (H200 run 5); at I = 1536 (GLM-4.7-Flash) they lost.
# 4-row blocks: 2.306 / 2.308 against 2.288 / 2.291 ms (run 38).
FUSED_GATE_UP_NARROW = tuned("FUSED_GATE_UP_NARROW",
                             dict(BLOCK_N=8, BLOCK_K=256, num_warps=4, PREFETCH=True, PREFETCH_ALL=True,
                                  ROW_SUMS=True))
NARROW_I: int = 1024
# Fused gate/up asking L2 for the chosen experts' down rows (``prefetch_l2``, only with HIGHSPEED_L2_PREFETCH=1
# and HIGHSPEED_PREFETCH_DOWN=1): H200 run 6 measured batch-1 decode 10% slower with every prefetch on (Qwen3
# graph replay 2.99 vs 2.71 ms) and about even without this one (2.75 vs 2.72), so this one cost ~0.25 ms: about
# one extra read of the down weights per layer, the prefetched rows not surviving the 50 MB of gate/up weights
# streamed meanwhile.
PREFETCH_DOWN: bool = os.environ.get("HIGHSPEED_PREFETCH_DOWN", "0") == "1"
# The post-attention norm with its pending residual add done by the router at batch-1 decode (as the qkv GEMV does
# the input norm, linear.ADD_NORM): each router program adds the residual and normalises the whole row it loads
# anyway; program 0 stores the sum (the residual stream) and the normalised row for gate/up. The norm launch goes.
# H200 batch-1 decode chain (run 70, two interleaved passes): Qwen3-30B-A3B 2.034 / 2.032 ms per step against 2.056
# / 2.056 (router 1.06 -> 1.46 us per layer, the norm's 0.95 gone), GLM-4.7-Flash 2.693 / 2.691 against 2.722 /
# 2.722. Only for hidden sizes up to norm.ADD_NORM_MAX_K (the router took 128 registers at 4096 and 221 at 6144;
# the shapes measured are 2048 wide). HIGHSPEED_ROUTER_ADD_NORM=0: the norm launch.
ROUTER_ADD_NORM: bool = os.environ.get("HIGHSPEED_ROUTER_ADD_NORM", "1") != "0"
# The shared expert's gate/up programs asking L2 for their rows before the PDL wait (HIGHSPEED_SHARED_L2, commit
# a16bf88, removed): GLM-4.7-Flash 2.920 / 2.924 ms per step, and 3.018 / 3.026 with its down rows too, against
# 2.909 / 2.909 (H200 run 38). Gate/up got 1.6 us per layer faster, the router and down slower by as much: the
# expert window is bound by its bytes, wherever they are read (benchmarks/KERNEL_NOTES.md, runs 38-42).


@triton.jit
def _acc_zeros(ROWS: tl.constexpr, BLOCK_K: tl.constexpr, ROW_SUMS: tl.constexpr):
    if ROW_SUMS:
        acc = tl.zeros([ROWS], dtype=tl.float32)
    else:
        acc = tl.zeros([ROWS, BLOCK_K], dtype=tl.float32)
    return acc


@triton.jit
def _acc_add(acc, w, x, ROW_SUMS: tl.constexpr):
    """``acc`` plus the products of weight tile ``w`` and ``x`` (broadcastable to it): a 2-D accumulator the
    shape of the tile, reduced once at the end, or (ROW_SUMS) its row sums, reduced every step (within a warp,
    the tile's rows lying along warps). ROW_SUMS holds a third to a half fewer registers -- the down kernel's
    [32, 256] tile took 167 (three programs per SM, two waves) -- so more programs are resident at once and the
    next kernel's programs find room sooner under PDL. (One return per jit function: the GPU compiler rejects a
    return inside a constexpr branch followed by another.)"""
    if ROW_SUMS:
        out = acc + tl.sum(w.to(tl.float32) * x, 1)
    else:
        out = acc + w.to(tl.float32) * x
    return out


@triton.jit
def _acc_rows(acc, ROW_SUMS: tl.constexpr):
    if ROW_SUMS:
        rows = acc
    else:
        rows = tl.sum(acc, 1)
    return rows


@triton.jit
def _router_kernel(x_ptr, w_ptr, out_ptr, nw_ptr, ss_ptr, rin_ptr, sum_ptr, nx_ptr, H, E, P, eps,
                   stride_xt, stride_we, stride_ot, stride_st, stride_rt, stride_sum, stride_nx,
                   BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, L2_PREFETCH: tl.constexpr, LINE: tl.constexpr,
                   KLINES: tl.constexpr, W_EVICT: tl.constexpr,
                   WHOLE: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr, NORM: tl.constexpr,
                   BLOCK_P: tl.constexpr, SELF_NORM: tl.constexpr, ADD_RES: tl.constexpr, PDL: tl.constexpr):
    # NORM (WHOLE only): x is the residual stream, normalised here with nw and the partial sums of squares at ss
    # (SELF_NORM: the sums of squares of the whole row this program loads). ADD_RES (with SELF_NORM): the row is x
    # plus the residual at rin_ptr; program 0 stores the sum (the residual stream) at sum_ptr and the normalised
    # row, which gate/up reads, at nx_ptr (ROUTER_ADD_NORM).
    if PDL:
        gdc_launch_dependents()
    t = tl.program_id(0).to(tl.int64)
    e = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    emask = e < E
    w_rows = w_ptr + e[:, None].to(tl.int64) * stride_we
    # The router weights do not depend on the previous kernel: in flight before the wait (all of them with WHOLE,
    # else the first tile, each iteration then loading the next tile before using the current one).
    if L2_PREFETCH:
        lines = tl.minimum(tl.arange(0, KLINES) * LINE, H - 1)
        prefetch_l2(w_ptr + tl.minimum(e, E - 1)[:, None].to(tl.int64) * stride_we + lines[None, :])
    if WHOLE:   # the whole rows (as in the GEMV, ops/triton/linear.py): after the wait, one read of x
        w1, w2 = whole_rows_load(w_rows, emask, H, K1, K2)
        if NORM:
            g1, g2 = norm_weights_load(nw_ptr, H, K1, K2)
        else:
            g1, g2 = 0.0, 0.0
    else:
        k = tl.arange(0, BLOCK_K)
        w = tl.load(w_rows + k[None, :], mask=emask[:, None] & (k < H)[None, :], other=0.0, eviction_policy=W_EVICT)
    if PDL:
        gdc_wait()
    x_row = x_ptr + t * stride_xt
    if WHOLE:
        y = whole_rows_dot(w1, w2, x_row, H, K1, K2, g1, g2, ss_ptr + t * stride_st, P, eps, NORM, BLOCK_P,
                           SELF_NORM, rin_ptr + t * stride_rt, sum_ptr + t * stride_sum,
                           tl.where(tl.program_id(1) == 0, H, 0), ADD_RES, nx_ptr + t * stride_nx, ADD_RES)
    else:
        y = tile_rows_dot(w, w_rows, emask, x_row, H, BLOCK_E, BLOCK_K, True, W_EVICT)
    tl.store(out_ptr + t * stride_ot + e, y, mask=emask)


@triton.jit
def _publish_ids(ids_ptr, t, ivec, TOP_K: tl.constexpr, BLOCK_TK: tl.constexpr, TRIGGER: tl.constexpr):
    """Store token t's expert ids and only then let the dependent (down) kernel launch, so that it may read them
    before its wait (EARLY_IDS). The trigger orders no memory: the fence makes this thread's stores visible
    GPU-wide, the barrier holds every thread until all have fenced."""
    kk = tl.arange(0, BLOCK_TK)
    tl.store(ids_ptr + t * TOP_K + kk, ivec, mask=kk < TOP_K)
    if TRIGGER:   # (with PDL; a jit helper's constexpr is not named PDL: only kernels take that)
        fence_gpu(t.to(tl.int32))
        tl.debug_barrier()
        gdc_launch_dependents()


@triton.jit
def _fused_gate_up_kernel(
    x_ptr, logits_ptr, bias_ptr, w13_ptr, ws13_ptr, act_ptr, wts_ptr, ids_ptr, w2_ptr, ws2_ptr, nw_ptr, ss_ptr,
    H, I, IS, n_group, per_group, scaling, P, eps,
    stride_xt, stride_lt, stride_we, stride_wn, stride_sn, stride_at, stride_2e, stride_2n, stride_s2n, stride_st,
    NORM: tl.constexpr, BLOCK_P: tl.constexpr, SELF_NORM: tl.constexpr, BLOCK_H: tl.constexpr,
    TOP_K: tl.constexpr, TOPK_GROUP: tl.constexpr, BLOCK_TK: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_PG: tl.constexpr,
    SIGMOID: tl.constexpr, HAS_BIAS: tl.constexpr, USE_GROUPS: tl.constexpr, RENORM: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PREFETCH: tl.constexpr, PREFETCH_ALL: tl.constexpr,
    ROW_SUMS: tl.constexpr, L2_PREFETCH: tl.constexpr, PF_DOWN: tl.constexpr, LINE: tl.constexpr, PF_ROWS: tl.constexpr,
    PF_LINES: tl.constexpr, W_EVICT: tl.constexpr, PARTIAL_PICKS: tl.constexpr, EARLY_IDS: tl.constexpr,
    PDL: tl.constexpr,
):
    if PDL:  # everything here depends on the router's logits
        if EARLY_IDS:   # program 0 lets the down kernel launch only once it has published the ids (below)
            if tl.program_id(1) != 0:
                gdc_launch_dependents()
        else:
            gdc_launch_dependents()
        gdc_wait()
    t = tl.program_id(0).to(tl.int64)
    p = tl.program_id(1)                 # row block: TOP_K * blocks_per_expert routed ones, then the shared ones
    if NORM:   # x is the residual stream: its rms from the producer's partial sums, loaded with the logits
        if SELF_NORM:   # or from the whole row, loaded here too: its reduction overlaps the routing
            hh = tl.arange(0, BLOCK_H)
            parts = tl.load(x_ptr + t * stride_xt + hh, mask=hh < H, other=0.0).to(tl.float32)
            parts = parts * parts
        else:
            parts = sumsq_load(ss_ptr + t * stride_st, P, BLOCK_P)
    blocks_per_expert = tl.cdiv(I, BLOCK_N)
    r = tl.arange(0, BLOCK_N)
    kk = tl.arange(0, BLOCK_TK)
    if p < TOP_K * blocks_per_expert:
        slot = p // blocks_per_expert
        n = (p % blocks_per_expert) * BLOCK_N + r
        nmask = n < I
        # Picks up to this program's own slot (slot s needs the s-th best expert; program 0 all of them: it
        # stores the routing for the down kernel).
        picks = tl.where(p == 0, TOP_K, slot + 1) if PARTIAL_PICKS else TOP_K
        ivec = _route_ids(logits_ptr + t * stride_lt, bias_ptr, n_group, per_group, picks,
                          TOP_K, TOPK_GROUP, BLOCK_TK, BLOCK_G, BLOCK_PG, SIGMOID, HAS_BIAS, USE_GROUPS)
        e = tl.sum(tl.where(kk == slot, ivec, 0), 0).to(tl.int64)
        if EARLY_IDS:
            if p == 0:   # publish the ids for the down programs' loads before their wait, then trigger
                _publish_ids(ids_ptr, t, ivec, TOP_K, BLOCK_TK, PDL)
        w_gate = w13_ptr + e * stride_we + n[:, None].to(tl.int64) * stride_wn
        w_up = w_gate + I * stride_wn
        out_cols = slot * I + n
        if PF_DOWN:  # this program's share of the expert's down rows, for the next kernel
            h = tl.minimum((p % blocks_per_expert) * PF_ROWS + tl.arange(0, PF_ROWS), H - 1)
            cols = tl.minimum(tl.arange(0, PF_LINES) * LINE, I - 1)
            prefetch_l2(w2_ptr + e * stride_2e + h[:, None].to(tl.int64) * stride_2n + cols[None, :])
    else:
        ivec = tl.zeros([BLOCK_TK], dtype=tl.int32)   # the shared expert's rows need no routing
        n = (p - TOP_K * blocks_per_expert) * BLOCK_N + r
        nmask = n < IS
        w_gate = ws13_ptr + n[:, None].to(tl.int64) * stride_sn
        w_up = w_gate + IS * stride_sn
        out_cols = TOP_K * I + n
        if PF_DOWN:
            h = tl.minimum((p - TOP_K * blocks_per_expert) * PF_ROWS + tl.arange(0, PF_ROWS), H - 1)
            cols = tl.minimum(tl.arange(0, PF_LINES) * LINE, IS - 1)
            prefetch_l2(ws2_ptr + h[:, None].to(tl.int64) * stride_s2n + cols[None, :])
    x_row = x_ptr + t * stride_xt
    if NORM:
        rstd = sumsq_rstd(parts, H, eps)
    acc_g = _acc_zeros(BLOCK_N, BLOCK_K, ROW_SUMS)
    acc_u = _acc_zeros(BLOCK_N, BLOCK_K, ROW_SUMS)
    if PREFETCH:  # software double buffering: the next weight tiles are in flight while this one is used
        k = tl.arange(0, BLOCK_K)
        m2 = nmask[:, None] & (k < H)[None, :]
        wg = tl.load(w_gate + k[None, :], mask=m2, other=0.0, eviction_policy=W_EVICT)
        wu = tl.load(w_up + k[None, :], mask=m2, other=0.0, eviction_policy=W_EVICT)
        if PREFETCH_ALL:   # x's tile too: no L2 round trip of its own in any iteration
            x_raw = tl.load(x_row + k, mask=k < H, other=0.0)
            if NORM:
                g_raw = tl.load(nw_ptr + k, mask=k < H, other=0.0)
    for k0 in range(0, H, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        kmask = k < H
        if PREFETCH_ALL:
            if NORM:
                xv = norm_values(x_raw, g_raw, rstd, x_ptr.dtype.element_ty)
            else:
                xv = x_raw.to(tl.float32)
        else:
            if NORM:
                xv = norm_values(tl.load(x_row + k, mask=kmask, other=0.0),
                                 tl.load(nw_ptr + k, mask=kmask, other=0.0), rstd, x_ptr.dtype.element_ty)
            else:
                xv = tl.load(x_row + k, mask=kmask, other=0.0).to(tl.float32)
        if PREFETCH:
            kn = k + BLOCK_K
            mn = nmask[:, None] & (kn < H)[None, :]
            wg_next = tl.load(w_gate + kn[None, :], mask=mn, other=0.0, eviction_policy=W_EVICT)
            wu_next = tl.load(w_up + kn[None, :], mask=mn, other=0.0, eviction_policy=W_EVICT)
            if PREFETCH_ALL:
                x_raw = tl.load(x_row + kn, mask=kn < H, other=0.0)
                if NORM:
                    g_raw = tl.load(nw_ptr + kn, mask=kn < H, other=0.0)
        else:
            m2 = nmask[:, None] & kmask[None, :]
            wg = tl.load(w_gate + k[None, :], mask=m2, other=0.0, eviction_policy=W_EVICT)
            wu = tl.load(w_up + k[None, :], mask=m2, other=0.0, eviction_policy=W_EVICT)
        acc_g = _acc_add(acc_g, wg, xv[None, :], ROW_SUMS)
        acc_u = _acc_add(acc_u, wu, xv[None, :], ROW_SUMS)
        if PREFETCH:
            wg = wg_next
            wu = wu_next
    gate = _acc_rows(acc_g, ROW_SUMS)
    up = _acc_rows(acc_u, ROW_SUMS)
    act = gate * tl.sigmoid(gate) * up
    tl.store(act_ptr + t * stride_at + out_cols, act.to(act_ptr.dtype.element_ty), mask=nmask)
    if p == 0:   # the routing for the down kernel; its weights are off every other program's critical path
        wvec = _route_weights(logits_ptr + t * stride_lt, ivec, n_group, per_group, scaling,
                              TOP_K, BLOCK_TK, BLOCK_G, BLOCK_PG, SIGMOID, RENORM)
        tl.store(wts_ptr + t * TOP_K + kk, wvec, mask=kk < TOP_K)
        if not EARLY_IDS:
            tl.store(ids_ptr + t * TOP_K + kk, ivec, mask=kk < TOP_K)


@triton.jit
def _fused_down_kernel(
    act_ptr, w2_ptr, ws2_ptr, wts_ptr, ids_ptr, out_ptr, res_ptr, ss_ptr,
    H, I, IS,
    stride_at, stride_we, stride_wn, stride_sn, stride_ot, stride_rt, stride_st,
    ADD_RESIDUAL: tl.constexpr,
    TOP_K: tl.constexpr, SLOTS: tl.constexpr, HAS_SHARED: tl.constexpr, SHARED_IN_LOOP: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PREFETCH: tl.constexpr, PREFETCH_ALL: tl.constexpr,
    ROW_SUMS: tl.constexpr, W_EVICT: tl.constexpr, EARLY_IDS: tl.constexpr, PDL: tl.constexpr,
):
    if PDL:  # everything here depends on gate_up's routing and activations (EARLY_IDS: but the ids, see below)
        gdc_launch_dependents()
        if not EARLY_IDS:
            gdc_wait()
    t = tl.program_id(0).to(tl.int64)
    nb = tl.program_id(1)
    # Tile rows are (slot, output column) pairs: every chosen expert's rows of this column block at once.
    rows = tl.arange(0, SLOTS * BLOCK_N)
    slot = rows // BLOCK_N
    n = nb * BLOCK_N + rows % BLOCK_N
    rmask = (slot < TOP_K) & (n < H)
    # EARLY_IDS: gate/up's program 0 stored and fenced the ids before it let this kernel launch; read them from L2
    # (.cg: this SM's L1 may hold the buffer's lines from an earlier step).
    e = tl.load(ids_ptr + t * TOP_K + slot, mask=rmask, other=0, cache_modifier=".cg" if EARLY_IDS else "")
    w_rows = w2_ptr + e.to(tl.int64) * stride_we + n.to(tl.int64) * stride_wn
    if PREFETCH:
        k = tl.arange(0, BLOCK_K)
        m2 = rmask[:, None] & (k < I)[None, :]
        w = tl.load(w_rows[:, None] + k[None, :], mask=m2, other=0.0, eviction_policy=W_EVICT)
    if PDL:
        if EARLY_IDS:
            gdc_wait()
    wt = tl.load(wts_ptr + t * TOP_K + slot, mask=rmask, other=0.0)
    a_rows = act_ptr + t * stride_at + slot * I
    acc = _acc_zeros(SLOTS * BLOCK_N, BLOCK_K, ROW_SUMS)
    c = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = c < H
    if ADD_RESIDUAL:   # issued with the routing loads: no round trip at the end
        r = tl.load(res_ptr + t * stride_rt + c, mask=cmask, other=0.0)
    if HAS_SHARED:
        s_rows = ws2_ptr + c[:, None].to(tl.int64) * stride_sn
        a_shared = act_ptr + t * stride_at + TOP_K * I
        acc_s = _acc_zeros(BLOCK_N, BLOCK_K, ROW_SUMS)
    if PREFETCH:
        if PREFETCH_ALL:   # the activations and the shared rows too: no round trip of their own in any iteration
            a_raw = tl.load(a_rows[:, None] + k[None, :], mask=m2, other=0.0)
            if SHARED_IN_LOOP:
                a_sl_raw = tl.load(a_shared + k, mask=k < I, other=0.0)
                w_sl = tl.load(s_rows + k[None, :], mask=cmask[:, None] & (k < I)[None, :], other=0.0,
                               eviction_policy=W_EVICT)
    for k0 in range(0, I, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        m2 = rmask[:, None] & (k < I)[None, :]
        if PREFETCH_ALL:
            a = a_raw.to(tl.float32)
            if SHARED_IN_LOOP:
                a_sl = a_sl_raw.to(tl.float32)
                w_sl_cur = w_sl
        else:
            a = tl.load(a_rows[:, None] + k[None, :], mask=m2, other=0.0).to(tl.float32)
        if PREFETCH:
            kn = k + BLOCK_K
            mn = rmask[:, None] & (kn < I)[None, :]
            w_next = tl.load(w_rows[:, None] + kn[None, :], mask=mn, other=0.0, eviction_policy=W_EVICT)
            if PREFETCH_ALL:
                a_raw = tl.load(a_rows[:, None] + kn[None, :], mask=mn, other=0.0)
                if SHARED_IN_LOOP:
                    a_sl_raw = tl.load(a_shared + kn, mask=kn < I, other=0.0)
                    w_sl = tl.load(s_rows + kn[None, :], mask=cmask[:, None] & (kn < I)[None, :], other=0.0,
                                   eviction_policy=W_EVICT)
        else:
            w = tl.load(w_rows[:, None] + k[None, :], mask=m2, other=0.0, eviction_policy=W_EVICT)
        if SHARED_IN_LOOP:   # the shared expert has the routed width: its rows load in the same iterations
            if not PREFETCH_ALL:
                a_sl = tl.load(a_shared + k, mask=k < I, other=0.0).to(tl.float32)
                w_sl_cur = tl.load(s_rows + k[None, :], mask=cmask[:, None] & (k < I)[None, :], other=0.0,
                                   eviction_policy=W_EVICT)
            acc_s = _acc_add(acc_s, w_sl_cur, a_sl[None, :], ROW_SUMS)
        acc = _acc_add(acc, w, a, ROW_SUMS)
        if PREFETCH:
            w = w_next
    per_row = _acc_rows(acc, ROW_SUMS) * wt
    out = tl.sum(tl.reshape(per_row, [SLOTS, BLOCK_N]), 0)
    if HAS_SHARED:
        if not SHARED_IN_LOOP:
            for k0 in range(0, IS, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                a_sh = tl.load(a_shared + ks, mask=ks < IS, other=0.0).to(tl.float32)
                w_sh = tl.load(s_rows + ks[None, :], mask=cmask[:, None] & (ks < IS)[None, :], other=0.0, eviction_policy=W_EVICT)
                acc_s = _acc_add(acc_s, w_sh, a_sh[None, :], ROW_SUMS)
        out += _acc_rows(acc_s, ROW_SUMS)
    if ADD_RESIDUAL:   # the residual stream, and its sums of squares for the next layer's norm
        out, part = residual_epilogue(out, r, cmask, out_ptr.dtype.element_ty)
        tl.store(out_ptr + t * stride_ot + c, out, mask=cmask)
        tl.store(ss_ptr + t * stride_st + nb, part)
    else:
        tl.store(out_ptr + t * stride_ot + c, out.to(out_ptr.dtype.element_ty), mask=cmask)


def _loop_args(cfg: dict) -> dict:
    """The expert kernels' loop constants from a launch shape (PREFETCH_ALL only applies with PREFETCH)."""
    prefetch = cfg.get("PREFETCH", False)
    return dict(BLOCK_K=cfg["BLOCK_K"], PREFETCH=prefetch, PREFETCH_ALL=prefetch and cfg.get("PREFETCH_ALL", False),
                ROW_SUMS=cfg.get("ROW_SUMS", True), num_warps=cfg["num_warps"])


def down_config(I: int, IS: int) -> dict:
    """The down kernel's launch shape for routed experts of width I and a shared expert of width IS (0: none)."""
    if I <= NARROW_I:
        return FUSED_DOWN
    return FUSED_DOWN_WIDE_SHARED_IN_LOOP if IS == I else FUSED_DOWN_WIDE


def _norm_args(norm: DeferredNorm | None, x: torch.Tensor, unused: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, int, float, dict]:
    """The router's and gate/up's arguments for folding ``norm`` of ``x``: (norm weight, the producer's partial
    sums of squares, their count, eps, the NORM / BLOCK_P / SELF_NORM constants). A norm whose producer stored no
    sums (HIGHSPEED_FOLD_NORM=self, or a pending residual add) has them taken from the row itself (SELF_NORM).
    Without a norm, or without the sums, the pointers are placeholders (x, ``unused``), never read."""
    if norm is None:
        return x, unused, 0, 0.0, dict(NORM=False, BLOCK_P=1, SELF_NORM=False)
    ss = norm.sumsq
    if ss is None:
        return norm.weight, unused, 0, norm.eps, dict(NORM=True, BLOCK_P=1, SELF_NORM=True)
    return norm.weight, ss, ss.shape[-1], norm.eps, dict(NORM=True, BLOCK_P=next_power_of_2(ss.shape[-1]),
                                                         SELF_NORM=False)


def _fused_moe_decode(x: torch.Tensor, gate_weight: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                      meta: dict, correction_bias: torch.Tensor | None, n_group: int, scaling: float,
                      shared_w13: torch.Tensor | None, shared_w2: torch.Tensor | None,
                      norm: DeferredNorm | None = None, residual: torch.Tensor | None = None
                      ) -> torch.Tensor | ResidualSum:
    """The three decode launches. ``norm``: a foldable ``DeferredNorm`` of x (router and gate/up normalise x as
    they load it); ``residual``: added to the output by the down kernel, which also stores the sums of squares."""
    T, H = x.shape
    E, _, I = w2.shape
    k = meta["TOP_K"]
    has_shared = shared_w13 is not None
    IS = shared_w2.shape[1] if has_shared else 0
    dev = x.device
    logits = torch.empty(T, E, dtype=torch.float32, device=dev)
    launch = pdl(x)
    prefetch = l2_prefetch(x)
    # ROUTER_ADD_NORM: a norm with its residual add pending, done by the router, whose program 0 stores the sum
    # and the normalised row; gate/up then reads that row as a plain input.
    add_res = norm is not None and norm.residual is not None
    nw, ss_in, P, eps, norm_args = _norm_args(norm, x, logits)
    cfg = ROUTER
    k1, k2 = lin.whole_split(H)
    if add_res:
        r_in = norm.residual.reshape(T, H)
        s_out = torch.empty(T, H, dtype=x.dtype, device=dev)
        nx = torch.empty(T, H, dtype=x.dtype, device=dev)
    else:
        r_in = s_out = nx = x   # unused pointers
    _router_kernel[(T, triton.cdiv(E, cfg["BLOCK_E"]))](
        x, gate_weight, logits, nw, ss_in, r_in, s_out, nx, H, E, P, eps,
        x.stride(0), gate_weight.stride(0), logits.stride(0), ss_in.stride(0), r_in.stride(0), s_out.stride(0),
        nx.stride(0),
        BLOCK_E=cfg["BLOCK_E"], BLOCK_K=cfg["BLOCK_K"], num_warps=cfg["num_warps"], **launch, **prefetch,
        KLINES=next_power_of_2(triton.cdiv(H * x.element_size(), 128)),
        WHOLE=lin.whole_rows(H), K1=k1, K2=k2, ADD_RES=add_res, **norm_args,
    )
    if add_res:   # from here on the input is the normalised row, with nothing left to fold
        norm.set_residual_out(s_out)
        x = nx
        nw, ss_in, P, eps, norm_args = _norm_args(None, x, logits)
    act = torch.empty(T, k * I + IS, dtype=x.dtype, device=dev)
    weights = torch.empty(T, k, dtype=torch.float32, device=dev)
    ids = torch.empty(T, k, dtype=torch.int32, device=dev)
    cfg = FUSED_GATE_UP_NARROW if I <= NARROW_I else FUSED_GATE_UP
    bn = cfg["BLOCK_N"]
    ws13 = shared_w13 if has_shared else w13     # dummy pointer without a shared expert (never read)
    bias = correction_bias if correction_bias is not None else logits
    ws2 = shared_w2 if has_shared else w2[0]
    # Down rows to prefetch per program: an expert's H rows shared by its row-block programs (the shared expert's
    # by its own, which may be fewer: the rows are clamped, so a short share just repeats the last row).
    bpe = min(triton.cdiv(I, bn), triton.cdiv(IS, bn)) if has_shared else triton.cdiv(I, bn)
    _fused_gate_up_kernel[(T, k * triton.cdiv(I, bn) + triton.cdiv(IS, bn))](
        x, logits, bias, w13, ws13, act, weights, ids, w2, ws2, nw, ss_in,
        H, I, IS, n_group, E // n_group, float(scaling), P, eps,
        x.stride(0), logits.stride(0), w13.stride(0), w13.stride(1), ws13.stride(-2), act.stride(0),
        w2.stride(0), w2.stride(1), ws2.stride(0), ss_in.stride(0), **norm_args,
        **{("BLOCK_TK" if key == "BLOCK_K" else key): v for key, v in meta.items()},
        BLOCK_N=bn, **_loop_args(cfg),
        PF_DOWN=prefetch["L2_PREFETCH"] and PREFETCH_DOWN, PF_ROWS=next_power_of_2(triton.cdiv(H, bpe)),
        PF_LINES=next_power_of_2(triton.cdiv(max(I, IS) * x.element_size(), 128)), PARTIAL_PICKS=PARTIAL_PICKS,
        EARLY_IDS=EARLY_IDS, BLOCK_H=next_power_of_2(H) if norm_args["SELF_NORM"] else 1,
        **prefetch, **launch,
    )
    out = torch.empty(T, H, dtype=x.dtype, device=dev)
    cfg = down_config(I, IS)
    programs = triton.cdiv(H, cfg["BLOCK_N"])
    add = fold_residual(residual, x, T, H)
    ss_out = torch.empty(T, programs, dtype=torch.float32, device=dev) if add else None
    res = residual if add else out
    ss_o = ss_out if ss_out is not None else logits
    _fused_down_kernel[(T, programs)](
        act, w2, ws2, weights, ids, out, res, ss_o, H, I, IS,
        act.stride(0), w2.stride(0), w2.stride(1), ws2.stride(0), out.stride(0), res.stride(0), ss_o.stride(0),
        ADD_RESIDUAL=add, TOP_K=k, SLOTS=next_power_of_2(k), HAS_SHARED=has_shared, SHARED_IN_LOOP=has_shared and IS == I,
        BLOCK_N=cfg["BLOCK_N"], **_loop_args(cfg), W_EVICT=prefetch["W_EVICT"], EARLY_IDS=EARLY_IDS, **launch,
    )
    if residual is None:
        return out
    return folded_sum(out, ss_out) if add else ResidualSum(out, residual)


# ----------------------------------------------------------------------------------------------------------------
# Experts, grouped path: pairs sorted by expert, grouped GEMMs on tensor cores.
# ----------------------------------------------------------------------------------------------------------------

# Pair counts up to which the alignment runs as one single-program kernel (O(pairs x experts) work on one SM:
# H200 run 2, E=256: 4 us at 8 pairs, 43 us at 512, 396 us at 8192); past it the torch version (sort + a dozen
# small ops: 50-130 us of device time, but 0.3-0.6 ms of host time per call on the H200 VM) is used.
ALIGN_KERNEL_MAX_PAIRS: int = 2048


@triton.jit
def _align_kernel(
    ids_ptr, sorted_pairs_ptr, block_expert_ptr, num_pairs, num_experts, max_blocks,
    BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr, CHUNK: tl.constexpr, BLOCK_B: tl.constexpr,
):
    """One program: stable counting sort of (token, slot) pairs by expert, each expert's run padded to BLOCK_M."""
    e = tl.arange(0, BLOCK_E)
    c = tl.arange(0, CHUNK)
    # 1. Pairs per expert (one-hot sums: histogram without atomics).
    counts = tl.zeros([BLOCK_E], dtype=tl.int32)
    for p0 in range(0, num_pairs, CHUNK):
        ids = tl.load(ids_ptr + p0 + c, mask=p0 + c < num_pairs, other=-1)
        counts += tl.sum((ids[:, None] == e[None, :]).to(tl.int32), 0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    padded_end = tl.cumsum(padded, 0)
    padded_start = padded_end - padded
    total = tl.sum(padded, 0)
    # 2. Expert of each block (-1 past the end), and padding sentinels everywhere.
    for b0 in range(0, max_blocks, BLOCK_B):
        b = b0 + tl.arange(0, BLOCK_B)
        start = b * BLOCK_M
        owner = tl.sum((padded_end[None, :] <= start[:, None]).to(tl.int32), 1)
        owner = tl.where(start < total, owner, -1)
        tl.store(block_expert_ptr + b, owner, mask=b < max_blocks)
    for s0 in range(0, max_blocks * BLOCK_M, CHUNK):
        tl.store(sorted_pairs_ptr + s0 + c, tl.zeros([CHUNK], dtype=tl.int32) + num_pairs,
                 mask=s0 + c < max_blocks * BLOCK_M)
    tl.debug_barrier()   # the sentinel stores above must land before the scatter below overwrites some of them
    # 3. Scatter: destination = expert's padded start + pairs of that expert before this one (stable).
    running = tl.zeros([BLOCK_E], dtype=tl.int32)
    for p0 in range(0, num_pairs, CHUNK):
        ids = tl.load(ids_ptr + p0 + c, mask=p0 + c < num_pairs, other=-1)
        onehot = (ids[:, None] == e[None, :]).to(tl.int32)
        rank = tl.sum(onehot * (tl.cumsum(onehot, 0) - 1 + running[None, :] + padded_start[None, :]), 1)
        tl.store(sorted_pairs_ptr + rank, p0 + c, mask=p0 + c < num_pairs)
        running += tl.sum(onehot, 0)


def _align_torch(ids: torch.Tensor, num_experts: int, block_m: int, max_blocks: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    flat = ids.reshape(-1).to(torch.int64)
    P = flat.numel()
    dev = flat.device
    order = torch.argsort(flat, stable=True)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=dev)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = torch.cumsum(padded, 0)
    padded_start = padded_end - padded
    start = torch.cumsum(counts, 0) - counts
    sorted_e = flat[order]
    dest = padded_start[sorted_e] + torch.arange(P, device=dev) - start[sorted_e]
    sorted_pairs = torch.full((max_blocks * block_m,), P, dtype=torch.int32, device=dev)
    sorted_pairs[dest] = order.to(torch.int32)
    block_start = torch.arange(max_blocks, device=dev, dtype=torch.int64) * block_m
    block_expert = torch.searchsorted(padded_end, block_start, right=True)
    block_expert = torch.where(block_start < padded_end[-1], block_expert, -1).to(torch.int32)
    return sorted_pairs, block_expert


def align_pairs_by_expert(ids: torch.Tensor, num_experts: int, block_m: int, use_kernel: bool | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort (token, slot) pairs by expert (stably) and pad each expert's run to a multiple of ``block_m``.

    Returns ``sorted_pairs`` [max_blocks * block_m] (pair index ``token * k + slot``; ``T * k`` marks padding) and
    ``block_expert`` [max_blocks] (the expert of each block, -1 past the end). Sizes are upper bounds known on
    the host, so nothing is read back and the whole thing can be captured in a CUDA graph.
    """
    P = ids.numel()
    max_blocks = triton.cdiv(P, block_m) + min(num_experts, P)
    if use_kernel is None:
        use_kernel = P <= ALIGN_KERNEL_MAX_PAIRS
    if not use_kernel:
        return _align_torch(ids, num_experts, block_m, max_blocks)
    flat = ids.reshape(-1).to(torch.int32)
    sorted_pairs = torch.empty(max_blocks * block_m, dtype=torch.int32, device=ids.device)
    block_expert = torch.empty(max_blocks, dtype=torch.int32, device=ids.device)
    block_e = next_power_of_2(num_experts)
    _align_kernel[(1,)](
        flat, sorted_pairs, block_expert, P, num_experts, max_blocks,
        BLOCK_M=block_m, BLOCK_E=block_e, CHUNK=max(16, min(128, 8192 // block_e)), BLOCK_B=32, num_warps=8,
    )
    return sorted_pairs, block_expert


@triton.jit
def _grouped_gate_up_silu_kernel(
    x_ptr, w13_ptr, sorted_pairs_ptr, block_expert_ptr, act_ptr,
    num_pairs, H, I,
    stride_xt, stride_we, stride_wn, stride_at,
    TOP_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_F32: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(block_expert_ptr + pid_m)
    if e < 0:
        return
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pairs = tl.load(sorted_pairs_ptr + m)
    mmask = pairs < num_pairs
    tok = (pairs // TOP_K).to(tl.int64)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = n < I
    a_rows = x_ptr + tok[:, None] * stride_xt
    wg_cols = w13_ptr + e.to(tl.int64) * stride_we + n[None, :].to(tl.int64) * stride_wn
    wu_cols = wg_cols + I * stride_wn
    acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        kmask = k < H
        a = tl.load(a_rows + k[None, :], mask=mmask[:, None] & kmask[None, :], other=0.0)
        bmask = kmask[:, None] & nmask[None, :]
        bg = tl.load(wg_cols + k[:, None], mask=bmask, other=0.0)
        bu = tl.load(wu_cols + k[:, None], mask=bmask, other=0.0)
        if DOT_F32:
            a, bg, bu = a.to(tl.float32), bg.to(tl.float32), bu.to(tl.float32)
            acc_g = tl.dot(a, bg, acc_g, input_precision="ieee")
            acc_u = tl.dot(a, bu, acc_u, input_precision="ieee")
        else:
            acc_g = tl.dot(a, bg, acc_g)
            acc_u = tl.dot(a, bu, acc_u)
    act = acc_g * tl.sigmoid(acc_g) * acc_u
    out_ptrs = act_ptr + pairs[:, None].to(tl.int64) * stride_at + n[None, :]
    tl.store(out_ptrs, act.to(act_ptr.dtype.element_ty), mask=mmask[:, None] & nmask[None, :])


@triton.jit
def _grouped_down_weighted_kernel(
    act_ptr, w2_ptr, sorted_pairs_ptr, block_expert_ptr, wts_ptr, out_ptr,
    num_pairs, H, I,
    stride_at, stride_we, stride_wn, stride_op,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_F32: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(block_expert_ptr + pid_m)
    if e < 0:
        return
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pairs = tl.load(sorted_pairs_ptr + m)
    mmask = pairs < num_pairs
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = n < H
    a_rows = act_ptr + pairs[:, None].to(tl.int64) * stride_at
    w_cols = w2_ptr + e.to(tl.int64) * stride_we + n[None, :].to(tl.int64) * stride_wn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, I, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        kmask = k < I
        a = tl.load(a_rows + k[None, :], mask=mmask[:, None] & kmask[None, :], other=0.0)
        b = tl.load(w_cols + k[:, None], mask=kmask[:, None] & nmask[None, :], other=0.0)
        if DOT_F32:
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
    wt = tl.load(wts_ptr + pairs, mask=mmask, other=0.0).to(tl.float32)
    acc = acc * wt[:, None]
    out_ptrs = out_ptr + pairs[:, None].to(tl.int64) * stride_op + n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mmask[:, None] & nmask[None, :])


def _moe_grouped(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor,
                 ids: torch.Tensor) -> torch.Tensor:
    T, H = x.shape
    E, _, I = w2.shape
    k = ids.shape[1]
    P = T * k
    cfg = GROUPED_LARGE if P >= GROUPED_LARGE_MIN_ROWS_PER_EXPERT * E else GROUPED
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    sorted_pairs, block_expert = align_pairs_by_expert(ids, E, bm)
    nblocks = block_expert.numel()
    act = torch.empty(P, I, dtype=x.dtype, device=x.device)
    _grouped_gate_up_silu_kernel[(nblocks, triton.cdiv(I, bn))](
        x, w13, sorted_pairs, block_expert, act, P, H, I,
        x.stride(0), w13.stride(0), w13.stride(1), act.stride(0),
        TOP_K=k, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, DOT_F32=interpreting() or x.dtype == torch.float32,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    # Per-pair weighted outputs in fp32, then a fixed-order sum over the k slots: deterministic, no atomics.
    per_pair = torch.empty(P, H, dtype=torch.float32, device=x.device)
    _grouped_down_weighted_kernel[(nblocks, triton.cdiv(H, bn))](
        act, w2, sorted_pairs, block_expert, weights, per_pair, P, H, I,
        act.stride(0), w2.stride(0), w2.stride(1), per_pair.stride(0),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, DOT_F32=interpreting() or x.dtype == torch.float32,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return per_pair.view(T, k, H).sum(dim=1).to(x.dtype)


def moe_experts(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
) -> torch.Tensor:
    """sum_j weights[t, j] * W2[ids[t, j]] @ (silu(gate) * up)(W13[ids[t, j]] @ x[t]), -> [T, H] in x.dtype."""
    T, H = x.shape
    E, two_i, H_w = w13.shape
    if H_w != H or w2.shape[0] != E or w2.shape[1] != H or 2 * w2.shape[2] != two_i:
        raise ValueError(f"shape mismatch: x {tuple(x.shape)}, w13 {tuple(w13.shape)}, w2 {tuple(w2.shape)}")
    if T == 0:
        return x.new_empty(0, H)
    # Kernels assume unit stride along the reduction axis.
    x = x if x.stride(-1) == 1 else x.contiguous()
    w13 = w13 if w13.stride(-1) == 1 else w13.contiguous()
    w2 = w2 if w2.stride(-1) == 1 else w2.contiguous()
    ids = ids.to(torch.int32).contiguous()
    weights = weights.to(torch.float32).contiguous()
    return _moe_grouped(x, w13, w2, weights, ids)


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
    """Router + selection + routed experts + shared expert; see ``highspeed.ops.moe.fused_moe``."""
    norm = x if isinstance(x, DeferredNorm) else None
    T, H = unnormed(x).shape
    E = gate_weight.shape[0]
    meta = _routing_meta(E, top_k, scoring, renormalize, correction_bias, n_group, topk_group)
    if (shared_w13 is None) != (shared_w2 is None):
        raise ValueError("shared_w13 and shared_w2 come together")
    fused = 0 < T <= FUSED_MAX_TOKENS
    if norm is not None and not (fused and lin.whole_rows(H)
                                 and (foldable_norm(norm, norm.x) or self_normable(norm, norm.x)
                                      or ROUTER_ADD_NORM and addable_norm(norm, norm.x))):
        x, norm = materialize(norm), None     # its own norm launch, then the same MoE launches as without one
    if fused:
        xin = unnormed(x)
        xin = xin if xin.stride(-1) == 1 else xin.contiguous()
        w13 = w13 if w13.stride(-1) == 1 else w13.contiguous()
        w2 = w2 if w2.stride(-1) == 1 else w2.contiguous()
        return _fused_moe_decode(xin, gate_weight.contiguous(), w13, w2, meta, correction_bias, n_group,
                                 routed_scaling_factor, shared_w13, shared_w2, norm, residual)
    from highspeed.ops.moe import moe_block   # the separate ops, each dispatching to its kernel

    y = moe_block(materialize(x), gate_weight, w13, w2, top_k, scoring, renormalize, correction_bias, n_group,
                  topk_group, routed_scaling_factor, shared_w13, shared_w2)
    return y if residual is None else ResidualSum(y, residual)
