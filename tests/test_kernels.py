"""The engine's CPU kernels compute what the torch code they replace computes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rag.service.engine import kernels

pytestmark = pytest.mark.skipif(
    not kernels.LOADED, reason="the engine's kernels were not built for this machine"
)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads, kv_heads", [(9, 3), (4, 4), (8, 1)])
def test_decode_attention_computes_what_sdpa_computes(dtype, heads, kv_heads):
    """Rows of different lengths over one layer of a slot cache (more slots than rows),
    against SDPA in float32 over the same keys under the mask the engine builds."""
    generator = torch.Generator().manual_seed(0)
    slots, positions, head_dim = 5, 40, 16
    cache = torch.randn(2, slots, positions, kv_heads, head_dim, generator=generator)
    keys, values = cache.to(dtype)
    lengths = torch.tensor([1, 33, 7, 40])
    rows = len(lengths)
    query = torch.randn(rows, heads, head_dim, generator=generator).to(dtype)
    out = kernels.decode_attention(query, keys, values, lengths, 0.3)

    span = int(lengths.max())
    mask = (torch.arange(span)[None, :] < lengths[:, None])[:, None, None, :]
    k, v = (c[:rows, :span].transpose(1, 2).float() for c in (keys, values))
    grouped = query.float().reshape(rows, kv_heads, heads // kv_heads, head_dim)
    expected = F.scaled_dot_product_attention(grouped, k, v, attn_mask=mask, scale=0.3)
    assert out.dtype == dtype and out.shape == query.shape
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out.float(), expected.reshape(query.shape), rtol=tolerance,
                               atol=tolerance)  # fmt: skip


def test_decode_attention_refuses_a_length_outside_the_slot():
    keys = torch.zeros(2, 8, 1, 4)
    with pytest.raises(RuntimeError, match="lengths within the slot"):
        kernels.decode_attention(torch.zeros(1, 1, 4), keys, keys, torch.tensor([9]), 1.0)
