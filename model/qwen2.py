"""Qwen2 causal decoder with an explicit, preallocated KV cache.

One call serves prefill (T > 1) and decode (T == 1)::

    hidden, past_key, past_value = decoder(inputs_embeds, past_key, past_value, cache_position)

- ``inputs_embeds`` (B, T, H); token embeddings come from :meth:`Qwen2Decoder.embed`.
- ``past_key`` / ``past_value`` (L, B, KVH, S, D): the whole cache, S = its capacity.
- ``cache_position`` (T,) int64: where this chunk's keys/values are written and
  also the RoPE positions. Key slot j is visible to query t iff
  j <= cache_position[t], so slots past the filled length are masked with no
  separate length input.
- returns the final-RMSNorm'd hidden states (B, T, H) and the updated cache.

All attention math lives in :meth:`Qwen2Attention.attend_with_cache`, so an
exporter can swap in a fused op (e.g. ``com.microsoft.GroupQueryAttention``
with rotary inside) and kernels can swap in a Triton op, by replacing that one
method.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from loc3r.model.config import TextConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def rope_inverse_frequencies(head_dim: int, theta: float) -> torch.Tensor:
    """(D/2,) float32, exactly as transformers' default RoPE."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (T, D) for int64 positions (T,). Halves are duplicated (rotate-half layout)."""
    inv_freq = rope_inverse_frequencies(head_dim, theta).to(positions.device)
    freqs = positions.float()[:, None] * inv_freq[None, :]  # (T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (T, D)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, h, T, D) rotated by cos/sin (T, D)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


def causal_cache_mask(cache_position: torch.Tensor, capacity: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask (T, S): 0 where key slot j <= cache_position[t], a large negative number elsewhere."""
    slots = torch.arange(capacity, device=cache_position.device)  # (S,)
    visible = slots[None, :] <= cache_position[:, None]  # (T, S)
    zero = torch.zeros((), dtype=dtype, device=cache_position.device)
    blocked = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=cache_position.device)
    return torch.where(visible, zero, blocked)


def write_cache(cache: torch.Tensor, new: torch.Tensor, cache_position: torch.Tensor) -> torch.Tensor:
    """cache (B, KVH, S, D) with slots ``cache_position`` replaced by new (B, KVH, T, D); out of place."""
    return cache.index_copy(2, cache_position, new.to(cache.dtype))


def grouped_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """q (B, H, T, D), k/v (B, KVH, S, D), additive mask (T, S) -> (B, H, T, D)."""
    b, h, t, d = q.shape
    kvh, s = k.shape[1], k.shape[2]
    groups = h // kvh
    qg = q.reshape(b, kvh, groups * t, d)  # query heads of one KV group share its keys
    scores = torch.matmul(qg, k.transpose(-1, -2)) * (d**-0.5)  # (B, KVH, G*T, S)
    scores = scores.view(b, kvh, groups, t, s) + mask  # (B, KVH, G, T, S)
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    out = torch.matmul(probs.view(b, kvh, groups * t, s), v)  # (B, KVH, G*T, D)
    return out.view(b, h, t, d)


class Qwen2Attention(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_kv_heads
        self.head_dim = cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=True)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=True)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=True)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)

    def attend_with_cache(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        past_key: torch.Tensor,
        past_value: torch.Tensor,
        cache_position: torch.Tensor,
        mask: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """RoPE + cache write + causal GQA: the one swappable attention step.

        q (B, T, H*D), k/v (B, T, KVH*D), cos/sin (T, D), past_key/value
        (B, KVH, S, D), cache_position (T,), mask (T, S)
        -> attn (B, T, H*D), new_key, new_value (B, KVH, S, D).
        """
        b, t, _ = q.shape
        qh = q.view(b, t, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        kh = k.view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, KVH, T, D)
        vh = v.view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        qh = apply_rope(qh, cos, sin)
        kh = apply_rope(kh, cos, sin)
        new_key = write_cache(past_key, kh, cache_position)
        new_value = write_cache(past_value, vh, cache_position)
        if qh.is_cuda:
            # On a GPU the fused Triton kernels (loc3r.kernels) do the same math: causal over
            # the new block plus the cached prefix; cache_position is contiguous here.
            from loc3r.kernels.ops import attention

            prefix = cache_position[:1].to(torch.int32).expand(b)  # (B,) first slot of this chunk
            out = attention(qh, new_key.to(qh.dtype), new_value.to(qh.dtype), prefix)  # (B, H, T, D)
        else:
            out = grouped_query_attention(qh, new_key.to(qh.dtype), new_value.to(qh.dtype), mask)  # (B, H, T, D)
        return out.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim), new_key, new_value

    def forward(self, x, cos, sin, past_key, past_value, cache_position, mask):
        attn, new_key, new_value = self.attend_with_cache(
            self.q_proj(x), self.k_proj(x), self.v_proj(x), cos, sin, past_key, past_value, cache_position, mask
        )
        return self.o_proj(attn), new_key, new_value


class Qwen2MLP(nn.Module):
    """SwiGLU."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Qwen2DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Qwen2Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = Qwen2MLP(cfg)

    def forward(self, x, cos, sin, past_key, past_value, cache_position, mask):
        attn, new_key, new_value = self.self_attn(
            self.input_layernorm(x), cos, sin, past_key, past_value, cache_position, mask
        )
        x = x + attn
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, new_key, new_value


class Qwen2Decoder(nn.Module):
    """Token embedding + decoder layers + final norm (no lm_head)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Qwen2DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) int64 -> (B, T, H)."""
        return self.embed_tokens(input_ids)

    def empty_cache(self, batch: int, capacity: int, dtype: torch.dtype = torch.float32,
                    device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Zeroed past_key, past_value (L, B, KVH, S, D)."""
        c = self.cfg
        shape = (c.num_layers, batch, c.num_kv_heads, capacity, c.head_dim)
        return torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device)

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        past_key: torch.Tensor,
        past_value: torch.Tensor,
        cache_position: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = inputs_embeds  # (B, T, H)
        cos, sin = rope_cos_sin(cache_position, self.cfg.head_dim, self.cfg.rope_theta)  # (T, D)
        mask = causal_cache_mask(cache_position, past_key.shape[3], torch.float32)  # (T, S)
        new_keys, new_values = [], []
        for i, layer in enumerate(self.layers):
            x, k, v = layer(x, cos, sin, past_key[i], past_value[i], cache_position, mask)
            new_keys.append(k)
            new_values.append(v)
        return self.norm(x), torch.stack(new_keys), torch.stack(new_values)
