"""Compile the batch-1 decode kernels (MoE block, GEMVs, decode attention, MLA projections, the graph's greedy
tail) for a Hopper GPU (sm_90) on a machine without one, and report each kernel's registers and spills (from
``cuobjdump``, shipped with Triton).

The interpreter (CI) accepts code the GPU compiler rejects, and a register count decides how many programs are
resident -- both are worth knowing before spending device time. Each op is called with CPU tensors at a real
model shape while its kernels are replaced by recorders; the recorded launches are then compiled with
``triton.compile`` for ``GPUTarget("cuda", 90, 32)`` with PDL on. Honours the HIGHSPEED_TUNE_* overrides. Each
line also carries a hash of the kernel's SASS: run it at two commits to see whether a refactor changed the code
the card would run.

    python3 benchmarks/offline_compile.py [qwen3-30b-a3b|glm-4.7-flash ...]

Run it also with the GPU image's Triton (3.6: ``python3 -m venv --system-site-packages /tmp/t36 &&
/tmp/t36/bin/pip install triton==3.6.0``): newer Triton accepts code 3.6 rejects (run 18 lost a device call to
a defaulted constexpr parameter of a jit helper), and 3.6's register counts are the GPU's.
"""
from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the repository root

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

# name: (hidden, experts, intermediate, top_k, shared intermediate, q|k|v width, o_proj input width)
SHAPES = {"qwen3-30b-a3b": (2048, 128, 768, 8, 0, 5120, 4096), "glm-4.7-flash": (2048, 64, 1536, 4, 1536, 0, 5120)}
_TYPES = {torch.bfloat16: "bf16", torch.float32: "fp32", torch.int32: "i32", torch.int64: "i64", torch.float16: "fp16"}


class Recorder:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](*args, **kw)`` records the launch."""

    def __init__(self, kernel, launches: list):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        return lambda *args, **kw: self.launches.append((self.kernel, args, kw))


def _type(v) -> str:
    if isinstance(v, torch.Tensor):
        return "*" + _TYPES[v.dtype]
    if isinstance(v, bool):
        return "i1"
    if isinstance(v, int):
        return "i32" if abs(v) < 2**31 else "i64"
    if isinstance(v, float):
        return "fp32"
    raise TypeError(type(v))


def compile_launch(kernel, args: tuple, kw: dict) -> dict:
    """Compile one recorded launch for sm_90 as the JIT would specialise it (ints equal to 1 become constants,
    16-divisible pointers and ints get the divisibility hint); returns registers, spills, shared memory and a hash
    of the SASS (to check that a refactor left a kernel's machine code as it was)."""
    sig, consts, attrs = {}, {}, {}
    # Keyword arguments the kernel does not declare constexpr are runtime ones (pointers, ints), as in the JIT.
    runtime = {p.name for p in kernel.params if not p.is_constexpr}
    named = dict(zip(kernel.arg_names, args)) | {n: v for n, v in kw.items() if n in runtime}
    kw = {n: v for n, v in kw.items() if n not in runtime}
    for i, name in enumerate(kernel.arg_names):
        if name not in named:
            continue
        a = named[name]
        sig[name] = _type(a)
        if isinstance(a, int) and not isinstance(a, bool) and a == 1:
            sig[name], consts[name] = "constexpr", 1
        elif (isinstance(a, torch.Tensor) and a.data_ptr() % 16 == 0) or (
                isinstance(a, int) and not isinstance(a, bool) and a % 16 == 0):
            attrs[(i,)] = [["tt.divisibility", 16]]
    for name, v in kw.items():
        if name not in ("num_warps", "num_stages", "launch_pdl", "maxnreg"):
            sig[name], consts[name] = "constexpr", v
    if "PDL" in kernel.arg_names:
        consts["PDL"] = True
    opts = {"num_warps": kw.get("num_warps", 4)}
    for opt in ("num_stages", "maxnreg"):
        if kw.get(opt) is not None:
            opts[opt] = kw[opt]
    compiled = triton.compile(ASTSource(kernel, sig, consts, attrs), target=GPUTarget("cuda", 90, 32), options=opts)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        usage = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True).stdout
        sass = subprocess.run([tool, "-sass", path], capture_output=True, text=True).stdout
    field = lambda key: int(m.group(1)) if (m := re.search(rf"{key}:(\d+)", usage)) else None  # noqa: E731
    # The machine code without its addresses: equal hashes at two commits mean the card runs the same kernel.
    code = [re.sub(r"/\*[0-9a-f]{4}\*/", "", line).strip() for line in sass.splitlines()
            if re.search(r"/\*[0-9a-f]{4}\*/", line)]
    out = dict(kernel=kernel.__name__, regs=field("REG"), stack=field("STACK"), shared=field("SHARED"),
               num_warps=opts["num_warps"], sass=hashlib.sha1("\n".join(code).encode()).hexdigest()[:12])
    if "maxnreg" in opts:
        out["maxnreg"] = opts["maxnreg"]
    return out


def record_decode_layer(shape: str) -> list:
    """The MoE block (with and without the norm fold), the GEMVs and the RMSNorms of one batch-1 decode layer,
    recorded."""
    from highspeed.ops import norm as norm_ops
    from highspeed.ops.norm import DeferredNorm, ResidualSum
    from highspeed.ops.triton import linear as lin
    from highspeed.ops.triton import moe
    from highspeed.ops.triton import norm as norm_kernels

    H, E, I, k, S, qkv, o_in = SHAPES[shape]
    launches: list = []
    kernels = {mod: [n for n, v in vars(mod).items() if isinstance(v, triton.runtime.jit.JITFunction)]
               for mod in (lin, moe, norm_kernels)}
    saved = {(mod, n): getattr(mod, n) for mod, names in kernels.items() for n in names}
    for (mod, n), kern in saved.items():
        setattr(mod, n, Recorder(kern, launches))
    try:
        dt = torch.bfloat16
        x, r = torch.randn(1, H, dtype=dt), torch.randn(1, H, dtype=dt)
        nw = torch.ones(H, dtype=dt)
        w13, w2 = torch.empty(E, 2 * I, H, dtype=dt), torch.empty(E, H, I, dtype=dt)
        ws13 = torch.empty(2 * S, H, dtype=dt) if S else None
        ws2 = torch.empty(H, S, dtype=dt) if S else None
        gate = torch.randn(E, H)
        moe.fused_moe(x, gate, w13, w2, k, shared_w13=ws13, shared_w2=ws2)
        lin.linear(torch.randn(1, o_in, dtype=dt), torch.empty(H, o_in, dtype=dt))
        fold, norm_ops.FOLD_NORM = norm_ops.FOLD_NORM, True     # the norm-fold variants (HIGHSPEED_FOLD_NORM=1)
        try:
            folded = DeferredNorm(ResidualSum(x, None, torch.ones(1, 8)), nw, 1e-6)
            moe.fused_moe(folded, gate, w13, w2, k, shared_w13=ws13, shared_w2=ws2, residual=r)
            lin.linear(torch.randn(1, o_in, dtype=dt), torch.empty(H, o_in, dtype=dt), None, r)
        finally:
            norm_ops.FOLD_NORM = fold
        if qkv:
            lin.linear(x, torch.empty(qkv, H, dtype=dt))
            saved_add = lin.ADD_NORM   # HIGHSPEED_GEMV_ADD_NORM=1: the input norm's add and norm in the qkv GEMV
            lin.ADD_NORM = True
            try:
                lin.linear(DeferredNorm(x, nw, 1e-6, residual=r), torch.empty(qkv, H, dtype=dt))
            finally:
                lin.ADD_NORM = saved_add
        norm_kernels.add_rms_norm(x, r, nw, 1e-6)     # the residual norms, and a plain one (MLA's latent width)
        norm_kernels.rms_norm(torch.randn(1, 768, dtype=dt), torch.ones(768, dtype=dt), 1e-6)
        # The self-normalising variants: the GEMV (MLA's q_b_proj reading q_a_layernorm's input: 768 -> 20 x 256),
        # and with HIGHSPEED_FOLD_NORM=self the next layer's GEMV, the router and gate/up.
        saved_switch, saved_router = lin.SELF_NORM, moe.ROUTER_ADD_NORM
        lin.SELF_NORM = True
        try:
            lin.linear(DeferredNorm(torch.randn(1, 768, dtype=dt), torch.ones(768, dtype=dt), 1e-6),
                       torch.empty(5120, 768, dtype=dt))
            # HIGHSPEED_FOLD_NORM=self: the next GEMV, router and gate/up take the row's sum of squares themselves.
            lin.linear(DeferredNorm(ResidualSum(x, None, None), nw, 1e-6), torch.empty(H, H, dtype=dt))
            moe.fused_moe(DeferredNorm(ResidualSum(x, None, None), nw, 1e-6), gate, w13, w2, k, shared_w13=ws13,
                          shared_w2=ws2)
            moe.ROUTER_ADD_NORM = True   # the post-attention norm in the router (HIGHSPEED_ROUTER_ADD_NORM)
            moe.fused_moe(DeferredNorm(ResidualSum(x, r), nw, 1e-6), gate, w13, w2, k, shared_w13=ws13,
                          shared_w2=ws2)
        finally:
            lin.SELF_NORM = saved_switch
            moe.ROUTER_ADD_NORM = saved_router
    finally:
        for (mod, n), kern in saved.items():
            setattr(mod, n, kern)
    return launches


def record_attention() -> list:
    """Qwen3-30B-A3B's batch-1 decode attention (32 q / 4 kv heads x 128, QK-norm + RoPE from the raw
    projections) and a 512-wide MLA latent (GLM-4.7-Flash's), over a 200-key sequence in a graph sized for 384."""
    from highspeed.context import AttentionContext
    from highspeed.ops.rope import build_cos_sin_cache
    from highspeed.ops.triton import attention as att

    launches: list = []
    saved = att._paged_attn_kernel, att._combine_kernel, att._num_sms
    att._paged_attn_kernel = Recorder(saved[0], launches)
    att._combine_kernel = Recorder(saved[1], launches)
    att._num_sms = lambda device: 132   # an H200's SMs: the split plan of the real launch
    try:
        dt = torch.bfloat16
        ctx = AttentionContext(query_lens=[1], seq_lens=[200], query_start_loc=torch.tensor([0, 1], dtype=torch.int32),
                               seq_lens_t=torch.tensor([200], dtype=torch.int32),
                               slot_mapping=torch.zeros(1, dtype=torch.int64),
                               block_tables=torch.zeros(1, 24, dtype=torch.int32), block_size=16, max_query_len=1,
                               max_seq_len=384)
        cache = torch.zeros(30, 16, 4, 128, dtype=dt)
        q, k, v = torch.zeros(1, 40 * 128, dtype=dt).split([32 * 128, 4 * 128, 4 * 128], -1)
        att.rope_paged_attention(q.view(1, 32, 128), k.view(1, 4, 128), v.view(1, 4, 128),
                                 torch.zeros(1, dtype=torch.int64), build_cos_sin_cache(128, 1024, 1e6).float(), 128,
                                 False, cache, cache.clone(), ctx, 0.1, torch.ones(128, dtype=dt),
                                 torch.ones(128, dtype=dt), 1e-6)
        att.mla_attention(torch.zeros(1, 20, 576, dtype=dt), torch.zeros(30, 16, 576, dtype=dt), ctx, 0.1, 512)
    finally:
        att._paged_attn_kernel, att._combine_kernel, att._num_sms = saved
    return launches


def record_mla_projections() -> list:
    """GLM-4.7-Flash's batch-1 MLA projections: q_nope @ W_UK fused with the RoPE + latent-cache write (20 heads,
    192 + 64 query dims, a 512-wide latent), and the latent @ W_UV^T (256-wide values)."""
    from highspeed.ops.rope import build_cos_sin_cache
    from highspeed.ops.triton import mla_proj

    launches: list = []
    saved = mla_proj._absorb_rope_kernel, mla_proj._latent_to_v_kernel
    mla_proj._absorb_rope_kernel, mla_proj._latent_to_v_kernel = (Recorder(k, launches) for k in saved)
    try:
        dt, H, L, R = torch.bfloat16, 20, 512, 64
        cache = torch.zeros(30, 16, L + R, dtype=dt)
        q_abs = torch.zeros(1, H, L + R, dtype=dt)
        w_kv = torch.zeros(H, 192 + 256, L, dtype=dt)
        mla_proj.absorb_q_rope_write(
            torch.zeros(1, H, 192, dtype=dt), w_kv[:, :192], q_abs[..., :L], q=torch.zeros(1, H, R, dtype=dt),
            k=torch.zeros(1, R, dtype=dt), v=torch.zeros(1, L, dtype=dt), positions=torch.zeros(1, dtype=torch.int64),
            cos_sin=build_cos_sin_cache(R, 1024, 1e6).float(), rotary_dim=R, interleaved=False,
            k_cache=cache[..., L:], v_cache=cache[..., :L], slot_mapping=torch.zeros(1, dtype=torch.int64),
            v_norm_weight=torch.ones(L, dtype=dt), eps=1e-6, q_out=q_abs[..., L:])
        mla_proj.latent_to_v(torch.zeros(1, H, L, dtype=dt), w_kv[:, 192:], torch.zeros(1, H, 256, dtype=dt))
    finally:
        mla_proj._absorb_rope_kernel, mla_proj._latent_to_v_kernel = saved
    return launches


def record_graph_tail(vocab: int = 151936, hidden: int = 2048) -> list:
    """The decode graph's seam at batch 1: its tail (``greedy_advance``, with the host ring and without) and the
    embedding gather that starts the next step."""
    from highspeed.ops.triton import embedding, sampling

    launches: list = []
    saved = sampling._chunk_max_kernel, sampling._pick_kernel, embedding._embedding_kernel
    sampling._chunk_max_kernel, sampling._pick_kernel, embedding._embedding_kernel = (
        Recorder(k, launches) for k in saved)
    try:
        i64 = torch.int64
        for ring in (None, torch.zeros(4, 8, dtype=i64)):
            sampling.greedy_advance(torch.zeros(1, vocab, dtype=torch.bfloat16), torch.zeros(1, dtype=i64),
                                    torch.zeros(2, 1, dtype=i64), torch.ones(1, dtype=torch.int32), ring,
                                    None if ring is None else torch.zeros(1, dtype=i64))
        embedding.embedding(torch.zeros(1, dtype=i64), torch.empty(vocab, hidden, dtype=torch.bfloat16))
    finally:
        sampling._chunk_max_kernel, sampling._pick_kernel, embedding._embedding_kernel = saved
    return launches


def main(shapes: list[str]) -> None:
    for shape in shapes:
        seen = set()
        launches = record_decode_layer(shape) + (record_attention() + record_graph_tail()
                                                 if shape == "qwen3-30b-a3b" else record_mla_projections())
        for kernel, args, kw in launches:
            key = (kernel.__name__, tuple(sorted((n, str(v)) for n, v in kw.items())))
            if key in seen:
                continue
            seen.add(key)
            print(shape, compile_launch(kernel, args, kw))


if __name__ == "__main__":
    main(sys.argv[1:] or list(SHAPES))
