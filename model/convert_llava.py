"""Hugging Face LLaVA-Video (``LlavaOnevisionForConditionalGeneration``) -> our checkpoint.

Reads an HF model directory (``config.json``, ``tokenizer.json`` and
``model.safetensors`` or a sharded ``model.safetensors.index.json``), maps its
config to :class:`Loc3RConfig` and its tensor names to ours, adds ``<Pos>`` and
``<Ori>`` to the tokenizer, optionally merges a CUT3R pose prior, initialises
the Loc3R heads the inputs lack, and writes our format
(:mod:`loc3r.model.checkpoint`). Tensors are streamed one at a time, so memory
stays at about the largest tensor (plus the pose prior, which is small).

Both tensor-name layouts are accepted: the hub's
(``language_model.model.layers...``, ``vision_tower.vision_model...``) and
transformers 5's (``model.language_model.layers...``, ``model.vision_tower...``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from safetensors import safe_open
from tqdm import tqdm

from loc3r.errors import Loc3rError
from loc3r.model.checkpoint import (TIED_KEY, TOKENIZER_FILE, WEIGHTS_FILE, expected_tensor_shapes, format_shape,
                                    write_config, write_safetensors_streaming)
from loc3r.model.config import Loc3RConfig, TextConfig, VisionConfig
from loc3r.model.projector import SUPPORTED_PROJECTOR_ACTIVATIONS
from loc3r.model.siglip import used_vision_layers

POS_TOKEN = "<Pos>"
ORI_TOKEN = "<Ori>"
ARCHITECTURE = "LlavaOnevisionForConditionalGeneration"
# Embedding rows are added in multiples of this when <Pos>/<Ori> do not fit.
VOCAB_GROWTH_MULTIPLE = 64

# transformers' defaults for keys a saved config may omit.
_SIGLIP_DEFAULTS = {"hidden_size": 1152, "intermediate_size": 4304, "patch_size": 14, "image_size": 384,
                    "num_hidden_layers": 26, "num_attention_heads": 16, "layer_norm_eps": 1e-6,
                    "hidden_act": "gelu_pytorch_tanh", "num_channels": 3, "vision_use_head": False}
_QWEN2_DEFAULTS = {"vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 22016, "num_hidden_layers": 32,
                   "num_attention_heads": 32, "hidden_act": "silu", "max_position_embeddings": 32768,
                   "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "use_sliding_window": False}
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
OUTPUT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class ConversionReport:
    out_dir: Path
    config: Loc3RConfig
    num_tensors: int
    num_bytes: int
    pos_token_id: int
    ori_token_id: int
    initialised: tuple[str, ...]  # modules not in the inputs, freshly initialised
    dropped: tuple[str, ...]  # input tensors Loc3R-VLM does not use
    vocab_growth: Optional[tuple[int, int]]  # (old rows, new rows) when <Pos>/<Ori> did not fit


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise Loc3rError(f"missing file: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise Loc3rError(f"{path} is not valid JSON: {exc}") from None


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise Loc3rError(message)


def llava_config_to_loc3r(hf: dict, name: str) -> Loc3RConfig:
    """Our config for an HF ``LlavaOnevisionConfig`` dict: the base VLM, no pose prior."""
    _require(hf.get("model_type") == "llava_onevision" or ARCHITECTURE in hf.get("architectures", []),
             f"not a {ARCHITECTURE} config (model_type '{hf.get('model_type')}')")
    v = {**_SIGLIP_DEFAULTS, **hf.get("vision_config", {})}
    t = {**_QWEN2_DEFAULTS, **hf.get("text_config", {})}
    _require(v.get("model_type", "siglip_vision_model") == "siglip_vision_model",
             f"unsupported vision tower '{v.get('model_type')}'; only siglip_vision_model is supported")
    _require(t.get("model_type", "qwen2") == "qwen2",
             f"unsupported language model '{t.get('model_type')}'; only qwen2 is supported")
    _require(hf.get("vision_feature_select_strategy", "full") == "full",
             "unsupported vision_feature_select_strategy "
             f"'{hf.get('vision_feature_select_strategy')}'; SigLIP has no CLS token, only 'full' is supported")
    layer = hf.get("vision_feature_layer", -1)
    _require(isinstance(layer, int), f"unsupported vision_feature_layer {layer}; only a single layer is supported")
    _require(v["hidden_act"] == "gelu_pytorch_tanh", f"unsupported SigLIP activation '{v['hidden_act']}'")
    _require(v["num_channels"] == 3, f"unsupported vision num_channels {v['num_channels']}")
    _require(t["hidden_act"] == "silu", f"unsupported Qwen2 activation '{t['hidden_act']}'")
    _require(not t["use_sliding_window"], "unsupported: Qwen2 sliding-window attention")
    _require(hf.get("multimodal_projector_bias", True), "unsupported: projector without bias")
    act = hf.get("projector_hidden_act", "gelu")
    _require(act in SUPPORTED_PROJECTOR_ACTIVATIONS, f"unsupported projector activation '{act}'")
    rope = t.get("rope_parameters") or {}
    _require(rope.get("rope_type", "default") == "default", f"unsupported RoPE type '{rope.get('rope_type')}'")
    theta = rope.get("rope_theta", t.get("rope_theta", 10000.0))
    heads = t["num_attention_heads"]
    head_dim = t.get("head_dim") or t["hidden_size"] // heads
    vision = VisionConfig(
        image_size=v["image_size"], patch_size=v["patch_size"], hidden_size=v["hidden_size"],
        intermediate_size=v["intermediate_size"], num_layers=v["num_hidden_layers"],
        num_heads=v["num_attention_heads"], layer_norm_eps=v["layer_norm_eps"], feature_layer=layer,
    )
    used_vision_layers(vision)  # range check
    text = TextConfig(
        vocab_size=t["vocab_size"], hidden_size=t["hidden_size"], intermediate_size=t["intermediate_size"],
        num_layers=t["num_hidden_layers"], num_heads=heads, num_kv_heads=t.get("num_key_value_heads") or heads,
        head_dim=head_dim, rope_theta=float(theta), rms_norm_eps=t["rms_norm_eps"],
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False) or t["tie_word_embeddings"]),
        max_position_embeddings=t["max_position_embeddings"],
    )
    return Loc3RConfig(name=name, vision=vision, text=text, pose_prior=None, use_camera_tokens=False,
                       projector_hidden_act=act)


def canonical_llava_key(key: str) -> str:
    """One spelling for both HF layouts: language_model.*, lm_head.*, vision_tower.*, multi_modal_projector.*."""
    if key.startswith("model."):
        key = key[len("model."):]
    for old, new in (("language_model.model.", "language_model."), ("language_model.lm_head.", "lm_head."),
                     ("vision_tower.vision_model.", "vision_tower.")):
        if key.startswith(old):
            return new + key[len(old):]
    return key


def loc3r_key(canonical: str, cfg: Loc3RConfig) -> Optional[str]:
    """Our tensor name for a canonical HF key; None when Loc3R-VLM does not use it; "" when unknown."""
    if canonical.endswith("rotary_emb.inv_freq"):
        return None  # a derived buffer some older checkpoints store
    if canonical == "image_newline" or canonical.startswith("language_model."):
        return canonical
    if canonical == TIED_KEY:
        return None if cfg.text.tie_word_embeddings else canonical
    if canonical.startswith("multi_modal_projector."):
        return "projector." + canonical[len("multi_modal_projector."):]
    if canonical.startswith("vision_tower."):
        rest = canonical[len("vision_tower."):]
        if rest.startswith("embeddings.patch_embedding."):
            return "vision_tower." + rest[len("embeddings."):]
        if rest == "embeddings.position_embedding.weight":
            return "vision_tower.position_embedding"
        if rest.startswith("encoder.layers."):
            index = rest.split(".")[2]
            if index.isdigit():
                if int(index) >= used_vision_layers(cfg.vision):
                    return None
                return "vision_tower.layers." + rest[len("encoder.layers."):]
        if rest.startswith("post_layernorm.") or rest.startswith("head."):
            return None  # features are taken before the post-layernorm; no pooling head
    return ""


def index_llava_weights(hf_dir: Path) -> dict[str, Path]:
    """HF tensor name -> the safetensors file holding it."""
    single = hf_dir / WEIGHTS_FILE
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map", {})
        files = {name: hf_dir / fname for name, fname in weight_map.items()}
        for path in sorted(set(files.values())):
            if not path.is_file():
                raise Loc3rError(f"missing file: {path}")
        return files
    if single.is_file():
        with safe_open(str(single), framework="pt") as f:
            return {name: single for name in f.keys()}
    raise Loc3rError(f"missing file: {single} (or model.safetensors.index.json)")


def tokenizer_with_loc3r_tokens(path: Path):
    """(tokenizers.Tokenizer with <Pos>/<Ori> added as special tokens, pos id, ori id)."""
    from tokenizers import AddedToken, Tokenizer

    if not path.is_file():
        raise Loc3rError(f"missing file: {path}")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception on bad files
        raise Loc3rError(f"cannot read tokenizer {path}: {exc}") from None
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (POS_TOKEN, ORI_TOKEN)])
    return tok, tok.token_to_id(POS_TOKEN), tok.token_to_id(ORI_TOKEN)


def eos_token_id(hf_dir: Path, hf: dict, tokenizer) -> Optional[int]:
    """EOS from generation_config.json, then the config, then the tokenizer's <|im_end|>."""
    candidates = []
    gen = hf_dir / "generation_config.json"
    if gen.is_file():
        candidates.append(read_json(gen).get("eos_token_id"))
    candidates += [hf.get("text_config", {}).get("eos_token_id"), hf.get("eos_token_id")]
    for c in candidates:
        if isinstance(c, list) and c:
            return int(c[0])
        if isinstance(c, int):
            return c
    return tokenizer.token_to_id("<|im_end|>")


def grown_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """t (V, H) with rows V..rows-1 appended, each the mean of the existing rows."""
    extra = t.float().mean(0, keepdim=True).to(t.dtype).expand(rows - t.shape[0], -1)
    return torch.cat((t, extra), dim=0)


def initialised_heads(cfg: Loc3RConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Deterministically initialised tensors of the Loc3R heads (f_cam, f_pos, f_ori, f_proj)."""
    from loc3r.model.loc3r_vlm import loc3r_heads

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        heads = loc3r_heads(cfg)
    return {f"{name}.{k}": v for name, module in heads.items() for k, v in module.state_dict().items()}


def summarise_keys(keys: list[str], depth: int = 3, pose_prior_depth: int = 2) -> list[str]:
    """Group tensor names by module prefix (at most ``depth`` components, ``pose_prior_depth`` for
    "file.pth:key" names): ['a.b.c (3 tensors)', ...]."""
    groups: dict[str, int] = {}
    for k in keys:
        source, _, name = k.rpartition(":")
        parts = name.split(".")
        keep = pose_prior_depth if source else depth
        prefix = ".".join(parts[:max(1, min(keep, len(parts) - 1))])
        prefix = f"{source}:{prefix}" if source else prefix
        groups[prefix] = groups.get(prefix, 0) + 1
    return [f"{p} ({n} tensor{'s' if n > 1 else ''})" for p, n in groups.items()]


def convert_llava(
    hf_dir: Path,
    out_dir: Path,
    pose_prior_path: Optional[Path] = None,
    dtype: Optional[torch.dtype] = None,
    name: Optional[str] = None,
    progress: bool = True,
    log: Callable[[str], None] = lambda message: None,
) -> ConversionReport:
    """Convert an HF LLaVA-Video directory (+ optional CUT3R .pth) into a checkpoint directory.

    ``dtype`` None keeps the LLM's stored dtype (and casts the pose prior and
    new heads to it).
    """
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    if not hf_dir.is_dir():
        raise Loc3rError(f"missing directory: {hf_dir}")
    hf = read_json(hf_dir / "config.json")
    cfg = llava_config_to_loc3r(hf, name or out_dir.name)
    tokenizer, pos_id, ori_id = tokenizer_with_loc3r_tokens(hf_dir / TOKENIZER_FILE)
    files = index_llava_weights(hf_dir)
    if pose_prior_path is not None and not Path(pose_prior_path).is_file():
        raise Loc3rError(f"missing file: {pose_prior_path}")

    # Map names; collect what is dropped or unknown.
    source: dict[str, str] = {}  # our name -> HF name
    dropped, unknown = [], []
    for hf_key in files:
        ours = loc3r_key(canonical_llava_key(hf_key), cfg)
        if ours is None:
            dropped.append(hf_key)
        elif ours == "":
            unknown.append(hf_key)
        else:
            source[ours] = hf_key

    # Token ids; grow the vocabulary if <Pos>/<Ori> do not fit.
    vocab = cfg.text.vocab_size
    vocab_growth = None
    if max(pos_id, ori_id) >= vocab:
        new_vocab = math.ceil((max(pos_id, ori_id) + 1) / VOCAB_GROWTH_MULTIPLE) * VOCAB_GROWTH_MULTIPLE
        vocab_growth = (vocab, new_vocab)
        cfg = cfg.replace(text=dataclasses.replace(cfg.text, vocab_size=new_vocab))
        log(f"grew the vocabulary from {vocab} to {new_vocab} rows to fit {POS_TOKEN}={pos_id}, {ORI_TOKEN}={ori_id}")
    cfg = cfg.replace(pos_token_id=pos_id, ori_token_id=ori_id, eos_token_id=eos_token_id(hf_dir, hf, tokenizer))

    # The pose prior (another model's checkpoint, small enough to hold).
    pose_tensors: dict[str, torch.Tensor] = {}
    if pose_prior_path is not None:
        from loc3r.model.convert_cut3r import convert_cut3r_checkpoint

        pp_sd, pp_cfg, pp_dropped = convert_cut3r_checkpoint(str(pose_prior_path))
        cfg = cfg.replace(pose_prior=pp_cfg, use_camera_tokens=True)
        pose_tensors = {f"pose_prior.{k}": v for k, v in pp_sd.items()}
        dropped += [f"{Path(pose_prior_path).name}:{k}" for k in pp_dropped]

    head_tensors = initialised_heads(cfg)
    expected = expected_tensor_shapes(cfg)
    unknown += [hf_key for ours, hf_key in source.items() if ours not in expected]
    if unknown:
        raise Loc3rError(f"unexpected keys in {hf_dir}: {', '.join(sorted(unknown))}")
    provided = set(source) | set(pose_tensors) | set(head_tensors)
    missing = sorted(set(expected) - provided)
    if missing:
        hf_names = [k for k in missing if not k.startswith("pose_prior.")]
        where = hf_dir if hf_names else pose_prior_path
        raise Loc3rError(f"missing keys in {where}: {', '.join(missing)}")
    extra = sorted(provided - set(expected))
    if extra:
        raise Loc3rError(f"unexpected keys: {', '.join(extra)}")

    with contextlib.ExitStack() as stack:
        handles = {path: stack.enter_context(safe_open(str(path), framework="pt")) for path in set(files.values())}
        grow = {"language_model.embed_tokens.weight", TIED_KEY} if vocab_growth else set()

        # Shape and dtype of every source tensor, checked before anything is written.
        stored: dict[str, tuple[torch.dtype, tuple]] = {}
        for ours, hf_key in source.items():
            sl = handles[files[hf_key]].get_slice(hf_key)
            shape, src_dtype = tuple(sl.get_shape()), _DTYPES.get(sl.get_dtype())
            want = expected[ours]
            if ours in grow:
                want = (vocab,) + want[1:]
            if shape != want:
                raise Loc3rError(f"shape mismatch for {hf_key}: expected {format_shape(want)}, "
                                 f"found {format_shape(shape)}")
            if src_dtype is None:
                raise Loc3rError(f"unsupported dtype {sl.get_dtype()} for {hf_key}")
            stored[ours] = (src_dtype, shape)
        for k, t in pose_tensors.items():
            if tuple(t.shape) != expected[k]:
                raise Loc3rError(f"shape mismatch for {k}: expected {format_shape(expected[k])}, "
                                 f"found {format_shape(t.shape)}")

        base_dtype = dtype or stored["language_model.embed_tokens.weight"][0]
        # Our module order; LLaVA tensors keep their dtype unless one is asked for.
        specs = [(k, dtype or stored.get(k, (base_dtype,))[0], expected[k]) for k in expected]

        def tensor_for(key: str) -> torch.Tensor:
            if key in pose_tensors:
                return pose_tensors[key]
            if key in head_tensors:
                return head_tensors[key]
            hf_key = source[key]
            t = handles[files[hf_key]].get_tensor(hf_key)
            if key in grow:
                t = grown_rows(t, expected[key][0])
            return t

        total = sum(torch.Size(s).numel() * torch.empty((), dtype=d).element_size() for _, d, s in specs)
        out_dir.mkdir(parents=True, exist_ok=True)
        with tqdm(total=total, unit="B", unit_scale=True, desc="writing model.safetensors",
                  disable=not progress, leave=False) as bar:
            write_safetensors_streaming(out_dir / WEIGHTS_FILE, specs, tensor_for, bar.update)

    write_config(out_dir, cfg)
    tokenizer.save(str(out_dir / TOKENIZER_FILE))
    initialised = tuple(dict.fromkeys(k.split(".")[0] for k in head_tensors))
    return ConversionReport(out_dir=out_dir, config=cfg, num_tensors=len(specs), num_bytes=total,
                            pos_token_id=pos_id, ori_token_id=ori_id, initialised=initialised,
                            dropped=tuple(dropped), vocab_growth=vocab_growth)
