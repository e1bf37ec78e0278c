"""Rotary position embedding (NeoX half-split or interleaved GPT-J pairs, full or partial), and RoPE fused
with the KV-cache write.

``rope`` reads each row once and writes the rotated copy once (the torch reference makes about five passes:
gather, float, rotate, cat, cast). ``rope_and_write_kv`` rotates q and k, and stores the rotated k and v straight
into their cache slots in the same launch, so the new keys never make a separate trip through ``write_kv``.
MLA uses it too: its "k" is k_pe [T, 1, R] and its "v" the latent c [T, 1, L], with ``k_cache`` / ``v_cache``
views ``latent_cache[..., L:]`` / ``latent_cache[..., :L]`` of the one cache tensor.

The RMSNorms that precede RoPE fold into the same launch: Qwen3's per-head QK-norm (q and k rows, over the whole
head incl. a partial rotary's pass-through part) and MLA's ``kv_a_layernorm`` (the latent row, written only to the
cache). The normed values could stay fp32 in registers up to the rotation, but they are rounded to the model
dtype where transformers rounds them (after ``x * rstd`` and after the weight): it costs nothing in registers and
keeps the fused result equal to the unfused ops.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from highspeed.ops.triton import EARLY_CTX_ROPE, gdc_launch_dependents, gdc_wait, next_power_of_2, pdl


@triton.jit
def _norm_scale(x, rstd, w_ptr, idx, wmask, ROUND_TY: tl.constexpr, OUT_TY: tl.constexpr):
    """RMSNorm's last steps with transformers' rounding: ``(x * rstd)`` to the input dtype, times the weight,
    rounded to the output dtype; returned in fp32 (the value the unfused ops would hand to RoPE)."""
    w = tl.load(w_ptr + idx, mask=wmask, other=0.0).to(tl.float32)
    return ((x * rstd).to(ROUND_TY).to(tl.float32) * w[None, :]).to(OUT_TY).to(tl.float32)


@triton.jit
def _rotate_rows(src, dst, dst2, rmask, cos, sin, w_ptr, eps, D, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr,
                 BLOCK_PASS: tl.constexpr, INTERLEAVED: tl.constexpr, WRITE2: tl.constexpr, NORM: tl.constexpr):
    """Rotate head rows ``src[r, :2*HALF]`` and copy ``src[r, 2*HALF:D]`` into dst (and dst2 when WRITE2).

    src / dst / dst2 are [R, 1] pointer tensors (one row start per head), rmask [R, 1] the valid rows; all heads
    of a program share one position, so cos / sin ([BLOCK_HALF]) are loaded once. With NORM each row is first
    RMS-normalised over all D dims and scaled by ``w_ptr[:D]`` (the pass-through part is read twice: once for
    the statistics, once to write; the second read hits L1)."""
    i = tl.arange(0, BLOCK_HALF)
    m = rmask & (i < HALF)[None, :]
    if INTERLEAVED:
        i1 = 2 * i
        i2 = 2 * i + 1
    else:
        i1 = i
        i2 = i + HALF
    x1 = tl.load(src + i1[None, :], mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(src + i2[None, :], mask=m, other=0.0).to(tl.float32)
    if NORM:
        ss = tl.sum(x1 * x1, 1) + tl.sum(x2 * x2, 1)
        for p0 in range(2 * HALF, D, BLOCK_PASS):
            p = p0 + tl.arange(0, BLOCK_PASS)
            xp = tl.load(src + p[None, :], mask=rmask & (p < D)[None, :], other=0.0).to(tl.float32)
            ss += tl.sum(xp * xp, 1)
        rstd = (1.0 / tl.sqrt(ss / D + eps))[:, None]
        x1 = _norm_scale(x1, rstd, w_ptr, i1, i < HALF, src.dtype.element_ty, dst.dtype.element_ty)
        x2 = _norm_scale(x2, rstd, w_ptr, i2, i < HALF, src.dtype.element_ty, dst.dtype.element_ty)
    o1 = (x1 * cos[None, :] - x2 * sin[None, :]).to(dst.dtype.element_ty)
    o2 = (x2 * cos[None, :] + x1 * sin[None, :]).to(dst.dtype.element_ty)
    tl.store(dst + i1[None, :], o1, mask=m)
    tl.store(dst + i2[None, :], o2, mask=m)
    if WRITE2:
        # The cache gets exactly the returned (rounded) k.
        tl.store(dst2 + i1[None, :], o1.to(dst2.dtype.element_ty), mask=m)
        tl.store(dst2 + i2[None, :], o2.to(dst2.dtype.element_ty), mask=m)
    for p0 in range(2 * HALF, D, BLOCK_PASS):
        p = p0 + tl.arange(0, BLOCK_PASS)
        pm = rmask & (p < D)[None, :]
        if NORM:
            xp = tl.load(src + p[None, :], mask=pm, other=0.0).to(tl.float32)
            v = _norm_scale(xp, rstd, w_ptr, p, p < D, src.dtype.element_ty, dst.dtype.element_ty)
            v = v.to(dst.dtype.element_ty)
        else:
            v = tl.load(src + p[None, :], mask=pm).to(dst.dtype.element_ty)
        tl.store(dst + p[None, :], v, mask=pm)
        if WRITE2:
            tl.store(dst2 + p[None, :], v.to(dst2.dtype.element_ty), mask=pm)


@triton.jit
def _rope_lanes(d, HALF: tl.constexpr, INTERLEAVED: tl.constexpr):
    """Per lane ``d`` of a head row: its rotation partner, its cos/sin column, whether its sine term is negated,
    and whether it rotates at all (lanes past 2 * HALF pass through). Shared by ``_rope_tile`` and the decode
    attention kernel's RoPE (ops/triton/attention.py)."""
    rot = d < 2 * HALF
    if INTERLEAVED:
        pair = d ^ 1
        neg = (d % 2) == 0
        ci = d // 2
    else:
        pair = tl.where(d < HALF, d + HALF, d - HALF)
        neg = d < HALF
        ci = tl.where(d < HALF, d, d - HALF)
    return tl.where(rot, pair, d), ci, neg, rot


@triton.jit
def _rope_tile(rows, rmask, d, cs_row, w_ptr, eps, D, HALF: tl.constexpr, INTERLEAVED: tl.constexpr,
               NORM: tl.constexpr, OUT_TY: tl.constexpr):
    """Head rows ``rows`` ([R, 1] row-start pointers, or one scalar pointer) normalised (with NORM) and rotated,
    returned as a [R, len(d)] tile in OUT_TY: the values ``_rotate_rows`` would store, for a consumer that keeps
    them in registers (the decode attention kernel). Each element loads its rotation partner directly instead of
    splitting the row into halves, so the tile keeps the consumer's [rows, D] shape; ``cs_row`` is the
    position's row of the cos/sin table."""
    pair, ci, neg, rot = _rope_lanes(d, HALF, INTERLEAVED)
    dm = d < D
    m = rmask & dm[None, :]
    x = tl.load(rows + d[None, :], mask=m, other=0.0).to(tl.float32)
    xp = tl.load(rows + pair[None, :], mask=m, other=0.0).to(tl.float32)
    if NORM:
        rstd = (1.0 / tl.sqrt(tl.sum(x * x, 1) / D + eps))[:, None]
        x = _norm_scale(x, rstd, w_ptr, d, dm, rows.dtype.element_ty, OUT_TY)
        xp = _norm_scale(xp, rstd, w_ptr, pair, dm, rows.dtype.element_ty, OUT_TY)
    cos = tl.load(cs_row + ci, mask=rot, other=1.0).to(tl.float32)
    sin = tl.load(cs_row + HALF + ci, mask=rot, other=0.0).to(tl.float32)
    # x1*cos - x2*sin and x2*cos + x1*sin, as in _rotate_rows (negating a product is exact).
    return (x * cos[None, :] + xp * tl.where(neg, -sin, sin)[None, :]).to(OUT_TY)


@triton.jit
def _load_cos_sin(cs_ptr, pos_ptr, t, stride_cs, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr):
    pos = tl.load(pos_ptr + t).to(tl.int64)
    i = tl.arange(0, BLOCK_HALF)
    m = i < HALF
    cos = tl.load(cs_ptr + pos * stride_cs + i, mask=m, other=0.0).to(tl.float32)
    sin = tl.load(cs_ptr + pos * stride_cs + HALF + i, mask=m, other=0.0).to(tl.float32)
    return cos, sin


@triton.jit
def _rope_kernel(
    x_ptr, out_ptr, pos_ptr, cs_ptr,
    num_heads, D, stride_xt, stride_xh, stride_ot, stride_oh, stride_cs,
    HEADS: tl.constexpr, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_PASS: tl.constexpr,
    INTERLEAVED: tl.constexpr, PDL: tl.constexpr,
):
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
    t = tl.program_id(0).to(tl.int64)
    h = (tl.program_id(1) * HEADS + tl.arange(0, HEADS))[:, None]
    cos, sin = _load_cos_sin(cs_ptr, pos_ptr, t, stride_cs, HALF, BLOCK_HALF)
    dst = out_ptr + t * stride_ot + h * stride_oh
    _rotate_rows(x_ptr + t * stride_xt + h * stride_xh, dst, dst, h < num_heads,
                 cos, sin, x_ptr, 0.0, D, HALF, BLOCK_HALF, BLOCK_PASS, INTERLEAVED, False, False)


def _heads_per_prog(num_heads: int, width: int) -> int:
    """Enough heads per program for ~1-2K elements: one position's cos/sin serve them all."""
    return max(1, min(next_power_of_2(num_heads), next_power_of_2(max(1, 2048 // max(width, 1)))))


def rope(x: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor, rotary_dim: int,
         interleaved: bool) -> torch.Tensor:
    """Rotate ``x[..., :rotary_dim]`` of ``x[T, ..., D]`` by ``cos_sin[positions]``; a new tensor in x's dtype."""
    T, D = x.shape[0], x.shape[-1]
    if rotary_dim % 2 or rotary_dim > D:
        raise ValueError(f"rotary_dim {rotary_dim} must be even and <= head size {D}")
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.numel() == 0:
        return out
    x3 = x.reshape(T, -1, D)
    if x3.stride(-1) != 1:
        x3 = x3.contiguous()
    o3 = out.view(T, -1, D)
    H = x3.shape[1]
    half = rotary_dim // 2
    heads = _heads_per_prog(H, D)
    _rope_kernel[(T, triton.cdiv(H, heads))](
        x3, o3, positions, cos_sin, H, D,
        x3.stride(0), x3.stride(1), o3.stride(0), o3.stride(1), cos_sin.stride(0),
        HEADS=heads, HALF=half, BLOCK_HALF=next_power_of_2(max(half, 1)),
        BLOCK_PASS=max(16, min(256, next_power_of_2(max(D - rotary_dim, 1)))), INTERLEAVED=bool(interleaved),
        num_warps=4 if heads * D >= 1024 else 1, **pdl(x3),
    )
    return out


@triton.jit
def _rope_write_kernel(
    q_ptr, k_ptr, v_ptr, q_out_ptr, k_out_ptr, k_cache_ptr, v_cache_ptr, pos_ptr, cs_ptr, slot_ptr,
    qw_ptr, kw_ptr, vw_ptr, eps,
    num_q_heads, num_k_heads, num_q_blocks, Dq, Dk, Dv,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_qot, stride_qoh, stride_kot, stride_koh,
    stride_kcs, stride_kch, stride_vcs, stride_vch, stride_cs,
    HEADS: tl.constexpr, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_PASS: tl.constexpr,
    BLOCK_V: tl.constexpr, INTERLEAVED: tl.constexpr,
    Q_NORM: tl.constexpr, K_NORM: tl.constexpr, V_NORM: tl.constexpr, EARLY_CTX: tl.constexpr, PDL: tl.constexpr,
):
    if PDL:
        gdc_launch_dependents()
    t = tl.program_id(0).to(tl.int64)
    if EARLY_CTX:   # before the wait: see highspeed.ops.triton.EARLY_CTX_ROPE
        cos, sin, slot = rope_context(cs_ptr, pos_ptr, slot_ptr, t, stride_cs, HALF, BLOCK_HALF)
    if PDL:
        gdc_wait()
    if not EARLY_CTX:
        cos, sin, slot = rope_context(cs_ptr, pos_ptr, slot_ptr, t, stride_cs, HALF, BLOCK_HALF)
    rope_write_program(
        t, tl.program_id(1), cos, sin, slot,
        q_ptr, k_ptr, v_ptr, q_out_ptr, k_out_ptr, k_cache_ptr, v_cache_ptr, pos_ptr, cs_ptr, slot_ptr,
        qw_ptr, kw_ptr, vw_ptr, eps, num_q_heads, num_k_heads, num_q_blocks, Dq, Dk, Dv,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_qot, stride_qoh, stride_kot,
        stride_koh, stride_kcs, stride_kch, stride_vcs, stride_vch, stride_cs,
        HEADS, HALF, BLOCK_HALF, BLOCK_PASS, BLOCK_V, INTERLEAVED, Q_NORM, K_NORM, V_NORM)


@triton.jit
def rope_context(cs_ptr, pos_ptr, slot_ptr, t, stride_cs, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """Token t's cos/sin and cache slot: the step's context, which rope_write_program takes as arguments so that a
    kernel may load it before its PDL wait."""
    cos, sin = _load_cos_sin(cs_ptr, pos_ptr, t, stride_cs, HALF, BLOCK_HALF)
    return cos, sin, tl.load(slot_ptr + t).to(tl.int64)


@triton.jit
def rope_write_program(
    t, hb, cos, sin, slot,
    q_ptr, k_ptr, v_ptr, q_out_ptr, k_out_ptr, k_cache_ptr, v_cache_ptr, pos_ptr, cs_ptr, slot_ptr,
    qw_ptr, kw_ptr, vw_ptr, eps,
    num_q_heads, num_k_heads, num_q_blocks, Dq, Dk, Dv,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_qot, stride_qoh, stride_kot, stride_koh,
    stride_kcs, stride_kch, stride_vcs, stride_vch, stride_cs,
    HEADS: tl.constexpr, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_PASS: tl.constexpr,
    BLOCK_V: tl.constexpr, INTERLEAVED: tl.constexpr,
    Q_NORM: tl.constexpr, K_NORM: tl.constexpr, V_NORM: tl.constexpr,
):
    """Token t's head block hb (q blocks first, then k blocks) of ``rope_and_write_kv``, after the PDL wait; also
    the rope programs of mla_proj's fused ``absorb_q_rope_write`` launch. ``cos, sin, slot``: ``rope_context``."""
    if hb < num_q_blocks:
        h = (hb * HEADS + tl.arange(0, HEADS))[:, None]
        dst = q_out_ptr + t * stride_qot + h * stride_qoh
        _rotate_rows(q_ptr + t * stride_qt + h * stride_qh, dst, dst, h < num_q_heads,
                     cos, sin, qw_ptr, eps, Dq, HALF, BLOCK_HALF, BLOCK_PASS, INTERLEAVED, False, Q_NORM)
    else:
        h = ((hb - num_q_blocks) * HEADS + tl.arange(0, HEADS))[:, None]
        hmask = h < num_k_heads
        dst = k_out_ptr + t * stride_kot + h * stride_koh
        if slot >= 0:
            _rotate_rows(k_ptr + t * stride_kt + h * stride_kh, dst, k_cache_ptr + slot * stride_kcs + h * stride_kch,
                         hmask, cos, sin, kw_ptr, eps, Dk, HALF, BLOCK_HALF, BLOCK_PASS, INTERLEAVED, True, K_NORM)
            if V_NORM:
                # MLA's kv_a_layernorm: the whole latent row is one block (BLOCK_V >= Dv), normed in registers.
                d = tl.arange(0, BLOCK_V)
                dm = hmask & (d < Dv)[None, :]
                v = tl.load(v_ptr + t * stride_vt + h * stride_vh + d[None, :], mask=dm, other=0.0).to(tl.float32)
                rstd = (1.0 / tl.sqrt(tl.sum(v * v, 1) / Dv + eps))[:, None]
                v = _norm_scale(v, rstd, vw_ptr, d, d < Dv, v_ptr.dtype.element_ty, v_ptr.dtype.element_ty)
                tl.store(v_cache_ptr + slot * stride_vcs + h * stride_vch + d[None, :],
                         v.to(v_cache_ptr.dtype.element_ty), mask=dm)
            else:
                for d0 in range(0, Dv, BLOCK_V):
                    d = (d0 + tl.arange(0, BLOCK_V))[None, :]
                    dm = hmask & (d < Dv)
                    v = tl.load(v_ptr + t * stride_vt + h * stride_vh + d, mask=dm)
                    tl.store(v_cache_ptr + slot * stride_vcs + h * stride_vch + d,
                             v.to(v_cache_ptr.dtype.element_ty), mask=dm)
        else:   # padded token: rotate k for the caller, write nothing
            _rotate_rows(k_ptr + t * stride_kt + h * stride_kh, dst, dst, hmask,
                         cos, sin, kw_ptr, eps, Dk, HALF, BLOCK_HALF, BLOCK_PASS, INTERLEAVED, False, K_NORM)


def _cache_rows(cache: torch.Tensor, heads: int, width: int) -> torch.Tensor:
    """View a paged cache (or a last-dim slice of one) as [num_slots, heads, width] without copying."""
    rows = cache.view(cache.shape[0] * cache.shape[1], heads, width)
    if rows.stride(-1) != 1:
        raise ValueError("cache rows must be contiguous in their last dimension")
    return rows


def _norm_weight(w: torch.Tensor | None, width: int, name: str) -> torch.Tensor | None:
    if w is not None and (w.dim() != 1 or w.shape[0] != width or w.stride(0) != 1):
        raise ValueError(f"{name} must be a contiguous [{width}] vector, got {tuple(w.shape)}")
    return w


def rope_and_write_kv(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor,
    rotary_dim: int, interleaved: bool, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
    q_norm_weight: torch.Tensor | None = None, k_norm_weight: torch.Tensor | None = None,
    v_norm_weight: torch.Tensor | None = None, eps: float = 1e-6, q_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``q' = rope(norm_q(q)); k' = rope(norm_k(k)); write_kv(k_cache, slots, k'); write_kv(v_cache, slots,
    norm_v(v))``; returns (q', k'). Each norm is an optional per-row RMSNorm over the last dim (QK-norm, MLA's
    latent norm); it rounds like transformers' RMSNorm (to the input dtype before and after the weight), so the
    fused op equals the unfused ops up to fp32 summation order.

    q [T, Hq, Dq], k [T, Hk, Dk], v [T, Hk, Dv] (2-D [T, D] means one head); caches [num_blocks, block_size,
    (Hk,) D], possibly last-dim slices of one tensor (MLA). Slots < 0 are skipped. ``q_out`` (q's shape, may be
    a strided view with unit last stride) receives q' instead of a new tensor.
    """
    grid, args, consts, q_out, k_out = rope_write_launch(
        q, k, v, positions, cos_sin, rotary_dim, interleaved, k_cache, v_cache, slot_mapping, q_norm_weight,
        k_norm_weight, v_norm_weight, eps, q_out)
    if grid[0] > 0:
        _rope_write_kernel[grid](*args, **consts, **pdl(args[0]))
    return q_out, k_out


def rope_write_launch(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor,
    rotary_dim: int, interleaved: bool, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
    q_norm_weight: torch.Tensor | None = None, k_norm_weight: torch.Tensor | None = None,
    v_norm_weight: torch.Tensor | None = None, eps: float = 1e-6, q_out: torch.Tensor | None = None,
) -> tuple[tuple[int, int], tuple, dict, torch.Tensor, torch.Tensor]:
    """``rope_and_write_kv``'s launch, not made: (grid (T, head blocks), the kernel's runtime arguments, its
    constexprs and num_warps, q_out, k_out). Shared with mla_proj's fused launch."""
    T = q.shape[0]
    q3 = q.reshape(T, -1, q.shape[-1])
    k3 = k.reshape(T, -1, k.shape[-1])
    v3 = v.reshape(T, -1, v.shape[-1])
    Hq, Hk = q3.shape[1], k3.shape[1]
    if v3.shape[1] != Hk:
        raise ValueError(f"k has {Hk} heads but v has {v3.shape[1]}")
    if q_out is None:
        q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    elif q_out.shape != q.shape or q_out.dtype != q.dtype or q_out.stride(-1) != 1:
        raise ValueError(f"q_out must match q {tuple(q.shape)} {q.dtype} with unit last stride")
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if T == 0:
        return (0, 0), (), {}, q_out, k_out
    q3 = q3 if q3.stride(-1) == 1 else q3.contiguous()
    k3 = k3 if k3.stride(-1) == 1 else k3.contiguous()
    v3 = v3 if v3.stride(-1) == 1 else v3.contiguous()
    qo, ko = q_out.view(T, Hq, -1), k_out.view(T, Hk, -1)
    kc = _cache_rows(k_cache, Hk, k3.shape[2])
    vc = _cache_rows(v_cache, Hk, v3.shape[2])
    half = rotary_dim // 2
    Dk, Dv = k3.shape[2], v3.shape[2]
    qw = _norm_weight(q_norm_weight, q3.shape[2], "q_norm_weight")
    kw = _norm_weight(k_norm_weight, Dk, "k_norm_weight")
    vw = _norm_weight(v_norm_weight, Dv, "v_norm_weight")
    heads = _heads_per_prog(max(Hq, Hk), max(q3.shape[2], Dk, Dv))
    nqb = triton.cdiv(Hq, heads)
    args = (q3, k3, v3, qo, ko, kc, vc, positions, cos_sin, slot_mapping,
            q3 if qw is None else qw, q3 if kw is None else kw, q3 if vw is None else vw, float(eps),
            Hq, Hk, nqb, q3.shape[2], Dk, Dv,
            q3.stride(0), q3.stride(1), k3.stride(0), k3.stride(1), v3.stride(0), v3.stride(1),
            qo.stride(0), qo.stride(1), ko.stride(0), ko.stride(1),
            kc.stride(0), kc.stride(1), vc.stride(0), vc.stride(1), cos_sin.stride(0))
    consts = dict(
        HEADS=heads, HALF=half, BLOCK_HALF=next_power_of_2(max(half, 1)),
        BLOCK_PASS=max(16, min(256, next_power_of_2(max(max(q3.shape[2], Dk) - rotary_dim, 1)))),
        # A normed v row must fit one block (its statistics need the whole row): MLA's 512-wide latent does.
        BLOCK_V=max(16, next_power_of_2(Dv) if vw is not None else min(1024, next_power_of_2(Dv))),
        INTERLEAVED=bool(interleaved), Q_NORM=qw is not None, K_NORM=kw is not None, V_NORM=vw is not None,
        EARLY_CTX=EARLY_CTX_ROPE, num_warps=4 if heads * max(q3.shape[2], Dv) >= 1024 else 1,
    )
    return (T, nqb + triton.cdiv(Hk, heads)), args, consts, q_out, k_out


def rope_and_write_kv_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor,
    rotary_dim: int, interleaved: bool, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
    q_norm_weight: torch.Tensor | None = None, k_norm_weight: torch.Tensor | None = None,
    v_norm_weight: torch.Tensor | None = None, eps: float = 1e-6, q_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference of ``rope_and_write_kv``: the unfused ops (run with HIGHSPEED_DISABLE_TRITON=1 on CUDA)."""
    from highspeed.ops.norm import rms_norm as ref_rms_norm
    from highspeed.ops.rope import rope as ref_rope

    if q_norm_weight is not None:
        q = ref_rms_norm(q, q_norm_weight, eps)
    if k_norm_weight is not None:
        k = ref_rms_norm(k, k_norm_weight, eps)
    if v_norm_weight is not None:
        v = ref_rms_norm(v, v_norm_weight, eps)
    q_rot = ref_rope(q, positions, cos_sin, rotary_dim, interleaved)
    if q_out is not None:
        q_rot = q_out.copy_(q_rot)
    k_out = ref_rope(k, positions, cos_sin, rotary_dim, interleaved)
    T = q.shape[0]
    k3, v3 = k_out.reshape(T, -1, k.shape[-1]), v.reshape(T, -1, v.shape[-1])
    kc = _cache_rows(k_cache, k3.shape[1], k3.shape[2])
    vc = _cache_rows(v_cache, v3.shape[1], v3.shape[2])
    keep = slot_mapping >= 0
    kc[slot_mapping[keep].long()] = k3[keep].to(kc.dtype)
    vc[slot_mapping[keep].long()] = v3[keep].to(vc.dtype)
    return q_rot, k_out
