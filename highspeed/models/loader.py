"""Checkpoint folder -> model. Parameters are allocated once, empty, on the target device in the target dtype;
then each safetensors tensor is read and copied straight into its (slice of a) parameter, so peak memory is the
model plus one tensor. Also ``build_model(random_init=True)`` for benchmarks at published shapes without weights."""
from __future__ import annotations

import contextlib
import json
import os
from typing import Iterator

import torch
from torch import nn

from highspeed.config import HFConfig
from highspeed.models.layers import LayerNorm, RMSNorm
from highspeed.models.registry import get_model_class

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


def resolve_dtype(dtype: str | torch.dtype, config: HFConfig) -> torch.dtype:
    """``auto`` = the checkpoint's ``torch_dtype`` / ``dtype`` (fp32 if unset); else a name or a torch.dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).lower().replace("torch.", "")
    if name == "auto":
        name = str(config.get("torch_dtype") or config.get("dtype") or "float32").lower().replace("torch.", "")
    if name not in _DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; use auto, float32, bfloat16 or float16")
    return _DTYPES[name]


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(prev)


@torch.no_grad()
def init_random_weights(model: nn.Module, std: float = 0.02, seed: int | None = 0) -> None:
    """Norm weights 1, biases and router correction biases 0, everything else N(0, std)."""
    gen = None
    if seed is not None:
        device = next(model.parameters()).device
        gen = torch.Generator(device=device).manual_seed(seed)
    norm_params = {id(m.weight) for m in model.modules() if isinstance(m, (RMSNorm, LayerNorm))}
    for name, p in model.named_parameters():
        if id(p) in norm_params:
            p.fill_(1.0)
        elif name.endswith("bias"):
            p.zero_()
        else:
            p.normal_(0.0, std, generator=gen)


def build_model(
    config: HFConfig, dtype: str | torch.dtype = "auto", device: str | torch.device = "cpu", random_init: bool = False,
) -> nn.Module:
    """Instantiate the architecture's model with uninitialised parameters on ``device`` (router weights and
    correction biases stay fp32); with ``random_init`` fill them (benchmarks without a checkpoint)."""
    cls = get_model_class(config.architecture)
    torch_dtype = resolve_dtype(dtype, config)
    with torch.device(device), _default_dtype(torch_dtype):
        model = cls(config)
    if random_init:
        init_random_weights(model, std=float(config.get("initializer_range", 0.02)))
    return model.eval()


def _weight_files(path: str) -> list[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, ValueError, KeyError) as e:
            raise ValueError(f"cannot read shard index {index}: {e}") from e
        files = sorted(set(weight_map.values()))
        for name in files:
            if not os.path.isfile(os.path.join(path, name)):
                raise FileNotFoundError(f"shard {name!r} listed in {index} is missing")
        return [os.path.join(path, n) for n in files]
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {path!r} (other formats are not supported)")
    return [os.path.join(path, f) for f in files]


def _read_tensors(files: list[str], device: str, progress: bool) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open
    from tqdm.auto import tqdm

    handles = []
    for file in files:
        try:
            handles.append((file, safe_open(file, framework="pt", device=device)))
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise ValueError(f"cannot read weights file {file!r}: {e}") from e
    total = sum(len(h.keys()) for _, h in handles)
    with tqdm(total=total, desc="Loading weights", unit="tensor", disable=not progress) as bar:
        for file, handle in handles:
            for key in handle.keys():
                try:
                    tensor = handle.get_tensor(key)
                except Exception as e:
                    raise ValueError(f"cannot read tensor {key!r} from {file!r}: {e}") from e
                yield key, tensor
                bar.update(1)


def load_model(
    path: str, dtype: str | torch.dtype = "auto", device: str | torch.device = "cpu", progress: bool = True,
) -> tuple[nn.Module, HFConfig]:
    """Load a HuggingFace checkpoint folder (config.json + safetensors, single file or sharded; per-expert or
    fused expert tensors). Raises a ValueError naming any missing, mis-shaped or unexpected tensor."""
    config = HFConfig.from_pretrained(path)
    model = build_model(config, dtype, device)
    files = _weight_files(path)
    read_device = str(device) if torch.device(device).type != "meta" else "cpu"
    filled = model.load_weights(_read_tensors(files, read_device, progress))
    missing = {n for n, _ in model.named_parameters()} - filled
    mtp = {n for n in missing if n.startswith("mtp.")}
    if mtp and getattr(model, "mtp", None) is not None and not any(n.startswith("mtp.") for n in filled):
        model.mtp = None  # the checkpoint ships no MTP layer: run without speculative drafting
        missing -= mtp
    if missing:
        names = model.missing_checkpoint_names(sorted(missing))
        shown = ", ".join(repr(n) for n in names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")
        raise ValueError(f"checkpoint {path!r} is missing tensor(s) for {config.architecture}: {shown}")
    return model, config
