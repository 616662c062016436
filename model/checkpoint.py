"""Our checkpoint format: a directory with

- ``config.json``: :meth:`Loc3RConfig.to_dict`;
- ``model.safetensors``: the state dict of :class:`Loc3RVLM` (a tied
  ``lm_head.weight`` is not stored; it is ``language_model.embed_tokens.weight``);
- ``tokenizer.json`` (optional): HF ``tokenizers`` file with ``<Pos>``/``<Ori>``.

Weights are written tensor by tensor (:func:`write_safetensors_streaming`),
so a converter holds at most one tensor in memory at a time.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch
from safetensors import safe_open

from loc3r.errors import Loc3rError
from loc3r.model.config import Loc3RConfig

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
TIED_KEY = "lm_head.weight"

_SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}


def format_shape(shape: Iterable[int]) -> str:
    return "(" + ", ".join(str(int(s)) for s in shape) + ")"


def write_safetensors_streaming(
    path: Path,
    specs: list[tuple[str, torch.dtype, tuple[int, ...]]],
    tensor_for: Callable[[str], torch.Tensor],
    progress: Optional[Callable[[int], None]] = None,
) -> None:
    """Write a safetensors file whose tensors are produced one at a time.

    ``specs`` lists (name, dtype, shape) in file order; ``tensor_for(name)``
    returns that tensor (checked against its spec) and may be freed after.
    ``progress(nbytes)`` is called after each tensor.
    """
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, dtype, shape in specs:
        if dtype not in _SAFETENSORS_DTYPES:
            raise Loc3rError(f"cannot store {name}: unsupported dtype {dtype}")
        nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, dtype, shape in specs:
            t = tensor_for(name).detach().to("cpu", dtype).contiguous()
            if tuple(t.shape) != tuple(shape):
                raise Loc3rError(f"shape mismatch for {name}: expected {format_shape(shape)}, "
                                 f"found {format_shape(t.shape)}")
            data = t.reshape(-1).view(torch.uint8).numpy()
            f.write(memoryview(data))
            if progress is not None:
                progress(data.nbytes)
    tmp.replace(path)


def checkpoint_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The tensors we store: the state dict without a tied lm_head."""
    sd = model.state_dict()
    if model.cfg.text.tie_word_embeddings:
        sd.pop(TIED_KEY, None)
    return sd


def expected_tensor_shapes(cfg: Loc3RConfig, pose_prior: Optional[torch.nn.Module] = None) -> dict[str, tuple]:
    """name -> shape of every stored tensor of a model with ``cfg`` (built on the meta device, no memory)."""
    from loc3r.model.loc3r_vlm import Loc3RVLM

    with torch.device("meta"):
        model = Loc3RVLM(cfg, pose_prior=pose_prior)
    return {k: tuple(v.shape) for k, v in checkpoint_state(model).items()}


def write_config(directory: Path, cfg: Loc3RConfig) -> None:
    (Path(directory) / CONFIG_FILE).write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")


def read_config(directory: Path) -> Loc3RConfig:
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise Loc3rError(f"missing file: {path}")
    try:
        return Loc3RConfig.from_dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError) as exc:
        raise Loc3rError(f"{path} is not a valid loc3r config: {exc}") from None


def save_checkpoint(model: torch.nn.Module, directory: Path, tokenizer=None) -> None:
    """Write ``model`` (a :class:`Loc3RVLM`) and optionally a ``tokenizers.Tokenizer`` to ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    sd = checkpoint_state(model)
    specs = [(k, v.dtype, tuple(v.shape)) for k, v in sd.items()]
    write_safetensors_streaming(directory / WEIGHTS_FILE, specs, sd.__getitem__)
    write_config(directory, model.cfg)
    if tokenizer is not None:
        tokenizer.save(str(directory / TOKENIZER_FILE))


def load_checkpoint(directory: Path, dtype: Optional[torch.dtype] = None, device: str = "cpu"):
    """A :class:`Loc3RVLM` from a checkpoint directory, in eval mode.

    The model is built on the meta device and the stored tensors are assigned
    to it, so loading needs about one copy of the weights in memory.
    """
    from loc3r.model.loc3r_vlm import Loc3RVLM

    directory = Path(directory)
    cfg = read_config(directory)
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise Loc3rError(f"missing file: {weights}")
    with torch.device("meta"):
        model = Loc3RVLM(cfg)
    expected = checkpoint_state(model)
    sd = {}
    with safe_open(str(weights), framework="pt", device=device) as f:
        found = set(f.keys())
        missing = sorted(set(expected) - found)
        unexpected = sorted(found - set(expected))
        if missing:
            raise Loc3rError(f"missing keys in {weights}: {', '.join(missing)}")
        if unexpected:
            raise Loc3rError(f"unexpected keys in {weights}: {', '.join(unexpected)}")
        for k in expected:
            t = f.get_tensor(k)
            if tuple(t.shape) != tuple(expected[k].shape):
                raise Loc3rError(f"shape mismatch for {k}: expected {format_shape(expected[k].shape)}, "
                                 f"found {format_shape(t.shape)}")
            sd[k] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
    if cfg.text.tie_word_embeddings:
        sd[TIED_KEY] = sd["language_model.embed_tokens.weight"]
    model.load_state_dict(sd, strict=True, assign=True)
    if cfg.text.tie_word_embeddings:
        model.lm_head.weight = model.language_model.embed_tokens.weight
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:
        raise Loc3rError(f"checkpoint left tensors uninitialised: {', '.join(leftover)}")
    return model.eval()
