"""CUT3R checkpoint reading (restricted unpickler) and conversion to PosePrior."""

import dataclasses
import importlib
import math
import os
import pickle
import sys
import zipfile

import pytest
import torch

from loc3r.errors import Loc3rError
from loc3r.model.config import PosePriorConfig, cut3r_state_grid_width, get_config
from loc3r.model.convert_cut3r import (
    InertObject,
    config_from_cut3r,
    convert_cut3r_checkpoint,
    convert_cut3r_state_dict,
    parse_constructor_kwargs,
    read_cut3r_archive,
    read_cut3r_checkpoint,
)
from loc3r.model.pose_prior import PosePrior

RELEASED_512_CONSTRUCTOR = (
    "ARCroco3DStereo(ARCroco3DStereoConfig(freeze='encoder', state_size=768, pos_embed='RoPE100', "
    "rgb_head=True, pose_head=True, patch_embed_cls='ManyAR_PatchEmbed', img_size=(512, 512), "
    "head_type='dpt', output_mode='pts3d+pose', depth_mode=('exp', -inf, inf), conf_mode=('exp', 1, inf), "
    "pose_mode=('exp', -inf, inf), enc_embed_dim=1024, enc_depth=24, enc_num_heads=16, dec_embed_dim=768, "
    "dec_depth=12, dec_num_heads=12, landscape_only=False))"
)
TINY_CONSTRUCTOR = (
    "ARCroco3DStereo(ARCroco3DStereoConfig(state_size=8, pos_embed='RoPE100', rgb_head=True, pose_head=True, "
    "img_size=(48, 48), head_type='dpt', output_mode='pts3d+pose', depth_mode=('exp', -inf, inf), "
    "enc_embed_dim=32, enc_depth=2, enc_num_heads=2, dec_embed_dim=32, dec_depth=2, dec_num_heads=2, "
    "state_dec_num_heads=2, landscape_only=False))"
)
# A stand-in for omegaconf, written to disk, imported to pickle the args, then deleted.
FAKE_OMEGACONF = '''
class AnyNode:
    def __init__(self, value):
        self._val = value
        self._metadata = {"ref_type": "Any"}
        self._parent = None

    def __getstate__(self):
        return dict(self.__dict__)


class DictConfig:
    def __init__(self, content):
        self.__dict__["_content"] = {k: AnyNode(v) for k, v in content.items()}
        self.__dict__["_metadata"] = {"object_type": dict}
        self.__dict__["_parent"] = None

    def __getstate__(self):
        return dict(self.__dict__)

    def __setstate__(self, state):
        raise RuntimeError("the real class must never be used to unpickle")
'''


def tiny_cfg() -> PosePriorConfig:
    cfg = get_config("test-tiny").pose_prior
    return dataclasses.replace(cfg, state_grid_width=cut3r_state_grid_width(cfg.state_size))


def dropped_parts(cfg: PosePriorConfig, sd: dict) -> dict:
    """CUT3R's ray-map branch and DPT heads, with the DPT layer_rn aliases."""
    enc, dec, p = cfg.enc_embed_dim, cfg.dec_embed_dim, cfg.patch_size
    out = {
        "patch_embed_ray_map.proj.weight": torch.randn(enc, 6, p, p),
        "patch_embed_ray_map.proj.bias": torch.randn(enc),
        "enc_norm_ray_map.weight": torch.randn(enc),
        "enc_norm_ray_map.bias": torch.randn(enc),
        "masked_img_token": torch.randn(1, enc),
        "masked_ray_map_token": torch.randn(1, enc),
    }
    for i in range(2):
        for key, value in sd.items():
            if key.startswith("enc_blocks.0."):
                out[f"enc_blocks_ray_map.{i}." + key[len("enc_blocks.0."):]] = torch.randn_like(value)
    for head in ("dpt_self", "dpt_cross", "dpt_rgb"):
        base = f"downstream_head.{head}."
        out[base + "act_postprocess.0.0.weight"] = torch.randn(24, enc, 1, 1)
        out[base + "act_postprocess.1.0.weight"] = torch.randn(48, dec, 1, 1)
        for i in range(4):
            shared = torch.randn(64, 24 * 2 ** min(i, 1), 3, 3)
            out[base + f"scratch.layer{i + 1}_rn.weight"] = shared
            out[base + f"scratch.layer_rn.{i}.weight"] = shared  # the alias in the released files
            out[base + f"scratch.refinenet{i + 1}.out_conv.weight"] = torch.randn(64, 64, 1, 1)
        out[base + "head.0.weight"] = torch.randn(32, 64, 3, 3)
    for i in range(2):
        out[f"downstream_head.final_transform.{i}.norm1.mlp.1.weight"] = torch.randn(2 * dec, dec)
        out[f"downstream_head.final_transform.{i}.attn.qkv.weight"] = torch.randn(3 * dec, dec)
    return out


@pytest.fixture(scope="module")
def original() -> PosePrior:
    torch.manual_seed(0)
    return PosePrior(tiny_cfg()).eval()


def full_cut3r_state_dict(model: PosePrior) -> dict:
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd.update(dropped_parts(model.cfg, sd))
    return {"module." + k: v for k, v in sd.items()}


def save_released_layout(path, model_sd: dict, constructor: str, tmp_dir) -> None:
    """torch.save {'model', 'args', 'epoch'} with an args object whose class then disappears."""
    module_name = "fake_omegaconf_for_loc3r_test"
    source = tmp_dir / f"{module_name}.py"
    source.write_text(FAKE_OMEGACONF)
    sys.path.insert(0, str(tmp_dir))
    try:
        fake = importlib.import_module(module_name)
        args = fake.DictConfig({"model": constructor, "seed": 0, "lr": 1e-4})
        torch.save({"model": model_sd, "args": args, "epoch": 7}, path)
    finally:
        sys.path.remove(str(tmp_dir))
        sys.modules.pop(module_name, None)
        source.unlink()
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module(module_name)


@pytest.fixture(scope="module")
def released_file(tmp_path_factory, original):
    tmp_dir = tmp_path_factory.mktemp("cut3r")
    path = tmp_dir / "cut3r_tiny.pth"
    save_released_layout(path, full_cut3r_state_dict(original), TINY_CONSTRUCTOR, tmp_dir)
    return path


def test_weights_only_load_refuses_the_released_layout(released_file):
    # Why the restricted unpickler exists.
    with pytest.raises(Exception):
        torch.load(released_file, weights_only=True)


def test_released_layout_converts_and_loads_strict(released_file, original):
    archive = read_cut3r_archive(released_file)
    assert archive.model_constructor == TINY_CONSTRUCTOR
    sd, cfg, dropped = convert_cut3r_checkpoint(released_file)
    # Image size is the runtime's choice; CUT3R's 224-and-below models see square crops.
    assert (cfg.img_height, cfg.img_width) == (48, 48)
    assert dataclasses.replace(cfg, img_height=32) == original.cfg
    expected_dropped = sorted(k[len("module."):] for k in full_cut3r_state_dict(original)
                              if k[len("module."):] not in original.state_dict())
    assert dropped == expected_dropped
    assert len(dropped) == 6 + 2 * 12 + 3 * 15 + 4

    loaded = PosePrior(cfg).eval()
    result = loaded.load_state_dict(sd, strict=True)
    assert not result.missing_keys and not result.unexpected_keys

    torch.manual_seed(1)
    frames = torch.rand(3, 2, 3, 32, 48) * 2 - 1
    with torch.no_grad():
        s_a, m_a = original.initial_state(2), original.initial_memory(2)
        s_b, m_b = loaded.initial_state(2), loaded.initial_memory(2)
        for i, frame in enumerate(frames):
            first = torch.full((2,), float(i == 0))
            out_a = original(frame, s_a, m_a, first)
            out_b = loaded(frame, s_b, m_b, first)
            for a, b in zip(out_a, out_b):
                assert torch.equal(a, b)
            s_a, m_a, s_b, m_b = out_a[2], out_a[3], out_b[2], out_b[3]


def test_read_keeps_aliases_and_maps_lazily(released_file):
    sd = read_cut3r_checkpoint(released_file)
    a = sd["module.downstream_head.dpt_self.scratch.layer2_rn.weight"]
    b = sd["module.downstream_head.dpt_self.scratch.layer_rn.1.weight"]
    assert a.data_ptr() == b.data_ptr()
    # Tensors are copy-on-write views of the file, not copies.
    size = os.path.getsize(released_file)
    assert all(v.untyped_storage().nbytes() < size for v in sd.values())


def test_aliased_kept_tensors_are_cloned_apart(original):
    sd = {k: v.clone() for k, v in original.state_dict().items()}
    sd["dec_blocks_state.0.norm1.weight"] = sd["dec_blocks.0.norm1.weight"]
    out, _, _ = convert_cut3r_state_dict(sd, parse_constructor_kwargs(TINY_CONSTRUCTOR))
    ptrs = [v.untyped_storage().data_ptr() for v in out.values()]
    assert len(set(ptrs)) == len(ptrs)
    assert torch.equal(out["dec_blocks_state.0.norm1.weight"], out["dec_blocks.0.norm1.weight"])


def test_malicious_pickle_runs_nothing(tmp_path, original):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    class EvalEvil:
        def __reduce__(self):
            return (eval, (f"open({str(marker)!r}, 'w').close()",))

    path = tmp_path / "evil.pth"
    sd = {k: v.clone() for k, v in original.state_dict().items()}
    torch.save({"model": sd, "args": Evil(), "epoch": EvalEvil(), "x": [Evil()]}, path)
    assert not marker.exists()
    archive = read_cut3r_archive(path)
    assert not marker.exists()
    assert archive.model_constructor is None
    assert set(archive.state_dict) == set(sd)
    assert torch.equal(archive.state_dict["pose_token"], sd["pose_token"])


def test_malicious_storage_type_is_refused(tmp_path):
    payload = (b"\x80\x02}q\x00X\x05\x00\x00\x00modelq\x01}q\x02X\x01\x00\x00\x00aq\x03"
               b"ctorch._utils\n_rebuild_tensor_v2\nq\x04((X\x07\x00\x00\x00storageq\x05"
               b"cos\nsystem\nq\x06X\x01\x00\x00\x000q\x07X\x03\x00\x00\x00cpuq\x08K\x01tq\tQ"
               b"K\x00K\x01\x85K\x01\x85\x89)tRq\nss.")
    path = tmp_path / "evil_storage.pth"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("evil/data.pkl", payload)
        z.writestr("evil/data/0", b"\x00" * 4)
    with pytest.raises(Loc3rError, match=r"^cannot read the pickle in .*evil_storage.pth: unsupported storage type"):
        read_cut3r_checkpoint(path)


def test_missing_file_error(tmp_path):
    path = tmp_path / "nope.pth"
    with pytest.raises(Loc3rError) as err:
        read_cut3r_checkpoint(path)
    assert str(err.value) == f"CUT3R checkpoint not found: {path}"


def test_not_a_zip_error(tmp_path):
    path = tmp_path / "legacy.pth"
    path.write_bytes(pickle.dumps({"model": {}}))
    with pytest.raises(Loc3rError) as err:
        read_cut3r_checkpoint(path)
    assert str(err.value) == f"{path} is not a torch zip archive (expected a .pth written by torch.save)"


def test_zip_without_pickle_error(tmp_path):
    path = tmp_path / "other.zip"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("readme.txt", "hi")
    with pytest.raises(Loc3rError) as err:
        read_cut3r_checkpoint(path)
    assert str(err.value) == f"{path} is a zip file but not a torch archive (no single data.pkl)"


def test_missing_keys_error(original):
    sd = full_cut3r_state_dict(original)
    del sd["module.dec_norm.weight"], sd["module.pose_retriever.write_blocks.1.norm_y.bias"]
    with pytest.raises(Loc3rError) as err:
        convert_cut3r_state_dict(sd, parse_constructor_kwargs(TINY_CONSTRUCTOR))
    assert str(err.value) == ("CUT3R state dict is missing keys: dec_norm.weight, "
                              "pose_retriever.write_blocks.1.norm_y.bias")


def test_unexpected_keys_error(original):
    sd = full_cut3r_state_dict(original)
    sd["module.downstream_head.mystery.weight"] = torch.zeros(1)
    sd["module.extra_token"] = torch.zeros(1)
    with pytest.raises(Loc3rError) as err:
        convert_cut3r_state_dict(sd, parse_constructor_kwargs(TINY_CONSTRUCTOR))
    assert str(err.value) == "CUT3R state dict has unexpected keys: downstream_head.mystery.weight, extra_token"


def test_shape_mismatch_error(original):
    sd = full_cut3r_state_dict(original)
    sd["module.enc_blocks.1.attn.proj.weight"] = torch.zeros(32, 31)
    with pytest.raises(Loc3rError) as err:
        convert_cut3r_state_dict(sd, parse_constructor_kwargs(TINY_CONSTRUCTOR))
    assert str(err.value) == "CUT3R shape mismatch: 'enc_blocks.1.attn.proj.weight' expected (32, 32), found (32, 31)"


def test_constructor_is_parsed_not_evaluated():
    kwargs = parse_constructor_kwargs(RELEASED_512_CONSTRUCTOR)
    assert kwargs["state_size"] == 768 and kwargs["pos_embed"] == "RoPE100"
    assert kwargs["img_size"] == (512, 512) and kwargs["landscape_only"] is False
    assert kwargs["depth_mode"] == ("exp", -math.inf, math.inf)
    hostile = "M(a=__import__('os').system('echo hi'), b=3, c=open('x'))"
    assert parse_constructor_kwargs(hostile) == {"b": 3}
    with pytest.raises(Loc3rError, match="cannot parse the CUT3R model constructor string"):
        parse_constructor_kwargs("ARCroco3DStereo(")


def test_released_512_config_from_shapes_and_constructor():
    with torch.device("meta"):
        sd = PosePrior(PosePriorConfig()).state_dict()
    assert config_from_cut3r(sd, parse_constructor_kwargs(RELEASED_512_CONSTRUCTOR)) == PosePriorConfig()
    # Without args.model the released widths still give the released head counts.
    assert config_from_cut3r(sd) == PosePriorConfig()


def test_head_counts_needed_for_unreleased_widths(original):
    with pytest.raises(Loc3rError) as err:
        convert_cut3r_state_dict(original.state_dict())
    assert str(err.value) == ("cannot tell the head counts of a CUT3R model with widths 32/32: "
                              "its args.model constructor string is missing")


def test_inert_object_records_calls():
    cls = type("system", (InertObject,), {"origin": "os.system"})
    obj = cls("rm -rf /")
    assert obj.args == ("rm -rf /",) and repr(obj) == "<inert os.system>"


def test_image_size_without_constructor_follows_the_head_type():
    with torch.device("meta"):
        sd = PosePrior(PosePriorConfig()).state_dict()
    assert (config_from_cut3r(sd).img_height, config_from_cut3r(sd).img_width) == (384, 512)
    sd["downstream_head.proj.fc1.weight"] = torch.empty(3072, 768, device="meta")
    assert (config_from_cut3r(sd).img_height, config_from_cut3r(sd).img_width) == (224, 224)
