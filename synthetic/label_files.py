"""Reading labels.jsonl, prediction files and per-scene ground truth."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Union

import numpy as np

from loc3r.errors import Loc3rError

PathLike = Union[str, Path]


def _read_jsonl(path: Path, what: str) -> list[dict]:
    if not path.is_file():
        raise Loc3rError(f"{what} not found: {path}")
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise Loc3rError(f"{path}:{n}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict) or "id" not in row:
                raise Loc3rError(f"{path}:{n}: each line must be a JSON object with an 'id'")
            rows.append(row)
    return rows


def labels_path(data: PathLike) -> Path:
    """labels.jsonl of a dataset directory (or the file itself)."""
    p = Path(data)
    return p / "labels.jsonl" if p.is_dir() else p


def read_labels(data: PathLike) -> list[dict]:
    """The label records of a `loc3r synth` directory (or a labels.jsonl file)."""
    path = labels_path(data)
    rows = _read_jsonl(path, "labels file")
    for n, row in enumerate(rows, 1):
        missing = [k for k in ("type", "question", "answer") if k not in row]
        if missing:
            raise Loc3rError(f"{path}: label {row['id']} lacks {', '.join(missing)}")
    if not rows:
        raise Loc3rError(f"{path} holds no labels")
    return rows


def read_predictions(path: PathLike) -> dict[str, dict]:
    """Predictions JSONL: one {"id", "answer", "position": [x, y], "heading": deg} per line."""
    rows = _read_jsonl(Path(path), "predictions file")
    out: dict[str, dict] = {}
    for row in rows:
        if row["id"] in out:
            raise Loc3rError(f"{path}: prediction id {row['id']} appears twice")
        out[row["id"]] = row
    return out


def read_scene_info(data: PathLike, scene_id: str) -> dict:
    """scenes/<scene_id>.json of a dataset directory: room and objects in the BEV frame."""
    path = Path(data) / "scenes" / f"{scene_id}.json"
    if not path.is_file():
        raise Loc3rError(f"scene ground truth not found: {path}")
    return json.loads(path.read_text())


def read_scene_arrays(data: PathLike, scene_id: str) -> dict[str, np.ndarray]:
    """scenes/<scene_id>.npz of a dataset directory as a dict of arrays (no pickles)."""
    path = Path(data) / "scenes" / f"{scene_id}.npz"
    if not path.is_file():
        raise Loc3rError(f"scene arrays not found: {path}")
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}
