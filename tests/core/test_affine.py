"""The affine core against a direct float64 evaluation, over random shapes, groups and statistics."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from bnfold.core.affine import (
    ChannelAffine,
    FoldRefused,
    ScaledWeight,
    cast_checked,
    channel_factors,
    contract_shift,
    contract_shift_transposed,
    scale_weight,
)

finite = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False)


@st.composite
def batchnorms(draw, channels: int | None = None):
    c = channels or draw(st.integers(1, 8))
    vector = hnp.arrays(np.float64, c, elements=finite)
    variance = hnp.arrays(np.float64, c, elements=st.floats(1e-3, 1e3))
    return draw(vector), draw(vector), draw(vector), draw(variance), draw(st.floats(1e-6, 1e-2))


@given(batchnorms(), st.data())
def test_batchnorm_map_equals_the_normalization_it_replaces(params, data):
    gamma, beta, mean, var, eps = params
    x = data.draw(hnp.arrays(np.float64, (3, gamma.shape[0]), elements=finite))
    affine = ChannelAffine.from_batchnorm(gamma, beta, mean, var, eps)
    expected = gamma * (x - mean) / np.sqrt(var + eps) + beta
    magnitude = abs(affine.scale * x) + abs(affine.scale * mean) + abs(beta)
    assert np.all(abs(affine.scale * x + affine.shift - expected) <= 1e-12 * magnitude + 1e-300)


@given(st.integers(1, 6).flatmap(lambda c: st.tuples(batchnorms(c), batchnorms(c))), st.data())
def test_composition_applies_the_first_map_then_the_second(pair, data):
    first = ChannelAffine.from_batchnorm(*pair[0])
    second = ChannelAffine.from_batchnorm(*pair[1])
    x = data.draw(hnp.arrays(np.float64, first.channels, elements=finite))
    composed = first.then(second)
    direct = second.scale * (first.scale * x + first.shift) + second.shift
    magnitude = abs(second.scale) * (abs(first.scale * x) + abs(first.shift)) + abs(second.shift)
    assert np.all(abs(composed.apply(x) - direct) <= 1e-12 * magnitude + 1e-300)


def test_affine_free_batchnorm_uses_unit_gamma_and_zero_beta():
    affine = ChannelAffine.from_batchnorm(None, None, np.array([1.0, 2.0]), np.array([4.0, 1.0]), 0.0)
    np.testing.assert_allclose(affine.scale, [0.5, 1.0])
    np.testing.assert_allclose(affine.shift, [-0.5, -2.0])


@pytest.mark.parametrize(
    ("params", "code"),
    [
        ((np.ones(2), np.ones(2), np.ones(2), np.array([1.0, -1.0]), 1e-5), "nonpositive_variance"),
        ((np.ones(2), np.ones(2), np.ones(2), np.array([1.0, -1e-5]), 1e-5), "nonpositive_variance"),
        ((np.array([np.nan, 1.0]), np.ones(2), np.ones(2), np.ones(2), 1e-5), "non_finite_params"),
        ((np.ones(2), np.ones(3), np.ones(2), np.ones(2), 1e-5), "param_shape"),
        ((np.ones((2, 2)), np.ones(2), np.ones(2), np.ones(2), 1e-5), "param_shape"),
        ((np.ones(0), np.ones(0), np.ones(0), np.ones(0), 1e-5), "param_shape"),
        ((np.ones(2, dtype=np.int64), np.ones(2), np.ones(2), np.ones(2), 1e-5), "unsupported_dtype"),
        ((np.ones(2), np.ones(2), np.ones(2), np.zeros(2), float("nan")), "non_finite_params"),
    ],
)
def test_batchnorm_that_cannot_be_trusted_is_refused_with_a_reason(params, code):
    with pytest.raises(FoldRefused) as refusal:
        ChannelAffine.from_batchnorm(*params)
    assert refusal.value.code == code


@settings(max_examples=60)
@given(
    groups=st.integers(1, 4),
    rows_per_group=st.integers(1, 3),
    cols=st.integers(1, 3),
    kernel=st.lists(st.integers(1, 3), max_size=2),
    data=st.data(),
)
def test_grouped_factors_follow_the_group_layout(groups, rows_per_group, cols, kernel, data):
    # Weight [R, J, k...]: row r is in group r // (R/g); column j of group q is channel q*J + j.
    shape = (groups * rows_per_group, cols, *kernel)
    factors = data.draw(hnp.arrays(np.float64, groups * cols, elements=finite))
    weight = data.draw(hnp.arrays(np.float64, shape, elements=finite))
    got = scale_weight(weight, factors, axis=1, groups=groups)
    expected = np.empty_like(weight)
    for r in range(shape[0]):
        for j in range(cols):
            expected[r, j] = weight[r, j] * factors[(r // rows_per_group) * cols + j]
    np.testing.assert_array_equal(got, expected)


def test_factors_never_broadcast_by_accident():
    # pytorch#180995: a depthwise ConvTranspose weight [C, 1, k, k] must not take a (C,) scale on axis 1.
    with pytest.raises(FoldRefused):
        channel_factors((4, 1, 3, 3), np.ones(4), axis=1, groups=1)
    with pytest.raises(FoldRefused):
        channel_factors((4, 2, 3, 3), np.ones(6), axis=1, groups=4)


@given(groups=st.integers(1, 3), per_group_in=st.integers(1, 3), per_group_out=st.integers(1, 3), data=st.data())
def test_contract_shift_equals_a_conv_of_a_constant_input(groups, per_group_in, per_group_out, data):
    c_in, c_out = groups * per_group_in, groups * per_group_out
    weight = data.draw(hnp.arrays(np.float64, (c_out, per_group_in, 2, 2), elements=finite))
    shift = data.draw(hnp.arrays(np.float64, c_in, elements=finite))
    expected = np.array([
        sum(weight[o, j].sum() * shift[(o // per_group_out) * per_group_in + j] for j in range(per_group_in))
        for o in range(c_out)
    ])
    np.testing.assert_allclose(contract_shift(weight, shift, axis=1, groups=groups), expected, rtol=1e-9, atol=1e-6)


@given(groups=st.integers(1, 3), per_group_in=st.integers(1, 3), per_group_out=st.integers(1, 3), data=st.data())
def test_contract_shift_transposed_equals_a_transposed_conv_of_a_constant_input(groups, per_group_in, per_group_out,
                                                                                data):
    # ConvTranspose weight [C_in, C_out/g, k...]: output channel q*J + j sums column j over group q's rows.
    c_in = groups * per_group_in
    weight = data.draw(hnp.arrays(np.float64, (c_in, per_group_out, 2), elements=finite))
    shift = data.draw(hnp.arrays(np.float64, c_in, elements=finite))
    expected = np.array([
        sum(weight[q * per_group_in + i, j].sum() * shift[q * per_group_in + i] for i in range(per_group_in))
        for q in range(groups) for j in range(per_group_out)
    ])
    np.testing.assert_allclose(contract_shift_transposed(weight, shift, groups), expected, rtol=1e-9, atol=1e-6)


@given(
    op=st.sampled_from(["Mul", "Add", "Sub", "Div"]),
    constant_first=st.booleans(),
    data=st.data(),
)
def test_elementwise_map_equals_the_op_it_replaces(op, constant_first, data):
    constant_first = constant_first and op != "Div"
    nonzero = st.floats(0.1, 1e3) | st.floats(-1e3, -0.1)
    values = data.draw(hnp.arrays(np.float64, 3, elements=nonzero if op == "Div" else finite))
    x = data.draw(hnp.arrays(np.float64, 3, elements=finite))
    apply = {"Mul": np.multiply, "Add": np.add, "Sub": np.subtract, "Div": np.divide}[op]
    expected = apply(values, x) if constant_first else apply(x, values)
    affine = ChannelAffine.from_elementwise(op, values, constant_first)
    np.testing.assert_allclose(affine.apply(x), expected, rtol=1e-12, atol=1e-9)


@pytest.mark.parametrize(
    ("op", "values", "constant_first", "code"),
    [("Div", [1.0, 0.0], False, "zero_divisor"), ("Div", [1.0, 2.0], True, "not_affine"),
     ("Mul", [np.inf, 1.0], False, "non_finite_params"), ("Pow", [1.0, 2.0], False, "not_affine")],
)
def test_elementwise_maps_that_are_not_affine_or_finite_are_refused(op, values, constant_first, code):
    with pytest.raises(FoldRefused) as refusal:
        ChannelAffine.from_elementwise(op, np.array(values), constant_first)
    assert refusal.value.code == code


def test_repeat_spreads_each_channel_over_its_feature_block():
    affine = ChannelAffine(np.array([2.0, 3.0]), np.array([-1.0, 1.0])).repeat(3)
    np.testing.assert_array_equal(affine.scale, [2, 2, 2, 3, 3, 3])
    np.testing.assert_array_equal(affine.shift, [-1, -1, -1, 1, 1, 1])


def test_cast_back_refuses_overflow_and_rounds_once():
    with pytest.raises(FoldRefused) as refusal:
        cast_checked(np.array([1.0, 1e6]), np.float16, "weight")
    assert refusal.value.code == "cast_overflow"
    value = np.array([1 / 3])
    assert cast_checked(value, np.float16, "w")[0] == np.float16(1 / 3)


@contextlib.contextmanager
def _numpy_buffer(elements: int) -> Iterator[None]:
    previous = np.setbufsize(elements)
    try:
        yield
    finally:
        np.setbufsize(previous)


@settings(max_examples=200, deadline=None)
@given(
    shape=st.sampled_from([(6, 4, 3, 3), (8, 2, 1, 1), (5, 7), (1, 9), (12, 3, 2)]),
    axis=st.sampled_from([0, 1, -1]),
    dtype=st.sampled_from([np.float32, np.float16, np.float64]),
    buffer=st.sampled_from([16, 48, 8192]),
    seed=st.integers(0, 2**16),
    huge=st.booleans(),
)
def test_buffered_scaling_rounds_exactly_as_the_whole_product(shape, axis, dtype, buffer, seed, huge):
    """The lazy product, computed a numpy buffer at a time, is bit for bit the float64 product rounded once,
    and refuses overflow the same way, whatever the buffer size."""
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal(shape).astype(dtype)
    factors = rng.standard_normal(shape[axis]) * (1e6 if huge else 1.0)
    try:
        expected = cast_checked(scale_weight(weight, factors, axis), np.dtype(dtype), "w")
    except FoldRefused as refusal:
        with pytest.raises(FoldRefused, match=re.escape(refusal.message)), _numpy_buffer(buffer):
            ScaledWeight(weight, factors, axis).cast(np.dtype(dtype), "w")
        return
    with _numpy_buffer(buffer):
        actual = cast_checked(ScaledWeight(weight, factors, axis), np.dtype(dtype), "w")
    assert actual.dtype == expected.dtype
    np.testing.assert_array_equal(actual, expected)
    np.testing.assert_array_equal(np.asarray(ScaledWeight(weight, factors, axis)), scale_weight(weight, factors, axis))
