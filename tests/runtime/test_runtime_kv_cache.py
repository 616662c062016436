import numpy as np
import pytest

from loc3r.errors import Loc3rError
from loc3r.runtime.kv_cache import KVCache, KVCacheShape

SHAPE = KVCacheShape(num_layers=2, batch=1, kv_heads=2, max_len=16, head_dim=8)


def test_layout_and_views():
    kv = KVCache(SHAPE)
    assert kv.key(0).shape == (1, 2, 16, 8) and kv.key(0).flags["C_CONTIGUOUS"]
    assert kv.value(1).flags["C_CONTIGUOUS"]
    assert kv.nbytes == 2 * 2 * 1 * 2 * 16 * 8 * 4
    kv.key(1)[..., 3, :] = 7.0  # views write through to the one buffer
    kv.append(5)
    assert kv.valid_key(1).shape == (1, 2, 5, 8)
    assert (kv.valid_key(1)[..., 3, :] == 7.0).all()
    assert np.shares_memory(kv.valid_key(1), kv.key(1))


def test_append_rewind_bookkeeping():
    kv = KVCache(SHAPE)
    ptr = kv.data_pointer()
    assert kv.append(10) == (0, 10)
    assert (kv.length, kv.remaining) == (10, 6)
    assert kv.append(3) == (10, 13)
    kv.rewind_to(10)
    assert kv.length == 10
    assert kv.append(6) == (10, 16)
    assert kv.remaining == 0
    with pytest.raises(Loc3rError) as e:
        kv.append(1)
    assert str(e.value) == "context budget exceeded: 1 more tokens do not fit (16 of 16 used)"
    with pytest.raises(Loc3rError) as e:
        kv.rewind_to(17)
    assert str(e.value) == "cannot rewind the KV cache to 17: it holds 16 positions"
    kv.reset()
    assert kv.length == 0
    assert kv.data_pointer() == ptr  # never reallocated


def test_gqa_lengths():
    kv = KVCache(SHAPE)
    kv.append(4)
    seqlens_k, total = kv.gqa_lengths(3)
    assert seqlens_k.tolist() == [6] and seqlens_k.dtype == np.int32
    assert int(total) == 7 and total.dtype == np.int32 and total.shape == ()
    with pytest.raises(Loc3rError, match="context budget exceeded"):
        kv.gqa_lengths(13)
