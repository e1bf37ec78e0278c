"""The Triton embedding gather against ``F.embedding`` (interpreter on CPU, the kernel on a GPU)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.ops.conftest import DEVICE


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("V,H,shape,id_dtype", [
    (50, 33, (7,), torch.int64),          # odd width: one partial block
    (301, 2500, (2, 3), torch.int32),     # several column blocks, the last partial; 2-D ids
    (10, 16, (1,), torch.int64),          # one token (batch-1 decode)
])
def test_embedding(triton_module, monkeypatch, dtype, V, H, shape, id_dtype):
    emb = triton_module("embedding")
    monkeypatch.setattr(emb, "BLOCK_H", 1024)
    w = torch.randn(V, H, device=DEVICE).to(dtype)
    ids = torch.randint(0, V, shape, device=DEVICE, dtype=id_dtype)
    ids.view(-1)[0] = V - 1                       # the last row is reachable
    out = emb.embedding(ids, w)
    assert out.shape == (*shape, H) and out.dtype == dtype
    assert torch.equal(out, F.embedding(ids, w))


def test_embedding_out_of_range_rows_are_zero(triton_module):
    emb = triton_module("embedding")
    w = torch.randn(8, 40, device=DEVICE)
    out = emb.embedding(torch.tensor([3, 8, -1, 0], device=DEVICE), w)
    assert torch.equal(out[0], w[3]) and torch.equal(out[3], w[0])
    assert not out[1].any() and not out[2].any()


def test_embedding_empty_and_fallback(triton_module, monkeypatch):
    emb = triton_module("embedding")
    w = torch.randn(8, 40, device=DEVICE)
    assert emb.embedding(torch.empty(0, dtype=torch.int64, device=DEVICE), w).shape == (0, 40)
    monkeypatch.setattr(emb, "ON", False)          # HIGHSPEED_EMBED_KERNEL=0: torch's gather
    ids = torch.tensor([[1, 2]], device=DEVICE)
    assert torch.equal(emb.embedding(ids, w), w[ids])
