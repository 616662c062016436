"""Training data for loc3r-tiny: a `loc3r synth` directory -> one cached tensor file.

The cache (``.npz``) holds everything training needs, so no scene is
re-rendered or re-decoded:

- model inputs, produced by the runtime's preprocessing (the single source
  of truth, :mod:`loc3r.runtime.preprocess`): ``vision`` (N, F, 3, S, S) and
  ``pose`` (N, F, 3, Hp, Wp), stored as float16;
- stage-1 dense truth per vision patch (grid g = S / patch): ``semantic``
  (N, F, g, g) uint8 majority class (render.SEMANTIC_CLASSES), ``colour``
  (N, F, g, g) uint8 (0 = no object, 1 + index into OBJECT_COLOURS), and
  ``depth`` (N, F, g, g) float32 mean metres; ``pose7`` (N, F, 7), the
  pose-prior targets;
- stage-2 truth: ``bev_targets`` (N, F, G, G, 2) and ``bev_valid`` (N, F, G, G);
- questions, tokenized with the runtime's :class:`PromptTokenizer` and the
  chat template below: ``q_ids`` (Q, L) int32 right-padded suffix + answer +
  EOS, ``q_len`` (Q,), ``q_answer_start`` (Q,) index of the first answer
  token, ``q_scene`` (Q,), ``q_has_situation`` (Q,), ``q_position`` (Q, 2)
  BEV metres, ``q_heading`` (Q,) BEV degrees; ``prefix_ids`` (P,).

Label ids, types and scene ids go in a JSON file beside the cache.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from loc3r.errors import Loc3rError
from loc3r.model.config import Loc3RConfig

# The loc3r-tiny chat template (the export step copies it into the manifest).
CHAT_PREFIX = "<|im_start|>user\nvideo:"
CHAT_SUFFIX = "\n{situation}question: {question}<|im_end|>\n<|im_start|>assistant\n"
CHAT_SITUATION = "situation: {situation}<Pos><Ori>\n"
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<pad>"
CHAT_TEMPLATE_FILE = "chat_template.json"
IGNORE = -100


def chat_template_dict() -> dict:
    """The template as the manifest's ``chat_template`` entry."""
    return {"prefix": CHAT_PREFIX, "suffix": CHAT_SUFFIX, "situation": CHAT_SITUATION}


def write_tokenizer_files(directory: Path, name_tokens: bool = False) -> dict[str, int]:
    """Write ``tokenizer.json`` and ``chat_template.json`` (the manifest's ChatTemplate fields, which
    the exporter reads from a checkpoint directory) to ``directory``; return the special ids.
    ``name_tokens``: one token per object name (:func:`loc3r.synthetic.tokenizer.build_tokenizer`)."""
    from loc3r.synthetic.tokenizer import save_tokenizer

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_tokenizer(directory / "tokenizer.json", name_tokens=name_tokens)
    (directory / CHAT_TEMPLATE_FILE).write_text(json.dumps(chat_template_dict(), indent=1) + "\n")
    return special_ids(directory)


def special_ids(directory: Path) -> dict[str, int]:
    """<Pos>, <Ori>, EOS and pad ids of ``directory``/tokenizer.json."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(directory) / "tokenizer.json"))
    ids = {"pos": tok.token_to_id("<Pos>"), "ori": tok.token_to_id("<Ori>"), "eos": tok.token_to_id(EOS_TOKEN),
           "pad": tok.token_to_id(PAD_TOKEN)}
    missing = [k for k, v in ids.items() if v is None]
    if missing:
        raise Loc3rError(f"{directory}/tokenizer.json lacks the special tokens: {', '.join(missing)}")
    return ids


def prompt_tokenizer(directory: Path):
    """The runtime's :class:`PromptTokenizer` over ``directory``'s tokenizer.json and chat template."""
    from loc3r.runtime.package import ChatTemplate, SpecialTokens
    from loc3r.runtime.tokenizer import PromptTokenizer

    template = ChatTemplate(**json.loads((Path(directory) / CHAT_TEMPLATE_FILE).read_text()))
    return PromptTokenizer(Path(directory) / "tokenizer.json", template, SpecialTokens(**special_ids(directory)))


def model_config_with_tokens(cfg: Loc3RConfig, special: dict[str, int]) -> Loc3RConfig:
    """``cfg`` with the tokenizer's <Pos>/<Ori>/EOS ids."""
    return cfg.replace(pos_token_id=special["pos"], ori_token_id=special["ori"], eos_token_id=special["eos"])


@dataclass(frozen=True)
class EncodedQuestion:
    ids: np.ndarray  # (T,) suffix + answer + EOS
    answer_start: int


def encode_question(tok, question: str, situation: Optional[str], answer: Optional[str]) -> EncodedQuestion:
    """Suffix ids exactly as the runtime builds them, then the answer tokens and EOS (when ``answer``)."""
    suffix = tok.encode_suffix(question, situation).ids
    if answer is None:
        return EncodedQuestion(suffix, len(suffix))
    ans = np.asarray(tok._tok.encode(answer, add_special_tokens=False).ids, np.int64)
    return EncodedQuestion(np.concatenate([suffix, ans, [tok.special.eos]]).astype(np.int64), len(suffix))


def patch_labels(semantic: np.ndarray, instance: np.ndarray, depth: np.ndarray, object_colours: list[int],
                 size: int, grid: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-patch dense truth for one clip.

    semantic/instance (F, H, W) uint8, depth (F, H, W) metres; maps are
    resized (nearest) to ``size`` x ``size`` and split in ``grid`` x ``grid``
    patches. Returns (semantic (F, g, g) majority class, colour (F, g, g):
    0 = no object else 1 + colour index of the majority instance, depth
    (F, g, g) mean finite depth).
    """
    import cv2

    f = semantic.shape[0]
    p = size // grid

    def resized(a, interp):
        if a.shape[1:] == (size, size):
            return a
        return np.stack([cv2.resize(x, (size, size), interpolation=interp) for x in a])

    sem = resized(semantic, cv2.INTER_NEAREST).reshape(f, grid, p, grid, p).transpose(0, 1, 3, 2, 4)
    inst = resized(instance, cv2.INTER_NEAREST).reshape(f, grid, p, grid, p).transpose(0, 1, 3, 2, 4)
    dep = resized(np.nan_to_num(depth, nan=0.0, posinf=0.0).astype(np.float32), cv2.INTER_NEAREST)
    dep = dep.reshape(f, grid, p, grid, p).transpose(0, 1, 3, 2, 4).reshape(f, grid, grid, p * p)
    sem = sem.reshape(f, grid, grid, p * p)
    inst = inst.reshape(f, grid, grid, p * p)
    n_sem = int(sem.max()) + 1
    sem_major = np.argmax((sem[..., None] == np.arange(n_sem)).sum(-2), axis=-1).astype(np.uint8)
    n_inst = int(inst.max()) + 1
    inst_major = np.argmax((inst[..., None] == np.arange(n_inst)).sum(-2), axis=-1)
    lut = np.asarray([0] + [c + 1 for c in object_colours], np.uint8)
    colour = lut[inst_major]
    ok = dep > 0
    dmean = (dep * ok).sum(-1) / np.maximum(ok.sum(-1), 1)
    return sem_major, colour, dmean.astype(np.float32)


def build_cache(data_dir: Path, out: Path, cfg: Loc3RConfig, tokenizer_dir: Path, max_scenes: Optional[int] = None,
                progress: bool = True) -> dict:
    """Preprocess a `loc3r synth` directory into ``out`` (.npz) + ``out``.json; return the JSON summary."""
    from tqdm import tqdm

    from loc3r.runtime.preprocess import preprocess_pose_batch, preprocess_vision_batch
    from loc3r.synthetic.label_files import read_labels, read_scene_info
    from loc3r.synthetic.scene import OBJECT_COLOURS

    data_dir, out = Path(data_dir), Path(out)
    labels = read_labels(data_dir)
    scene_ids = list(dict.fromkeys(lab["scene_id"] for lab in labels))
    if max_scenes is not None:
        scene_ids = scene_ids[:max_scenes]
    index = {sid: i for i, sid in enumerate(scene_ids)}
    tok = prompt_tokenizer(tokenizer_dir)
    v, pp = cfg.vision, cfg.pose_prior
    colours = list(OBJECT_COLOURS)
    arrays: dict[str, list] = {k: [] for k in ("vision", "pose", "semantic", "colour", "depth", "pose7",
                                               "bev_targets", "bev_valid")}
    for sid in tqdm(scene_ids, desc=f"cache {data_dir.name}", unit="scene", disable=not progress):
        z = np.load(data_dir / "scenes" / f"{sid}.npz")
        rgb = z["rgb"]  # (F, H, W, 3) uint8
        arrays["vision"].append(preprocess_vision_batch(list(rgb), v.image_size, v.mean, v.std).astype(np.float16))
        if pp is not None:
            arrays["pose"].append(preprocess_pose_batch(list(rgb), pp.img_height, pp.img_width, pp.mean, pp.std,
                                                        pp.patch_size).astype(np.float16))
        info = read_scene_info(data_dir, sid)
        obj_colours = [colours.index(o["colour"]) for o in info["objects"]]
        sem, col, dep = patch_labels(z["semantic"], z["instance"], z["depth"], obj_colours, v.image_size, v.grid)
        arrays["semantic"].append(sem)
        arrays["colour"].append(col)
        arrays["depth"].append(dep)
        arrays["pose7"].append(z["pose7"].astype(np.float32))
        arrays["bev_targets"].append(z["bev_targets"].astype(np.float32))
        arrays["bev_valid"].append(z["bev_valid"].astype(bool))
    q_ids, q_start, q_scene, q_sit, q_pos, q_head, ids, types = [], [], [], [], [], [], [], []
    for lab in labels:
        if lab["scene_id"] not in index:
            continue
        enc = encode_question(tok, lab["question"], lab.get("situation"), lab["answer"])
        q_ids.append(enc.ids)
        q_start.append(enc.answer_start)
        q_scene.append(index[lab["scene_id"]])
        has = lab.get("position") is not None
        q_sit.append(has)
        q_pos.append(lab["position"] if has else [0.0, 0.0])
        q_head.append(lab["heading"] if has else 0.0)
        ids.append(lab["id"])
        types.append(lab["type"])
    length = max(len(x) for x in q_ids)
    padded = np.full((len(q_ids), length), tok.special.pad, np.int32)
    for i, x in enumerate(q_ids):
        padded[i, :len(x)] = x
    stacked = {k: np.stack(a) for k, a in arrays.items() if a}
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, **stacked, q_ids=padded, q_len=np.asarray([len(x) for x in q_ids], np.int32),
             q_answer_start=np.asarray(q_start, np.int32), q_scene=np.asarray(q_scene, np.int32),
             q_has_situation=np.asarray(q_sit, bool), q_position=np.asarray(q_pos, np.float32),
             q_heading=np.asarray(q_head, np.float32), prefix_ids=tok.encode_prefix().astype(np.int32))
    summary = {"data_dir": str(data_dir), "scenes": scene_ids, "label_ids": ids, "types": types,
               "frames": int(stacked["vision"].shape[1]), "questions": len(ids)}
    out.with_suffix(".json").write_text(json.dumps(summary) + "\n")
    return summary


class CachedSplit:
    """A loaded cache: numpy arrays by name plus the JSON summary."""

    def __init__(self, path: Path):
        path = Path(path)
        if not path.is_file():
            raise Loc3rError(f"training cache not found: {path}")
        with np.load(path) as z:
            self.arrays = {k: z[k] for k in z.files}
        self.summary = json.loads(path.with_suffix(".json").read_text())

    def __getitem__(self, name: str) -> np.ndarray:
        return self.arrays[name]

    @property
    def num_scenes(self) -> int:
        return int(self.arrays["vision"].shape[0])

    @property
    def num_questions(self) -> int:
        return int(self.arrays["q_ids"].shape[0])

    def question_batch(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """Stage-2 arrays for question ``rows``: suffix ids (B, L) trimmed to the longest, labels (B, L), ..."""
        ids = self.arrays["q_ids"][rows].astype(np.int64)  # (B, Lmax)
        lens = self.arrays["q_len"][rows]
        length = int(lens.max())
        ids = ids[:, :length]
        labels = np.full_like(ids, IGNORE)
        starts = self.arrays["q_answer_start"][rows]
        for i, (s, n) in enumerate(zip(starts, lens)):
            labels[i, s:n] = ids[i, s:n]
        return {"suffix_ids": ids, "labels": labels, "scene": self.arrays["q_scene"][rows],
                "has_situation": self.arrays["q_has_situation"][rows],
                "position": self.arrays["q_position"][rows], "heading_deg": self.arrays["q_heading"][rows]}
