"""A preallocated KV cache for the whole context budget, updated in place.

Layout: one numpy allocation of shape ``(L, 2, B, KVH, S_max, D)``; layer
``i``'s key buffer is ``buf[i, 0]`` and its value buffer ``buf[i, 1]``, each a
contiguous ``(B, KVH, S_max, D)`` array. That is the layout onnxruntime's
``com.microsoft.GroupQueryAttention`` expects for ``past_key``/``past_value``
when past and present share one buffer (``present`` has the same ``S_max``):
the runtime binds the same memory as the graph's ``past_key_values.i.*``
input and ``present.i.*`` output, the fused op writes the new tokens' keys
and values at positions ``[length, length + n)``, and nothing is copied.

:class:`KVCache` keeps the buffers in host memory (the CPU backend).
:class:`DeviceKVCache` has the same bookkeeping over per-layer buffers from a
runner's device allocator (CUDA OrtValues, TensorRT device buffers).

Bookkeeping only: :meth:`append` reserves ``n`` positions (the graph fills
them), :meth:`rewind_to` forgets everything after a position (the bytes stay;
they are overwritten by the next append). No method reallocates or copies the
buffers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from loc3r.errors import Loc3rError


@dataclass(frozen=True)
class KVCacheShape:
    num_layers: int
    batch: int
    kv_heads: int
    max_len: int  # S_max, the context budget in tokens
    head_dim: int


class _Positions:
    """Fill-length bookkeeping shared by the host and device caches."""

    shape: KVCacheShape
    _length: int

    @property
    def length(self) -> int:
        """Positions filled so far (the next token's position)."""
        return self._length

    @property
    def capacity(self) -> int:
        return self.shape.max_len

    @property
    def remaining(self) -> int:
        return self.shape.max_len - self._length

    def append(self, n: int) -> tuple[int, int]:
        """Reserve ``n`` positions; returns ``(start, end)``. The graph writes them."""
        if n < 0:
            raise Loc3rError(f"cannot append a negative number of tokens ({n})")
        if n > self.remaining:
            raise Loc3rError(
                f"context budget exceeded: {n} more tokens do not fit "
                f"({self._length} of {self.capacity} used)"
            )
        start = self._length
        self._length += n
        return start, self._length

    def rewind_to(self, n: int) -> None:
        """Forget positions ``>= n``; keeps ``[0, n)``."""
        if not 0 <= n <= self._length:
            raise Loc3rError(f"cannot rewind the KV cache to {n}: it holds {self._length} positions")
        self._length = n

    def reset(self) -> None:
        self._length = 0

    def gqa_lengths(self, new_tokens: int) -> tuple[np.ndarray, np.ndarray]:
        """``(seqlens_k, total_sequence_length)`` for a step adding ``new_tokens``.

        Call before :meth:`append`. In ORT's GQA, ``seqlens_k`` is (B,) int32
        holding total length minus one, and ``total_sequence_length`` is an
        int32 scalar: past + new.
        """
        total = self._length + new_tokens
        if total > self.capacity:
            raise Loc3rError(
                f"context budget exceeded: {new_tokens} more tokens do not fit "
                f"({self._length} of {self.capacity} used)"
            )
        seqlens_k = np.full((self.shape.batch,), total - 1, np.int32)  # (B,)
        return seqlens_k, np.array(total, np.int32)


def _check_shape(shape: KVCacheShape) -> None:
    for name in ("num_layers", "batch", "kv_heads", "max_len", "head_dim"):
        if getattr(shape, name) < 1:
            raise Loc3rError(f"KV cache {name} must be positive, got {getattr(shape, name)}")


class KVCache(_Positions):
    """A fixed-size host (numpy) KV cache with a fill ``length``; see the module docstring."""

    def __init__(self, shape: KVCacheShape, dtype=np.float32):
        _check_shape(shape)
        self.shape = shape
        self.dtype = np.dtype(dtype)
        s = shape
        self._buf = np.zeros(
            (s.num_layers, 2, s.batch, s.kv_heads, s.max_len, s.head_dim), self.dtype
        )  # (L, 2, B, KVH, S_max, D)
        self._length = 0

    @property
    def nbytes(self) -> int:
        return self._buf.nbytes

    # ---- views (no copies) ----
    def key(self, layer: int) -> np.ndarray:
        """Layer ``layer``'s full key buffer, ``(B, KVH, S_max, D)``, writable."""
        return self._buf[layer, 0]

    def value(self, layer: int) -> np.ndarray:
        """Layer ``layer``'s full value buffer, ``(B, KVH, S_max, D)``, writable."""
        return self._buf[layer, 1]

    def valid_key(self, layer: int) -> np.ndarray:
        """The filled part, ``(B, KVH, length, D)``, a view."""
        return self._buf[layer, 0, :, :, : self._length]

    def valid_value(self, layer: int) -> np.ndarray:
        return self._buf[layer, 1, :, :, : self._length]

    def data_pointer(self) -> int:
        """Address of the single allocation (tests use it to prove no reallocation)."""
        return self._buf.__array_interface__["data"][0]


class DeviceKVCache(_Positions):
    """The same cache with per-layer buffers from a device allocator.

    ``allocate(shape, dtype)`` returns one buffer, e.g.
    :meth:`loc3r.runtime.backends.ort.OrtRunner.device_buffer` (an OrtValue
    on the CUDA device) or
    :meth:`loc3r.runtime.backends.tensorrt.TrtRunner.device_buffer`. The
    2 x L buffers, ``(B, KVH, S_max, D)`` each, are allocated once here and
    bound in place by the runner on every step.
    """

    def __init__(self, shape: KVCacheShape, allocate: Callable, dtype=np.float32):
        _check_shape(shape)
        self.shape = shape
        self.dtype = np.dtype(dtype)
        per_layer = (shape.batch, shape.kv_heads, shape.max_len, shape.head_dim)
        self._keys = [allocate(per_layer, self.dtype) for _ in range(shape.num_layers)]
        self._values = [allocate(per_layer, self.dtype) for _ in range(shape.num_layers)]
        self._length = 0

    def key(self, layer: int):
        return self._keys[layer]

    def value(self, layer: int):
        return self._values[layer]
