"""heads.onnx (f_pos at <Pos>, f_ori at <Ori>) and bev_head.onnx (f_proj on vision-token hidden states).

Inputs are (batch, rows, H) so every Linear exports as MatMul.
heads.onnx: ``pos_hidden``, ``ori_hidden`` -> ``position`` (.., 3) = x, y,
sigma in metres; ``orientation_logits`` (.., bins); ``orientation`` (..)
radians (circular soft-argmax over the bin centres).
bev_head.onnx: ``hidden`` -> ``bev`` (.., 4) = x, y, sigma_x, sigma_y.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from loc3r.export.onnx_trace import export_graph, graph_spec
from loc3r.model.heads import circular_soft_argmax, orientation_bin_centres
from loc3r.runtime.package import GraphSpec

_ROWS = {0: "batch", 1: "rows"}


class HeadsGraph(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.f_pos = model.f_pos
        self.f_ori = model.f_ori
        self.register_buffer("bin_centres", orientation_bin_centres(model.cfg.heads.num_orientation_bins),
                             persistent=False)

    def forward(self, pos_hidden, ori_hidden):
        logits = self.f_ori(ori_hidden)  # (B, N, bins)
        return self.f_pos(pos_hidden), logits, circular_soft_argmax(logits, self.bin_centres)


class BevHeadGraph(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.f_proj = model.f_proj

    def forward(self, hidden):
        return self.f_proj(hidden)  # (B, N, 4)


def export_heads(model: nn.Module, out_dir: Path, opset: int) -> GraphSpec:
    path = Path(out_dir) / "heads.onnx"
    h = torch.randn(1, 1, model.cfg.text.hidden_size)
    export_graph(HeadsGraph(model).eval(), (h, h.clone()), path, ["pos_hidden", "ori_hidden"],
                 ["position", "orientation_logits", "orientation"],
                 {"pos_hidden": _ROWS, "ori_hidden": _ROWS, "position": _ROWS, "orientation_logits": _ROWS,
                  "orientation": _ROWS}, opset)
    return graph_spec("heads", path)


def export_bev_head(model: nn.Module, out_dir: Path, opset: int) -> GraphSpec:
    path = Path(out_dir) / "bev_head.onnx"
    h = torch.randn(1, 3, model.cfg.text.hidden_size)
    export_graph(BevHeadGraph(model).eval(), (h,), path, ["hidden"], ["bev"],
                 {"hidden": _ROWS, "bev": _ROWS}, opset)
    return graph_spec("bev_head", path)
