"""The model package contract, shared by export (writer) and runtime (reader).

A model package is a directory::

    loc3r.json        the manifest (this module's :class:`Manifest`)
    tokenizer.json    HF ``tokenizers`` file
    <graph files>     e.g. pose_prior.onnx, vision.onnx, decoder.onnx, ...
                      (ONNX external-data files are listed as plain files)

The manifest is plain JSON mapped onto frozen dataclasses. ``format_version``
is an int, bumped whenever a reader of the old version would misread a new
package; a reader refuses any version it does not know. Every file in the
package is listed with its sha256; :func:`load_package` refuses a package with
a missing file or a checksum mismatch. Whether a graph's actual inputs and
outputs agree with its manifest entry is checked when a backend loads it
(:func:`check_graph_io`), since reading graph I/O needs the backend.

Export writes with :func:`write_manifest`; the runtime reads with
:func:`load_package`. This module imports only the standard library.

Graph roles and their I/O names (batch 1 for the streaming graphs; ``H``
hidden size, ``L`` layers, ``KVH`` KV heads, ``D`` head dim, ``S_max`` the
context budget, ``T`` a symbolic token count, ``N`` a symbolic frame count):

- ``pose_prior``: one recurrent CUT3R step per frame.
  in ``image`` (1, 3, h, w) f32, ``state`` (1, S, Ds), ``memory`` (1, M, Dm),
  ``first_frame`` (1,) bool (the graph then ignores ``state``/``memory`` and
  starts from its learned initial values, so the runtime passes zeros);
  out ``camera_token`` (1, Dc), ``pose`` (1, 7) (translation xyz + quaternion
  wxyz, camera-to-world of frame 0), ``next_state``, ``next_memory``.
- ``vision``: SigLIP + projector + 2x2 bilinear pooling + ``f_cam``.
  in ``pixel_values`` (N, 3, s, s) f32, ``camera_token`` (N, Dc) (absent
  without camera tokens); out ``frame_embeds`` (N, tokens_per_frame, H),
  camera token first.
- ``embed``: in ``input_ids`` (1, T) int64; out ``inputs_embeds`` (1, T, H)
  and ``image_newline`` (H,) (the learned token after the last frame).
- ``decoder``: Qwen2 layers, one GroupQueryAttention node per layer, rotary
  inside, past and present sharing one S_max buffer.
  in ``inputs_embeds`` (1, T, H), ``past_key_values.{i}.key`` /
  ``past_key_values.{i}.value`` (1, KVH, S_max, D) for i < L,
  ``seqlens_k`` (1,) int32, ``total_sequence_length`` () int32;
  out ``hidden_states`` (1, T, H) (after the final norm),
  ``present.{i}.key`` / ``present.{i}.value`` (1, KVH, S_max, D).
- ``lm_head``: in ``hidden_states`` (1, T, H); out ``logits`` (1, T, V).
- ``heads``: in ``pos_hidden`` (1, H), ``ori_hidden`` (1, H); out
  ``position`` (1, 3) (x, y in metres, sigma > 0), ``orientation_logits``
  (1, n_bins) over ``orientation_bins_deg``.
- ``bev_head``: in ``token_hidden`` (1, T, H); out ``bev`` (1, T, 4)
  (x, y, sigma_x, sigma_y in metres).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

from loc3r.errors import Loc3rError

FORMAT_VERSION = 1
# What the ONNX graphs were exported for (optional manifest field, absent = onnxruntime):
# onnxruntime contrib attention ops, or loc3r::FusedAttention TensorRT plugin nodes.
TARGETS = ("onnxruntime", "tensorrt")
DEFAULT_TARGET = "onnxruntime"
MANIFEST_NAME = "loc3r.json"
TOKENIZER_NAME = "tokenizer.json"
PRECISIONS = ("fp32", "fp16", "int8", "int4")
# Graph roles the runtime knows. A package lists each role at most once.
GRAPH_ROLES = ("pose_prior", "vision", "embed", "decoder", "lm_head", "heads", "bev_head")
GRAPH_FORMATS = ("onnx", "tensorrt")
# Element types as ONNX spells them (onnx.TensorProto names, lower case).
DTYPES = ("float32", "float16", "bfloat16", "int64", "int32", "int8", "uint8", "bool")

Dim = Union[int, str]  # a fixed size, or a symbolic dimension name


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: name, element type and shape.

    A dimension is an int (fixed) or a string (symbolic, e.g. ``"batch"``,
    ``"seq"``). Symbolic names match any size.
    """

    name: str
    dtype: str
    shape: tuple[Dim, ...]

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise Loc3rError(f"tensor '{self.name}' has unknown dtype '{self.dtype}'; known: {', '.join(DTYPES)}")


@dataclass(frozen=True)
class GraphSpec:
    """One graph file: its role in the pipeline, file name and I/O."""

    role: str
    file: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    # "onnx" or "tensorrt" (a serialized engine built for one device).
    format: str = "onnx"

    def __post_init__(self) -> None:
        if self.format not in GRAPH_FORMATS:
            raise Loc3rError(
                f"graph {self.file} has unknown format '{self.format}'; known: {', '.join(GRAPH_FORMATS)}"
            )

    def input(self, name: str) -> TensorSpec:
        return _find(self.inputs, name, f"graph '{self.role}' input")

    def output(self, name: str) -> TensorSpec:
        return _find(self.outputs, name, f"graph '{self.role}' output")


@dataclass(frozen=True)
class VisionSpec:
    """SigLIP input and token geometry."""

    image_size: int  # square input, pixels
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    patch_grid: int  # patches per side before pooling
    pooled_grid: int  # per side after pooling
    tokens_per_frame: int  # pooled vision tokens per frame (no camera token)


@dataclass(frozen=True)
class PosePriorSpec:
    """CUT3R-style pose prior input geometry and recurrent state sizes."""

    img_height: int
    img_width: int
    patch_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    state_tokens: int
    state_dim: int
    mem_slots: int
    mem_dim: int
    # The pose image also carries the previous frame (6 channels; PosePriorConfig.previous_frame).
    previous_frame: bool = False


@dataclass(frozen=True)
class TextSpec:
    """Qwen2 decoder numbers the runtime needs for the KV cache and decoding."""

    hidden_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    max_context: int  # the KV budget the decoder graph was exported for
    vocab_size: int


@dataclass(frozen=True)
class SpecialTokens:
    pos: int  # <Pos>
    ori: int  # <Ori>
    eos: int
    pad: int


@dataclass(frozen=True)
class ChatTemplate:
    """The prompt around the video.

    The token sequence is ``prefix``, the frame blocks, then ``suffix`` with
    its ``{situation}`` slot filled by ``situation`` (itself with a
    ``{situation}`` slot; it must contain ``<Pos><Ori>``) when a situation is
    given, or by the empty string when not, and ``{question}`` by the question.
    """

    prefix: str
    suffix: str
    situation: str = "{situation}<Pos><Ori>"

    def __post_init__(self) -> None:
        for slot in ("{situation}", "{question}"):
            if self.suffix.count(slot) != 1:
                raise Loc3rError(f"chat template suffix must contain {slot} exactly once")
        if self.situation.count("{situation}") != 1:
            raise Loc3rError("chat template situation must contain {situation} exactly once")

    def render_suffix(self, question: str, situation: Optional[str]) -> str:
        sit = "" if situation is None else self.situation.replace("{situation}", situation)
        # Plain replacement, not str.format: user text may contain braces.
        head, tail = self.suffix.split("{question}")
        if "{situation}" in head:
            return head.replace("{situation}", sit) + question + tail
        return head + question + tail.replace("{situation}", sit)


@dataclass(frozen=True)
class Manifest:
    """The contents of ``loc3r.json``."""

    name: str
    precision: str
    vision: VisionSpec
    text: TextSpec
    special_tokens: SpecialTokens
    chat_template: ChatTemplate
    orientation_bins_deg: tuple[float, ...]
    graphs: tuple[GraphSpec, ...]
    pose_prior: Optional[PosePriorSpec] = None  # None: no pose prior in this model
    camera_tokens: bool = True  # a camera token leads each frame block
    target: str = DEFAULT_TARGET  # one of TARGETS; written only when not the default
    # file name -> sha256 hex, for every file but the manifest itself.
    # Filled by write_manifest.
    files: dict[str, str] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise Loc3rError(f"unknown precision '{self.precision}'; known: {', '.join(PRECISIONS)}")
        roles = [g.role for g in self.graphs]
        for role in roles:
            if role not in GRAPH_ROLES:
                raise Loc3rError(f"unknown graph role '{role}'; known: {', '.join(GRAPH_ROLES)}")
        dup = sorted({r for r in roles if roles.count(r) > 1})
        if dup:
            raise Loc3rError(f"manifest lists graph role(s) more than once: {', '.join(dup)}")
        if self.camera_tokens and self.pose_prior is None:
            raise Loc3rError("manifest enables camera tokens but has no pose prior")
        if self.target not in TARGETS:
            raise Loc3rError(f"unknown export target '{self.target}'; known: {', '.join(TARGETS)}")

    @property
    def graph_format(self) -> str:
        """"onnx" or "tensorrt": the one format of all this package's graphs."""
        formats = sorted({g.format for g in self.graphs})
        if len(formats) != 1:
            raise Loc3rError(f"model package mixes graph formats ({', '.join(formats) or 'none'})")
        return formats[0]

    @property
    def tokens_per_frame(self) -> int:
        """Tokens in one frame block: the camera token (if any) + pooled vision tokens."""
        return self.vision.tokens_per_frame + (1 if self.camera_tokens else 0)

    def graph(self, role: str) -> GraphSpec:
        for g in self.graphs:
            if g.role == role:
                return g
        raise Loc3rError(f"model package has no '{role}' graph")

    def has_graph(self, role: str) -> bool:
        return any(g.role == role for g in self.graphs)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if d["target"] == DEFAULT_TARGET:
            del d["target"]  # packages for onnxruntime stay readable by loaders without the field
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Manifest":
        return _manifest_from_dict(d)


@dataclass(frozen=True)
class Package:
    """A verified model package on disk."""

    root: Path
    manifest: Manifest

    def path(self, file: str) -> Path:
        return self.root / file

    def graph_path(self, role: str) -> Path:
        return self.root / self.manifest.graph(role).file

    @property
    def tokenizer_path(self) -> Path:
        return self.root / TOKENIZER_NAME


def _find(specs: Sequence[TensorSpec], name: str, what: str) -> TensorSpec:
    for s in specs:
        if s.name == name:
            return s
    raise Loc3rError(f"{what} '{name}' is not in the manifest")


def sha256_of_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def package_files(pkg_dir: Path) -> list[str]:
    """Every regular file under ``pkg_dir`` except the manifest, as posix relative paths."""
    out = []
    for p in sorted(Path(pkg_dir).rglob("*")):
        if p.is_file() and p.name != MANIFEST_NAME:
            out.append(p.relative_to(pkg_dir).as_posix())
    return out


def write_manifest(pkg_dir: Union[str, Path], manifest: Manifest) -> Manifest:
    """Write ``loc3r.json`` into ``pkg_dir``, with the sha256 of every other file there.

    Every graph file and ``tokenizer.json`` must already be in ``pkg_dir``.
    Returns the manifest as written (with ``files`` filled in).
    """
    pkg_dir = Path(pkg_dir)
    names = package_files(pkg_dir)
    needed = [g.file for g in manifest.graphs] + [TOKENIZER_NAME]
    missing = [n for n in needed if n not in names]
    if missing:
        raise Loc3rError(f"cannot write manifest: {pkg_dir} lacks {', '.join(missing)}")
    files = {n: sha256_of_file(pkg_dir / n) for n in names}
    manifest = dataclasses.replace(manifest, files=files)
    text = json.dumps(manifest.to_dict(), indent=2, sort_keys=False)
    tmp = pkg_dir / (MANIFEST_NAME + ".tmp")
    tmp.write_text(text + "\n")
    os.replace(tmp, pkg_dir / MANIFEST_NAME)
    return manifest


def load_package(pkg_dir: Union[str, Path], verify_checksums: bool = True) -> Package:
    """Read and verify the package in ``pkg_dir``.

    Refuses (Loc3rError): a directory that is not a package, an unreadable or
    malformed manifest, an unknown ``format_version``, a missing file, and a
    checksum mismatch.
    """
    root = Path(pkg_dir)
    if not root.exists():
        raise Loc3rError(f"model directory not found: {root}")
    if not root.is_dir():
        raise Loc3rError(f"model path is not a directory: {root}")
    mpath = root / MANIFEST_NAME
    if not mpath.is_file():
        raise Loc3rError(f"not a loc3r model package: {root} has no {MANIFEST_NAME}")
    try:
        raw = json.loads(mpath.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise Loc3rError(f"cannot read {mpath}: {exc}") from None
    if not isinstance(raw, dict):
        raise Loc3rError(f"malformed manifest {mpath}: expected a JSON object")
    version = raw.get("format_version")
    if version != FORMAT_VERSION:
        raise Loc3rError(
            f"unsupported model package format_version {version!r} in {mpath}; "
            f"this loc3r reads format_version {FORMAT_VERSION}"
        )
    manifest = _manifest_from_dict(raw, where=str(mpath))
    listed = set(manifest.files)
    for needed in [g.file for g in manifest.graphs] + [TOKENIZER_NAME]:
        if needed not in listed:
            raise Loc3rError(f"model package {root} is incomplete: manifest has no checksum for {needed}")
    for name in sorted(listed):
        if not (root / name).is_file():
            raise Loc3rError(f"model package {root} is incomplete: missing file {name}")
    if verify_checksums:
        for name, digest in sorted(manifest.files.items()):
            if sha256_of_file(root / name) != digest:
                raise Loc3rError(
                    f"model package {root} is corrupt or tampered: checksum mismatch for {name}"
                )
    return Package(root=root, manifest=manifest)


def check_graph_io(
    graph: GraphSpec,
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
) -> None:
    """Refuse a graph whose actual I/O differs from its manifest entry.

    ``inputs``/``outputs`` are what the backend reports. Names and dtypes must
    match exactly, in any order; shapes must have the same rank, and a fixed
    dimension must equal the manifest's fixed dimension (a symbolic dimension
    on either side matches anything).
    """
    for kind, want, got in (("inputs", graph.inputs, inputs), ("outputs", graph.outputs, outputs)):
        want_names = {t.name for t in want}
        got_names = {t.name for t in got}
        if want_names != got_names:
            extra = sorted(got_names - want_names)
            lacking = sorted(want_names - got_names)
            parts = []
            if lacking:
                parts.append(f"missing {', '.join(lacking)}")
            if extra:
                parts.append(f"unexpected {', '.join(extra)}")
            raise Loc3rError(
                f"graph {graph.file} {kind} differ from the manifest: {'; '.join(parts)}"
            )
        by_name = {t.name: t for t in got}
        for w in want:
            g = by_name[w.name]
            if g.dtype != w.dtype:
                raise Loc3rError(
                    f"graph {graph.file} {kind[:-1]} '{w.name}' has dtype {g.dtype}, manifest says {w.dtype}"
                )
            if not _shapes_agree(w.shape, g.shape):
                raise Loc3rError(
                    f"graph {graph.file} {kind[:-1]} '{w.name}' has shape {list(g.shape)}, "
                    f"manifest says {list(w.shape)}"
                )


def _shapes_agree(want: Sequence[Dim], got: Sequence[Dim]) -> bool:
    if len(want) != len(got):
        return False
    return all(isinstance(a, str) or isinstance(b, str) or b is None or a == b for a, b in zip(want, got))


def default_package_dir() -> Path:
    """The embedded default package, ``loc3r/default_model/`` in the installed package."""
    import loc3r

    path = Path(loc3r.__file__).resolve().parent / "default_model"
    if not (path / MANIFEST_NAME).is_file():
        raise Loc3rError(
            f"no embedded default model in this installation ({path} has no {MANIFEST_NAME}); "
            "pass --model PKG_DIR (build one with 'loc3r export onnx')"
        )
    return path


# ---- JSON -> dataclasses, with one clear line on any malformed field ----


def _manifest_from_dict(d: dict, where: str = "manifest") -> Manifest:
    try:
        d = dict(d)
        _no_unknown(d, Manifest, where)
        pose = d.get("pose_prior")
        return Manifest(
            format_version=int(d["format_version"]),
            name=str(d["name"]),
            precision=str(d["precision"]),
            vision=_plain(VisionSpec, d["vision"], where),
            text=_plain(TextSpec, d["text"], where),
            special_tokens=_plain(SpecialTokens, d["special_tokens"], where),
            chat_template=_plain(ChatTemplate, d["chat_template"], where),
            orientation_bins_deg=tuple(float(x) for x in d["orientation_bins_deg"]),
            graphs=tuple(_graph_from_dict(g, where) for g in d["graphs"]),
            pose_prior=None if pose is None else _plain(PosePriorSpec, pose, where),
            camera_tokens=bool(d.get("camera_tokens", True)),
            target=str(d.get("target", DEFAULT_TARGET)),
            files={str(k): str(v) for k, v in d.get("files", {}).items()},
        )
    except Loc3rError:
        raise
    except KeyError as exc:
        raise Loc3rError(f"malformed {where}: missing field {exc.args[0]!r}") from None
    except (TypeError, ValueError, AttributeError) as exc:
        raise Loc3rError(f"malformed {where}: {exc}") from None


def _no_unknown(d: dict, kind: type, where: str) -> None:
    known = {f.name for f in dataclasses.fields(kind)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise Loc3rError(f"malformed {where}: unknown {kind.__name__} field(s) {', '.join(unknown)}")


def _plain(kind: type, d: dict, where: str):
    """A dataclass of scalars and tuples from a JSON object."""
    if not isinstance(d, dict):
        raise Loc3rError(f"malformed {where}: {kind.__name__} must be an object")
    _no_unknown(d, kind, where)
    return kind(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def _tensor_from_dict(d: dict, where: str) -> TensorSpec:
    _no_unknown(d, TensorSpec, where)
    shape = tuple(x if isinstance(x, str) else int(x) for x in d["shape"])
    return TensorSpec(name=str(d["name"]), dtype=str(d["dtype"]), shape=shape)


def _graph_from_dict(d: dict, where: str) -> GraphSpec:
    _no_unknown(d, GraphSpec, where)
    return GraphSpec(
        role=str(d["role"]),
        file=str(d["file"]),
        inputs=tuple(_tensor_from_dict(t, where) for t in d["inputs"]),
        outputs=tuple(_tensor_from_dict(t, where) for t in d["outputs"]),
        format=str(d.get("format", "onnx")),
    )
