"""Deferred products (folded weights computed as they are written) against the cast they stand for."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bnfold.core.affine import FoldRefused, ScaledWeight
from bnfold.onnx.store import limits
from bnfold.onnx.store.deferred import RoundedProduct, cast_deferred


@contextlib.contextmanager
def _product_blocks(block_bytes: int) -> Iterator[None]:
    """Deferred products of any size, computed ``block_bytes`` at a time."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(limits, "DEFERRED_BLOCK_BYTES", block_bytes)
        patch.setattr(limits, "DEFERRED_MIN_BYTES", 0)
        yield


@settings(max_examples=300, deadline=None)
@given(
    shape=st.sampled_from([(6, 4, 3, 3), (8, 2, 1, 1), (5, 7), (1, 9), (12, 3, 2), (3,), (0, 4)]),
    axis=st.sampled_from([0, 1, -1]),
    groups=st.sampled_from([1, 2]),
    dtype=st.sampled_from([np.float32, np.float16, np.float64]),
    seed=st.integers(0, 2**16),
    magnitude=st.sampled_from([1.0, 1e4, 1e38, 1e300]),
    special=st.sampled_from([None, np.inf, -np.inf, np.nan]),
    block_bytes=st.sampled_from([1, 24, 100, 8 << 20]),
)
def test_a_deferred_product_has_the_bits_and_the_refusals_of_the_cast(shape, axis, groups, dtype, seed, magnitude,
                                                                      special, block_bytes):
    """Computed block by block as it is written, checked for overflow by a bound before any product exists,
    a deferred product is bit for bit the cast and refuses exactly the same weights with the same count: the
    bound only skips blocks it proves safe (infinities and NaNs in the weight, some channels overflowing)."""
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal(shape).astype(dtype)
    if special is not None and weight.size:
        weight.flat[seed % weight.size] = special
    weight.setflags(write=False)
    channel_axis = axis % len(shape)
    grouped = groups > 1 and channel_axis == 1 and len(shape) > 1 and shape[0] % groups == 0
    groups = groups if grouped else 1
    factors = rng.standard_normal(shape[channel_axis] * groups) * magnitude
    try:
        expected = ScaledWeight(weight, factors, axis, groups).cast(np.dtype(dtype), "w")
    except FoldRefused as refusal:
        with pytest.raises(FoldRefused, match=re.escape(refusal.message)), _product_blocks(block_bytes):
            cast_deferred(ScaledWeight(weight, factors, axis, groups), np.dtype(dtype), "w")
        return
    with _product_blocks(block_bytes):
        deferred = cast_deferred(ScaledWeight(weight, factors, axis, groups), np.dtype(dtype), "w")
        assert isinstance(deferred, RoundedProduct)
        assert (deferred.shape, deferred.dtype, deferred.nbytes) == (expected.shape, expected.dtype, expected.nbytes)
        assert b"".join(block.tobytes() for block in deferred.blocks()) == expected.tobytes()
        np.testing.assert_array_equal(np.asarray(deferred), expected)


def test_a_weight_that_may_change_is_cast_at_once():
    """Only a read-only weight (a view of the model's file, or of bytes) can wait until the output is written."""
    weight = np.ones((4, 3), np.float32)
    with _product_blocks(limits.DEFERRED_BLOCK_BYTES):
        cast = cast_deferred(ScaledWeight(weight, np.full(4, 2.0), 0), np.dtype(np.float32), "w")
    weight[:] = 5.0
    assert isinstance(cast, np.ndarray)
    np.testing.assert_array_equal(cast, np.full((4, 3), 2.0, np.float32))


def test_only_a_large_weight_is_deferred():
    def cast(elements: int):
        weight = np.ones((4, elements // 4), np.float32)
        weight.setflags(write=False)
        return cast_deferred(ScaledWeight(weight, np.full(4, 2.0), 0), np.dtype(np.float32), "w")

    assert isinstance(cast(limits.DEFERRED_MIN_BYTES // 4), RoundedProduct)
    assert isinstance(cast(limits.DEFERRED_MIN_BYTES // 8), np.ndarray)
