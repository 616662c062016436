"""Graphs over the external-data threshold are saved with their weights beside them, and a
rewritten graph leaves no stale weight file behind (the 2 GB protobuf limit, shrunk for the test)."""

import numpy as np
import onnx
import onnxruntime as ort

import loc3r.export.quantize_files as quantize_files
from loc3r.export.quantize_files import external_data_files, load_graph, save_graph
from loc3r.export.quantize_nbits import NBitsOptions, quantize_matmuls_nbits
from loc3r.export.quantize_select import select_matmuls

from quant_graphs import TinyDecoder, build_decoder, decoder_feeds


def test_large_graph_round_trip(tmp_path, monkeypatch):
    cfg = TinyDecoder()
    path = build_decoder(tmp_path / "decoder.onnx", cfg)
    ref = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(["logits"], decoder_feeds(cfg, 4))[0]
    monkeypatch.setattr(quantize_files, "EXTERNAL_DATA_BYTES", 10_000)  # "large" = over 10 kB here
    model = load_graph(path)
    save_graph(model, path, external_data_files(path))
    assert external_data_files(path) == {"decoder.onnx.data"} and path.stat().st_size < 100_000
    # Quantize and save again: the weights shrink but still go to the side file, rewritten in place.
    side = external_data_files(path)
    before = (tmp_path / "decoder.onnx.data").stat().st_size
    q = quantize_matmuls_nbits(load_graph(path), select_matmuls(model, min_k=32), NBitsOptions(bits=8))
    save_graph(q, path, side)
    assert (tmp_path / "decoder.onnx.data").stat().st_size < before / 2
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(["logits"], decoder_feeds(cfg, 4))[0]
    assert np.abs(got - ref).max() < 0.5
    # Back under the threshold: one file, and the side file is gone.
    monkeypatch.setattr(quantize_files, "EXTERNAL_DATA_BYTES", 10**12)
    save_graph(load_graph(path), path, external_data_files(path))
    assert external_data_files(path) == set() and not (tmp_path / "decoder.onnx.data").exists()
    assert len(onnx.load(str(path)).graph.node) > 0
