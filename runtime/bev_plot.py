"""A top-down (bird's-eye-view) picture of what the model saw and where it thinks the agent is.

- every vision token as a dot at its BEV-head position (x, y), coloured by
  the mean colour of the image patch it came from;
- the camera trajectory from the pose prior, as a line from the first frame
  (a circle) to the last (a square);
- the localized agent as an arrow along its heading, with a circle of radius
  sigma around it;
- axes in metres, equal aspect.

Headings are degrees counter-clockwise from the BEV +x axis: the arrow points
along ``(cos a, sin a)``. Drawn with matplotlib's Agg canvas directly (no
pyplot, no global backend switch), so it works headless and leaves no state.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np

from loc3r.errors import Loc3rError


@dataclass(frozen=True)
class BevScene:
    """Everything drawn; arrays are numpy, positions in metres."""

    token_xy: np.ndarray  # (N, 2) BEV positions of vision tokens
    token_rgb: np.ndarray  # (N, 3) uint8 patch colours
    trajectory_xy: Optional[np.ndarray] = None  # (F, 2) camera positions, in frame order
    agent_xy: Optional[tuple[float, float]] = None
    agent_heading_deg: Optional[float] = None
    agent_sigma: Optional[float] = None
    title: str = ""


def patch_colors(rgb: np.ndarray, grid: int) -> np.ndarray:
    """Mean colour of each cell of a ``grid x grid`` split of a frame: (grid*grid, 3) uint8, row-major.

    This matches the vision tokens' order after pooling (row-major over the
    pooled grid of the whole, directly resized frame).
    """
    import cv2

    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise Loc3rError(f"patch_colors needs an RGB frame, got shape {tuple(rgb.shape)}")
    cells = cv2.resize(rgb, (grid, grid), interpolation=cv2.INTER_AREA)  # (grid, grid, 3)
    return cells.reshape(grid * grid, 3)


def draw_bev(scene: BevScene, path: Union[str, Path], size_px: int = 800) -> Path:
    """Write ``scene`` as a square PNG of ``size_px`` pixels; returns the path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Circle

    xy = np.asarray(scene.token_xy, np.float64).reshape(-1, 2)  # (N, 2)
    colors = np.asarray(scene.token_rgb).reshape(-1, 3)  # (N, 3)
    if len(xy) != len(colors):
        raise Loc3rError(f"BEV scene has {len(xy)} token positions but {len(colors)} colours")
    path = Path(path)
    if path.parent and not path.parent.exists():
        raise Loc3rError(f"cannot write BEV picture: folder {path.parent} does not exist")

    dpi = 100
    fig = Figure(figsize=(size_px / dpi, size_px / dpi), dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    finite = np.isfinite(xy).all(axis=1)
    if finite.any():
        ax.scatter(xy[finite, 0], xy[finite, 1], c=colors[finite] / 255.0, s=12, marker="s",
                   linewidths=0, label="vision tokens")
    points = [xy[finite]]
    if scene.trajectory_xy is not None and len(scene.trajectory_xy):
        traj = np.asarray(scene.trajectory_xy, np.float64).reshape(-1, 2)  # (F, 2)
        ax.plot(traj[:, 0], traj[:, 1], "-", color="0.25", lw=1.5, label="camera")
        ax.plot(traj[0, 0], traj[0, 1], "o", color="0.25", ms=6)
        ax.plot(traj[-1, 0], traj[-1, 1], "s", color="0.25", ms=6)
        points.append(traj)
    if scene.agent_xy is not None:
        ax_, ay = float(scene.agent_xy[0]), float(scene.agent_xy[1])
        sigma = float(scene.agent_sigma) if scene.agent_sigma is not None else 0.0
        if sigma > 0:
            ax.add_patch(Circle((ax_, ay), sigma, fill=False, ec="crimson", lw=1.5, ls="--"))
        length = max(0.3, sigma)
        if scene.agent_heading_deg is not None:
            a = np.deg2rad(float(scene.agent_heading_deg))
            ax.annotate("", xy=(ax_ + length * np.cos(a), ay + length * np.sin(a)), xytext=(ax_, ay),
                        arrowprops=dict(arrowstyle="-|>", color="crimson", lw=2.5, mutation_scale=20))
        ax.plot(ax_, ay, "o", color="crimson", ms=7, label="agent")
        points.append(np.array([[ax_ - sigma, ay - sigma], [ax_ + sigma, ay + sigma],
                                [ax_ - length, ay - length], [ax_ + length, ay + length]]))
    allp = np.concatenate([p for p in points if len(p)]) if any(len(p) for p in points) else None
    if allp is not None:
        lo, hi = allp.min(axis=0), allp.max(axis=0)
        # Square limits around everything, so metres are equal on both axes.
        centre = (lo + hi) / 2
        half = float((hi - lo).max()) / 2
        half += max(0.25, 0.08 * half)
        ax.set_xlim(centre[0] - half, centre[0] + half)
        ax.set_ylim(centre[1] - half, centre[1] + half)
    ax.set_aspect("equal", adjustable="box")
    ax.set_xlabel("x (m)")
    ax.set_ylabel("y (m)")
    ax.grid(True, lw=0.3, color="0.85")
    if scene.title:
        ax.set_title(scene.title, fontsize=10)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper right", fontsize=8, framealpha=0.8)
    fig.tight_layout()
    try:
        fig.savefig(str(path), dpi=dpi, format="png")
    except OSError as exc:
        raise Loc3rError(f"cannot write BEV picture {path}: {exc.strerror or exc}") from None
    return path
