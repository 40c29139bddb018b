"""Folded weights computed only as they are written: a weight mapped from a multi-GB model file then never
exists in memory whole, scaled or not (fresh memory is the slowest part of folding a model that size).

The math is :class:`bnfold.core.affine.ScaledWeight`'s; what this adds is the layout ONNX stores: raw data in
little-endian byte order, produced a block of rows at a time into one reused buffer.
"""

from __future__ import annotations

from collections.abc import Iterator
from types import EllipsisType

import numpy as np

from bnfold.core.affine import FoldRefused, ScaledWeight, overflow_count
from bnfold.onnx.store import limits
from bnfold.reasons import Reason

_DEFERRABLE_DTYPES = {np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)}


def cast_deferred(scaled: ScaledWeight, dtype: np.dtype, what: str) -> np.ndarray | RoundedProduct:
    """``scaled.cast(dtype, what)``, or the same values as a :class:`RoundedProduct`, checked now and
    computed as it is read, where the weight cannot change meanwhile (a read-only array: a view of the
    model's file or of bytes) and is large enough for its memory to matter more than the per-block
    bookkeeping."""
    if (not scaled.weight.flags.writeable and np.dtype(dtype) in _DEFERRABLE_DTYPES
            and scaled.weight.nbytes >= limits.DEFERRED_MIN_BYTES):
        return RoundedProduct(scaled, dtype, what)
    return scaled.cast(dtype, what)


class RoundedProduct:
    """A :class:`ScaledWeight` rounded once to ``dtype``, with exactly the values and the overflow verdict of
    :meth:`ScaledWeight.cast`, but computed only when read, a block of rows at a time into one buffer
    (:meth:`blocks`).

    The overflow check runs when it is made, without computing the product: a channel whose largest
    magnitude times its factor stays within ``dtype``'s range cannot overflow (rounding is monotonic); only
    blocks where that bound fails (large factors, infinities, NaNs) are multiplied out and counted."""

    def __init__(self, scaled: ScaledWeight, dtype: np.dtype, what: str) -> None:
        self._scaled = scaled
        self.dtype = np.dtype(dtype).newbyteorder("<")  # the byte order of ONNX raw data
        self.shape = np.broadcast_shapes(scaled.weight.shape, scaled.factors.shape)
        self.nbytes = int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize
        overflowed = self._overflows()
        if overflowed:
            raise FoldRefused(Reason.CAST_OVERFLOW, f"folded {what} overflows {self.dtype.name} ({overflowed} values)")

    @property
    def weight(self) -> np.ndarray:
        """The weight the product scales: it is read again each time the product is."""
        return self._scaled.weight

    def __array__(self, dtype: np.dtype | None = None, copy: bool | None = None) -> np.ndarray:
        out = np.empty(self.shape, self.dtype)
        for rows, weight, factors in self._row_blocks():
            _multiply(weight, factors, out[rows])
        return out if dtype is None else out.astype(dtype)

    def blocks(self) -> Iterator[np.ndarray]:
        """The rounded product in row-major order, a block of whole rows at a time, each block in the same
        buffer (consume it before asking for the next)."""
        buffer: np.ndarray | None = None
        for _, weight, factors in self._row_blocks():
            if buffer is None or buffer.size < weight.size:
                buffer = np.empty(max(weight.size, limits.DEFERRED_BLOCK_BYTES // self.dtype.itemsize), self.dtype)
            yield _multiply(weight, factors, buffer[:weight.size].reshape(weight.shape))

    def _row_blocks(self) -> Iterator[tuple[slice | EllipsisType, np.ndarray, np.ndarray]]:
        """``(rows, weight[rows], factors for those rows)`` covering the weight in order."""
        weight, factors = self._scaled.weight, self._scaled.factors
        if weight.ndim == 0 or weight.size == 0:  # channel_factors gave the factors the weight's own shape
            yield ..., weight, factors
            return
        step = max(1, (limits.DEFERRED_BLOCK_BYTES // self.dtype.itemsize) // (weight.size // weight.shape[0]))
        for start in range(0, weight.shape[0], step):
            rows = slice(start, start + step)
            yield rows, weight[rows], factors if factors.shape[0] == 1 else factors[rows]

    def _overflows(self) -> int:
        limit = np.finfo(self.dtype).max
        # The axes a factor is constant along: the largest magnitude along them bounds the channel's products.
        axes = tuple(axis for axis, size in enumerate(self._scaled.factors.shape) if size == 1)
        overflowed = 0
        for _, weight, factors in self._row_blocks():
            if weight.size == 0:
                continue
            with np.errstate(over="ignore", invalid="ignore"):
                largest = np.maximum(weight.max(axis=axes, keepdims=True).astype(np.float64),
                                     -weight.min(axis=axes, keepdims=True).astype(np.float64))
                if np.all(largest * np.abs(factors) <= limit):
                    continue
                product = np.multiply(weight, factors, dtype=np.float64)
                overflowed += overflow_count(product.astype(self.dtype), product)
        return overflowed


def _multiply(weight: np.ndarray, factors: np.ndarray, out: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore", invalid="ignore"):
        return np.multiply(weight, factors, out=out, dtype=np.float64, casting="unsafe")
