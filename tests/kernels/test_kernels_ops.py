"""torch custom ops (CPU = reference), the attention entry, and ONNX export of the ops."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F

from loc3r.errors import Loc3rError
from loc3r.kernels import ops
from loc3r.kernels.decode_attention import decode_attention_reference
from loc3r.kernels.int4_layout import quantize_int4
from loc3r.kernels.prefill_attention import attention_reference


def sdpa_attention(q, k_cache, v_cache, prefix, causal=True):
    """torch SDPA on the same problem (one sequence), as an independent check of the reference."""
    t = q.shape[2]
    k, v = k_cache[:, :, : prefix + t], v_cache[:, :, : prefix + t]
    mask = None
    if causal:
        mask = torch.arange(prefix + t)[None, :] <= (prefix + torch.arange(t))[:, None]  # (T, S)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


@pytest.mark.parametrize("h,kvh,t,prefix,causal", [(4, 4, 5, 0, True), (8, 2, 3, 6, True), (7, 1, 4, 9, False)])
def test_reference_matches_torch_sdpa(h, kvh, t, prefix, causal):
    g = torch.Generator().manual_seed(h * 100 + t)
    q = torch.randn(1, h, t, 64, generator=g)
    k = torch.randn(1, kvh, prefix + t + 2, 64, generator=g)
    v = torch.randn(1, kvh, prefix + t + 2, 64, generator=g)
    ref = attention_reference(q, k, v, torch.tensor([prefix], dtype=torch.int32), causal=causal)
    torch.testing.assert_close(ref, sdpa_attention(q, k, v, prefix, causal), atol=1e-5, rtol=1e-5)


def test_attention_entry_runs_the_op_and_takes_an_int_prefix():
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 4, 3, 64, generator=g), torch.randn(2, 2, 8, 64, generator=g), torch.randn(2, 2, 8, 64, generator=g)
    out = ops.attention(q, k, v, 5)
    torch.testing.assert_close(out, attention_reference(q, k, v, torch.tensor([5, 5])), atol=0, rtol=0)


def test_decode_op_equals_prefill_with_one_token():
    g = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(2, 8, 64, generator=g), torch.randn(2, 2, 12, 64, generator=g), torch.randn(2, 2, 12, 64, generator=g)
    lens = torch.tensor([12, 4], dtype=torch.int32)
    dec = torch.ops.loc3r.decode_attention(q, k, v, lens, 0.125)
    pre = ops.attention(q[:, :, None], k, v, lens - 1, scale=0.125)[:, :, 0]
    torch.testing.assert_close(dec, pre, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(dec, decode_attention_reference(q, k, v, lens, 0.125))


def test_int4_linear_matches_dequantized_matmul_and_adds_bias():
    w = torch.randn(12, 64, generator=torch.Generator().manual_seed(2))
    p = quantize_int4(w)
    x, bias = torch.randn(2, 3, 64), torch.randn(12)
    y = ops.int4_linear(x, p.packed, p.scales, p.zero_points, 64, 32, bias)
    assert y.shape == (2, 3, 12)
    from loc3r.kernels.int4_layout import dequantize_packed

    torch.testing.assert_close(y, x @ dequantize_packed(p).T + bias, atol=1e-5, rtol=1e-5)


def test_opcheck_passes_for_every_op():
    g = torch.Generator().manual_seed(3)
    q, k, v = torch.randn(1, 4, 2, 64, generator=g), torch.randn(1, 2, 6, 64, generator=g), torch.randn(1, 2, 6, 64, generator=g)
    lens = torch.tensor([3], dtype=torch.int32)
    torch.library.opcheck(torch.ops.loc3r.prefill_attention.default, (q, k, v, lens, 0.125, True))
    torch.library.opcheck(torch.ops.loc3r.decode_attention.default, (q[:, :, 0], k, v, lens, 0.125))
    p = quantize_int4(torch.randn(8, 64, generator=g))
    torch.library.opcheck(torch.ops.loc3r.w4a16_matmul.default, (torch.randn(3, 64), p.packed, p.scales, p.zero_points, 64, 32))


def test_bad_inputs_raise_one_line_errors():
    q, k = torch.randn(1, 6, 2, 64), torch.randn(1, 4, 8, 64)
    with pytest.raises(Loc3rError, match="6 query heads are not a multiple of 4 KV heads"):
        ops.attention(q, k, k, 0)
    with pytest.raises(Loc3rError, match="head dim must be a power of two in \\[16, 256\\], got 48"):
        ops.attention(torch.randn(1, 4, 2, 48), torch.randn(1, 4, 8, 48), torch.randn(1, 4, 8, 48), 0)
    p = quantize_int4(torch.randn(8, 64))
    with pytest.raises(Loc3rError, match="activations have K=32, the weight has K=64"):
        ops.int4_linear(torch.randn(2, 32), p.packed, p.scales, p.zero_points, 64)


class TinyAttention(torch.nn.Module):
    """A module that calls the fused attention entry, then an int4 projection."""

    def __init__(self):
        super().__init__()
        p = quantize_int4(torch.randn(16, 64, generator=torch.Generator().manual_seed(4)))
        self.register_buffer("packed", p.packed)
        self.register_buffer("scales", p.scales)
        self.register_buffer("zero_points", p.zero_points)

    def forward(self, q, k_cache, v_cache, prefix_lens):
        o = ops.attention(q, k_cache, v_cache, prefix_lens, scale=0.125)  # (B, H, T, D)
        return ops.int4_linear(o, self.packed, self.scales, self.zero_points, 64, 32)  # (B, H, T, 16)


@pytest.fixture(scope="module")
def exported_tiny_attention():
    args = (torch.randn(1, 4, 3, 64), torch.randn(1, 2, 10, 64), torch.randn(1, 2, 10, 64),
            torch.tensor([2], dtype=torch.int32))
    t, s = torch.export.Dim("T", max=4096), torch.export.Dim("S", max=65536)
    program = torch.onnx.export(TinyAttention().eval(), args, dynamo=True, optimize=False, verbose=False,
                                dynamic_shapes=({2: t}, {2: s}, {2: s}, None))
    return program.model_proto


def test_onnx_export_emits_fused_attention_node(exported_tiny_attention):
    nodes = [n for n in exported_tiny_attention.graph.node if (n.domain, n.op_type) == ("loc3r", "FusedAttention")]
    assert len(nodes) == 1
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in nodes[0].attribute}
    assert attrs["causal"] == 1 and attrs["scale"] == pytest.approx(0.125)
    assert attrs["plugin_namespace"] == b"loc3r"  # TensorRT's ONNX parser looks the creator up there
    assert len(nodes[0].input) == 4
    assert {o.domain: o.version for o in exported_tiny_attention.opset_import}["loc3r"] == 1
    out_dims = exported_tiny_attention.graph.output[0].type.tensor_type.shape.dim
    assert out_dims[2].dim_param and out_dims[3].dim_value == 16  # T stays symbolic; int4 N = 16


def test_onnx_export_of_int4_linear_runs_in_onnxruntime():
    class Proj(torch.nn.Module):
        def __init__(self, p):
            super().__init__()
            self.register_buffer("packed", p.packed)
            self.register_buffer("scales", p.scales)
            self.register_buffer("zero_points", p.zero_points)

        def forward(self, x):
            return ops.int4_linear(x, self.packed, self.scales, self.zero_points, 96, 32)

    p = quantize_int4(torch.randn(20, 96, generator=torch.Generator().manual_seed(5)))
    x = torch.randn(2, 5, 96)
    model = torch.onnx.export(Proj(p).eval(), (x,), dynamo=True, optimize=False, verbose=False).model_proto
    assert [(n.domain, n.op_type) for n in model.graph.node] == [("com.microsoft", "MatMulNBits")]
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    np.testing.assert_allclose(got, Proj(p)(x).numpy(), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("causal", [True, False])
def test_decomposed_attention_matches_reference(causal):
    from loc3r.kernels.prefill_attention import attention_decomposed

    g = torch.Generator().manual_seed(6)
    q, k, v = torch.randn(2, 8, 3, 64, generator=g), torch.randn(2, 2, 11, 64, generator=g), torch.randn(2, 2, 11, 64, generator=g)
    lens = torch.tensor([6, 0], dtype=torch.int32)
    torch.testing.assert_close(attention_decomposed(q, k, v, lens, 0.125, causal),
                               attention_reference(q, k, v, lens, 0.125, causal), atol=1e-5, rtol=1e-5)


def test_decomposed_onnx_export_runs_in_onnxruntime_with_dynamic_lengths():
    class Attn(torch.nn.Module):
        def forward(self, q, k_cache, v_cache, prefix_lens):
            return ops.attention(q, k_cache, v_cache, prefix_lens)

    g = torch.Generator().manual_seed(7)
    args = (torch.randn(1, 4, 3, 64, generator=g), torch.randn(1, 2, 10, 64, generator=g),
            torch.randn(1, 2, 10, 64, generator=g), torch.tensor([4], dtype=torch.int32))
    t, s = torch.export.Dim("T", max=4096), torch.export.Dim("S", max=65536)
    with ops.onnx_attention_form("decomposed"):
        model = torch.onnx.export(Attn().eval(), args, dynamo=True, optimize=False, verbose=False,
                                  dynamic_shapes=({2: t}, {2: s}, {2: s}, None)).model_proto
    assert not [n for n in model.graph.node if n.op_type == "FusedAttention"]
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    q, k, v = torch.randn(1, 4, 5, 64, generator=g), torch.randn(1, 2, 16, 64, generator=g), torch.randn(1, 2, 16, 64, generator=g)
    lens = torch.tensor([9], dtype=torch.int32)  # other lengths than at export time
    got = sess.run(None, dict(zip([i.name for i in sess.get_inputs()], [q.numpy(), k.numpy(), v.numpy(), lens.numpy()])))[0]
    np.testing.assert_allclose(got, attention_reference(q, k, v, lens).numpy(), rtol=1e-4, atol=1e-5)


def test_unknown_onnx_attention_form_is_rejected():
    with pytest.raises(Loc3rError, match="ONNX attention form must be one of fused, decomposed, got 'sdpa'"):
        with ops.onnx_attention_form("sdpa"):
            pass


def test_attention_and_int4_linear_are_differentiable():
    g = torch.Generator().manual_seed(8)
    q = torch.randn(1, 4, 3, 64, generator=g, requires_grad=True)
    k, v = torch.randn(1, 2, 7, 64, generator=g), torch.randn(1, 2, 7, 64, generator=g)
    ops.attention(q, k, v, 4).sum().backward()
    q2 = q.detach().clone().requires_grad_(True)
    sdpa_attention(q2, k, v, 4).sum().backward()
    torch.testing.assert_close(q.grad, q2.grad, atol=1e-5, rtol=1e-4)

    p = quantize_int4(torch.randn(6, 64, generator=g))
    x = torch.randn(2, 64, generator=g, requires_grad=True)
    ops.int4_linear(x, p.packed, p.scales, p.zero_points, 64).sum().backward()
    from loc3r.kernels.int4_layout import dequantize_packed

    torch.testing.assert_close(x.grad, dequantize_packed(p).sum(0).expand(2, 64), atol=1e-5, rtol=1e-5)
