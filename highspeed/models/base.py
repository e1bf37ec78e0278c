"""The causal-LM skeleton every family shares, and the checkpoint -> parameter mapping.

Parameter names are the checkpoint names (``model.layers.N.self_attn.o_proj.weight``...) except where we fuse:
a module that fuses declares ``weight_sources()`` -> ``{param: [alternative, ...]}``, each alternative a list of
``(checkpoint name, index into the parameter)`` that together fill it (e.g. per-expert tensors, or one fused 3-D
tensor). ``load_weights`` copies each checkpoint tensor straight into its slice of the preallocated parameter,
so no second copy of the model is ever built.
"""
from __future__ import annotations

import re
from typing import Iterable

import torch
from torch import nn

from highspeed.config import HFConfig
from highspeed.models.layers import DecoderLayer, Embedding, Linear, RMSNorm
from highspeed.ops import linear

_ALWAYS_IGNORED = re.compile(r"(^|\.)rotary_emb\.|\.inv_freq$")


class MtpLayer(DecoderLayer):
    """Multi-token-prediction layer (DeepSeek-V3 / GLM): ``h' = eh_proj([enorm(emb(t_{i+1})); hnorm(h_i)])``, a
    full decoder block (own KV cache), then ``shared_head.norm``. Checkpoint names ``model.layers.{L}.*`` with L =
    num_hidden_layers. The layer's own ``embed_tokens`` / ``shared_head.head`` copies are not loaded: they equal
    the main model's embedding and lm_head, which are used instead."""

    def __init__(self, self_attn: nn.Module, mlp: nn.Module, hidden: int, eps: float):
        super().__init__(self_attn, mlp, hidden, eps)
        self.enorm = RMSNorm(hidden, eps)
        self.hnorm = RMSNorm(hidden, eps)
        self.eh_proj = Linear(2 * hidden, hidden)
        self.shared_head = nn.Module()
        self.shared_head.norm = RMSNorm(hidden, eps)


class DecoderModel(nn.Module):
    def __init__(self, vocab: int, hidden: int, eps: float):
        super().__init__()
        self.embed_tokens = Embedding(vocab, hidden)
        self.layers = nn.ModuleList()
        self.norm = RMSNorm(hidden, eps)


class CausalLM(nn.Module):
    """``model.{embed_tokens, layers, norm}`` + ``lm_head`` (+ optional ``mtp``). Families fill ``model.layers``
    and, for MTP, ``self.mtp``."""

    def __init__(self, config: HFConfig):
        super().__init__()
        self.config = config
        self.hidden_size: int = config.hidden_size
        self.vocab_size: int = config.vocab_size
        self.num_layers: int = config.num_hidden_layers
        self.model = DecoderModel(self.vocab_size, self.hidden_size, config.get("rms_norm_eps", 1e-6))
        self.tie_word_embeddings = bool(config.get("tie_word_embeddings", False))
        self.lm_head = Linear(self.hidden_size, self.vocab_size)
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.mtp: MtpLayer | None = None

    # ----- forward -----
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Flattened tokens of all sequences of the step -> hidden states after the final norm ``[T, hidden]``."""
        hidden = self.model.embed_tokens(input_ids)
        aux: dict = {}
        for layer in self.model.layers:
            hidden = layer(positions, hidden, aux)
        return self.model.norm(hidden)

    def compute_logits(self, hidden: torch.Tensor, float32: bool = True) -> torch.Tensor:
        """The lm_head's logits, in fp32 unless ``float32`` is False (the decode graph's greedy tail takes the
        argmax of the model-dtype logits: the same token, without a cast of the whole vocabulary per step)."""
        logits = linear(hidden, self.lm_head.weight)
        return logits.float() if float32 else logits

    def forward_mtp(self, input_ids: torch.Tensor, positions: torch.Tensor, previous_hidden: torch.Tensor) -> torch.Tensor:
        """MTP draft step: ``input_ids`` are the tokens t_{i+1}, ``previous_hidden`` the main model's post-norm
        hidden h_i at ``positions`` i. Returns hidden ``[T, hidden]`` after ``shared_head.norm``; logits with
        ``compute_logits``."""
        if self.mtp is None:
            raise RuntimeError(f"{type(self).__name__} has no MTP layer (the checkpoint carries no MTP weights)")
        mtp = self.mtp
        emb = self.model.embed_tokens(input_ids)
        emb = torch.where((positions == 0)[:, None], torch.zeros_like(emb), emb)  # as vLLM/DeepSeek: no t_0 draft
        hidden = mtp.eh_proj(torch.cat([mtp.enorm(emb), mtp.hnorm(previous_hidden)], dim=-1))
        return mtp.shared_head.norm(mtp(positions, hidden, {}))

    # ----- checkpoint mapping -----
    def checkpoint_name(self, name: str) -> str | None:
        """Map a checkpoint tensor name to our naming; None = deliberately ignored. Families extend this."""
        if _ALWAYS_IGNORED.search(name):
            return None
        if self.tie_word_embeddings and name == "lm_head.weight":
            return None
        m = re.match(r"model\.layers\.(\d+)\.(.*)$", name)
        if m and int(m.group(1)) >= self.num_layers:
            # MTP layer(s): keep the first when this model has one, minus its duplicated embedding / head.
            rest = m.group(2)
            if self.mtp is None or int(m.group(1)) != self.num_layers:
                return None
            if rest.startswith("embed_tokens.") or rest.startswith("shared_head.head."):
                return None
            return "mtp." + rest
        return name

    def weight_table(self) -> dict[str, list[list[tuple[str, tuple]]]]:
        """``{param name: [alternative, ...]}`` with full checkpoint names (after ``checkpoint_name``)."""
        table: dict[str, list[list[tuple[str, tuple]]]] = {n: [[(n, ())]] for n, _ in self.named_parameters()}
        for mod_name, module in self.named_modules():
            sources = getattr(module, "weight_sources", None)
            if sources is None:
                continue
            prefix = mod_name + "." if mod_name else ""
            for local, alternatives in sources().items():
                table[prefix + local] = [[(prefix + ck, idx) for ck, idx in alt] for alt in alternatives]
        return table

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy checkpoint tensors into the parameters. Raises on a mis-shaped or unexpected tensor (naming it);
        returns the names of the parameters completely filled (the loader reports the rest as missing)."""
        params = dict(self.named_parameters())
        table = self.weight_table()
        by_source: dict[str, list[tuple[str, int, tuple]]] = {}
        for pname, alternatives in table.items():
            for a, alt in enumerate(alternatives):
                for ck, idx in alt:
                    by_source.setdefault(ck, []).append((pname, a, idx))
        seen: dict[tuple[str, int], set[str]] = {}
        arch = self.config.get("architectures", ["?"])[0]
        for raw_name, tensor in weights:
            name = self.checkpoint_name(raw_name)
            if name is None:
                continue
            targets = by_source.get(name)
            if targets is None:
                hint = " (FP8/quantized checkpoints are not supported)" if "scale" in raw_name else ""
                raise ValueError(f"unexpected tensor {raw_name!r} in checkpoint: {arch} has no such weight{hint}")
            for pname, a, idx in targets:
                dst = params[pname].data[idx] if idx else params[pname].data
                if tuple(dst.shape) != tuple(tensor.shape):
                    raise ValueError(
                        f"tensor {raw_name!r} has shape {tuple(tensor.shape)} but {arch} expects "
                        f"{tuple(dst.shape)} (config.json and weights disagree)"
                    )
                dst.copy_(tensor)
                seen.setdefault((pname, a), set()).add(name)
        self._missing_sources = {}
        filled = set()
        for pname, alternatives in table.items():
            best = None
            for a, alt in enumerate(alternatives):
                got = seen.get((pname, a), set())
                if len(got) == len(alt):
                    filled.add(pname)
                    break
                missing = [ck for ck, _ in alt if ck not in got]
                if best is None or len(missing) < len(best):
                    best = missing
            else:
                self._missing_sources[pname] = best or []
        return filled

    def missing_checkpoint_names(self, param_names: Iterable[str]) -> list[str]:
        """Checkpoint tensor names that would have filled the given unfilled parameters (after load_weights)."""
        out: list[str] = []
        for p in param_names:
            for ck in getattr(self, "_missing_sources", {}).get(p, [p]):
                out.append(re.sub(r"^mtp\.", f"model.layers.{self.num_layers}.", ck))
        return out
