"""decoder.onnx: Qwen2 layers + final norm over ``inputs_embeds``, one GroupQueryAttention node per layer.

Inputs: ``inputs_embeds`` (batch, seq, H); per layer ``past_key_values.{i}.key`` /
``.value`` (batch, KVH, kv_len, D); ``seqlens_k`` (batch,) int32 = total - 1;
``total_sequence_length`` () int32 = filled + seq. Outputs: ``hidden``
(batch, seq, H), final-normed (no logits: frame blocks never need the vocab
projection), and ``present.{i}.key`` / ``.value`` of the same shape as the past.
The runtime binds each present to the same buffer as its past, so the fused op
writes the chunk's keys/values in place at [filled, filled + seq). RoPE
positions come from ``seqlens_k`` inside the op (cos/sin caches of
``max_context`` rows are initializers).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from loc3r.export.fused_attention import RotaryCaches, fused_decoder_attention
from loc3r.export.onnx_trace import export_graph, graph_spec
from loc3r.runtime.package import GraphSpec

ROLE = "decoder"
FILE = "decoder.onnx"


def past_names(layer: int) -> tuple[str, str]:
    return f"past_key_values.{layer}.key", f"past_key_values.{layer}.value"


def present_names(layer: int) -> tuple[str, str]:
    return f"present.{layer}.key", f"present.{layer}.value"


class DecoderGraph(nn.Module):
    """The decoder step with per-layer past/present tensors (for export only)."""

    def __init__(self, language_model: nn.Module, max_context: int):
        super().__init__()
        cfg = language_model.cfg
        self.layers = language_model.layers
        self.norm = language_model.norm
        self.rotary = RotaryCaches(cfg.head_dim, cfg.rope_theta, max_context)

    def forward(self, inputs_embeds, seqlens_k, total_len, *past):
        x = inputs_embeds  # (B, T, H)
        presents = []
        for i, layer in enumerate(self.layers):
            # Slots (cos, sin, cache_position, mask) carry (caches, -, seqlens_k, total) to the fused op.
            x, k, v = layer(x, self.rotary, None, past[2 * i], past[2 * i + 1], seqlens_k, total_len)
            presents += [k, v]
        return (self.norm(x), *presents)


def export_decoder(model: nn.Module, out_dir: Path, max_context: int, opset: int,
                   attention=fused_decoder_attention) -> GraphSpec:
    """``attention(language_model)``: the context manager that fuses attention (default: onnxruntime's GQA)."""
    lm = model.language_model
    cfg = lm.cfg
    graph = DecoderGraph(lm, max_context).eval()
    capacity, past_len, seq = 8, 3, 2  # example shapes for tracing
    embeds = torch.randn(1, seq, cfg.hidden_size)
    past = []
    for _ in range(cfg.num_layers):
        past += [torch.zeros(1, cfg.num_kv_heads, capacity, cfg.head_dim)] * 2
    seqlens = torch.tensor([past_len + seq - 1], dtype=torch.int32)
    total = torch.tensor(past_len + seq, dtype=torch.int32)
    inputs = ["inputs_embeds", "seqlens_k", "total_sequence_length"]
    outputs = ["hidden"]
    axes = {"inputs_embeds": {0: "batch", 1: "seq"}, "hidden": {0: "batch", 1: "seq"}, "seqlens_k": {0: "batch"}}
    for i in range(cfg.num_layers):
        inputs += past_names(i)
        outputs += present_names(i)
        for name in past_names(i) + present_names(i):
            axes[name] = {0: "batch", 2: "kv_len"}
    path = Path(out_dir) / FILE
    with attention(lm):
        export_graph(graph, (embeds, seqlens, total, *past), path, inputs, outputs, axes, opset)
    return graph_spec(ROLE, path)
