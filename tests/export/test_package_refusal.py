"""Exported packages: the CLI, and refusal of tampered or incomplete packages with one clear line."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest

pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from click.testing import CliRunner  # noqa: E402

from loc3r.errors import Loc3rError  # noqa: E402
from loc3r.export.default_model import make_random_checkpoint  # noqa: E402
from loc3r.export.onnx_cli import onnx_command  # noqa: E402
from loc3r.runtime.package import MANIFEST_NAME, TensorSpec, load_package, write_manifest  # noqa: E402
from loc3r.runtime.session import Pipeline  # noqa: E402


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("pkgcli")
    ckpt = make_random_checkpoint(root / "ckpt", preset="test-tiny-nocam", seed=5)
    pkg = root / "pkg"
    result = CliRunner().invoke(onnx_command, [str(ckpt), "--out", str(pkg), "--max-context", "64", "--quiet"])
    assert result.exit_code == 0, result.output
    return ckpt, pkg, result.output


@pytest.fixture
def copy(made, tmp_path):
    dst = tmp_path / "pkg"
    shutil.copytree(made[1], dst)
    return dst


def refusal(pkg) -> str:
    with pytest.raises(Loc3rError) as err:
        Pipeline.load(pkg, "cpu")
    message = str(err.value)
    assert "\n" not in message
    return message


def test_cli_writes_a_verified_package(made):
    ckpt, pkg, output = made
    assert "7 graphs" not in output and "6 graphs" in output  # no pose prior without camera tokens
    assert "context 64 tokens" in output
    manifest = load_package(pkg).manifest
    assert [g.role for g in manifest.graphs] == ["vision", "embed", "decoder", "lm_head", "heads", "bev_head"]
    assert set(manifest.files) == {g.file for g in manifest.graphs} | {"tokenizer.json"}
    assert manifest.precision == "fp32" and not manifest.camera_tokens
    Pipeline.load(pkg, "cpu")  # every graph's I/O agrees with the manifest


def test_cli_errors_are_one_line(made, tmp_path):
    ckpt, pkg, _ = made
    runner = CliRunner()
    r = runner.invoke(onnx_command, [str(ckpt), "--out", str(pkg)])
    assert r.exit_code != 0 and "is not empty" in r.output and r.output.count("\n") == 1
    r = runner.invoke(onnx_command, [str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    assert r.exit_code != 0 and "checkpoint directory not found" in r.output and r.output.count("\n") == 1
    r = runner.invoke(onnx_command, [str(ckpt), "--out", str(tmp_path / "o"), "--max-context", "3"])
    assert r.exit_code != 0 and "--max-context 3 is too small" in r.output
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())
    try:
        import loc3r.export.quantize  # noqa: F401
    except ImportError:
        r = runner.invoke(onnx_command, [str(ckpt), "--out", str(tmp_path / "q"), "--precision", "int4"])
        assert r.exit_code != 0 and "needs loc3r.export.quantize" in r.output


def test_changed_byte_is_refused(copy):
    path = copy / "decoder.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    assert "checksum mismatch for decoder.onnx" in refusal(copy)


def test_missing_file_is_refused(copy):
    (copy / "lm_head.onnx").unlink()
    assert "incomplete: missing file lm_head.onnx" in refusal(copy)


def test_unknown_format_version_is_refused(copy):
    raw = json.loads((copy / MANIFEST_NAME).read_text())
    raw["format_version"] = 99
    (copy / MANIFEST_NAME).write_text(json.dumps(raw))
    assert "unsupported model package format_version 99" in refusal(copy)


def test_graph_io_disagreeing_with_manifest_is_refused(copy):
    manifest = load_package(copy).manifest
    dec = manifest.graph("decoder")
    renamed = tuple(TensorSpec("input_embeds", t.dtype, t.shape) if t.name == "inputs_embeds" else t
                    for t in dec.inputs)
    graphs = tuple(dataclasses.replace(g, inputs=renamed) if g.role == "decoder" else g for g in manifest.graphs)
    write_manifest(copy, dataclasses.replace(manifest, graphs=graphs))  # checksums are fine, I/O is not
    message = refusal(copy)
    assert "decoder.onnx inputs differ from the manifest" in message
    assert "missing input_embeds" in message and "unexpected inputs_embeds" in message


def test_swapped_graph_file_is_refused(copy):
    manifest = load_package(copy).manifest
    shutil.copyfile(copy / "bev_head.onnx", copy / "heads.onnx")
    write_manifest(copy, manifest)
    assert "heads.onnx inputs differ from the manifest" in refusal(copy)


def test_loc3r_export_onnx_is_reachable_from_the_loc3r_group(made, tmp_path):
    from loc3r.cli import main

    ckpt = made[0]
    r = CliRunner().invoke(main, ["export", "onnx", "--help"])
    assert r.exit_code == 0 and "--precision" in r.output and "--max-context" in r.output
    r = CliRunner().invoke(main, ["export", "onnx", str(ckpt), "--out", str(tmp_path / "p"), "--max-context", "48",
                                  "--quiet"])
    assert r.exit_code == 0, r.output
    assert load_package(tmp_path / "p").manifest.text.max_context == 48


def test_no_fuse_matmuls_keeps_the_projections_apart(made, tmp_path):
    from loc3r.export.quantize import QUANT_REPORT

    ckpt = made[0]
    runner = CliRunner()
    for flags, fused in (([], True), (["--no-fuse-matmuls"], False)):
        out = tmp_path / f"int4-{fused}"
        r = runner.invoke(onnx_command, [str(ckpt), "--out", str(out), "--precision", "int4", "--quiet", *flags])
        assert r.exit_code == 0, r.output
        report = json.loads((out / QUANT_REPORT).read_text())["graphs"]["decoder"]
        assert ("fused" in report) == fused
        assert any("q_proj+k_proj+v_proj" in n for n in report["nodes"]) == fused


def test_int4_lm_head_bits_flag(made, tmp_path):
    from loc3r.export.quantize import QUANT_REPORT

    r = CliRunner().invoke(onnx_command, [str(made[0]), "--out", str(tmp_path / "p"), "--precision", "int4",
                                          "--quiet", "--int4-lm-head-bits", "4"])
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "p" / QUANT_REPORT).read_text())["graphs"]
    assert report["lm_head"]["method"] == "MatMulNBits-4" and "nodes_8bit" not in report["lm_head"]
