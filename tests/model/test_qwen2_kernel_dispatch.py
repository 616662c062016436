"""The GPU path of Qwen2 attention (loc3r.kernels.ops.attention) computes the
same thing as the CPU path (grouped_query_attention with the cache mask).

On CPU the custom op runs its PyTorch reference, so this checks that the
arguments the model passes on CUDA (prefix from cache_position, cache layout)
mean what the model means.
"""

import pytest
import torch

from loc3r.model.qwen2 import causal_cache_mask, grouped_query_attention

ops = pytest.importorskip("loc3r.kernels.ops", reason="loc3r.kernels needs triton")


@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (7, 1), (4, 4)])
@pytest.mark.parametrize("prefix,t", [(0, 5), (6, 3), (9, 1)])
def test_kernel_entry_matches_model_attention(heads, kv_heads, prefix, t):
    torch.manual_seed(0)
    b, d, capacity = 2, 16, 16
    q = torch.randn(b, heads, t, d)
    k = torch.randn(b, kv_heads, capacity, d)
    v = torch.randn(b, kv_heads, capacity, d)
    cache_position = torch.arange(prefix, prefix + t)
    mask = causal_cache_mask(cache_position, capacity, torch.float32)
    want = grouped_query_attention(q, k, v, mask)
    got = ops.attention(q, k, v, cache_position[:1].to(torch.int32).expand(b))
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
