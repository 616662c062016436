"""vision.onnx: SigLIP + projector + bilinear pooling (+ f_cam on the camera token) -> frame blocks.

Inputs: ``pixel_values`` (frames, 3, S, S) normalised as the manifest says;
with camera tokens also ``camera_token`` (frames, Dd) from pose_prior.onnx.
Output: ``frame_embeds`` (frames, P, H) with P = 1 + n (camera token first)
or n. SigLIP attention is one MultiHeadAttention node per layer.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from loc3r.export.fused_attention import fused_vision_attention
from loc3r.export.onnx_trace import export_graph, graph_spec
from loc3r.model.projector import pool_frame_features
from loc3r.runtime.package import GraphSpec


class VisionGraph(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.grid = model.cfg.vision.grid
        self.vision_tower = model.vision_tower
        self.projector = model.projector
        self.f_cam = model.f_cam if model.uses_camera_tokens else None

    def forward(self, pixel_values, camera_token=None):
        vision = pool_frame_features(self.projector(self.vision_tower(pixel_values)), self.grid)  # (F, n, H)
        if self.f_cam is None:
            return vision
        cam = self.f_cam(camera_token.unsqueeze(1))  # (F, 1, H)
        return torch.cat((cam, vision), dim=1)  # (F, 1 + n, H)


def export_vision(model: nn.Module, out_dir: Path, opset: int, attention=fused_vision_attention) -> GraphSpec:
    """``attention(vision_tower)``: the context manager that fuses attention (default: MultiHeadAttention)."""
    cfg = model.cfg
    path = Path(out_dir) / "vision.onnx"
    graph = VisionGraph(model).eval()
    frames = 2
    args = (torch.randn(frames, 3, cfg.vision.image_size, cfg.vision.image_size),)
    names = ["pixel_values"]
    axes = {"pixel_values": {0: "frames"}, "frame_embeds": {0: "frames"}}
    if graph.f_cam is not None:
        args += (torch.randn(frames, cfg.pose_prior.dec_embed_dim),)
        names.append("camera_token")
        axes["camera_token"] = {0: "frames"}
    with attention(model.vision_tower):
        export_graph(graph, args, path, names, ["frame_embeds"], axes, opset)
    return graph_spec("vision", path)
