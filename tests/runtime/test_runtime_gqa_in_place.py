"""The KV cache served in place to onnxruntime's GroupQueryAttention through OrtRunner.

A one-node GQA graph, bound with past and present on the same numpy buffers:
chunked prefill, decode, and a rewind all write into the cache without a
reallocation, and the attention output matches a numpy reference.
"""

import numpy as np
import pytest

from loc3r.runtime.backends import resolve_backend
from loc3r.runtime.backends.ort import OrtRunner
from loc3r.runtime.kv_cache import DeviceKVCache, KVCache, KVCacheShape

NH, KVH, D, SMAX = 4, 2, 8, 16


@pytest.fixture
def gqa_graph(tmp_path):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto as T, helper

    node = helper.make_node(
        "GroupQueryAttention",
        ["q", "k", "v", "past_key", "past_value", "seqlens_k", "total_sequence_length"],
        ["out", "present_key", "present_value"],
        domain="com.microsoft", num_heads=NH, kv_num_heads=KVH, name="/attn/GroupQueryAttention",
    )
    vi = helper.make_tensor_value_info
    graph = helper.make_graph(
        [node], "gqa",
        [vi("q", T.FLOAT, [1, "s", NH * D]), vi("k", T.FLOAT, [1, "s", KVH * D]),
         vi("v", T.FLOAT, [1, "s", KVH * D]), vi("past_key", T.FLOAT, [1, KVH, "max", D]),
         vi("past_value", T.FLOAT, [1, KVH, "max", D]), vi("seqlens_k", T.INT32, [1]),
         vi("total_sequence_length", T.INT32, [])],
        [vi("out", T.FLOAT, [1, "s", NH * D]), vi("present_key", T.FLOAT, [1, KVH, "max", D]),
         vi("present_value", T.FLOAT, [1, KVH, "max", D])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 9
    path = tmp_path / "gqa.onnx"
    onnx.save(model, str(path))
    return path


def reference_attention(q, keys, values, start):
    """Causal GQA in numpy: q (1, n, NH*D); keys/values (1, KVH, L, D)."""
    n, total = q.shape[1], keys.shape[2]
    qh = q.reshape(1, n, NH, D).transpose(0, 2, 1, 3)  # (1, NH, n, D)
    kr = np.repeat(keys, NH // KVH, axis=1)  # (1, NH, L, D)
    vr = np.repeat(values, NH // KVH, axis=1)
    s = qh @ kr.transpose(0, 1, 3, 2) / np.sqrt(D)  # (1, NH, n, L)
    mask = np.arange(total)[None, :] <= np.arange(start, start + n)[:, None]
    s = np.where(mask, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return (p @ vr).transpose(0, 2, 1, 3).reshape(1, n, NH * D)


@pytest.mark.parametrize("where", ["host", "device"])
def test_gqa_writes_cache_in_place(gqa_graph, where):
    """Host: numpy buffers wrapped on each call. Device: OrtValues allocated once by the runner
    (the path CUDA takes; on CPU the OrtValues live in host memory)."""
    rng = np.random.default_rng(0)
    shape = KVCacheShape(num_layers=1, batch=1, kv_heads=KVH, max_len=SMAX, head_dim=D)
    written_k = np.zeros((1, KVH, SMAX, D), np.float32)
    written_v = np.zeros_like(written_k)
    with OrtRunner(gqa_graph, resolve_backend("cpu")) as runner:
        kv = KVCache(shape) if where == "host" else DeviceKVCache(shape, runner.device_buffer)
        ptrs = (kv.key(0).data_ptr(), kv.value(0).data_ptr()) if where == "device" else kv.data_pointer()
        for step, n in enumerate([5, 3, 1, "rewind", 2, 1]):
            if n == "rewind":
                kv.rewind_to(6)  # forget the last 3 positions
                continue
            q = rng.standard_normal((1, n, NH * D)).astype(np.float32)
            k = rng.standard_normal((1, n, KVH * D)).astype(np.float32)
            v = rng.standard_normal((1, n, KVH * D)).astype(np.float32)
            seqlens_k, total = kv.gqa_lengths(n)
            out = runner.infer_bound(
                {"q": q, "k": k, "v": v, "past_key": kv.key(0), "past_value": kv.value(0),
                 "seqlens_k": seqlens_k, "total_sequence_length": total},
                in_place={"present_key": kv.key(0), "present_value": kv.value(0)},
                fetch=["out"],
            )["out"]
            start, end = kv.append(n)
            written_k[:, :, start:end] = k.reshape(1, n, KVH, D).transpose(0, 2, 1, 3)
            written_v[:, :, start:end] = v.reshape(1, n, KVH, D).transpose(0, 2, 1, 3)
            keys = kv.key(0).numpy() if where == "device" else kv.key(0)
            values = kv.value(0).numpy() if where == "device" else kv.value(0)
            np.testing.assert_array_equal(keys[:, :, :end], written_k[:, :, :end])
            np.testing.assert_array_equal(values[:, :, :end], written_v[:, :, :end])
            ref = reference_attention(q, written_k[:, :, :end], written_v[:, :, :end], start)
            np.testing.assert_allclose(out, ref, atol=1e-5)
            assert runner.last_inference_time() > 0
        assert kv.length == 9
        if where == "device":
            assert (kv.key(0).data_ptr(), kv.value(0).data_ptr()) == ptrs
        else:
            assert kv.data_pointer() == ptrs
