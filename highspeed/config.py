"""Configuration: the checkpoint's config.json (HFConfig) and the engine's options (EngineConfig)."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields
from typing import Any


class HFConfig:
    """Attribute access over a HuggingFace ``config.json`` dict.

    Model files read the fields they need with transformers' defaults via ``get``; a missing required field is a
    clear error naming the field and the architecture.
    """

    def __init__(self, data: dict[str, Any]):
        # Multimodal/wrapper configs nest the language model under text_config.
        if "text_config" in data and "hidden_size" not in data:
            merged = dict(data["text_config"])
            merged.setdefault("architectures", data.get("architectures"))
            data = merged
        self._data = dict(data)

    @classmethod
    def from_pretrained(cls, path: str) -> "HFConfig":
        cfg_path = os.path.join(path, "config.json")
        if not os.path.isfile(cfg_path):
            raise FileNotFoundError(f"no config.json in {path!r}: not a HuggingFace checkpoint folder")
        try:
            with open(cfg_path, encoding="utf-8") as f:
                return cls(json.load(f))
        except json.JSONDecodeError as e:
            raise ValueError(f"cannot parse {cfg_path}: {e}") from e

    @property
    def architecture(self) -> str:
        archs = self._data.get("architectures") or []
        if not archs:
            raise ValueError("config.json names no 'architectures'")
        return archs[0]

    def get(self, name: str, default: Any = None) -> Any:
        value = self._data.get(name, default)
        return default if value is None and default is not None else value

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        try:
            return self._data[name]
        except KeyError:
            raise AttributeError(
                f"config.json of {self._data.get('architectures')} has no field {name!r}"
            ) from None

    def __contains__(self, name: str) -> bool:
        return name in self._data

    def to_dict(self) -> dict[str, Any]:
        return dict(self._data)

    @property
    def eos_token_ids(self) -> list[int]:
        eos = self._data.get("eos_token_id")
        if eos is None:
            return []
        return list(eos) if isinstance(eos, (list, tuple)) else [int(eos)]


@dataclass(frozen=True)
class EngineConfig:
    """Every engine option in one place. ``LLM(**engine_options)`` and the CLI flags map onto these fields."""

    model: str | None = None               # checkpoint folder; None = the built-in demo model
    dtype: str = "auto"                    # auto | float32 | bfloat16 | float16
    device: str = "auto"                   # auto | cpu | cuda | cuda:N
    seed: int = 0
    block_size: int = 16                   # tokens per KV block
    num_kv_blocks: int | None = None       # None = sized from free memory
    gpu_memory_utilization: float = 0.90   # share of device memory the engine may use (weights + KV + graphs)
    cpu_kv_cache_gib: float = 2.0          # KV pool size on the CPU when num_kv_blocks is None
    max_model_len: int | None = None       # None = the checkpoint's max_position_embeddings
    max_num_seqs: int = 256                # sequences in one step
    max_num_batched_tokens: int = 8192     # tokens in one step (chunked-prefill budget)
    enable_prefix_caching: bool = True
    enable_request_merging: bool = True
    max_waiting_requests: int = 4096       # admission bound; the server answers 503 beyond it
    max_wait_steps: int = 64               # bound on how long prefix-aware ordering may delay a request
    enforce_eager: bool = False            # no CUDA graphs
    use_triton: bool = True                # Triton kernels on CUDA (off = plain torch path)
    async_scheduling: bool | None = None   # enqueue step N+1 before reading step N's tokens (None: on CUDA)
    speculative_tokens: int = 0            # MTP draft tokens per step (0 = off)
    tokenizer: str | None = None           # defaults to the model folder
    load_progress: bool = True

    @classmethod
    def from_options(cls, **options: Any) -> "EngineConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise TypeError(f"unknown engine option(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**options)
