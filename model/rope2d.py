"""2D rotary position embedding (RoPE) as CroCo/DUSt3R/CUT3R use it.

Each attention head of width ``head_dim`` is split in two halves: the first
half rotates by the token's row (y), the second by its column (x). Within a
half of width ``D = head_dim / 2`` the rotation is the "rotate half" form:
the pair (i, i + D/2) turns by the angle ``pos * base ** (-i / (D/2))`` for
``i < D/2``.

cos/sin are computed straight from the (possibly negative) positions, not
looked up in a table, so CUT3R's pose token at (-1, -1) works and the
export sees plain elementwise ops.
"""

from __future__ import annotations

import torch


def rope_cos_sin(positions: torch.Tensor, head_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables for ``positions`` (B, N, 2) as (y, x).

    Returns two float32 tensors of shape (B, 1, N, head_dim), broadcastable
    over heads, laid out as ``[y-half | x-half]`` to match
    :func:`apply_rope`.
    """
    quarter = head_dim // 4
    exponent = torch.arange(quarter, device=positions.device, dtype=torch.float32) / quarter  # (Q,)
    inv_freq = 1.0 / torch.pow(torch.full_like(exponent, float(base)), exponent)  # (Q,)
    pos = positions.to(torch.float32)  # (B, N, 2)
    angle_y = pos[..., 0:1] * inv_freq  # (B, N, Q)
    angle_x = pos[..., 1:2] * inv_freq  # (B, N, Q)
    angles = torch.cat([angle_y, angle_y, angle_x, angle_x], dim=-1)  # (B, N, head_dim)
    return angles.cos().unsqueeze(1), angles.sin().unsqueeze(1)


def _rotate_quarters(t: torch.Tensor) -> torch.Tensor:
    """[a, b | c, d] -> [-b, a | -d, c]: rotate-half applied to each half."""
    a, b, c, d = t.chunk(4, dim=-1)
    return torch.cat([-b, a, -d, c], dim=-1)


def apply_rope(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``t`` (B, H, N, head_dim) by tables from :func:`rope_cos_sin`.

    Computed in float32, as CUT3R does, and cast back to ``t``'s dtype.
    """
    t32 = t.to(torch.float32)
    return (t32 * cos + _rotate_quarters(t32) * sin).to(t.dtype)
