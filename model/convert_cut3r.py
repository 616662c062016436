"""Read a released CUT3R ``.pth`` safely and convert its pose path.

The released files (``cut3r_512_dpt_4_64.pth``, ``cut3r_224_linear_4.pth``)
are ``torch.save`` zip archives holding ``{'model': state_dict, 'args':
<OmegaConf DictConfig>, 'epoch': ...}``. ``torch.load(weights_only=True)``
refuses them because of the OmegaConf object, and ``weights_only=False``
would run whatever the pickle names. So this module has its own restricted
unpickler:

- tensors are rebuilt from the archive's storages, which are memory-mapped
  (copy-on-write, paged in lazily), so a 3.2 GB file needs little more than
  the pages actually read;
- ``collections.OrderedDict`` is the only other real class it builds;
- every other global (OmegaConf classes, ``os.system``, anything) becomes an
  inert placeholder class: calling it, or restoring its state, just records
  the arguments. Nothing named by the pickle is ever imported or executed.

The config comes from both sources: every dimension and depth is inferred
from tensor shapes; the head counts, image size and RoPE base (which shapes
cannot tell) come from the ``args.model`` constructor string, read with
``ast`` (keyword literals only, never ``eval``). Without that string the
released models' head counts are assumed, and only for their widths.
"""

from __future__ import annotations

import ast
import math
import os
import pickle
import struct
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Optional

import torch

from loc3r.errors import Loc3rError
from loc3r.model.config import PosePriorConfig, cut3r_state_grid_width

# Parts of the CUT3R model that the pose path never reads.
DENSE_HEAD_PREFIXES = (
    "downstream_head.dpt_self.", "downstream_head.dpt_cross.", "downstream_head.dpt_rgb.",
    "downstream_head.final_transform.",
    # The 224 model's linear heads.
    "downstream_head.proj.", "downstream_head.rgb_proj.", "downstream_head.cross_proj.",
    "downstream_head.self_proj.", "downstream_head.cross_conf_proj.", "downstream_head.pose_conf_proj.",
)
# The ray-map branch: with image-only input it is multiplied by zero.
RAY_MAP_PREFIXES = (
    "patch_embed_ray_map.", "enc_blocks_ray_map.", "enc_norm_ray_map.",
    "masked_img_token", "masked_ray_map_token",
)
DROPPED_PREFIXES = DENSE_HEAD_PREFIXES + RAY_MAP_PREFIXES

_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool, "UntypedStorage": torch.uint8,
}
_MAX_LISTED = 20


# --------------------------------------------------------------------------
# Restricted unpickling
# --------------------------------------------------------------------------
class InertObject:
    """Stands in for any object the pickle names; it records, never runs.

    ``origin`` is the ``module.name`` the pickle asked for. Calls,
    ``__setstate__``, item and list updates are all stored as data.
    """

    origin = "?"

    def __new__(cls, *args, **kwargs):
        obj = super().__new__(cls)
        obj.args = args
        obj.kwargs = kwargs
        obj.state = None
        obj.items = []
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.state = state

    def __setitem__(self, key, value):
        self.items.append((key, value))

    def append(self, value):
        self.items.append((None, value))

    def extend(self, values):
        for value in values:
            self.append(value)

    def __repr__(self):
        return f"<inert {self.origin}>"


def _inert_class(module: str, name: str) -> type:
    return type(name, (InertObject,), {"origin": f"{module}.{name}"})


@dataclass(frozen=True)
class _StorageKind:
    dtype: torch.dtype


def _rebuild_tensor(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                    metadata=None):
    if not isinstance(storage, tuple) or len(storage) != 2:
        raise pickle.UnpicklingError("tensor without a storage from the archive")
    untyped, dtype = storage
    tensor = torch.empty((0,), dtype=dtype)
    try:
        return tensor.set_(untyped, storage_offset, tuple(size), tuple(stride))
    except RuntimeError as err:
        raise pickle.UnpicklingError(f"tensor does not fit its storage: {err}") from None


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    return data


_SAFE_GLOBALS = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("collections", "OrderedDict"): OrderedDict,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Builds tensors from memory-mapped archive records and nothing else real."""

    def __init__(self, file, load_storage):
        super().__init__(file)
        self._load_storage = load_storage
        self._storages: dict[str, tuple] = {}

    def find_class(self, module: str, name: str):
        safe = _SAFE_GLOBALS.get((module, name))
        if safe is not None:
            return safe
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageKind(_STORAGE_DTYPES[name])
        return _inert_class(module, name)

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r:.80}")
        _, kind, key, _location, numel = pid
        if not isinstance(kind, _StorageKind):
            raise pickle.UnpicklingError(f"unsupported storage type {kind!r:.80}")
        key = str(key)
        if key not in self._storages:
            itemsize = torch.empty((), dtype=kind.dtype).element_size()
            # Same key -> same storage object, so aliased tensors stay aliased.
            self._storages[key] = (self._load_storage(key, int(numel) * itemsize), kind.dtype)
        return self._storages[key]


def _record_data_offset(archive_file, info: zipfile.ZipInfo) -> int:
    """Byte offset of a stored (uncompressed) zip member's data in the file."""
    archive_file.seek(info.header_offset)
    header = archive_file.read(30)
    if len(header) != 30 or header[:4] != b"PK\x03\x04":
        raise Loc3rError(f"corrupt zip entry '{info.filename}'")
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_len + extra_len


@dataclass(frozen=True)
class Cut3rArchive:
    """What a CUT3R ``.pth`` holds: its state dict and, if present, ``args.model``."""

    state_dict: dict[str, torch.Tensor]
    model_constructor: Optional[str]


def read_cut3r_archive(path: str) -> Cut3rArchive:
    """Read a CUT3R ``.pth`` with the restricted unpickler (never executes pickle globals)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise Loc3rError(f"CUT3R checkpoint not found: {path}")
    if not os.path.isfile(path):
        raise Loc3rError(f"CUT3R checkpoint is not a file: {path}")
    if not zipfile.is_zipfile(path):
        raise Loc3rError(f"{path} is not a torch zip archive (expected a .pth written by torch.save)")
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as err:
        raise Loc3rError(f"{path} is not a readable zip archive: {err}") from None
    with archive, open(path, "rb") as raw:
        pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise Loc3rError(f"{path} is a zip file but not a torch archive (no single data.pkl)")
        prefix = pickles[0][: -len("data.pkl")]
        byteorder = prefix + "byteorder"
        if byteorder in archive.namelist() and archive.read(byteorder).strip() != b"little":
            raise Loc3rError(f"{path} was saved big-endian; only little-endian archives are supported")
        file_size = os.path.getsize(path)
        mapped = torch.UntypedStorage.from_file(path, shared=False, nbytes=file_size)

        def load_storage(key: str, nbytes: int) -> torch.UntypedStorage:
            name = f"{prefix}data/{key}"
            try:
                info = archive.getinfo(name)
            except KeyError:
                raise pickle.UnpicklingError(f"missing storage record '{name}'") from None
            if info.compress_type != zipfile.ZIP_STORED:
                raise pickle.UnpicklingError(f"storage record '{name}' is compressed")
            if info.file_size < nbytes:
                raise pickle.UnpicklingError(f"storage record '{name}' is shorter than its tensor")
            start = _record_data_offset(raw, info)
            if start + nbytes > file_size:
                raise pickle.UnpicklingError(f"storage record '{name}' runs past the end of the file")
            return mapped[start:start + nbytes]

        with archive.open(pickles[0]) as pkl:
            try:
                obj = _RestrictedUnpickler(pkl, load_storage).load()
            except Loc3rError:
                raise
            except Exception as err:  # any malformed pickle: one clear line
                raise Loc3rError(f"cannot read the pickle in {path}: {err}") from None
    return Cut3rArchive(_state_dict_from(obj, path), _find_model_constructor(obj))


def read_cut3r_checkpoint(path: str) -> dict[str, torch.Tensor]:
    """The state dict of a CUT3R ``.pth``: tensors memory-mapped from the file, keys as saved."""
    return read_cut3r_archive(path).state_dict


def _state_dict_from(obj: Any, path: str) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        sd = obj["model"]
    elif isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        sd = obj  # a bare state dict
    else:
        raise Loc3rError(f"{path} holds no 'model' state dict")
    bad = sorted(str(k) for k, v in sd.items() if not isinstance(v, torch.Tensor))
    if bad:
        raise Loc3rError(f"{path}: state dict entries that are not tensors: {_listed(bad)}")
    return dict(sd)


def _find_model_constructor(obj: Any) -> Optional[str]:
    """``args.model`` (the constructor string), searched through inert placeholders.

    OmegaConf keeps it as ``DictConfig.__dict__['_content']['model']``, a
    value node whose ``_val`` is the string; an argparse ``Namespace`` keeps
    it as a plain attribute. Both come out of the restricted unpickler as
    placeholders with their state recorded.
    """
    args = obj.get("args") if isinstance(obj, dict) else None
    if args is None:
        return None
    queue, seen = [(args, 0)], 0
    while queue and seen < 10000:
        node, depth = queue.pop(0)
        seen += 1
        if depth > 8:
            continue
        for key, value in _children(node):
            if key == "model":
                text = _as_string(value)
                if text is not None:
                    return text
            queue.append((value, depth + 1))
    return None


def _children(node: Any) -> list[tuple[Any, Any]]:
    if isinstance(node, dict):
        return list(node.items())
    if isinstance(node, (list, tuple)):
        return [(None, v) for v in node]
    if isinstance(node, InertObject):
        kids = [(None, node.state), (None, node.args)] + list(node.items)
        kids += list(node.kwargs.items())
        extra = getattr(node, "__dict__", {})
        kids += [(k, v) for k, v in extra.items() if k not in ("args", "kwargs", "state", "items")]
        return kids
    return []


def _as_string(value: Any) -> Optional[str]:
    if isinstance(value, str):
        return value
    if isinstance(value, InertObject):
        for _, child in _children(value):
            if isinstance(child, dict) and isinstance(child.get("_val"), str):
                return child["_val"]
    return None


# --------------------------------------------------------------------------
# The constructor string, read without eval
# --------------------------------------------------------------------------
_UNKNOWN = object()
_NAMES = {"inf": math.inf, "True": True, "False": False, "None": None}


def _literal(node: ast.AST) -> Any:
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name):
        return _NAMES.get(node.id, _UNKNOWN)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _literal(node.operand)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return -value if isinstance(node.op, ast.USub) else value
        return _UNKNOWN
    if isinstance(node, (ast.Tuple, ast.List)):
        values = [_literal(e) for e in node.elts]
        return _UNKNOWN if any(v is _UNKNOWN for v in values) else tuple(values)
    return _UNKNOWN


def parse_constructor_kwargs(text: str) -> dict[str, Any]:
    """Keyword literals of every call in a CUT3R constructor string, e.g.
    ``ARCroco3DStereo(ARCroco3DStereoConfig(state_size=768, pos_embed='RoPE100', ...))``.

    Only literals (numbers, strings, tuples, ``inf``, ``True``...) are kept;
    anything else is skipped. Nothing is evaluated.
    """
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as err:
        raise Loc3rError(f"cannot parse the CUT3R model constructor string: {err.msg}") from None
    kwargs: dict[str, Any] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            for keyword in node.keywords:
                if keyword.arg is None:
                    continue
                value = _literal(keyword.value)
                if value is not _UNKNOWN:
                    kwargs[keyword.arg] = value
    return kwargs


# --------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------
def _listed(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_LISTED])
    more = len(keys) - _MAX_LISTED
    return shown + (f" (and {more} more)" if more > 0 else "")


def _count_blocks(sd: dict[str, torch.Tensor], prefix: str) -> int:
    indices = {int(k[len(prefix):].split(".", 1)[0]) for k in sd
               if k.startswith(prefix) and k[len(prefix):].split(".", 1)[0].isdigit()}
    return max(indices) + 1 if indices else 0


_SHAPE_KEYS = ("patch_embed.proj.weight", "register_tokens.weight", "decoder_embed.weight",
               "pose_retriever.mem", "downstream_head.pose_head.mlp.fc1.weight", "enc_blocks.0.mlp.fc1.weight")
# The released models' head counts, by (enc_embed_dim, dec_embed_dim).
_RELEASED_HEADS = {(1024, 768): (16, 12, 16)}


def config_from_cut3r(sd: dict[str, torch.Tensor], constructor_kwargs: Optional[dict] = None) -> PosePriorConfig:
    """The PosePriorConfig of a (prefix-stripped) CUT3R state dict.

    Dimensions and depths come from tensor shapes; head counts, image size
    and RoPE base from the constructor keywords (:func:`parse_constructor_kwargs`).
    """
    kwargs = dict(constructor_kwargs or {})
    absent = [k for k in _SHAPE_KEYS if k not in sd]
    if absent:
        raise Loc3rError(f"CUT3R state dict is missing keys: {_listed(absent)}")
    enc_dim, _, patch, _ = sd["patch_embed.proj.weight"].shape
    state_size = sd["register_tokens.weight"].shape[0]
    dec_dim = sd["decoder_embed.weight"].shape[0]
    mem_slots, mem_dim = sd["pose_retriever.mem"].shape[1:]
    pose_hidden = sd["downstream_head.pose_head.mlp.fc1.weight"].shape[0]
    mlp_ratio = sd["enc_blocks.0.mlp.fc1.weight"].shape[0] / enc_dim

    heads = (kwargs.get("enc_num_heads"), kwargs.get("dec_num_heads"), kwargs.get("state_dec_num_heads"))
    if None in heads:
        released = _RELEASED_HEADS.get((enc_dim, dec_dim))
        if released is None:
            raise Loc3rError(f"cannot tell the head counts of a CUT3R model with widths {enc_dim}/{dec_dim}: "
                             f"its args.model constructor string is missing")
        heads = tuple(h if h is not None else r for h, r in zip(heads, released))

    state_pe = kwargs.get("state_pe", "2d")
    if state_pe != "2d":
        raise Loc3rError(f"unsupported CUT3R state_pe '{state_pe}' (only '2d' is supported)")
    pos_embed = str(kwargs.get("pos_embed", "RoPE100"))
    if not pos_embed.startswith("RoPE"):
        raise Loc3rError(f"unsupported CUT3R pos_embed '{pos_embed}' (only RoPE is supported)")
    try:
        rope_base = float(pos_embed[len("RoPE"):])
    except ValueError:
        raise Loc3rError(f"unsupported CUT3R pos_embed '{pos_embed}'") from None

    # Without args.model: the linear-head (224) release has downstream_head.proj, the DPT (512) one not.
    linear_head = any(k.startswith("downstream_head.proj.") for k in sd)
    img_size = kwargs.get("img_size", 224 if linear_head else 512)
    long_side = max(img_size) if isinstance(img_size, tuple) else int(img_size)
    width = long_side // patch * patch
    # CUT3R's 224 models see square crops; the 512 models a 4:3 frame at 512x384.
    height = width if long_side <= 224 else (width * 3 // 4) // patch * patch

    return PosePriorConfig(
        img_height=int(height), img_width=int(width), patch_size=int(patch),
        enc_embed_dim=int(enc_dim), enc_depth=_count_blocks(sd, "enc_blocks."), enc_num_heads=int(heads[0]),
        dec_embed_dim=int(dec_dim), dec_depth=_count_blocks(sd, "dec_blocks."), dec_num_heads=int(heads[1]),
        state_size=int(state_size), state_dec_num_heads=int(heads[2]),
        state_grid_width=cut3r_state_grid_width(int(state_size)),
        mem_slots=int(mem_slots), mem_dim=int(mem_dim), mem_depth=_count_blocks(sd, "pose_retriever.read_blocks."),
        mlp_ratio=float(mlp_ratio), rope_base=rope_base, pose_head_hidden=int(pose_hidden),
    )


def expected_pose_prior_shapes(cfg: PosePriorConfig) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a PosePrior built from ``cfg`` (on the meta device, no memory)."""
    from loc3r.model.pose_prior import PosePrior

    with torch.device("meta"):
        model = PosePrior(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def convert_cut3r_state_dict(sd: dict[str, torch.Tensor], constructor_kwargs: Optional[dict] = None
                             ) -> tuple[dict[str, torch.Tensor], PosePriorConfig, list[str]]:
    """CUT3R state dict -> (PosePrior state dict, its config, dropped keys).

    Strips a ``module.`` prefix; drops the dense heads and the ray-map branch
    (returned, sorted); refuses unexpected keys, missing keys and shape
    mismatches with one Loc3rError line. Tensors that share storage in the
    result are cloned apart so they can be written to safetensors.
    """
    stripped: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        name = key[len("module."):] if key.startswith("module.") else key
        if name in stripped:
            raise Loc3rError(f"CUT3R state dict has key '{name}' both with and without the 'module.' prefix")
        stripped[name] = value

    cfg = config_from_cut3r(stripped, constructor_kwargs)
    expected = expected_pose_prior_shapes(cfg)
    dropped = sorted(k for k in stripped if k.startswith(DROPPED_PREFIXES))
    unexpected = sorted(k for k in stripped if k not in expected and not k.startswith(DROPPED_PREFIXES))
    if unexpected:
        raise Loc3rError(f"CUT3R state dict has unexpected keys: {_listed(unexpected)}")
    missing = sorted(k for k in expected if k not in stripped)
    if missing:
        raise Loc3rError(f"CUT3R state dict is missing keys: {_listed(missing)}")
    mismatched = [f"'{k}' expected {expected[k]}, found {tuple(stripped[k].shape)}"
                  for k in expected if tuple(stripped[k].shape) != expected[k]]
    if mismatched:
        raise Loc3rError(f"CUT3R shape mismatch: {'; '.join(mismatched[:_MAX_LISTED])}")

    out: dict[str, torch.Tensor] = {}
    owners: dict[tuple[int, int], str] = {}
    for key in expected:
        tensor = stripped[key]
        if not tensor.is_floating_point():
            raise Loc3rError(f"CUT3R key '{key}' has non-float dtype {tensor.dtype}")
        storage = tensor.untyped_storage()
        span = (storage.data_ptr(), storage.nbytes())
        if span in owners or not tensor.is_contiguous():
            tensor = tensor.clone(memory_format=torch.contiguous_format)  # aliased: give it its own storage
        else:
            owners[span] = key
        out[key] = tensor
    return out, cfg, dropped


def convert_cut3r_checkpoint(path: str) -> tuple[dict[str, torch.Tensor], PosePriorConfig, list[str]]:
    """Read a CUT3R ``.pth`` and convert it (:func:`convert_cut3r_state_dict`)."""
    archive = read_cut3r_archive(path)
    kwargs = parse_constructor_kwargs(archive.model_constructor) if archive.model_constructor else None
    return convert_cut3r_state_dict(archive.state_dict, kwargs)
