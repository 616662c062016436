"""embed.onnx (token ids -> embeddings) and lm_head.onnx (hidden rows -> logits).

The embedding table gets one extra row, the learned ``image_newline``, at id
``vocab_size`` (:data:`IMAGE_NEWLINE_OFFSET`): the runtime embeds the newline
that follows the last frame with the same graph as text.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from loc3r.export.onnx_trace import export_graph, graph_spec
from loc3r.runtime.package import GraphSpec


class EmbedGraph(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        table = torch.cat((model.language_model.embed_tokens.weight, model.image_newline.view(1, -1)), dim=0)
        self.embed_tokens = nn.Parameter(table.detach().clone())  # (V + 1, H)

    def forward(self, input_ids):
        return F.embedding(input_ids, self.embed_tokens)  # (B, T, H)


class LmHeadGraph(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.lm_head = model.lm_head

    def forward(self, hidden):
        return self.lm_head(hidden)  # (B, T, V)


def export_embed(model: nn.Module, out_dir: Path, opset: int) -> GraphSpec:
    path = Path(out_dir) / "embed.onnx"
    ids = torch.zeros(1, 3, dtype=torch.int64)
    export_graph(EmbedGraph(model).eval(), (ids,), path, ["input_ids"], ["embeds"],
                 {"input_ids": {0: "batch", 1: "seq"}, "embeds": {0: "batch", 1: "seq"}}, opset)
    return graph_spec("embed", path)


def export_lm_head(model: nn.Module, out_dir: Path, opset: int) -> GraphSpec:
    path = Path(out_dir) / "lm_head.onnx"
    hidden = torch.randn(1, 2, model.cfg.text.hidden_size)
    export_graph(LmHeadGraph(model).eval(), (hidden,), path, ["hidden"], ["logits"],
                 {"hidden": {0: "batch", 1: "seq"}, "logits": {0: "batch", 1: "seq"}}, opset)
    return graph_spec("lm_head", path)
