"""Recover stage 1's frozen encoders (vision tower, pose prior) from a model package.

Stage 2 of ``loc3r train`` trains only the projector, ``f_cam``, the LLM and
the heads; the vision tower and the pose prior stay as stage 1 left them. A
shipped package (``loc3r/default_model``) holds those two encoders, so a new
stage-2 recipe can start from them without re-running stage 1 (57 minutes of
this machine's 2-hour training budget) when the stage-1 checkpoint is gone:

    python -m loc3r.synthetic.package_encoders loc3r/default_model runs/pkg/stage1
    loc3r train --stage 2 --init runs/pkg/stage1 ...

The graphs' initializers keep the PyTorch parameter names. Each is read as
stored: float as is (``NAME.T``: a transposed MatMul weight), int8 QDQ weights
(``NAME_quantized`` with per-channel ``_scale``/``_zero_point``) dequantized, so
the recovered encoders are the int8 package's, not the fp32 originals. The
pose prior's initial state and memory are folded into graph constants; they are
stored back through ``register_tokens`` / ``decoder_embed_state`` (identity
embedding) and ``pose_retriever.mem``. Everything else in the written
checkpoint (LLM, projector, heads) is freshly initialised: stage 2 replaces it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from loc3r.errors import Loc3rError

ENCODER_PREFIXES = ("vision_tower.", "pose_prior.")


def _graph_tensors(path: Path) -> tuple[dict[str, np.ndarray], dict[tuple[int, ...], list[np.ndarray]]]:
    """Initializers by name (a float MatMul weight, stored (in, out), under ``NAME.T``), and large
    Constant-node tensors by shape."""
    import onnx
    from onnx import numpy_helper

    if not path.is_file():
        raise Loc3rError(f"missing file: {path}")
    model = onnx.load(str(path))
    matmul_b = {n.input[1] for n in model.graph.node if n.op_type == "MatMul"}
    inits = {}
    for i in model.graph.initializer:
        name = i.name + ".T" if i.name in matmul_b and not i.name.endswith(".T") else i.name
        inits[name] = numpy_helper.to_array(i)
    consts: dict[tuple[int, ...], list[np.ndarray]] = {}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].type == onnx.AttributeProto.TENSOR:
            t = numpy_helper.to_array(node.attribute[0].t)
            consts.setdefault(tuple(t.shape), []).append(t)
    return inits, consts


def _dequantize(q: np.ndarray, scale: np.ndarray, zero: np.ndarray, axis: int) -> np.ndarray:
    shape = [1] * q.ndim
    if scale.ndim:
        shape[axis] = -1
    return (q.astype(np.float32) - zero.astype(np.float32).reshape(shape)) * scale.astype(np.float32).reshape(shape)


def _lookup(name: str, shape: tuple[int, ...], inits: dict[str, np.ndarray]) -> np.ndarray | None:
    """The parameter ``name`` of torch ``shape`` from a graph's initializers (None: not stored there)."""
    if name in inits and inits[name].shape == shape:
        return inits[name].astype(np.float32)
    if name + ".T" in inits and inits[name + ".T"].T.shape == shape:
        return np.ascontiguousarray(inits[name + ".T"].T.astype(np.float32))
    # The int8 quantizer names a weight after its MatMul node, where a shared module path
    # (pose_prior.pose_retriever.X) can appear shortened (pose_prior.X).
    for candidate in (name, name.replace("pose_prior.pose_retriever.", "pose_prior.")):
        q = inits.get(candidate + "_quantized")
        if q is None:
            continue
        # A weight's scale is NAME_scale; a bias quantized to int32 has NAME_quantized_scale.
        tag = candidate + "_quantized" if candidate + "_quantized_scale" in inits else candidate
        scale, zero = inits[tag + "_scale"], inits[tag + "_zero_point"]
        if q.ndim == 2 and q.T.shape == shape:  # MatMul weight stored (in, out), per output channel on axis 1
            return np.ascontiguousarray(_dequantize(q, scale, zero, 1).T)
        if q.ndim != 2 and q.shape == shape:  # Conv weight (out, in, kh, kw) or a bias: per channel on axis 0
            return _dequantize(q, scale, zero, 0)
    return None


def encoder_state(package: Path, model) -> dict[str, torch.Tensor]:
    """The vision tower and pose prior of ``package`` as a state dict for ``model`` (a Loc3RVLM)."""
    package = Path(package)
    inits, _ = _graph_tensors(package / "vision.onnx")
    if model.pose_prior is not None:
        pose_inits, pose_consts = _graph_tensors(package / "pose_prior.onnx")
        inits.update(pose_inits)
    wanted = {k: v for k, v in model.state_dict().items() if k.startswith(ENCODER_PREFIXES)}
    # Folded into graph constants by the exporter (the pose prior's state before frame 0).
    folded = {"pose_prior.register_tokens.weight", "pose_prior.decoder_embed_state.weight",
              "pose_prior.decoder_embed_state.bias", "pose_prior.pose_retriever.mem"}
    out, missing = {}, []
    for name, ref in wanted.items():
        if name in folded:
            continue
        got = _lookup(name, tuple(ref.shape), inits)
        if got is None:
            missing.append(name)
        else:
            out[name] = torch.from_numpy(got).to(ref.dtype)
    if missing:
        raise Loc3rError(f"{package} does not hold these encoder weights of {model.cfg.name}: "
                         + ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else ""))
    if model.pose_prior is not None:
        pp = model.pose_prior
        s, dd = pp.initial_state(1).shape[1:]
        mem_shape = tuple(pp.pose_retriever.mem.shape)
        states, mems = pose_consts.get((1, s, dd), []), pose_consts.get(mem_shape, [])
        if len(states) != 1 or len(mems) != 1:
            raise Loc3rError(f"{package / 'pose_prior.onnx'}: cannot find the initial state {(1, s, dd)} and "
                             f"memory {mem_shape} among its constants")
        enc = pp.register_tokens.weight.shape[1]
        if enc < dd:
            raise Loc3rError(f"register tokens of width {enc} cannot hold a state of width {dd}")
        tokens = np.zeros((s, enc), np.float32)
        tokens[:, :dd] = states[0][0]
        proj = np.zeros((dd, enc), np.float32)
        proj[:, :dd] = np.eye(dd, dtype=np.float32)
        out["pose_prior.register_tokens.weight"] = torch.from_numpy(tokens)
        out["pose_prior.decoder_embed_state.weight"] = torch.from_numpy(proj)
        out["pose_prior.decoder_embed_state.bias"] = torch.zeros(dd)
        out["pose_prior.pose_retriever.mem"] = torch.from_numpy(mems[0].astype(np.float32))
    return out


def checkpoint_from_package(package: Path, out: Path, preset: str = "loc3r-tiny", seed: int = 0) -> Path:
    """Write a ``preset`` checkpoint to ``out`` whose encoders are ``package``'s (the rest freshly initialised),
    with the training tokenizer files beside it, as ``loc3r train --stage 1`` leaves ``OUT/stage1``."""
    from loc3r.model.checkpoint import save_checkpoint
    from loc3r.model.config import get_config
    from loc3r.model.loc3r_vlm import Loc3RVLM
    from loc3r.synthetic.train_data import model_config_with_tokens, write_tokenizer_files
    from loc3r.synthetic.train_run import init_language_weights

    out = Path(out)
    special = write_tokenizer_files(out)
    cfg = model_config_with_tokens(get_config(preset), special)
    torch.manual_seed(seed)
    model = Loc3RVLM(cfg)
    init_language_weights(model)
    state = encoder_state(package, model)
    model.load_state_dict(state, strict=False)
    save_checkpoint(model, out)  # beside the tokenizer files written above
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Recover a package's vision tower and pose prior as a stage-1 "
                                             "checkpoint (for `loc3r train --stage 2 --init`).")
    ap.add_argument("package", type=Path, help="model package directory (e.g. loc3r/default_model)")
    ap.add_argument("out", type=Path, help="checkpoint directory to write")
    ap.add_argument("--preset", default="loc3r-tiny", help="model preset of the package")
    args = ap.parse_args(argv)
    try:
        path = checkpoint_from_package(args.package, args.out, args.preset)
    except Loc3rError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"checkpoint: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
