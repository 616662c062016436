"""Frozen configuration dataclasses for Loc3R-VLM and its named presets.

Configs are looked up by exact name (:func:`get_config`), never parsed out of
paths. They are torch-free, so the export code and tests can read them
without building a model. ``to_dict``/``from_dict`` round-trip the
``config.json`` of a checkpoint directory.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Optional

from loc3r.errors import Loc3rError


@dataclass(frozen=True)
class VisionConfig:
    """SigLIP vision transformer (no CLS token, no pooling head)."""

    image_size: int = 384
    patch_size: int = 14
    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_layers: int = 26
    num_heads: int = 16
    layer_norm_eps: float = 1e-6
    # Index into the list of hidden states [embeddings, layer 1, ..., layer N]
    # (LLaVA's `vision_feature_layer`). -1 is the last layer's output, taken
    # before the post-layernorm, as transformers does.
    feature_layer: int = -1
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def pooled_grid(self) -> int:
        return math.ceil(self.grid / 2)

    @property
    def tokens_per_frame(self) -> int:
        return self.pooled_grid**2

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass(frozen=True)
class TextConfig:
    """Qwen2 causal decoder."""

    vocab_size: int = 152064
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_layers: int = 28
    num_heads: int = 28
    num_kv_heads: int = 4
    head_dim: int = 128
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 32768


@dataclass(frozen=True)
class PosePriorConfig:
    """CUT3R-style recurrent pose prior (encoder + state/frame decoders).

    Defaults are the released 512 model's (paper-notes.md, "CUT3R checkpoint
    facts"); names follow CUT3R's constructor arguments. ``img_height`` x
    ``img_width`` is the frame size the runtime feeds (the long side resized
    to ``img_width``, each side centre-cropped to a multiple of
    ``patch_size``); the model itself accepts any multiple of the patch.

    ``state_grid_width`` places the state tokens on a 2D RoPE grid. CUT3R
    derives it from ``state_size`` (:func:`cut3r_state_grid_width`: 28 for
    768 tokens); the converter sets it that way. ``mem_dim`` is the local
    memory's width, always ``2 * dec_embed_dim`` (query half + value half).
    ``pose_head_hidden`` is the pose MLP's hidden width (``4 * dec_embed_dim``
    in CUT3R).
    """

    img_height: int = 384
    img_width: int = 512
    patch_size: int = 16
    enc_embed_dim: int = 1024
    enc_depth: int = 24
    enc_num_heads: int = 16
    dec_embed_dim: int = 768
    dec_depth: int = 12
    dec_num_heads: int = 12
    state_size: int = 768
    state_dec_num_heads: int = 16
    state_grid_width: int = 28
    mem_slots: int = 256
    mem_dim: int = 1536
    mem_depth: int = 2
    mlp_ratio: float = 4.0
    rope_base: float = 100.0
    norm_eps: float = 1e-6
    pose_head_hidden: int = 3072
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    # Early fusion of the previous frame: the pose image carries the frame and its predecessor
    # (6 channels; the first frame is paired with itself). Off in CUT3R's checkpoints; on in
    # loc3r-tiny, whose from-scratch ViT never learned frame-to-frame motion from single frames
    # in our training budget (README, "Demo model").
    previous_frame: bool = False

    def __post_init__(self):
        rope_layers = (("enc", self.enc_embed_dim, self.enc_num_heads),
                       ("dec", self.dec_embed_dim, self.dec_num_heads),
                       ("state_dec", self.dec_embed_dim, self.state_dec_num_heads))
        for name, dim, heads in rope_layers:
            if heads <= 0 or dim % heads or (dim // heads) % 4:
                raise Loc3rError(f"pose prior: {name} width {dim} with {heads} heads needs a head dim "
                                 f"divisible by 4 (2D RoPE)")
        if self.mem_dim != 2 * self.dec_embed_dim:
            raise Loc3rError(f"pose prior: mem_dim must be 2 * dec_embed_dim = {2 * self.dec_embed_dim}, "
                             f"got {self.mem_dim}")
        if self.mem_dim % self.dec_num_heads:
            raise Loc3rError(f"pose prior: mem_dim {self.mem_dim} is not divisible by dec_num_heads "
                             f"{self.dec_num_heads}")
        if self.img_height % self.patch_size or self.img_width % self.patch_size:
            raise Loc3rError(f"pose prior: image {self.img_height}x{self.img_width} is not a multiple of "
                             f"patch {self.patch_size}")
        if self.state_grid_width <= 0:
            raise Loc3rError("pose prior: state_grid_width must be positive")

    @property
    def num_patches(self) -> int:
        return (self.img_height // self.patch_size) * (self.img_width // self.patch_size)

    @property
    def in_channels(self) -> int:
        """Channels of the pose image: 3, or 6 with :attr:`previous_frame`."""
        return 6 if self.previous_frame else 3

    @property
    def enc_mlp_hidden(self) -> int:
        return int(self.enc_embed_dim * self.mlp_ratio)

    @property
    def dec_mlp_hidden(self) -> int:
        return int(self.dec_embed_dim * self.mlp_ratio)


def cut3r_state_grid_width(state_size: int) -> int:
    """CUT3R's width of the 2D grid its state tokens sit on ('2d' state_pe).

    int(sqrt(state_size)), bumped to the next even number when odd: 28 for
    the released 768-token state.
    """
    width = math.isqrt(state_size)
    return width + 1 if width % 2 == 1 else width


@dataclass(frozen=True)
class HeadsConfig:
    """Loc3R heads: f_cam, f_pos, f_ori, f_proj."""

    num_orientation_bins: int = 36
    # Hidden width of the 2-layer MLPs; 0 means "the LLM width".
    cam_hidden: int = 0
    head_hidden: int = 0


@dataclass(frozen=True)
class Loc3RConfig:
    name: str
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    # None: no pose prior (a plain LLaVA-Video checkpoint, or the ablation).
    pose_prior: Optional[PosePriorConfig] = field(default_factory=PosePriorConfig)
    heads: HeadsConfig = field(default_factory=HeadsConfig)
    # Prepend a camera token to each frame block. False = the base VLM.
    use_camera_tokens: bool = True
    projector_hidden_act: str = "gelu"
    # Special token ids (set when the tokenizer is known).
    pos_token_id: Optional[int] = None
    ori_token_id: Optional[int] = None
    eos_token_id: Optional[int] = None

    @property
    def tokens_per_frame(self) -> int:
        """Tokens in one frame block: camera token (if any) + pooled patches."""
        return self.vision.tokens_per_frame + (1 if self.camera_tokens_active else 0)

    @property
    def camera_tokens_active(self) -> bool:
        return self.use_camera_tokens and self.pose_prior is not None

    def replace(self, **changes) -> "Loc3RConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Loc3RConfig":
        d = dict(d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise Loc3rError(f"config has unknown fields: {', '.join(unknown)}")

        def sub(kind, value):
            if value is None:
                return None
            fields = {f.name for f in dataclasses.fields(kind)}
            bad = sorted(set(value) - fields)
            if bad:
                raise Loc3rError(f"config.{kind.__name__} has unknown fields: {', '.join(bad)}")
            value = {k: tuple(v) if isinstance(v, list) else v for k, v in value.items()}
            return kind(**value)

        d["vision"] = sub(VisionConfig, d.get("vision", {}))
        d["text"] = sub(TextConfig, d.get("text", {}))
        d["pose_prior"] = sub(PosePriorConfig, d.get("pose_prior"))
        d["heads"] = sub(HeadsConfig, d.get("heads", {}))
        return cls(**d)


def _tiny_pose_prior(img: int) -> PosePriorConfig:
    return PosePriorConfig(
        img_height=img, img_width=img, patch_size=16,
        enc_embed_dim=128, enc_depth=3, enc_num_heads=4,
        dec_embed_dim=96, dec_depth=2, dec_num_heads=4,
        state_size=16, state_dec_num_heads=4, state_grid_width=4,
        mem_slots=16, mem_dim=192, pose_head_hidden=192, previous_frame=True,
    )


PRESETS: dict[str, Loc3RConfig] = {
    # The paper's model: LLaVA-Video-7B-Qwen2 + SigLIP so400m + CUT3R 512.
    "loc3r-7b": Loc3RConfig(name="loc3r-7b"),
    # The embedded demo model, trained on synthetic rooms (issue 5).
    "loc3r-tiny": Loc3RConfig(
        name="loc3r-tiny",
        vision=VisionConfig(image_size=64, patch_size=8, hidden_size=192, intermediate_size=768,
                            num_layers=4, num_heads=3),
        text=TextConfig(vocab_size=512, hidden_size=256, intermediate_size=768, num_layers=4,
                        num_heads=4, num_kv_heads=2, head_dim=64, tie_word_embeddings=True,
                        max_position_embeddings=2048),
        pose_prior=_tiny_pose_prior(64),
    ),
    # Small random-weight presets for tests.
    "test-tiny": Loc3RConfig(
        name="test-tiny",
        vision=VisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                            num_layers=2, num_heads=2),
        text=TextConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2,
                        num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=512),
        pose_prior=PosePriorConfig(
            img_height=32, img_width=48, patch_size=16,
            enc_embed_dim=32, enc_depth=2, enc_num_heads=2,
            dec_embed_dim=32, dec_depth=2, dec_num_heads=2,
            state_size=8, state_dec_num_heads=2, state_grid_width=2,
            mem_slots=8, mem_dim=64, pose_head_hidden=64,
        ),
    ),
    "test-tiny-nocam": Loc3RConfig(
        name="test-tiny-nocam",
        vision=VisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                            num_layers=2, num_heads=2),
        text=TextConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2,
                        num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=512),
        pose_prior=None,
        use_camera_tokens=False,
    ),
}
# test-tiny with the previous frame fused into the pose image (as loc3r-tiny).
PRESETS["test-tiny-prev"] = PRESETS["test-tiny"].replace(
    name="test-tiny-prev", pose_prior=dataclasses.replace(PRESETS["test-tiny"].pose_prior, previous_frame=True))


def get_config(name: str) -> Loc3RConfig:
    """The preset called exactly ``name``."""
    try:
        return PRESETS[name]
    except KeyError:
        raise Loc3rError(f"unknown model preset '{name}'; known: {', '.join(sorted(PRESETS))}") from None
