"""Training log: loss history as JSON and loss curves as a PNG."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Optional


class TrainLog:
    """Collects per-step and validation records of every stage; writes ``log.json`` and ``loss_curves.png``."""

    def __init__(self, out: Path, meta: dict):
        self.out = Path(out)
        self.meta = dict(meta)
        self.records: list[dict] = []
        self.start = time.time()
        path = self.out / "log.json"
        if path.is_file():  # a later stage appends to an earlier stage's log
            old = json.loads(path.read_text())
            self.records = old.get("records", [])
            self.meta = {**old.get("meta", {}), **self.meta}

    def add(self, stage: int, kind: str, step: int, values: dict[str, float]) -> None:
        """kind is 'train' or 'val'."""
        rec = {"stage": stage, "kind": kind, "step": step, "time_s": round(time.time() - self.start, 2)}
        rec.update({k: (round(float(v), 6) if math.isfinite(float(v)) else None) for k, v in values.items()})
        self.records.append(rec)

    def write(self, extra: Optional[dict] = None) -> None:
        if extra:
            self.meta.update(extra)
        self.out.mkdir(parents=True, exist_ok=True)
        tmp = self.out / "log.json.partial"
        tmp.write_text(json.dumps({"meta": self.meta, "records": self.records}, indent=0) + "\n")
        tmp.replace(self.out / "log.json")
        self.plot(self.out / "loss_curves.png")

    def plot(self, path: Path) -> None:
        """One panel per logged quantity, train (smoothed) and val lines, per stage."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        panels = [(1, ("vision", "semantic", "colour", "depth")), (1, ("pose", "translation_err_m", "rotation_err_deg")),
                  (2, ("loss", "ce")), (2, ("bev", "pos", "ori")), (2, ("pos_err_m",)), (2, ("ori_err_deg",))]
        panels = [(s, keys) for s, keys in panels
                  if any(r["stage"] == s and r.get(k) is not None for r in self.records for k in keys)]
        if not panels:
            return
        cols = min(3, len(panels))
        rows = math.ceil(len(panels) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
        for ax, (stage, keys) in zip(axes.flat, panels):
            for key in keys:
                for kind, style in (("train", "-"), ("val", "o--")):
                    pts = [(r["step"], r[key]) for r in self.records
                           if r["stage"] == stage and r["kind"] == kind and r.get(key) is not None]
                    if not pts:
                        continue
                    xs, ys = zip(*pts)
                    if kind == "train":
                        ys = _smooth(ys)
                    ax.plot(xs, ys, style, label=f"{kind} {key}", markersize=3)
            ax.set_title(f"stage {stage}")
            ax.set_xlabel("step")
            ax.legend(fontsize=7)
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[len(panels):]:
            ax.axis("off")
        fig.tight_layout()
        fig.savefig(path, dpi=90)
        plt.close(fig)


def _smooth(values, alpha: float = 0.05) -> list[float]:
    out, acc = [], None
    for v in values:
        acc = v if acc is None else (1 - alpha) * acc + alpha * v
        out.append(acc)
    return out
