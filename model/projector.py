"""LLaVA ``mlp2x_gelu`` projector and the bilinear 2x video pooling.

The pooling is transformers' ``LlavaOnevisionModel.apply_pooling``: the
projected (grid x grid) patch map of each frame is bilinearly resized to
ceil(grid/2) x ceil(grid/2) (``align_corners=False``), row-major.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from loc3r.errors import Loc3rError

_PROJECTOR_ACTIVATIONS = {
    "gelu": lambda: nn.GELU(),
    "gelu_pytorch_tanh": lambda: nn.GELU(approximate="tanh"),
}

SUPPORTED_PROJECTOR_ACTIVATIONS = tuple(sorted(_PROJECTOR_ACTIVATIONS))


class MultimodalProjector(nn.Module):
    """Linear -> GELU -> Linear, vision width -> LLM width."""

    def __init__(self, vision_hidden: int, text_hidden: int, act: str = "gelu"):
        super().__init__()
        if act not in _PROJECTOR_ACTIVATIONS:
            raise Loc3rError(f"unsupported projector activation '{act}'; supported: "
                             f"{', '.join(SUPPORTED_PROJECTOR_ACTIVATIONS)}")
        self.linear_1 = nn.Linear(vision_hidden, text_hidden)
        self.act = _PROJECTOR_ACTIVATIONS[act]()
        self.linear_2 = nn.Linear(text_hidden, text_hidden)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(features)))  # (..., H)


def pool_frame_features(features: torch.Tensor, grid: int) -> torch.Tensor:
    """Bilinear 2x downsampling of each frame's patch grid.

    features: (N, grid*grid, C) -> (N, ceil(grid/2)**2, C).
    """
    n, _, c = features.shape
    pooled = math.ceil(grid / 2)
    x = features.view(n, grid, grid, c).permute(0, 3, 1, 2)  # (N, C, g, g)
    x = F.interpolate(x, size=(pooled, pooled), mode="bilinear", align_corners=False)  # (N, C, p, p)
    return x.permute(0, 2, 3, 1).reshape(n, pooled * pooled, c)  # (N, p*p, C)
