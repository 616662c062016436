"""What enters the context when a stream has more frames than the KV budget holds.

The context holds ``budget`` frame blocks (after the prompt prefix, keeping
room for a question and its answer). The user picks one policy; every time
it acts it says so through the session's notice callback (stderr by
default), so frames are never dropped silently:

- ``stop``: keep the first ``budget`` frames; later frames are refused
  (``add_frame`` returns False) with one notice.
- ``uniform``: keep an evenly spaced subset of the whole stream. When the
  context is full, every other kept frame is dropped and the sampling stride
  doubles (frames 0, 2s, 4s, ... stay; from then on only every 2s-th frame
  is added); the context is rebuilt by re-prefilling the kept frame blocks.
- ``recent``: a sliding window over the newest frames. When full, the oldest
  quarter of the window (at least one frame) is dropped and the rest are
  re-prefilled, so the rebuild cost is paid once per ``budget / 4`` frames.
- ``error``: raise a Loc3rError instead of dropping anything.

The pose prior still runs on every frame under every policy, so its
recurrent state and the camera tokens of the frames that are kept stay
those of the full stream; rebuilding re-uses the stored frame blocks and
never re-runs the vision tower.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from loc3r.errors import Loc3rError

FRAME_POLICIES = ("stop", "uniform", "recent", "error")
# Policies that rebuild the context, so the session must keep every frame block.
REBUILDING_POLICIES = ("uniform", "recent")


@dataclass(frozen=True)
class Admission:
    """What to do with an incoming frame."""

    add: bool  # prefill this frame
    keep: Optional[tuple[int, ...]] = None  # rebuild the context from these stream indices first; None: no rebuild


class FrameSelector:
    """The policy's bookkeeping: which stream indices are in the context."""

    def __init__(self, policy: str, budget: int, notice: Callable[[str], None]):
        if policy not in FRAME_POLICIES:
            raise Loc3rError(f"unknown frame policy '{policy}'; choose one of: {', '.join(FRAME_POLICIES)}")
        if budget < 1:
            raise Loc3rError("the context has no room for a single frame block after the prompt; "
                             "export the package with a larger --max-context")
        self.policy = policy
        self.budget = budget
        self.stride = 1  # uniform: only multiples of this are added
        self._notice = notice
        self._stopped = False

    def admit(self, index: int, kept: Sequence[int]) -> Admission:
        """Decide for stream frame ``index`` given the indices ``kept`` now in the context."""
        if self.policy == "uniform" and index % self.stride:
            return Admission(add=False)
        if len(kept) < self.budget:
            return Admission(add=True)
        if self.policy == "error":
            raise Loc3rError(f"frame budget reached: the context holds {self.budget} frames "
                             "(choose the uniform, recent or stop frame policy, or sample fewer frames)")
        if self.policy == "stop":
            if not self._stopped:
                self._notice(f"frame budget reached: the context holds {self.budget} frames; "
                             "later frames are refused (frame policy 'stop')")
                self._stopped = True
            return Admission(add=False)
        if self.policy == "recent":
            drop = max(1, self.budget // 4)
            keep = tuple(kept[drop:])
            self._notice(f"frame budget of {self.budget} reached: dropping the {drop} oldest frame(s) and "
                         f"re-prefilling {len(keep)} (frame policy 'recent')")
            return Admission(add=True, keep=keep)
        self.stride *= 2
        keep = tuple(i for i in kept if i % self.stride == 0)
        add = index % self.stride == 0
        self._notice(f"frame budget of {self.budget} reached: keeping every {self.stride}th frame "
                     f"({len(keep)} kept, re-prefilled; frame policy 'uniform')")
        return Admission(add=add, keep=keep)
