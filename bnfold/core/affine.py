"""The affine algebra every fold shares.

An inference-time BatchNormalization is the per-channel map ``y = scale * x + shift`` with
``scale = gamma / sqrt(var + eps)`` and ``shift = beta - scale * mean`` (Ioffe & Szegedy, 2015).
Folding it into a linear layer scales the layer's weight along one channel axis and moves the shift
into the bias. Everything here runs in float64 and knows nothing of ONNX or torch; the result is cast
back to the model's dtype exactly once, by :func:`cast_checked`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from bnfold.reasons import Reason


class FoldRefused(Exception):
    """A fold is not provably exact or safe; ``code`` says why, in reports."""

    def __init__(self, code: Reason, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _as_float64_vector(name: str, values: np.ndarray) -> np.ndarray:
    """``values`` widened to float64; the caller ignores the invalid flag (a signalling NaN raises it as it
    widens, and is refused later as not finite)."""
    array = np.asarray(values)
    if array.dtype.kind not in "fc" and not str(array.dtype).startswith("bfloat16"):
        raise FoldRefused(Reason.UNSUPPORTED_DTYPE, f"{name} has non-float dtype {array.dtype}")
    if array.ndim != 1:
        raise FoldRefused(Reason.PARAM_SHAPE, f"{name} has shape {array.shape}, expected one value per channel")
    return array.astype(np.float64)


class ChannelAffine(NamedTuple):
    """``y[c] = scale[c] * x[c] + shift[c]`` along one channel axis, in float64."""

    scale: np.ndarray
    shift: np.ndarray

    @property
    def channels(self) -> int:
        return int(self.scale.shape[0])

    @classmethod
    def identity(cls, channels: int) -> ChannelAffine:
        return cls(np.ones(channels), np.zeros(channels))

    @classmethod
    def from_batchnorm(
        cls,
        gamma: np.ndarray | None,
        beta: np.ndarray | None,
        mean: np.ndarray,
        var: np.ndarray,
        epsilon: float,
    ) -> ChannelAffine:
        """The inference-time map of a BN; ``gamma``/``beta`` of ``None`` mean an affine-free BN."""
        # One errstate and one finiteness pass for the four vectors: a model has hundreds of batch norms.
        with np.errstate(invalid="ignore"):
            mean64 = _as_float64_vector("running mean", mean)
            var64 = _as_float64_vector("running variance", var)
            channels = mean64.shape[0]
            gamma64 = np.ones(channels) if gamma is None else _as_float64_vector("scale (gamma)", gamma)
            beta64 = np.zeros(channels) if beta is None else _as_float64_vector("bias (beta)", beta)
        lengths = {v.shape[0] for v in (gamma64, beta64, mean64, var64)}
        if len(lengths) != 1:
            raise FoldRefused(Reason.PARAM_SHAPE, f"parameter lengths differ: {sorted(lengths)}")
        if channels == 0:
            raise FoldRefused(Reason.PARAM_SHAPE, "parameters have zero channels")
        params = {"gamma": gamma64, "beta": beta64, "mean": mean64, "var": var64}
        if not np.isfinite(np.stack(list(params.values()))).all():
            name = next(name for name, values in params.items() if not np.isfinite(values).all())
            raise FoldRefused(Reason.NON_FINITE_PARAMS, f"{name} contains NaN or infinity")
        eps = float(epsilon)
        if not math.isfinite(eps):
            raise FoldRefused(Reason.NON_FINITE_PARAMS, "epsilon is not finite")
        denominator = var64 + eps
        nonpositive = denominator <= 0
        if nonpositive.any():
            raise FoldRefused(
                Reason.NONPOSITIVE_VARIANCE, f"var + epsilon <= 0 at channel {int(np.argmax(nonpositive))}"
            )
        scale = gamma64 / np.sqrt(denominator)
        shift = beta64 - scale * mean64
        if not (np.isfinite(scale).all() and np.isfinite(shift).all()):
            raise FoldRefused(Reason.NON_FINITE_PARAMS, "the folded scale or shift is not finite")
        return cls(scale, shift)

    @classmethod
    def from_elementwise(cls, op: str, values: np.ndarray, constant_first: bool) -> ChannelAffine:
        """The map of ``x op values`` (or ``values op x``) for ``op`` in Mul, Add, Sub, Div."""
        with np.errstate(invalid="ignore"):
            vector = _as_float64_vector("constant", values)
        if not np.isfinite(vector).all():
            raise FoldRefused(Reason.NON_FINITE_PARAMS, f"the {op} constant contains NaN or infinity")
        ones, zeros = np.ones_like(vector), np.zeros_like(vector)
        if op == "Mul":
            return cls(vector, zeros)
        if op == "Add":
            return cls(ones, vector)
        if op == "Sub":
            return cls(-ones, vector) if constant_first else cls(ones, -vector)
        if op == "Div" and not constant_first:
            if np.any(vector == 0):
                raise FoldRefused(
                    Reason.ZERO_DIVISOR, f"the Div constant is 0 at channel {int(np.argmax(vector == 0))}"
                )
            return cls(1 / vector, zeros)
        side = "first" if constant_first else "second"
        raise FoldRefused(Reason.NOT_AFFINE, f"{op} with the constant as {side} operand is not affine in its input")

    def then(self, later: ChannelAffine) -> ChannelAffine:
        """The map ``later(self(x))``."""
        if later.channels != self.channels:
            raise FoldRefused(Reason.CHANNEL_MISMATCH, f"{self.channels} channels followed by {later.channels}")
        return ChannelAffine(later.scale * self.scale, later.scale * self.shift + later.shift)

    def apply(self, values: np.ndarray) -> np.ndarray:
        """Apply the map to a per-channel vector (e.g. a bias), in float64."""
        return self.scale * np.asarray(values, dtype=np.float64) + self.shift

    def repeat(self, block: int) -> ChannelAffine:
        """The same map over ``block`` consecutive entries per channel, as after flattening ``[C, S...]``
        to ``C * S`` features in row-major order."""
        return ChannelAffine(np.repeat(self.scale, block), np.repeat(self.shift, block))


def channel_factors(weight_shape: Sequence[int], factors: np.ndarray, axis: int, groups: int = 1) -> np.ndarray:
    """Lay ``factors`` out so they broadcast against a weight of ``weight_shape`` on its channel axis.

    With ``groups == 1`` factor ``c`` multiplies slice ``c`` of ``axis``. With ``groups > 1`` the
    channel is split across axes 0 and 1, as in a ConvTranspose weight ``[C_in, C_out/g, k...]`` seen
    from the output side or a Conv weight ``[C_out, C_in/g, k...]`` seen from the input side: row ``r``
    of axis 0 belongs to group ``r // (rows/g)`` and column ``j`` of axis 1 to channel
    ``group * cols + j``. Shapes are checked explicitly; nothing relies on accidental broadcasting.
    """
    shape = tuple(int(d) for d in weight_shape)
    factors = np.asarray(factors, dtype=np.float64)
    rank = len(shape)
    axis = axis % rank
    if groups == 1:
        if factors.shape != (shape[axis],):
            raise FoldRefused(
                Reason.CHANNEL_MISMATCH, f"{factors.shape[0]} channels against weight axis {axis} of {shape}"
            )
        layout = [1] * rank
        layout[axis] = shape[axis]
        return factors.reshape(layout)
    if axis != 1 or rank < 2:
        raise FoldRefused(Reason.UNSUPPORTED_LAYOUT, f"grouped channels on axis {axis} of {shape}")
    rows, cols = shape[0], shape[1]
    if groups <= 0 or rows % groups != 0 or factors.shape != (groups * cols,):
        raise FoldRefused(
            Reason.CHANNEL_MISMATCH,
            f"{factors.shape[0]} channels do not match {groups} groups of weight {shape}",
        )
    group_of_row = np.arange(rows) // (rows // groups)
    index = group_of_row[:, None] * cols + np.arange(cols)[None, :]
    return factors[index].reshape((rows, cols) + (1,) * (rank - 2))


def scale_weight(
    weight: np.ndarray, factors: np.ndarray, axis: int, groups: int = 1
) -> np.ndarray:
    """``weight`` (any float dtype) times per-channel ``factors`` on its channel axis, in float64. A weight
    that is only cast afterwards is better a :class:`ScaledWeight`."""
    weight = np.asarray(weight)
    # One pass: numpy widens each element to float64 as it multiplies, with no float64 copy of the weight.
    return np.multiply(weight, channel_factors(weight.shape, factors, axis, groups), dtype=np.float64)


class ScaledWeight:
    """``weight`` times per-channel factors, computed in float64 only when cast (:func:`cast_checked`): numpy
    widens each element to float64, multiplies and rounds once to the target dtype a buffer at a time, so the
    float64 products never exist as a whole array. A 200 MB model's weights would otherwise pass through
    400 MB of float64 fresh from the kernel, and the page faults cost more than the arithmetic."""

    def __init__(self, weight: np.ndarray, factors: np.ndarray, axis: int, groups: int = 1) -> None:
        self.weight = np.asarray(weight)
        self.factors = channel_factors(self.weight.shape, factors, axis, groups)

    def __array__(self, dtype: np.dtype | None = None, copy: bool | None = None) -> np.ndarray:
        product = np.multiply(self.weight, self.factors, dtype=np.float64)
        return product if dtype is None else product.astype(dtype)

    def cast(self, dtype: np.dtype, what: str) -> np.ndarray:
        """The product rounded once to ``dtype``; refuses (``cast_overflow``) where a finite product overflows."""
        out = np.empty(np.broadcast_shapes(self.weight.shape, self.factors.shape), dtype)
        with np.errstate(over="ignore", invalid="ignore"):
            np.multiply(self.weight, self.factors, out=out, dtype=np.float64, casting="unsafe")
        refuse_overflow(out, self, what)
        return out


def contract_shift(weight: np.ndarray, shift: np.ndarray, axis: int, groups: int = 1) -> np.ndarray:
    """Bias added to each output row (axis 0) when ``shift`` is added to the input channels first.

    For a layer whose weight reads input channel ``c`` along ``axis`` (grouped as in
    :func:`channel_factors`), ``sum over that row of weight * shift[c]`` — exact whenever every output
    position sees every kernel tap of real input (no zero padding).
    """
    weighted = scale_weight(weight, shift, axis, groups)
    return weighted.reshape(weighted.shape[0], -1).sum(axis=1)


def contract_shift_transposed(weight: np.ndarray, shift: np.ndarray, groups: int = 1) -> np.ndarray:
    """:func:`contract_shift` for a ConvTranspose weight ``[C_in, C_out/g, k...]``: input channel ``c``
    is row ``c``; output channel ``q * C_out/g + j`` sums column ``j`` over the rows of group ``q``.
    Exact only where every output position receives every tap of real input exactly once."""
    weighted = scale_weight(weight, shift, axis=0)
    rows, cols = weighted.shape[0], weighted.shape[1]
    if groups <= 0 or rows % groups:
        raise FoldRefused(Reason.CHANNEL_MISMATCH, f"{rows} input channels do not split into {groups} groups")
    per_tap = weighted.reshape(rows, cols, -1).sum(axis=2)
    return per_tap.reshape(groups, rows // groups, cols).sum(axis=1).reshape(groups * cols)


def cast_checked(values: np.ndarray | ScaledWeight, dtype: np.dtype, what: str) -> np.ndarray:
    """Round float64 ``values`` once to ``dtype``; refuse if a finite value would become infinite."""
    if isinstance(values, ScaledWeight):
        return values.cast(dtype, what)
    with np.errstate(over="ignore", invalid="ignore"):
        cast = np.asarray(values).astype(dtype)
    refuse_overflow(cast, values, what)
    return cast


def refuse_overflow(cast: np.ndarray, values: np.ndarray | ScaledWeight, what: str) -> None:
    """Refuse (``cast_overflow``) if finite ``values`` became infinite in ``cast``, naming how many."""
    overflowed = overflow_count(cast, values)
    if overflowed:
        raise FoldRefused(Reason.CAST_OVERFLOW, f"folded {what} overflows {cast.dtype.name} ({overflowed} values)")


def overflow_count(cast: np.ndarray, values: np.ndarray | ScaledWeight) -> int:
    """How many finite ``values`` became infinite in ``cast``."""
    if np.issubdtype(cast.dtype, np.inexact) and not np.isinf(cast).any():
        return 0  # the common case, decided without a float64 pass
    return int((~np.isfinite(cast.astype(np.float64)) & np.isfinite(values)).sum())
