"""Fixed-point encoding: no wrap-around, unbiased rounding, clipping counted, bad input refused."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from secagg import EncodingSpec, InvalidInput, OverflowRisk, SecAggParams, aggregate_in_process


def field_sum(vectors, bits):
    """Sum mod 2^bits with Python integers (independent of numpy's wrapping arithmetic)."""
    mod = 1 << bits
    return np.array([sum(int(v[j]) for v in vectors) % mod for j in range(len(vectors[0]))],
                    dtype=np.uint32 if bits == 32 else np.uint64)


@pytest.mark.parametrize("bits, n, p", [(32, 1 << 16, 16), (32, 70_000, 16), (32, 4, 30), (64, 1 << 40, 24)])
def test_configurations_that_could_overflow_are_refused_with_the_fix(bits, n, p):
    with pytest.raises(OverflowRisk) as err:
        EncodingSpec.build(1.0, 8, bits=bits, max_clients=n, precision_bits=p)
    msg = str(err.value)
    assert "fewer clients" in msg and "precision_bits" in msg and "bits=64" in msg


def test_overflow_is_refused_before_the_protocol_starts():
    transcript = []
    with pytest.raises(OverflowRisk):
        aggregate_in_process({c: np.zeros(3) for c in range(4)}, 1.0, SecAggParams(precision_bits=30), transcript=transcript)
    assert transcript == []
    EncodingSpec.build(1.0, 8, bits=64, max_clients=4, precision_bits=30)  # the named fix works


@settings(max_examples=200, deadline=None)
@given(
    clip=st.floats(1e-6, 1e6),
    n=st.integers(2, 1 << 20),
    bits=st.sampled_from([32, 64]),
    p=st.integers(1, 24),
)
def test_accepted_configurations_cannot_wrap_and_keep_their_precision(clip, n, bits, p):
    try:
        spec = EncodingSpec.build(clip, 1, bits=bits, max_clients=n, precision_bits=p)
    except OverflowRisk:
        assert math.log2(n) + p > bits - 2  # refused only near the limit
        return
    seg = spec.segments[0]
    largest_q = math.ceil(math.ldexp(clip, seg.frac_bits))  # |q| of one client never exceeds this
    assert n * largest_q <= 2 ** (bits - 1) - 1
    assert 2 * math.ldexp(clip, seg.frac_bits) >= 2**p


@pytest.mark.parametrize("bits", [32, 64])
@pytest.mark.parametrize("clip", [1.0, 3.0, 1000.0])
def test_extreme_sums_decode_exactly_without_wrapping(bits, clip):
    n = 7
    spec = EncodingSpec.build(clip, 4, bits=bits, max_clients=n)
    x = np.array([clip, -clip, 5 * clip, -5 * clip])  # the last two clip to +-clip
    enc = [spec.encode(x, np.random.default_rng(i))[0] for i in range(n)]
    total, counts = spec.decode(field_sum(enc, bits))
    assert total.tolist() == [n * clip, -n * clip, n * clip, -n * clip]
    assert counts == (2 * n,)


def test_decoding_is_the_exact_integer_sum_scaled_by_a_power_of_two():
    spec = EncodingSpec.build(0.5, 1000, bits=32, max_clients=10)
    rng = np.random.default_rng(0)
    enc = [spec.encode(rng.uniform(-0.5, 0.5, 1000), rng)[0] for _ in range(10)]
    total, _ = spec.decode(field_sum(enc, 32))
    q = sum(v[:1000].view(np.int32).astype(np.int64) for v in enc)  # each client's signed integers
    assert np.array_equal(total, np.ldexp(q.astype(np.float64), -spec.segments[0].frac_bits))


@pytest.mark.parametrize("frac", [0.1, 0.5, 0.93])
@pytest.mark.parametrize("sign", [1, -1])
def test_stochastic_rounding_is_unbiased(frac, sign):
    spec = EncodingSpec.build(1.0, 200_000, bits=32, max_clients=10)
    f = spec.segments[0].frac_bits
    y = sign * (12345 + frac)  # target in units of the quantization step
    x = np.full(spec.length, math.ldexp(y, -f))
    q = spec.encode(x, np.random.default_rng(7))[0][: spec.length].view(np.int32).astype(np.int64)
    assert set(np.unique(q)) <= {math.floor(y), math.ceil(y)}
    sd = math.sqrt(frac * (1 - frac) / spec.length)  # CLT: std of the mean of Bernoulli(frac) steps
    assert abs(q.mean() - y) < 5 * sd


def test_clipping_is_counted_per_segment_never_silent():
    spec = EncodingSpec.build([(3, 10.0), (4, 0.1)], 7, bits=32, max_clients=3)
    x = np.array([10.0, -10.5, 3.0, 0.1, -0.1, 0.2, -7.0])  # exactly at the range is not clipped
    enc, report = spec.encode(x)
    assert report.clipped == 3 and report.per_segment == (1, 2) and report.length == 7
    total, counts = spec.decode(field_sum([enc], 32))
    assert counts == (1, 2)
    assert total.tolist() == pytest.approx([10.0, -10.0, 3.0, 0.1, -0.1, 0.1, -0.1], abs=1e-6)


def test_sum_result_reports_clipping_over_the_survivors_only():
    inputs = {c: np.array([0.0, 2.0 if c == 1 else 0.0, 3.0 if c == 2 else 0.0]) for c in range(5)}
    res = aggregate_in_process(inputs, 1.0, SecAggParams(), drop={"masked_input": {2}})
    assert res.clipped == 1 and res.sum.tolist() == pytest.approx([0.0, 1.0, 0.0], abs=1e-6)


@pytest.mark.parametrize(
    "clip, length, x, match",
    [
        (1.0, 3, [0.0, float("nan"), 1.0], "non-finite"),
        (1.0, 3, [0.0, float("inf"), 1.0], "non-finite"),
        (1.0, 3, [0.0, 1.0], "length 3"),
        ([(2, 1.0), (2, 1.0)], 3, None, "cover 4 coordinates"),
        (0.0, 3, None, "clip range"),
        (-1.0, 3, None, "clip range"),
        (float("nan"), 3, None, "clip range"),
        ([(0, 1.0), (3, 1.0)], 3, None, "length must be >= 1"),
        ("wide", 3, None, "clip must be"),
    ],
)
def test_bad_inputs_are_refused_by_name(clip, length, x, match):
    with pytest.raises(InvalidInput, match=match):
        spec = EncodingSpec.build(clip, length, bits=32, max_clients=4)
        spec.encode(np.array(x))


def test_bits_must_be_32_or_64():
    with pytest.raises(InvalidInput, match="32 or 64"):
        EncodingSpec.build(1.0, 3, bits=16, max_clients=4)
