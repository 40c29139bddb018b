"""Linear layers as convolution kernels, and the algebra that merges them (structural re-parameterization).

Every branch a merge takes in is one :class:`ConvKernel` in float64: a convolution as it is, a per-channel
affine map (an identity, a batch norm, a scale) as a depthwise 1x...x1 kernel, an average pool counting its
zero padding as a depthwise kernel of equal taps. Parallel kernels reading one input sum to one kernel when
their strides and dilations agree and their taps land on the same input positions
(:func:`merge_parallel`); a pointwise kernel composes with the kernel before or after it
(:func:`compose_serial`). The result is rounded to the model's dtype once, by the caller.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import reduce
from typing import NamedTuple

import numpy as np

from bnfold.core.affine import FoldRefused
from bnfold.reasons import Reason


class ConvKernel(NamedTuple):
    """``conv(x, weight) + bias`` with ``weight`` ``[C_out, C_in/groups, k...]`` and ``bias`` ``[C_out]``, both
    float64; ``pads`` as ONNX has them: every axis's begin, then every axis's end."""

    weight: np.ndarray
    bias: np.ndarray
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    pads: tuple[int, ...]
    groups: int

    @property
    def spatial(self) -> int:
        return self.weight.ndim - 2

    @property
    def kernel_shape(self) -> tuple[int, ...]:
        return tuple(int(k) for k in self.weight.shape[2:])

    @property
    def out_channels(self) -> int:
        return int(self.weight.shape[0])

    @property
    def in_channels(self) -> int:
        return int(self.weight.shape[1]) * self.groups

    @property
    def macs(self) -> int:
        """Multiply-accumulates per output position."""
        return int(self.weight.size)

    @property
    def is_pointwise(self) -> bool:
        """A 1x...x1 kernel with stride 1 and no padding: a per-position matrix product."""
        return (all(k == 1 for k in self.kernel_shape) and all(s == 1 for s in self.strides)
                and not any(self.pads))

    @classmethod
    def diagonal(cls, scale: np.ndarray, shift: np.ndarray, spatial: int) -> ConvKernel:
        """``scale * x + shift`` per channel as a depthwise 1x...x1 kernel."""
        channels = int(scale.shape[0])
        weight = np.asarray(scale, dtype=np.float64).reshape((channels, 1) + (1,) * spatial)
        ones = (1,) * spatial
        return cls(weight, np.asarray(shift, dtype=np.float64), ones, ones, (0,) * (2 * spatial), channels)

    @classmethod
    def average_pool(cls, channels: int, kernel: Sequence[int], strides: Sequence[int], pads: Sequence[int],
                     dilations: Sequence[int]) -> ConvKernel:
        """An average pool that divides every window by its full size (zero padding counted) as a kernel."""
        taps = math.prod(kernel)
        weight = np.full((channels, 1, *kernel), 1.0 / taps)
        return cls(weight, np.zeros(channels), tuple(strides), tuple(dilations), tuple(pads), channels)

    def then_affine(self, scale: np.ndarray, shift: np.ndarray) -> ConvKernel:
        """The kernel followed by ``scale * y + shift`` per output channel."""
        scale = np.asarray(scale, dtype=np.float64)
        factors = scale.reshape((self.out_channels,) + (1,) * (self.weight.ndim - 1))
        return self._replace(weight=self.weight * factors, bias=scale * self.bias + shift)

    def scaled(self, factor: float) -> ConvKernel:
        return self._replace(weight=self.weight * factor, bias=self.bias * factor)

    def regrouped(self, groups: int) -> ConvKernel:
        """The same map with ``groups`` groups, a divisor of ``self.groups``: each new group holds whole old
        groups, and the weights between old groups are zero."""
        if groups == self.groups:
            return self
        if groups <= 0 or self.groups % groups:
            raise FoldRefused(Reason.UNSUPPORTED_LAYOUT, f"{self.groups} groups cannot be regrouped into {groups}")
        out_c, in_per_old = self.out_channels, int(self.weight.shape[1])
        in_per_new = self.in_channels // groups
        weight = np.zeros((out_c, in_per_new, *self.kernel_shape))
        rows = np.arange(out_c)
        global_first = (rows // (out_c // self.groups)) * in_per_old  # first input channel each row reads
        local_first = global_first - (rows // (out_c // groups)) * in_per_new
        for j in range(in_per_old):
            weight[rows, local_first + j] = self.weight[:, j]
        return self._replace(weight=weight, groups=groups)


def _axis_window(kernel: ConvKernel, axis: int) -> tuple[int, int, int, int]:
    """(begin pad, end pad, dilation, reach) of ``kernel`` along ``axis``; ``reach = begin + end - dilation *
    (k - 1)`` decides the output length, ``(L + reach - 1) // stride + 1``, so equal reaches give equal lengths."""
    spatial = kernel.spatial
    begin, end = kernel.pads[axis], kernel.pads[spatial + axis]
    size = kernel.kernel_shape[axis]
    dilation = kernel.dilations[axis] if size > 1 else 0  # a single tap has no dilation to agree on
    return begin, end, dilation, begin + end - max(dilation, 1) * (size - 1)


def merge_parallel(kernels: Sequence[ConvKernel]) -> ConvKernel:
    """One kernel computing the sum of ``kernels``, all reading the same input; ``FoldRefused`` where no
    single convolution computes it exactly (strides or dilations differ, or taps land on different input
    positions, at the borders too)."""
    first = kernels[0]
    spatial = first.spatial
    if any(k.spatial != spatial for k in kernels):
        raise FoldRefused(Reason.BRANCH_GEOMETRY, "the branches have different spatial ranks")
    if len({(k.out_channels, k.in_channels) for k in kernels}) != 1:
        shapes = sorted({f"{k.in_channels}->{k.out_channels}" for k in kernels})
        raise FoldRefused(Reason.CHANNEL_MISMATCH, f"the branches map channels differently: {', '.join(shapes)}")
    if len({k.strides for k in kernels}) != 1:
        strides = sorted({k.strides for k in kernels})
        raise FoldRefused(Reason.BRANCH_GEOMETRY, f"the branches have different strides {strides}")
    groups = reduce(math.gcd, (k.groups for k in kernels))
    begins, ends, dilations, sizes = [], [], [], []
    for axis in range(spatial):
        windows = [_axis_window(k, axis) for k in kernels]
        dilation_set = {w[2] for w in windows} - {0}
        if len(dilation_set) > 1:
            raise FoldRefused(Reason.BRANCH_GEOMETRY, f"the branches have different dilations on axis {axis}")
        if len({w[3] for w in windows}) != 1:
            raise FoldRefused(Reason.BRANCH_GEOMETRY,
                              f"the branches' kernels and paddings give different output lengths on axis {axis}")
        dilation = dilation_set.pop() if dilation_set else 1
        begin, end = max(w[0] for w in windows), max(w[1] for w in windows)
        if any((begin - w[0]) % dilation for w in windows) or (begin + end - windows[0][3]) % dilation:
            raise FoldRefused(Reason.BRANCH_GEOMETRY,
                              f"the branches' kernel centres do not align under their paddings on axis {axis}")
        begins.append(begin)
        ends.append(end)
        dilations.append(dilation)
        sizes.append((begin + end - windows[0][3]) // dilation + 1)
    weight = np.zeros((first.out_channels, first.in_channels // groups, *sizes))
    bias = np.zeros(first.out_channels)
    for kernel in kernels:
        regrouped = kernel.regrouped(groups)
        offsets = [(begins[a] - kernel.pads[a]) // dilations[a] for a in range(spatial)]
        window = tuple(slice(o, o + k) for o, k in zip(offsets, kernel.kernel_shape, strict=True))
        weight[(slice(None), slice(None)) + window] += regrouped.weight
        bias += kernel.bias
    return ConvKernel(weight, bias, first.strides, tuple(dilations), tuple(begins + ends), groups)


def require_cheaper(kernels: Sequence[ConvKernel], merged: ConvKernel) -> None:
    """Refuse (``merge_costlier``) a merge whose one layer multiplies more than its branches together, counting
    each Add joining them as one operation a channel."""
    parts = sum(k.macs for k in kernels) + (len(kernels) - 1) * merged.out_channels
    if merged.macs > parts:
        shape = "x".join(str(k) for k in merged.kernel_shape)
        raise FoldRefused(Reason.MERGE_COSTLIER, f"one {shape} Conv with {merged.groups} group(s) costs "
                                                 f"{merged.macs} multiply-adds a position, the branches {parts}")


def compose_serial(first: ConvKernel, second: ConvKernel) -> ConvKernel:
    """One kernel computing ``second(first(x))`` where one of them is pointwise; ``FoldRefused`` where the
    composition is not one convolution: a bias of the first reaching the zero padding of the second."""
    if first.out_channels != second.in_channels:
        raise FoldRefused(Reason.CHANNEL_MISMATCH,
                          f"{first.out_channels} channels feed a layer reading {second.in_channels}")
    groups = math.gcd(first.groups, second.groups)
    a, b = first.regrouped(groups), second.regrouped(groups)
    mid = first.out_channels // groups
    if second.is_pointwise:
        w1 = a.weight.reshape(groups, mid, *a.weight.shape[1:])  # [g, M/g, I/g, k...]
        w2 = b.weight.reshape(groups, b.out_channels // groups, mid)  # [g, O/g, M/g]
        weight = np.einsum("gom,gmi...->goi...", w2, w1).reshape(b.out_channels, *a.weight.shape[1:])
        return a._replace(weight=weight, bias=_grouped_bias(b, a.bias, groups) + b.bias, groups=groups)
    if not first.is_pointwise:
        raise FoldRefused(Reason.UNSUPPORTED_SHAPE, "neither layer is pointwise (1x1, stride 1, no padding)")
    if any(second.pads) and np.any(first.bias):
        raise FoldRefused(Reason.PADDING, "the second layer zero-pads its input, which the first layer's bias "
                                          "would reach after the merge")
    w1 = a.weight.reshape(groups, mid, a.weight.shape[1])  # [g, M/g, I/g]
    w2 = b.weight.reshape(groups, b.out_channels // groups, mid, *b.kernel_shape)  # [g, O/g, M/g, k...]
    weight = np.einsum("gom...,gmi->goi...", w2, w1).reshape(b.out_channels, a.weight.shape[1], *b.kernel_shape)
    return b._replace(weight=weight, bias=_grouped_bias(b, a.bias, groups) + b.bias, groups=groups)


def _grouped_bias(layer: ConvKernel, shift: np.ndarray, groups: int) -> np.ndarray:
    """What ``layer`` (``groups`` groups) adds to each output channel when its input is shifted by ``shift``
    per channel everywhere (no padding reached)."""
    per_tap = layer.weight.reshape(layer.out_channels, layer.weight.shape[1], -1).sum(axis=2)  # [O, I/g]
    rows = np.arange(layer.out_channels) // (layer.out_channels // groups)
    in_per_group = layer.weight.shape[1]
    reads = shift[rows[:, None] * in_per_group + np.arange(in_per_group)[None, :]]
    return (per_tap * reads).sum(axis=1)


def compose_matrices(b1: np.ndarray, c1: np.ndarray | None, b2: np.ndarray, c2: np.ndarray | None
                     ) -> tuple[np.ndarray, np.ndarray | None]:
    """``(x @ b1 + c1) @ b2 + c2`` as ``x @ b + c``, in float64; a missing bias is ``None``."""
    b = np.asarray(b1, dtype=np.float64) @ np.asarray(b2, dtype=np.float64)
    if c1 is None and c2 is None:
        return b, None
    c: np.ndarray = np.zeros(1)
    if c1 is not None:
        c = np.asarray(c1, dtype=np.float64) @ np.asarray(b2, dtype=np.float64)
    if c2 is not None:
        c = c + np.asarray(c2, dtype=np.float64)
    return b, c
