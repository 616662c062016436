"""SigLIP vision transformer (no CLS token, no pooling head).

Matches transformers' ``SiglipVisionModel`` as LLaVA-OneVision uses it: the
features are ``hidden_states[feature_layer]`` where ``hidden_states`` is
``[embeddings, layer 1, ..., layer N]``, taken *before* the post-layernorm.
Layers past the feature layer never influence the output, so they are not
built at all (the converter reports their weights as dropped), and neither
is the post-layernorm.
"""

from __future__ import annotations

import torch
from torch import nn

from loc3r.errors import Loc3rError
from loc3r.model.config import VisionConfig

def used_vision_layers(cfg: VisionConfig) -> int:
    """How many encoder layers feed ``hidden_states[cfg.feature_layer]``."""
    n_states = cfg.num_layers + 1
    if not -n_states <= cfg.feature_layer < n_states:
        raise Loc3rError(
            f"vision feature_layer {cfg.feature_layer} is out of range for {cfg.num_layers} layers"
        )
    return cfg.feature_layer % n_states


def vision_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Full (non-causal) softmax attention. q, k, v: (B, heads, N, D) -> (B, heads, N, D)."""
    scale = q.shape[-1] ** -0.5
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # (B, h, N, N)
    return torch.matmul(scores.softmax(dim=-1), v)


class SiglipAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.head_dim
        d = cfg.hidden_size
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape  # (B, N, D)
        shape = (b, n, self.num_heads, self.head_dim)
        q = self.q_proj(x).view(shape).transpose(1, 2)  # (B, h, N, hd)
        k = self.k_proj(x).view(shape).transpose(1, 2)
        v = self.v_proj(x).view(shape).transpose(1, 2)
        out = vision_attention(q, k, v).transpose(1, 2).reshape(b, n, d)  # (B, N, D)
        return self.out_proj(out)


class SiglipMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.act = nn.GELU(approximate="tanh")  # SigLIP's gelu_pytorch_tanh
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SiglipEncoderLayer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = SiglipAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = SiglipMLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class SiglipVisionTower(nn.Module):
    """Images in, patch features out: (B, 3, S, S) -> (B, grid*grid, D).

    Pixels are expected already normalised (``(x - mean) / std``, see
    :class:`VisionConfig`) at exactly ``image_size`` square.
    """

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embedding = nn.Conv2d(3, cfg.hidden_size, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.position_embedding = nn.Parameter(torch.zeros(cfg.grid * cfg.grid, cfg.hidden_size))
        nn.init.normal_(self.position_embedding, std=cfg.hidden_size**-0.5)
        self.layers = nn.ModuleList(SiglipEncoderLayer(cfg) for _ in range(used_vision_layers(cfg)))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(pixel_values)  # (B, D, g, g)
        x = x.flatten(2).transpose(1, 2) + self.position_embedding  # (B, g*g, D)
        for layer in self.layers:
            x = layer(x)
        return x  # (B, g*g, D)
