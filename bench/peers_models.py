"""Model shapes for ``bench/peers.py`` and the random-weight checkpoints every system runs.

Three shapes (the dims matter, not the weights):

- ``qwen2-0.5b``: a Qwen2-0.5B-shaped decoder (24 layers, 896 wide, 14 heads,
  2 KV heads, MLP 4864, vocab 151936, tied embeddings) under a
  SigLIP-base-shaped vision tower (768 wide, 12 layers, 12 heads, patch 16,
  224 px), as a Hugging Face ``LlavaOnevisionForConditionalGeneration``;
- ``loc3r-tiny``: the embedded demo model's preset (with its pose prior);
- ``test-micro``: a few-MB LLaVA for unit tests of the suite's pieces.

For a LLaVA shape, :func:`build_model_artifacts` writes the Hugging Face
LLaVA directory (what transformers eager runs), the same decoder saved as
``Qwen2ForCausalLM`` (what onnxruntime-genai's model builder reads), and the
loc3r checkpoint from ``loc3r export convert``. For ``loc3r-tiny`` the loc3r
checkpoint is the preset's random model (what torch eager runs, through the
PyTorch reference) and the ``Qwen2ForCausalLM`` has its decoder's dims.
Packages come from ``loc3r export onnx`` (:func:`export_package`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

QWEN2_05B_TEXT = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                      num_attention_heads=14, num_key_value_heads=2, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
                      tie_word_embeddings=True, max_position_embeddings=32768)
SIGLIP_BASE_VISION = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                          image_size=224, patch_size=16, vision_use_head=False)
MICRO_TEXT = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  initializer_range=0.3,
                  num_key_value_heads=2, rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
                  max_position_embeddings=1024)
MICRO_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                    patch_size=8, vision_use_head=False)
VIDEO_TOKEN, IMAGE_TOKEN = "<video>", "<image>"


@dataclass(frozen=True)
class ModelShape:
    """One benchmarked model shape.

    ``llava_text``/``llava_vision`` are transformers ``Qwen2Config`` /
    ``SiglipVisionConfig`` keyword arguments for a LLaVA shape; ``preset``
    names a loc3r preset instead (then there is no Hugging Face LLaVA).
    """

    name: str
    max_context: int
    llava_text: Optional[dict] = None
    llava_vision: Optional[dict] = None
    preset: Optional[str] = None
    description: str = ""

    @property
    def is_llava(self) -> bool:
        return self.llava_text is not None


SHAPES: dict[str, ModelShape] = {
    "qwen2-0.5b": ModelShape("qwen2-0.5b", 2048, QWEN2_05B_TEXT, SIGLIP_BASE_VISION,
                             description="Qwen2-0.5B decoder + SigLIP-base/16 at 224 px (LLaVA-OneVision layout)"),
    "loc3r-tiny": ModelShape("loc3r-tiny", 2048, preset="loc3r-tiny",
                             description="the embedded demo model (pose prior + camera tokens)"),
    "test-micro": ModelShape("test-micro", 1024, MICRO_TEXT, MICRO_VISION, description="unit-test shape"),
}


def get_shape(name: str) -> ModelShape:
    from loc3r.errors import Loc3rError

    if name not in SHAPES:
        raise Loc3rError(f"unknown model shape '{name}'; known: {', '.join(SHAPES)}")
    return SHAPES[name]


def qwen2_text_kwargs(shape: ModelShape) -> dict:
    """``Qwen2Config`` keyword arguments of the shape's decoder (a preset's text config mapped to HF names)."""
    if shape.is_llava:
        return dict(shape.llava_text)
    from loc3r.model.config import get_config

    t = get_config(shape.preset).text
    return dict(vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
                num_hidden_layers=t.num_layers, num_attention_heads=t.num_heads, num_key_value_heads=t.num_kv_heads,
                head_dim=t.head_dim, rope_theta=t.rope_theta, rms_norm_eps=t.rms_norm_eps,
                tie_word_embeddings=t.tie_word_embeddings, max_position_embeddings=t.max_position_embeddings)


@dataclass(frozen=True)
class ModelArtifacts:
    """Where a shape's checkpoints and packages live (under one work folder)."""

    root: Path
    shape: ModelShape
    packages: dict = field(default_factory=dict)  # precision -> package dir
    genai: dict = field(default_factory=dict)  # precision -> onnxruntime-genai model dir

    @property
    def hf_llava(self) -> Path:
        return self.root / "hf_llava"

    @property
    def hf_qwen2(self) -> Path:
        return self.root / "hf_qwen2"

    @property
    def ckpt(self) -> Path:
        return self.root / "ckpt"

    @property
    def calib_video(self) -> Path:
        return self.root / "calib.mp4"

    def package(self, precision: str) -> Path:
        return self.root / f"pkg_{precision}"

    def genai_dir(self, precision: str) -> Path:
        return self.root / f"genai_{precision}"


def save_tokenizer_with_video_tokens(directory: Path, max_vocab: int) -> tuple[int, int]:
    """The synthetic word-level tokenizer (Qwen chat specials) plus ``<video>``/``<image>``; returns their ids."""
    from tokenizers import AddedToken

    from loc3r.synthetic.tokenizer import build_tokenizer

    tok = build_tokenizer(max_vocab=max_vocab - 2)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (VIDEO_TOKEN, IMAGE_TOKEN)])
    tok.save(str(directory / "tokenizer.json"))
    return tok.token_to_id(VIDEO_TOKEN), tok.token_to_id(IMAGE_TOKEN)


def build_hf_checkpoints(arts: ModelArtifacts, seed: int = 0) -> None:
    """Random-weight ``Qwen2ForCausalLM`` (+ for a LLaVA shape the LLaVA with the same decoder weights)."""
    import torch
    from transformers import (LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, Qwen2Config,
                              Qwen2ForCausalLM, SiglipVisionConfig)

    shape = arts.shape
    torch.manual_seed(seed)
    text = Qwen2Config(**qwen2_text_kwargs(shape))
    qwen = Qwen2ForCausalLM(text).eval()
    arts.hf_qwen2.mkdir(parents=True, exist_ok=True)
    save_tokenizer_with_video_tokens(arts.hf_qwen2, text.vocab_size)
    if shape.is_llava:
        arts.hf_llava.mkdir(parents=True, exist_ok=True)
        video_id, image_id = save_tokenizer_with_video_tokens(arts.hf_llava, text.vocab_size)
        cfg = LlavaOnevisionConfig(vision_config=SiglipVisionConfig(**shape.llava_vision), text_config=text,
                                   video_token_index=video_id, image_token_index=image_id,
                                   tie_word_embeddings=text.tie_word_embeddings,
                                   vision_feature_layer=-1, vision_feature_select_strategy="full")
        llava = LlavaOnevisionForConditionalGeneration(cfg).eval()
        llava.model.language_model.load_state_dict(qwen.model.state_dict())
        if not text.tie_word_embeddings:
            llava.lm_head.load_state_dict(qwen.lm_head.state_dict())
        llava.save_pretrained(arts.hf_llava)
        del llava
    qwen.save_pretrained(arts.hf_qwen2)
    gen = json.loads((arts.hf_qwen2 / "generation_config.json").read_text()) \
        if (arts.hf_qwen2 / "generation_config.json").is_file() else {}
    gen.pop("eos_token_id", None)  # random weights: never stop early on EOS in the decode timings
    (arts.hf_qwen2 / "generation_config.json").write_text(json.dumps(gen))


def write_calibration_video(path: Path, frames: int = 8, size: int = 96) -> Path:
    """A small mp4 of moving noise, the int8 calibration source."""
    import cv2
    import numpy as np

    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 4.0, (size, size))
    for i in range(frames):
        writer.write(np.roll(base, 5 * i, axis=1))
    writer.release()
    return path


def run_tool(args: list[str], what: str) -> None:
    """Run a build step as a subprocess; one clear error with its output's tail if it fails."""
    from loc3r.errors import Loc3rError

    # PYTHONSAFEPATH: run from the repository root, `-m`/`-c` would put it first on sys.path, where our
    # top-level kernels/ folder shadows the Hugging Face `kernels` package that transformers imports.
    env = {**os.environ, "PYTHONSAFEPATH": "1"}
    proc = subprocess.run(args, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise Loc3rError(f"{what} failed (exit {proc.returncode}): {' | '.join(tail)}")


# The ``loc3r`` command with this interpreter (the console script may not be on PATH).
_LOC3R_CLI = "from loc3r.cli import main; main(prog_name='loc3r')"


def convert_checkpoint(arts: ModelArtifacts) -> None:
    """``loc3r export convert`` (LLaVA shape) or a random preset checkpoint (loc3r-tiny)."""
    if arts.shape.is_llava:
        run_tool([sys.executable, "-c", _LOC3R_CLI, "export", "convert", "--llava", str(arts.hf_llava),
                  "--out", str(arts.ckpt), "--quiet"], "loc3r export convert")
    else:
        from loc3r.export.default_model import make_random_checkpoint

        make_random_checkpoint(arts.ckpt, preset=arts.shape.preset, seed=0)


def export_package(arts: ModelArtifacts, precision: str) -> Path:
    """``loc3r export onnx CKPT --out PKG --precision P [--calib VIDEO] --max-context N``."""
    out = arts.package(precision)
    args = [sys.executable, "-c", _LOC3R_CLI, "export", "onnx", str(arts.ckpt), "--out", str(out),
            "--precision", precision, "--max-context", str(arts.shape.max_context), "--quiet"]
    if precision == "int8":
        if not arts.calib_video.is_file():
            write_calibration_video(arts.calib_video)
        args += ["--calib", str(arts.calib_video)]
    run_tool(args, f"loc3r export onnx --precision {precision}")
    return out


_QUANTIZE = ("import sys; from pathlib import Path; from loc3r.export.quantize import QuantOptions, quantize_package; "
             "quantize_package(Path(sys.argv[1]), sys.argv[2], calib=sys.argv[3] if len(sys.argv) > 3 else None, "
             "options=QuantOptions(progress=False))")


def quantize_fp32_copy(arts: ModelArtifacts, precision: str) -> Path:
    """A ``precision`` package from a copy of the fp32 one, by the quantizer ``loc3r export onnx`` calls.

    ``loc3r export onnx --precision int8|int4`` writes the fp32 package and then
    runs :func:`loc3r.export.quantize.quantize_package` on it; starting from the
    fp32 package already exported gives the same package without tracing the
    model again (minutes for a 0.5B decoder on 2 cores).
    """
    import shutil

    out = arts.package(precision)
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(arts.package("fp32"), out)
    args = [sys.executable, "-c", _QUANTIZE, str(out), precision]
    if precision == "int8":
        if not arts.calib_video.is_file():
            write_calibration_video(arts.calib_video)
        args.append(str(arts.calib_video))
    run_tool(args, f"quantize_package --precision {precision}")
    return out


def build_genai_model(arts: ModelArtifacts, precision: str, threads: int) -> Path:
    """onnxruntime-genai's model builder on the ``Qwen2ForCausalLM`` directory (CPU, fp32 or int4)."""
    out = arts.genai_dir(precision)
    run_tool([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(arts.hf_qwen2), "-o", str(out),
              "-p", precision, "-e", "cpu", "-c", str(arts.root / "genai_cache")],
             f"onnxruntime_genai.models.builder -p {precision}")
    set_genai_threads(out, threads)
    return out


def set_genai_threads(model_dir: Path, threads: int) -> None:
    """Pin the decoder session's intra-op threads in ``genai_config.json`` (as every other system)."""
    path = model_dir / "genai_config.json"
    cfg = json.loads(path.read_text())
    cfg["model"]["decoder"].setdefault("session_options", {})["intra_op_num_threads"] = threads
    path.write_text(json.dumps(cfg, indent=2))
