import json

import pytest

from loc3r.errors import Loc3rError
from loc3r.model.config import PRESETS, Loc3RConfig, get_config


def test_7b_has_the_paper_dimensions():
    c = get_config("loc3r-7b")
    assert (c.vision.grid, c.vision.pooled_grid, c.vision.tokens_per_frame) == (27, 14, 196)
    assert c.vision.hidden_size == 1152
    t = c.text
    assert (t.hidden_size, t.num_layers, t.num_heads, t.num_kv_heads, t.head_dim) == (3584, 28, 28, 4, 128)
    assert t.rope_theta == 1e6
    assert c.tokens_per_frame == 197
    p = c.pose_prior
    assert (p.enc_embed_dim, p.enc_depth, p.dec_embed_dim, p.dec_depth, p.state_size) == (1024, 24, 768, 12, 768)
    assert c.heads.num_orientation_bins == 36


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_config_json_round_trip(name):
    c = get_config(name)
    back = Loc3RConfig.from_dict(json.loads(json.dumps(c.to_dict())))
    assert back == c


def test_unknown_preset_lists_known_ones():
    with pytest.raises(Loc3rError, match="unknown model preset 'nope'; known: loc3r-7b"):
        get_config("nope")


def test_unknown_field_is_refused():
    d = get_config("test-tiny").to_dict()
    d["text"]["bogus"] = 1
    with pytest.raises(Loc3rError, match="config.TextConfig has unknown fields: bogus"):
        Loc3RConfig.from_dict(d)


def test_no_camera_tokens_without_pose_prior():
    c = get_config("test-tiny-nocam")
    assert not c.camera_tokens_active
    assert c.tokens_per_frame == c.vision.tokens_per_frame
