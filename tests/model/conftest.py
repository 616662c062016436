"""Tiny random Hugging Face LLaVA-OneVision models saved to disk, for the conversion tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

# Special ids of the tiny word-level tokenizer: 100 words w0..w99, then these.
UNK, VIDEO, IMAGE = 100, 101, 102


def save_tiny_tokenizer(path: Path, num_words: int = 100) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(num_words)}
    vocab.update({"<unk>": num_words, "<video>": num_words + 1, "<image>": num_words + 2})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path))


def build_tiny_llava(directory: Path, *, heads: int = 4, kv_heads: int = 2, head_dim: int = 8,
                     tied: bool = False, feature_layer: int = -1, image_size: int = 32, patch: int = 8,
                     vocab: int = 128, shard: bool = False, seed: int = 0, num_words: int = 100):
    """Save a random LlavaOnevisionForConditionalGeneration + tokenizer.json to ``directory``; return the model."""
    from transformers import (LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, Qwen2Config,
                              SiglipVisionConfig)

    torch.manual_seed(seed)
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=2,
                                image_size=image_size, patch_size=patch, vision_use_head=False)
    text = Qwen2Config(vocab_size=vocab, hidden_size=heads * head_dim, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=heads, num_key_value_heads=kv_heads,
                       rope_parameters={"rope_type": "default", "rope_theta": 1e6}, tie_word_embeddings=tied,
                       eos_token_id=None)
    cfg = LlavaOnevisionConfig(vision_config=vision, text_config=text, video_token_index=num_words + 1,
                               image_token_index=num_words + 2, tie_word_embeddings=tied,
                               vision_feature_layer=feature_layer)
    model = LlavaOnevisionForConditionalGeneration(cfg).eval()
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, max_shard_size="40KB" if shard else "5GB")
    save_tiny_tokenizer(directory / "tokenizer.json", num_words)
    return model


@pytest.fixture(scope="session")
def tiny_llava_factory(tmp_path_factory):
    """build(name, **options) -> (hf_dir, hf_model); cached per name for the session."""
    cache: dict = {}

    def build(name: str, **options):
        if name not in cache:
            d = tmp_path_factory.mktemp(f"hf-{name}")
            cache[name] = (d, build_tiny_llava(d, **options))
        return cache[name]

    return build
