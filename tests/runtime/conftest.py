"""Fixtures for runtime tests: a tiny model package built in the test (no blobs in git)."""

from __future__ import annotations

from pathlib import Path

import pytest

from loc3r.runtime.package import (
    ChatTemplate,
    GraphSpec,
    Manifest,
    PosePriorSpec,
    SpecialTokens,
    TensorSpec,
    TextSpec,
    VisionSpec,
    write_manifest,
)

WORDS = ["what", "is", "on", "my", "left", "i", "am", "sitting", "the", "bed", "a", "chair",
         "table", "user", "assistant", "video", "?", ".", ":"]
SPECIALS = ["<pad>", "<unk>", "<eos>", "<Pos>", "<Ori>", "<im_start>", "<im_end>"]


def write_tokenizer(path: Path) -> dict[str, int]:
    """A word-level tokenizer.json; returns its vocab."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import WordLevel

    vocab = {t: i for i, t in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    tok.add_special_tokens(SPECIALS)
    tok.save(str(path))
    return vocab


def write_add_one_graph(path: Path, in_name: str = "x", out_name: str = "y") -> None:
    """A one-node ONNX graph: y = x + 1, x (batch, 4) float32."""
    import onnx
    from onnx import TensorProto, helper

    one = helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])
    graph = helper.make_graph(
        [helper.make_node("Add", [in_name, "one"], [out_name], name="/add")],
        "add_one",
        [helper.make_tensor_value_info(in_name, TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info(out_name, TensorProto.FLOAT, ["batch", 4])],
        initializer=[one],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, str(path))


def tiny_manifest(vocab: dict[str, int], graphs=None) -> Manifest:
    add_one = GraphSpec(
        role="heads",
        file="heads.onnx",
        inputs=(TensorSpec("x", "float32", ("batch", 4)),),
        outputs=(TensorSpec("y", "float32", ("batch", 4)),),
    )
    return Manifest(
        name="test-pkg",
        precision="fp32",
        vision=VisionSpec(image_size=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
                          patch_grid=4, pooled_grid=2, tokens_per_frame=4),
        pose_prior=PosePriorSpec(img_height=32, img_width=48, patch_size=16, mean=(0.5, 0.5, 0.5),
                                 std=(0.5, 0.5, 0.5), state_tokens=8, state_dim=32, mem_slots=8, mem_dim=64),
        text=TextSpec(hidden_size=64, num_layers=2, num_kv_heads=2, head_dim=16, max_context=512,
                      vocab_size=len(vocab)),
        special_tokens=SpecialTokens(pos=vocab["<Pos>"], ori=vocab["<Ori>"], eos=vocab["<eos>"],
                                     pad=vocab["<pad>"]),
        chat_template=ChatTemplate(
            prefix="<im_start> user :",
            suffix="{situation} {question} <im_end> <im_start> assistant :",
        ),
        orientation_bins_deg=tuple(float(10 * i) for i in range(36)),
        graphs=(add_one,) if graphs is None else graphs,
    )


@pytest.fixture
def tiny_package(tmp_path) -> Path:
    """A complete, valid package directory with one graph (heads.onnx: y = x + 1)."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    vocab = write_tokenizer(pkg / "tokenizer.json")
    write_add_one_graph(pkg / "heads.onnx")
    write_manifest(pkg, tiny_manifest(vocab))
    return pkg


@pytest.fixture
def package_builders():
    """The builder functions, for tests that assemble a package themselves."""
    import types

    return types.SimpleNamespace(
        write_tokenizer=write_tokenizer, write_add_one_graph=write_add_one_graph, tiny_manifest=tiny_manifest
    )
