"""TensorRT optimization profiles for a package's graphs, from the manifest alone.

Every symbolic dimension of a graph input gets a (min, opt, max) range from
its name and the manifest's numbers:

- ``batch``: 1 (one stream);
- ``frames`` (vision tower): 1 .. ``max_frames``, opt 1 (the session embeds
  frame by frame);
- ``seq`` (embed, decoder, lm_head tokens): two profiles. ``prefill``:
  1 .. the prefill chunk (default: the longest of a frame block and 256
  tokens, within the context), opt one frame block (tokens per frame + 1 for
  the newline); ``decode``: exactly 1 token, so TensorRT picks GEMV-shaped
  tactics for generation;
- ``kv_len`` (and any name with ``kv``/``past``/``cache``): the context
  budget. The KV cache is one buffer of ``max_context`` positions that past
  and present share and that is always bound whole, so min = opt = max;
- ``rows`` (heads, BEV head): 1 .. max_context, opt one frame block;
- anything else: 1 .. max_context, opt 1.

Profile 0 always covers every shape the runtime sends, so a runner that
never switches profiles still works; profile 1 (``decode``), where present,
is the fast path for one-token steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from loc3r.errors import Loc3rError
from loc3r.runtime.package import GraphSpec, Manifest

TOKEN_ROLES = ("embed", "decoder", "lm_head")
DEFAULT_PREFILL_CHUNK = 256


@dataclass(frozen=True)
class DimRange:
    min: int
    opt: int
    max: int

    def __post_init__(self) -> None:
        if not 1 <= self.min <= self.opt <= self.max:
            raise Loc3rError(f"bad dimension range min={self.min} opt={self.opt} max={self.max}")


@dataclass(frozen=True)
class Profile:
    """One optimization profile: input name -> (min, opt, max) shapes."""

    name: str
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]


@dataclass(frozen=True)
class ProfileOptions:
    max_frames: int = 4  # frames per vision call
    prefill_chunk: Optional[int] = None  # tokens per prefill call; None: see the module docstring

    def __post_init__(self) -> None:
        if self.max_frames < 1:
            raise Loc3rError(f"--max-frames must be at least 1, got {self.max_frames}")
        if self.prefill_chunk is not None and self.prefill_chunk < 1:
            raise Loc3rError(f"--prefill-chunk must be at least 1, got {self.prefill_chunk}")


def prefill_chunk(manifest: Manifest, options: ProfileOptions) -> int:
    block = manifest.tokens_per_frame + 1  # a frame block and its newline
    want = options.prefill_chunk or max(block, DEFAULT_PREFILL_CHUNK)
    if want > manifest.text.max_context:
        if options.prefill_chunk is not None:
            raise Loc3rError(f"--prefill-chunk {want} exceeds the package's context of {manifest.text.max_context}")
        want = manifest.text.max_context
    return want


def dim_range(name: str, role: str, kind: str, manifest: Manifest, options: ProfileOptions) -> DimRange:
    """The range of symbolic dimension ``name`` of a ``role`` graph in a ``kind`` profile."""
    ctx = manifest.text.max_context
    block = min(manifest.tokens_per_frame + 1, ctx)
    low = name.lower()
    if low == "batch":
        return DimRange(1, 1, 1)
    if low == "frames":
        return DimRange(1, 1, options.max_frames)
    if any(k in low for k in ("kv", "past", "cache")):
        return DimRange(ctx, ctx, ctx)
    if low == "seq" and role in TOKEN_ROLES:
        if kind == "decode":
            return DimRange(1, 1, 1)
        chunk = prefill_chunk(manifest, options)
        return DimRange(1, min(block, chunk), chunk)
    if low == "rows":
        return DimRange(1, block, ctx)
    return DimRange(1, 1, ctx)


def graph_profiles(spec: GraphSpec, manifest: Manifest, options: ProfileOptions = ProfileOptions()) -> list[Profile]:
    """The profiles for one graph: ``[all]``, or ``[prefill, decode]`` for token graphs."""
    symbolic = any(isinstance(d, str) for t in spec.inputs for d in t.shape)
    if not symbolic:
        return []
    seq = spec.role in TOKEN_ROLES and any(d == "seq" for t in spec.inputs for d in t.shape)
    kinds = ("prefill", "decode") if seq else ("all",)
    out = []
    for kind in kinds:
        shapes = {}
        for t in spec.inputs:
            if not t.shape:
                continue  # scalars need no profile
            ranges = [DimRange(d, d, d) if isinstance(d, int) else dim_range(d, spec.role, kind, manifest, options)
                      for d in t.shape]
            shapes[t.name] = (tuple(r.min for r in ranges), tuple(r.opt for r in ranges),
                              tuple(r.max for r in ranges))
        out.append(Profile(kind, shapes))
    return out
