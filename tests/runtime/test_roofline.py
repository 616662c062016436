import pytest

from loc3r.runtime.roofline import (
    Roofline,
    decode_bytes_per_token,
    decode_fraction_of_bound,
    measure_roofline,
    prefill_fraction_of_bound,
)


def test_measurements_are_positive_and_finite():
    r = measure_roofline(n_bytes=1 << 20, matmul_n=64, repeats=2)
    for v in (r.copy_gbps, r.triad_gbps, r.matmul_gflops):
        assert 0 < v < 1e5
    assert r.bandwidth_gbps == max(r.copy_gbps, r.triad_gbps)
    assert set(r.to_dict()) == {"copy_gbps", "triad_gbps", "matmul_gflops", "bandwidth_gbps"}


def test_decode_fraction_hand_computed():
    # 1 GB weights + 1 MB/token KV at context 1000 = 2 GB per token.
    b = decode_bytes_per_token(10**9, 10**6, 1000)
    assert b == 2 * 10**9
    # 20 GB/s -> bound 10 tok/s; 7 tok/s achieved = 70%.
    assert decode_fraction_of_bound(7.0, b, 20.0) == pytest.approx(0.7)


def test_prefill_fraction_hand_computed():
    # 1 GFLOP per token at 100 GFLOP/s -> bound 100 tok/s; 25 tok/s = 25%.
    assert prefill_fraction_of_bound(25.0, 1e9, 100.0) == pytest.approx(0.25)


def test_roofline_is_frozen():
    r = Roofline(1.0, 2.0, 3.0)
    with pytest.raises(Exception):
        r.copy_gbps = 5.0
