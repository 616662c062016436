"""pose_prior.onnx: one recurrent step of the CUT3R-style pose prior.

Inputs: ``pose_image`` (batch, 3, Hp, Wp); ``state`` (batch, S, Dd);
``memory`` (batch, M, Dm); ``is_first`` (batch,) float, 1 on a stream's first
frame. Outputs: ``camera_token`` (batch, Dd), ``pose`` (batch, 7) = t, qw, qx,
qy, qz; ``state_out``, ``memory_out``. On the first frame the graph blends in
the learned initial state and memory (``is_first * initial + (1 - is_first) *
input``), so the runtime passes zeros and needs no weights of its own.
Attention is MultiHeadAttention with the 2D RoPE applied to q/k before it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from loc3r.export.fused_attention import fused_pose_prior_attention
from loc3r.export.onnx_trace import export_graph, graph_spec
from loc3r.runtime.package import GraphSpec


class PosePriorGraph(nn.Module):
    def __init__(self, pose_prior: nn.Module):
        super().__init__()
        self.pose_prior = pose_prior
        with torch.no_grad():
            self.register_buffer("initial_state", pose_prior.initial_state(1).clone(), persistent=False)
            self.register_buffer("initial_memory", pose_prior.initial_memory(1).clone(), persistent=False)

    def forward(self, pose_image, state, memory, is_first):
        first = is_first.view(-1, 1, 1)  # (B, 1, 1)
        state = first * self.initial_state + (1.0 - first) * state  # (B, S, Dd)
        memory = first * self.initial_memory + (1.0 - first) * memory  # (B, M, Dm)
        return self.pose_prior(pose_image, state, memory, is_first)


def export_pose_prior(model: nn.Module, out_dir: Path, opset: int,
                      attention=fused_pose_prior_attention) -> GraphSpec:
    """``attention(pose_prior)``: the context manager that fuses attention (default: MultiHeadAttention)."""
    cfg = model.cfg.pose_prior
    path = Path(out_dir) / "pose_prior.onnx"
    graph = PosePriorGraph(model.pose_prior).eval()
    args = (torch.randn(1, cfg.in_channels, cfg.img_height, cfg.img_width), torch.randn(1, cfg.state_size, cfg.dec_embed_dim),
            torch.randn(1, cfg.mem_slots, cfg.mem_dim), torch.zeros(1))
    batch = {0: "batch"}
    with attention(model.pose_prior):
        export_graph(graph, args, path, ["pose_image", "state", "memory", "is_first"],
                     ["camera_token", "pose", "state_out", "memory_out"],
                     {n: batch for n in ("pose_image", "state", "memory", "is_first", "camera_token", "pose",
                                         "state_out", "memory_out")}, opset)
    return graph_spec("pose_prior", path)
