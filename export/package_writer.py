"""Checkpoint -> model package (``loc3r.json`` + ``tokenizer.json`` + ONNX graphs).

The graph split follows the streaming runtime's calls, one graph per thing
that runs at a different rate or on different inputs:

- ``pose_prior.onnx``: one recurrent pose-prior step per frame; its state and
  memory are explicit inputs/outputs (the learned initial ones are blended in
  by ``is_first``), so the runtime keeps them between frames and nothing is
  recomputed.
- ``vision.onnx``: SigLIP + projector + bilinear pooling + f_cam on the
  camera token -> the frame block (F, P, H). Stateless and batchable over
  frames, so it can be quantized (int8 QDQ) and calibrated on its own.
- ``embed.onnx``: token ids -> embeddings (the table plus the image_newline
  row at id ``vocab_size``). Kept out of the decoder so frame blocks, text and
  the newline all enter the decoder the same way (``inputs_embeds``).
- ``decoder.onnx``: the Qwen2 layers over ``inputs_embeds`` with per-layer
  past/present KV that share one buffer of the context budget, attention
  fused into one GroupQueryAttention node per layer (rotary inside).
  It outputs final-normed hidden states only: prefilling a frame block never
  pays for the vocabulary projection.
- ``lm_head.onnx``: hidden rows -> logits, run only on the row that picks the
  next token (the largest MatMul for a 150k vocab, so it is quantized on its
  own terms).
- ``heads.onnx``: f_pos / f_ori at ``<Pos>`` / ``<Ori>``; ``bev_head.onnx``:
  f_proj on vision-token hidden states (kept for ``--bev``). Tiny, kept fp32.

For precisions other than fp32 the fp32 package is written first and then
handed to ``loc3r.export.quantize.quantize_package(pkg_dir, precision,
calib=...)``, which rewrites graphs and the manifest.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from loc3r.errors import Loc3rError
from loc3r.runtime.package import (PRECISIONS, TOKENIZER_NAME, ChatTemplate, GraphSpec, Manifest, PosePriorSpec,
                                   SpecialTokens, TextSpec, VisionSpec, write_manifest)

DEFAULT_MAX_CONTEXT_CAP = 8192
CHAT_TEMPLATE_FILE = "chat_template.json"  # optional override in a checkpoint directory
QWEN_CHAT_TEMPLATE = ChatTemplate(
    prefix="<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n",
    suffix="\n{situation}{question}<|im_end|>\n<|im_start|>assistant\n",
    situation="{situation}<Pos><Ori>",
)
EOS_CANDIDATES = ("<|im_end|>", "<|endoftext|>", "<eos>", "</s>")
PAD_CANDIDATES = ("<pad>", "<|endoftext|>")


@dataclass(frozen=True)
class ExportOptions:
    precision: str = "fp32"
    calib: Optional[str] = None
    max_context: Optional[int] = None  # default: the model's, capped at DEFAULT_MAX_CONTEXT_CAP
    opset: int = 17
    progress: bool = True
    name: Optional[str] = None  # package name (default: the config's)
    target: str = "onnxruntime"  # "tensorrt": loc3r::FusedAttention plugin nodes (loc3r.export.trt_target)
    matmul_nbits_plugin: bool = False  # tensorrt target: allow int4 MatMulNBits (needs the plugin)
    fuse_matmuls: bool = True  # weight-only precisions: fuse q/k/v and gate/up before quantizing
    int4_lm_head_bits: int = 8  # int4 packages: lm_head at 8 (default) or 4 bits


def graph_exporters(model, max_context: int, opset: int, target: str = "onnxruntime") -> list[tuple[str, Callable]]:
    """(role, fn(out_dir) -> GraphSpec) for every graph the model needs, in manifest order."""
    from loc3r.export.graph_decoder import export_decoder
    from loc3r.export.graph_heads import export_bev_head, export_heads
    from loc3r.export.graph_pose_prior import export_pose_prior
    from loc3r.export.graph_text import export_embed, export_lm_head
    from loc3r.export.graph_vision import export_vision
    from loc3r.export.trt_target import attention_patches

    attn = attention_patches(target)
    out: list[tuple[str, Callable]] = []
    if model.uses_camera_tokens:
        out.append(("pose_prior", lambda d: export_pose_prior(model, d, opset, attn["pose_prior"])))
    out += [
        ("vision", lambda d: export_vision(model, d, opset, attn["vision"])),
        ("embed", lambda d: export_embed(model, d, opset)),
        ("decoder", lambda d: export_decoder(model, d, max_context, opset, attn["decoder"])),
        ("lm_head", lambda d: export_lm_head(model, d, opset)),
        ("heads", lambda d: export_heads(model, d, opset)),
        ("bev_head", lambda d: export_bev_head(model, d, opset)),
    ]
    return out


def _token_id(tok, candidates, what: str, explicit: Optional[int] = None) -> int:
    if explicit is not None:
        return int(explicit)
    for text in candidates:
        i = tok.token_to_id(text)
        if i is not None:
            return int(i)
    raise Loc3rError(f"the checkpoint's tokenizer has no {what} token (looked for {', '.join(candidates)})")


def special_tokens_for(cfg, tok) -> SpecialTokens:
    pos = _token_id(tok, ("<Pos>",), "<Pos>", cfg.pos_token_id)
    ori = _token_id(tok, ("<Ori>",), "<Ori>", cfg.ori_token_id)
    eos = _token_id(tok, EOS_CANDIDATES, "end-of-sequence", cfg.eos_token_id)
    pad = _token_id(tok, PAD_CANDIDATES + EOS_CANDIDATES, "padding")
    return SpecialTokens(pos=pos, ori=ori, eos=eos, pad=pad)


def read_chat_template(ckpt_dir: Path) -> ChatTemplate:
    """``chat_template.json`` ({"prefix", "suffix"[, "situation"]}) from the checkpoint, else Qwen2's."""
    path = Path(ckpt_dir) / CHAT_TEMPLATE_FILE
    if not path.is_file():
        return QWEN_CHAT_TEMPLATE
    try:
        d = json.loads(path.read_text())
        return ChatTemplate(**d)
    except (json.JSONDecodeError, TypeError) as exc:
        raise Loc3rError(f"{path} is not a valid chat template: {exc}") from None


def build_manifest(cfg, graphs: tuple[GraphSpec, ...], special: SpecialTokens, template: ChatTemplate,
                   max_context: int, name: str, target: str = "onnxruntime") -> Manifest:
    from loc3r.model.heads import orientation_bin_centres_deg

    v, t, p = cfg.vision, cfg.text, cfg.pose_prior
    pose = None
    if cfg.camera_tokens_active:
        pose = PosePriorSpec(img_height=p.img_height, img_width=p.img_width, patch_size=p.patch_size,
                             mean=tuple(p.mean), std=tuple(p.std), state_tokens=p.state_size,
                             state_dim=p.dec_embed_dim, mem_slots=p.mem_slots, mem_dim=p.mem_dim,
                             previous_frame=p.previous_frame)
    return Manifest(
        name=name,
        precision="fp32",
        vision=VisionSpec(image_size=v.image_size, mean=tuple(v.mean), std=tuple(v.std), patch_grid=v.grid,
                          pooled_grid=v.pooled_grid, tokens_per_frame=v.tokens_per_frame),
        text=TextSpec(hidden_size=t.hidden_size, num_layers=t.num_layers, num_kv_heads=t.num_kv_heads,
                      head_dim=t.head_dim, max_context=max_context, vocab_size=t.vocab_size),
        special_tokens=special,
        chat_template=template,
        orientation_bins_deg=tuple(orientation_bin_centres_deg(cfg.heads.num_orientation_bins)),
        graphs=graphs,
        pose_prior=pose,
        camera_tokens=cfg.camera_tokens_active,
        target=target,
    )


def resolve_max_context(cfg, requested: Optional[int]) -> int:
    limit = cfg.text.max_position_embeddings
    if requested is None:
        return min(limit, DEFAULT_MAX_CONTEXT_CAP)
    if requested < cfg.tokens_per_frame + 8:
        raise Loc3rError(f"--max-context {requested} is too small: one frame block alone is "
                         f"{cfg.tokens_per_frame} tokens")
    if requested > limit:
        raise Loc3rError(f"--max-context {requested} exceeds the model's max_position_embeddings {limit}")
    return requested


def _prepare_out_dir(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise Loc3rError(f"--out {out_dir} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        raise Loc3rError(f"--out {out_dir} is not empty; remove it or choose another directory")
    out_dir.mkdir(parents=True, exist_ok=True)


def write_package(ckpt_dir: Path, out_dir: Path, options: ExportOptions = ExportOptions()) -> Manifest:
    """Export the checkpoint in ``ckpt_dir`` to a model package in ``out_dir``; returns its manifest."""
    import torch
    from tqdm import tqdm

    from loc3r.model.checkpoint import load_checkpoint
    from tokenizers import Tokenizer

    if options.precision not in PRECISIONS:
        raise Loc3rError(f"unknown precision '{options.precision}'; choose one of: {', '.join(PRECISIONS)}")
    from loc3r.export.trt_target import check_target_precision

    check_target_precision(options.target, options.precision, options.matmul_nbits_plugin)
    quantize = _quantizer(options.precision)
    ckpt_dir, out_dir = Path(ckpt_dir), Path(out_dir)
    if not ckpt_dir.is_dir():
        raise Loc3rError(f"checkpoint directory not found: {ckpt_dir}")
    tok_path = ckpt_dir / TOKENIZER_NAME
    if not tok_path.is_file():
        raise Loc3rError(f"checkpoint {ckpt_dir} has no {TOKENIZER_NAME}; a package needs the tokenizer")
    model = load_checkpoint(ckpt_dir, dtype=torch.float32)
    cfg = model.cfg
    tok = Tokenizer.from_file(str(tok_path))
    special = special_tokens_for(cfg, tok)
    template = read_chat_template(ckpt_dir)
    max_context = resolve_max_context(cfg, options.max_context)
    _prepare_out_dir(out_dir)
    try:
        shutil.copyfile(tok_path, out_dir / TOKENIZER_NAME)
        exporters = graph_exporters(model, max_context, options.opset, options.target)
        specs = []
        bar = tqdm(exporters, desc="graphs", unit="graph", disable=not options.progress)
        for role, fn in bar:
            bar.set_postfix_str(role)
            specs.append(fn(out_dir))
        manifest = write_manifest(out_dir, build_manifest(cfg, tuple(specs), special, template, max_context,
                                                          options.name or cfg.name, options.target))
        if quantize is not None:
            from loc3r.export.trt_target import check_plugin_nbits, quant_options_for
            from loc3r.runtime.package import load_package

            quant = quant_options_for(options.target, options.progress, options.fuse_matmuls,
                                      options.int4_lm_head_bits)
            quantize(out_dir, options.precision, calib=options.calib, options=quant)
            manifest = load_package(out_dir).manifest
            if options.target == "tensorrt":
                check_plugin_nbits(out_dir, manifest)
    except BaseException:
        shutil.rmtree(out_dir, ignore_errors=True)
        raise
    return manifest


def _quantizer(precision: str):
    """``quantize_package`` for a non-fp32 precision, or None for fp32."""
    if precision == "fp32":
        return None
    try:
        from loc3r.export.quantize import quantize_package
    except ImportError:
        raise Loc3rError(f"precision '{precision}' needs loc3r.export.quantize, which is not in this build; "
                         "use --precision fp32") from None
    return quantize_package
