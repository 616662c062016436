import json
import subprocess
import sys

import pytest

from loc3r.errors import Loc3rError
from loc3r.runtime import package as pkgmod
from loc3r.runtime.package import (
    ChatTemplate,
    GraphSpec,
    TensorSpec,
    check_graph_io,
    load_package,
)


def test_round_trip(tiny_package):
    pkg = load_package(tiny_package)
    m = pkg.manifest
    assert m.format_version == 1
    assert m.name == "test-pkg"
    assert set(m.files) == {"tokenizer.json", "heads.onnx"}
    assert m.graph("heads").inputs[0] == TensorSpec("x", "float32", ("batch", 4))
    assert m.tokens_per_frame == 5  # 4 pooled + camera token
    assert m.vision.mean == (0.5, 0.5, 0.5)
    raw = json.loads((tiny_package / "loc3r.json").read_text())
    assert pkgmod.Manifest.from_dict(raw) == m


def test_unknown_format_version(tiny_package):
    path = tiny_package / "loc3r.json"
    raw = json.loads(path.read_text())
    raw["format_version"] = 7
    path.write_text(json.dumps(raw))
    with pytest.raises(Loc3rError) as e:
        load_package(tiny_package)
    assert str(e.value) == (
        f"unsupported model package format_version 7 in {path}; this loc3r reads format_version 1"
    )


def test_missing_file(tiny_package):
    (tiny_package / "heads.onnx").unlink()
    with pytest.raises(Loc3rError) as e:
        load_package(tiny_package)
    assert str(e.value) == f"model package {tiny_package} is incomplete: missing file heads.onnx"


def test_tampered_byte(tiny_package):
    path = tiny_package / "heads.onnx"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(Loc3rError) as e:
        load_package(tiny_package)
    assert str(e.value) == (
        f"model package {tiny_package} is corrupt or tampered: checksum mismatch for heads.onnx"
    )


def test_not_a_package(tmp_path):
    with pytest.raises(Loc3rError) as e:
        load_package(tmp_path)
    assert str(e.value) == f"not a loc3r model package: {tmp_path} has no loc3r.json"
    with pytest.raises(Loc3rError, match="model directory not found"):
        load_package(tmp_path / "nope")


def test_malformed_manifest(tiny_package):
    path = tiny_package / "loc3r.json"
    raw = json.loads(path.read_text())
    del raw["text"]
    path.write_text(json.dumps(raw))
    with pytest.raises(Loc3rError) as e:
        load_package(tiny_package)
    assert str(e.value) == f"malformed {path}: missing field 'text'"
    path.write_text("{not json")
    with pytest.raises(Loc3rError, match="cannot read"):
        load_package(tiny_package)


def test_write_manifest_requires_files(tmp_path, package_builders):
    vocab = package_builders.write_tokenizer(tmp_path / "tokenizer.json")
    with pytest.raises(Loc3rError) as e:
        pkgmod.write_manifest(tmp_path, package_builders.tiny_manifest(vocab))
    assert str(e.value) == f"cannot write manifest: {tmp_path} lacks heads.onnx"


def test_graph_io_check():
    g = GraphSpec("heads", "heads.onnx", (TensorSpec("x", "float32", ("batch", 4)),),
                  (TensorSpec("y", "float32", ("batch", 4)),))
    check_graph_io(g, [TensorSpec("x", "float32", ("n", 4))], [TensorSpec("y", "float32", (2, 4))])
    with pytest.raises(Loc3rError) as e:
        check_graph_io(g, [TensorSpec("z", "float32", ("n", 4))], [TensorSpec("y", "float32", (2, 4))])
    assert str(e.value) == "graph heads.onnx inputs differ from the manifest: missing x; unexpected z"
    with pytest.raises(Loc3rError) as e:
        check_graph_io(g, [TensorSpec("x", "float16", ("n", 4))], [TensorSpec("y", "float32", (2, 4))])
    assert str(e.value) == "graph heads.onnx input 'x' has dtype float16, manifest says float32"
    with pytest.raises(Loc3rError) as e:
        check_graph_io(g, [TensorSpec("x", "float32", ("n", 5))], [TensorSpec("y", "float32", (2, 4))])
    assert str(e.value) == "graph heads.onnx input 'x' has shape ['n', 5], manifest says ['batch', 4]"


def test_chat_template_render():
    t = ChatTemplate(prefix="P", suffix="{situation} Q: {question} A:")
    assert t.render_suffix("where {x}?", None) == " Q: where {x}? A:"
    assert t.render_suffix("q", "I sit") == "I sit<Pos><Ori> Q: q A:"
    t2 = ChatTemplate(prefix="P", suffix="{question} | {situation}")
    assert t2.render_suffix("q {situation}", "s") == "q {situation} | s<Pos><Ori>"
    with pytest.raises(Loc3rError, match=r"must contain \{question\} exactly once"):
        ChatTemplate(prefix="", suffix="{situation}")


def test_manifest_validation(tiny_package):
    m = load_package(tiny_package).manifest
    import dataclasses

    with pytest.raises(Loc3rError, match="unknown precision 'fp8'"):
        dataclasses.replace(m, precision="fp8")
    dup = m.graphs + m.graphs
    with pytest.raises(Loc3rError, match="more than once: heads"):
        dataclasses.replace(m, graphs=dup)
    with pytest.raises(Loc3rError) as e:
        m.graph("vision")
    assert str(e.value) == "model package has no 'vision' graph"
    assert m.graph_format == "onnx"
    with pytest.raises(Loc3rError, match="graph x.plan has unknown format 'plan'"):
        dataclasses.replace(m.graphs[0], file="x.plan", format="plan")
    engine = dataclasses.replace(m.graphs[0], role="vision", file="vision.engine", format="tensorrt")
    with pytest.raises(Loc3rError, match=r"mixes graph formats \(onnx, tensorrt\)"):
        dataclasses.replace(m, graphs=m.graphs + (engine,)).graph_format


def test_default_package_dir_message(monkeypatch, tmp_path):
    import loc3r

    monkeypatch.setattr(loc3r, "__file__", str(tmp_path / "loc3r" / "__init__.py"))
    with pytest.raises(Loc3rError, match="no embedded default model in this installation"):
        pkgmod.default_package_dir()


def test_runtime_never_imports_torch():
    # Every module of loc3r.runtime (found by walking the package, so new ones are covered),
    # then a whole question answered on the embedded package: torch must stay out.
    code = (
        "import sys, pkgutil, importlib, numpy as np, loc3r.runtime as rt\n"
        "names = [m.name for m in pkgutil.walk_packages(rt.__path__, 'loc3r.runtime.')]\n"
        "for n in names: importlib.import_module(n)\n"
        "from loc3r.runtime.package import default_package_dir\n"
        "from loc3r.runtime.session import Pipeline\n"
        "s = Pipeline.load(default_package_dir(), 'cpu').new_session()\n"
        "s.add_frame(np.zeros((48, 64, 3), np.uint8), 0.0)\n"
        "s.ask('how many chairs are there?', situation='I am standing next to the red chair.', max_new_tokens=2)\n"
        "assert 'torch' not in sys.modules, 'torch imported'; print(len(names))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.strip()) >= 15
