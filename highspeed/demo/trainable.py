"""A differentiable GLM-5 (``GlmMoeDsaForCausalLM`` + one MTP layer) for training the demo model.

Why a training copy of the architecture instead of transformers' or highspeed's inference classes: training needs
what inference code hides or cannot give. The DSA indexer must be trained (transformers runs it under
``no_grad``) against the main attention's head-summed distribution (which no fused attention returns), the MTP
layer is absent from transformers, and the MoE must train on all experts' weights at once. The forward math follows
transformers 5.24's ``modeling_glm_moe_dsa.py`` term by term (RMSNorm casts, interleaved RoPE, indexer score
formula, sigmoid ``noaux_tc`` routing), and ``tests/demo`` checks the exported checkpoint against transformers.

Parameter names equal the checkpoint's (``export_state_dict`` only splits the fused experts per expert and moves
the MTP layer to ``model.layers.{num_hidden_layers}``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class DemoConfig:
    vocab_size: int = 5120
    hidden_size: int = 256
    num_hidden_layers: int = 4
    first_k_dense_replace: int = 1
    intermediate_size: int = 640          # dense MLP of the first layer(s)
    moe_intermediate_size: int = 64
    n_routed_experts: int = 16
    num_experts_per_tok: int = 4
    n_shared_experts: int = 1
    routed_scaling_factor: float = 2.5
    num_attention_heads: int = 8
    q_lora_rank: int = 128
    kv_lora_rank: int = 64
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 16
    v_head_dim: int = 32
    index_n_heads: int = 4
    index_head_dim: int = 32
    index_topk: int = 64
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    eos_token_id: list[int] = field(default_factory=lambda: [0])
    pad_token_id: int = 0

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def to_hf_config(self) -> dict:
        """config.json for ``GlmMoeDsaForCausalLM`` (transformers' field names and GLM-5's extra fields)."""
        return {
            "architectures": ["GlmMoeDsaForCausalLM"],
            "model_type": "glm_moe_dsa",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "moe_intermediate_size": self.moe_intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "first_k_dense_replace": self.first_k_dense_replace,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_attention_heads,
            "n_shared_experts": self.n_shared_experts,
            "n_routed_experts": self.n_routed_experts,
            "num_experts_per_tok": self.num_experts_per_tok,
            "routed_scaling_factor": self.routed_scaling_factor,
            "n_group": 1,
            "topk_group": 1,
            "topk_method": "noaux_tc",
            "scoring_func": "sigmoid",
            "norm_topk_prob": True,
            "kv_lora_rank": self.kv_lora_rank,
            "q_lora_rank": self.q_lora_rank,
            "qk_nope_head_dim": self.qk_nope_head_dim,
            "qk_rope_head_dim": self.qk_rope_head_dim,
            "v_head_dim": self.v_head_dim,
            "index_topk": self.index_topk,
            "index_n_heads": self.index_n_heads,
            "index_head_dim": self.index_head_dim,
            "rope_interleave": True,
            "indexer_rope_interleave": True,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "hidden_act": "silu",
            "attention_bias": False,
            "attention_dropout": 0.0,
            "tie_word_embeddings": False,
            "num_nextn_predict_layers": 1,
            "initializer_range": self.initializer_range,
            "bos_token_id": None,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "use_cache": True,
            "dtype": "bfloat16",
        }


class RMSNorm(nn.Module):
    """transformers' GlmMoeDsaRMSNorm: normalise in fp32, cast back, then scale."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def rope_cos_sin(positions: torch.Tensor, dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin per rotated pair, [S, dim/2], fp32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float, device=positions.device) / dim))
    freqs = positions.float()[:, None] * inv_freq[None, :]
    return freqs.cos(), freqs.sin()


def apply_rope_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """GPT-J pairs (2i, 2i+1), output de-interleaved as transformers writes it ([evens' | odds'])."""
    cos = cos.to(x.dtype)
    sin = sin.to(x.dtype)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def _bcast(t: torch.Tensor, x: torch.Tensor, head_dim_axis: bool) -> torch.Tensor:
    # cos/sin [S, R/2] -> broadcast against [B, S, (heads,) R/2]
    return t[None, :, None, :] if head_dim_axis else t[None, :, :]


@dataclass
class AttnAux:
    """What one attention layer reports for the indexer's KL loss."""
    kl: torch.Tensor
    selected_frac: torch.Tensor


class Indexer(nn.Module):
    def __init__(self, c: DemoConfig):
        super().__init__()
        self.c = c
        self.wq_b = nn.Linear(c.q_lora_rank, c.index_n_heads * c.index_head_dim, bias=False)
        self.wk = nn.Linear(c.hidden_size, c.index_head_dim, bias=False)
        self.k_norm = nn.LayerNorm(c.index_head_dim, eps=1e-6)
        self.weights_proj = nn.Linear(c.hidden_size, c.index_n_heads, bias=False)

    def forward(self, x: torch.Tensor, q_resid: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Index scores I[b, s, t] (fp32, before masking), as transformers computes them."""
        c = self.c
        B, S, _ = x.shape
        R = c.qk_rope_head_dim
        q = self.wq_b(q_resid).view(B, S, c.index_n_heads, c.index_head_dim)
        q = torch.cat([apply_rope_interleaved(q[..., :R], _bcast(cos, q, True), _bcast(sin, q, True)), q[..., R:]], -1)
        k = self.k_norm(self.wk(x))
        k = torch.cat([apply_rope_interleaved(k[..., :R], _bcast(cos, k, False), _bcast(sin, k, False)), k[..., R:]], -1)
        # Scores in fp32 even under autocast: the top-k selection is what they are for, and bf16 rounding would
        # create ties that fp32 inference does not have.
        with torch.autocast(x.device.type, enabled=False):
            scores = F.relu(torch.einsum("bshd,btd->bsht", q.float(), k.float()) * c.index_head_dim ** -0.5)
            weights = F.linear(x.float(), self.weights_proj.weight.float()) * c.index_n_heads ** -0.5
            return torch.einsum("bsh,bsht->bst", weights, scores)


class Attention(nn.Module):
    """MLA with the DSA indexer (transformers' GlmMoeDsaAttention in its eager form)."""

    def __init__(self, c: DemoConfig):
        super().__init__()
        self.c = c
        H = c.num_attention_heads
        self.q_a_proj = nn.Linear(c.hidden_size, c.q_lora_rank, bias=False)
        self.q_a_layernorm = RMSNorm(c.q_lora_rank, 1e-6)
        self.q_b_proj = nn.Linear(c.q_lora_rank, H * c.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(c.hidden_size, c.kv_lora_rank + c.qk_rope_head_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(c.kv_lora_rank, 1e-6)
        self.kv_b_proj = nn.Linear(c.kv_lora_rank, H * (c.qk_nope_head_dim + c.v_head_dim), bias=False)
        self.o_proj = nn.Linear(H * c.v_head_dim, c.hidden_size, bias=False)
        self.indexer = Indexer(c)
        self.scaling = c.qk_head_dim ** -0.5
        # Set to a dict to capture the head-mean attention and the index scores of the next forward (evaluation).
        self.record: dict[str, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sparse: bool,
                want_kl: bool) -> tuple[torch.Tensor, AttnAux | None]:
        c = self.c
        B, S, _ = x.shape
        H = c.num_attention_heads
        q_resid = self.q_a_layernorm(self.q_a_proj(x))
        q = self.q_b_proj(q_resid).view(B, S, H, c.qk_head_dim)
        q_pass, q_rot = q.split([c.qk_nope_head_dim, c.qk_rope_head_dim], dim=-1)
        kv_pass, k_rot = self.kv_a_proj_with_mqa(x).split([c.kv_lora_rank, c.qk_rope_head_dim], dim=-1)
        k_pass = self.kv_a_layernorm(kv_pass)
        q_rot = apply_rope_interleaved(q_rot, _bcast(cos, q_rot, True), _bcast(sin, q_rot, True))
        k_rot = apply_rope_interleaved(k_rot, _bcast(cos, k_rot, False), _bcast(sin, k_rot, False))
        k_nope, v = self.kv_b_proj(k_pass).view(B, S, H, c.qk_nope_head_dim + c.v_head_dim).split(
            [c.qk_nope_head_dim, c.v_head_dim], dim=-1)
        query = torch.cat([q_pass, q_rot], dim=-1)
        key = torch.cat([k_nope, k_rot[:, :, None, :].expand(B, S, H, c.qk_rope_head_dim)], dim=-1)

        causal = torch.ones(S, S, dtype=torch.bool, device=x.device).tril()
        # The indexer trains only through its KL loss (DeepSeek-V3.2 detaches its input); the top-k it picks
        # is a hard selection, so the language-model loss could not reach it anyway.
        index_scores = self.indexer(x.detach(), q_resid.detach(), cos, sin)
        masked_index = index_scores.masked_fill(~causal, float("-inf"))
        if sparse and S > c.index_topk:
            top = masked_index.detach().topk(c.index_topk, dim=-1).indices
            allowed = torch.zeros(B, S, S, dtype=torch.bool, device=x.device).scatter_(-1, top, True) & causal
        else:
            allowed = causal.expand(B, S, S)

        scores = torch.einsum("bshd,bthd->bhst", query, key).float() * self.scaling
        scores = scores.masked_fill(~allowed[:, None], float("-inf"))
        probs = scores.softmax(dim=-1)
        out = torch.einsum("bhst,bthd->bshd", probs.to(v.dtype), v).reshape(B, S, H * c.v_head_dim)
        out = self.o_proj(out)
        if self.record is not None:
            self.record["attention"] = probs.detach().mean(1)
            self.record["index_scores"] = masked_index.detach()

        aux = None
        if want_kl:
            # Target: the main attention's distribution summed over heads and L1-normalised, over the tokens the
            # attention saw (all causal ones while dense, the selected ones while sparse), as DeepSeek-V3.2 does.
            target = (probs.detach().sum(1) / H)
            logq = masked_index.masked_fill(~allowed, float("-inf")).log_softmax(dim=-1)
            kl = (torch.xlogy(target, target) - target * logq.masked_fill(~allowed, 0.0)).sum(-1).mean()
            aux = AttnAux(kl=kl, selected_frac=allowed.float().sum(-1).mean() / causal.float().sum(-1).mean())
        return out, aux


class MLP(nn.Module):
    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    """Sigmoid scores; the correction bias steers selection only (aux-loss-free balancing, updated outside autograd)."""

    def __init__(self, c: DemoConfig):
        super().__init__()
        self.c = c
        self.weight = nn.Parameter(torch.zeros(c.n_routed_experts, c.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(c.n_routed_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Routing math stays fp32 even under bf16 autocast, as in transformers and GLM-5's reference.
        with torch.autocast(x.device.type, enabled=False):
            return self._route(x.float())

    def _route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = F.linear(x, self.weight.float()).sigmoid()
        ids = (scores.detach() + self.e_score_correction_bias).topk(self.c.num_experts_per_tok, dim=-1).indices
        w = scores.gather(1, ids)
        w = w / (w.sum(-1, keepdim=True) + 1e-20) * self.c.routed_scaling_factor
        return w, ids


class MoE(nn.Module):
    def __init__(self, c: DemoConfig):
        super().__init__()
        self.c = c
        E, I, Hd = c.n_routed_experts, c.moe_intermediate_size, c.hidden_size
        self.gate = Router(c)
        # transformers 5.x's fused layout: gate rows then up rows; exported per expert.
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * I, Hd))
        self.down_proj = nn.Parameter(torch.empty(E, Hd, I))
        self.shared_experts = MLP(Hd, I * c.n_shared_experts)
        self.last_load: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.c
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        N, E, I = flat.shape[0], c.n_routed_experts, c.moe_intermediate_size
        w, ids = self.gate(flat)
        combine = torch.zeros(N, E, device=x.device, dtype=torch.float32).scatter(1, ids, w)
        self.last_load = torch.bincount(ids.flatten(), minlength=E).detach()
        # All experts run on every token and the unselected ones are multiplied by zero: at this size one wide
        # matmul beats gathering tokens per expert, and zero weights give unselected experts zero gradient.
        h = flat @ self.gate_up_proj.reshape(E * 2 * I, -1).t()
        h = h.view(N, E, 2 * I)
        a = F.silu(h[..., :I]) * h[..., I:]
        a = a * combine.to(a.dtype)[..., None]
        routed = a.reshape(N, E * I) @ self.down_proj.permute(0, 2, 1).reshape(E * I, -1)
        return (routed.to(x.dtype) + self.shared_experts(flat)).view(shape)


class DecoderLayer(nn.Module):
    def __init__(self, c: DemoConfig, dense: bool):
        super().__init__()
        self.self_attn = Attention(c)
        self.mlp = MLP(c.hidden_size, c.intermediate_size) if dense else MoE(c)
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)

    def forward(self, x, cos, sin, sparse: bool, want_kl: bool, dropout: float):
        a, aux = self.self_attn(self.input_layernorm(x), cos, sin, sparse, want_kl)
        x = x + F.dropout(a, dropout, self.training)
        x = x + F.dropout(self.mlp(self.post_attention_layernorm(x)), dropout, self.training)
        return x, aux


class MTPLayer(nn.Module):
    """GLM-5's MTP layer: model.layers.{L}.{enorm, hnorm, eh_proj, shared_head.norm} + a full decoder block."""

    def __init__(self, c: DemoConfig):
        super().__init__()
        self.enorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.hnorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * c.hidden_size, c.hidden_size, bias=False)
        self.block = DecoderLayer(c, dense=False)
        self.shared_head_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)


class Inner(nn.Module):
    def __init__(self, c: DemoConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(
            [DecoderLayer(c, dense=i < c.first_k_dense_replace) for i in range(c.num_hidden_layers)])
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)


@dataclass
class ForwardOut:
    hidden: torch.Tensor            # [B, S, H] after the final norm
    kl: torch.Tensor                # indexer KL, summed over layers (0 when not asked)
    selected_frac: float            # mean fraction of causal tokens the attention saw (1.0 = dense)


class DemoGlm5(nn.Module):
    def __init__(self, c: DemoConfig):
        super().__init__()
        self.c = c
        self.model = Inner(c)
        self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        self.mtp = MTPLayer(c)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.c.initializer_range
        # Residual-branch outputs start smaller so the deep sum stays at unit scale (GPT-2's scaled init).
        out_std = std / math.sqrt(2 * (self.c.num_hidden_layers + 1))
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                nn.init.normal_(p, 0.0, out_std if name.endswith(("o_proj.weight", "down_proj.weight", "down_proj"))
                                else std)
        for m in self.modules():
            if isinstance(m, (RMSNorm,)):
                nn.init.ones_(m.weight)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, Router):
                m.e_score_correction_bias.zero_()

    def moe_layers(self) -> list[MoE]:
        return [m for m in self.modules() if isinstance(m, MoE)]

    def forward(self, ids: torch.Tensor, sparse: bool = True, want_kl: bool = False,
                dropout: float = 0.0) -> ForwardOut:
        B, S = ids.shape
        cos, sin = rope_cos_sin(torch.arange(S, device=ids.device), self.c.qk_rope_head_dim, self.c.rope_theta)
        x = F.dropout(self.model.embed_tokens(ids), dropout, self.training)
        kl = x.new_zeros((), dtype=torch.float32)
        fracs = []
        for layer in self.model.layers:
            x, aux = layer(x, cos, sin, sparse, want_kl, dropout)
            if aux is not None:
                kl = kl + aux.kl
                fracs.append(float(aux.selected_frac))
        return ForwardOut(self.model.norm(x), kl, sum(fracs) / len(fracs) if fracs else 1.0)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    def forward_mtp(self, next_ids: torch.Tensor, hidden: torch.Tensor, sparse: bool = True, want_kl: bool = False,
                    dropout: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        """Entry i combines Emb(t_{i+1}) and the main model's post-norm hidden h_i, at position i, and predicts
        t_{i+2}. As in vLLM's DeepSeek/GLM MTP, the embedding at position 0 is zeroed. Returns (hidden, kl)."""
        B, S = next_ids.shape
        cos, sin = rope_cos_sin(torch.arange(S, device=next_ids.device), self.c.qk_rope_head_dim, self.c.rope_theta)
        e = self.model.embed_tokens(next_ids)
        e = torch.cat([torch.zeros_like(e[:, :1]), e[:, 1:]], dim=1)
        x = self.mtp.eh_proj(torch.cat([self.mtp.enorm(e), self.mtp.hnorm(hidden)], dim=-1))
        x, aux = self.mtp.block(x, cos, sin, sparse, want_kl, dropout)
        kl = aux.kl if aux is not None else x.new_zeros((), dtype=torch.float32)
        return self.mtp.shared_head_norm(x), kl

    @torch.no_grad()
    def update_routing_bias(self, rate: float) -> None:
        """DeepSeek-V3's aux-loss-free balancing: nudge each expert's selection bias towards equal load."""
        for moe in self.moe_layers():
            if moe.last_load is None:
                continue
            load = moe.last_load.float()
            moe.gate.e_score_correction_bias += rate * torch.sign(load.mean() - load)

    def export_state_dict(self, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
        """Checkpoint tensors named as GLM-5's: per-expert keys, MTP at model.layers.{num_hidden_layers}."""
        L = self.c.num_hidden_layers
        I = self.c.moe_intermediate_size
        out: dict[str, torch.Tensor] = {}

        def put(name: str, t: torch.Tensor) -> None:
            # The routing bias stays fp32, as in GLM-5's checkpoints: selection is sensitive to its precision.
            keep32 = name.endswith("e_score_correction_bias")
            out[name] = t.detach().to(torch.float32 if keep32 else dtype).contiguous().cpu()

        def put_block(prefix: str, block: DecoderLayer) -> None:
            for n, t in list(block.named_parameters()) + list(block.named_buffers()):
                if n == "mlp.gate_up_proj":
                    for j in range(t.shape[0]):
                        put(f"{prefix}.mlp.experts.{j}.gate_proj.weight", t[j, :I])
                        put(f"{prefix}.mlp.experts.{j}.up_proj.weight", t[j, I:])
                elif n == "mlp.down_proj" and t.dim() == 3:
                    for j in range(t.shape[0]):
                        put(f"{prefix}.mlp.experts.{j}.down_proj.weight", t[j])
                else:
                    put(f"{prefix}.{n}", t)

        put("model.embed_tokens.weight", self.model.embed_tokens.weight)
        for i, layer in enumerate(self.model.layers):
            put_block(f"model.layers.{i}", layer)
        put("model.norm.weight", self.model.norm.weight)
        put("lm_head.weight", self.lm_head.weight)
        put(f"model.layers.{L}.enorm.weight", self.mtp.enorm.weight)
        put(f"model.layers.{L}.hnorm.weight", self.mtp.hnorm.weight)
        put(f"model.layers.{L}.eh_proj.weight", self.mtp.eh_proj.weight)
        put(f"model.layers.{L}.shared_head.norm.weight", self.mtp.shared_head_norm.weight)
        put_block(f"model.layers.{L}", self.mtp.block)
        return out

    def load_exported(self, sd: dict[str, torch.Tensor]) -> None:
        """Inverse of export_state_dict (used to evaluate exactly the weights that ship)."""
        L = self.c.num_hidden_layers
        own: dict[str, torch.Tensor] = {}
        experts: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
        for k, t in sd.items():
            k2 = k
            if k.startswith(f"model.layers.{L}."):
                rest = k[len(f"model.layers.{L}."):]
                if rest.startswith(("enorm", "hnorm", "eh_proj")):
                    k2 = "mtp." + rest
                elif rest == "shared_head.norm.weight":
                    k2 = "mtp.shared_head_norm.weight"
                else:
                    k2 = "mtp.block." + rest
            if ".mlp.experts." in k2:
                pre, post = k2.split(".mlp.experts.")
                j, proj = post.split(".")[:2]
                experts.setdefault(pre, {}).setdefault(int(j), {})[proj] = t
                continue
            own[k2] = t
        for pre, per in experts.items():
            E = len(per)
            own[f"{pre}.mlp.gate_up_proj"] = torch.stack(
                [torch.cat([per[j]["gate_proj"], per[j]["up_proj"]], 0) for j in range(E)])
            own[f"{pre}.mlp.down_proj"] = torch.stack([per[j]["down_proj"] for j in range(E)])
        self.load_state_dict({k: v.float() for k, v in own.items()}, strict=True)
