"""Serial linear layers with nothing between them become one layer.

- ``serial-conv``: a Conv reading only a Conv's output, one of the two pointwise (1x...x1, stride 1, no
  padding): ``1x1 -> kxk`` and ``kxk -> 1x1``. A bias of the first layer before a zero-padded second one
  would reach the border, where the second layer sees zeros instead: refused (``padding``) unless the bias is
  zero.
- ``serial-gemm``: ``Gemm -> Gemm`` and ``Gemm -> MatMul`` on the Gemm's 2-D output.

Neither merges where the merged layer would multiply more than the two it replaces (a depthwise 7x7 before a
pointwise expansion, a bottleneck of pointwise layers): such pairs are common outside re-parameterized models
and are not sites of these patterns, so they get no record. Both decide that from shapes alone."""

from __future__ import annotations

import math

import numpy as np
from onnx import NodeProto

from bnfold.core.affine import FoldRefused
from bnfold.core.kernels import ConvKernel, compose_matrices, compose_serial
from bnfold.onnx.fold.patterns.base import Site, float_attribute, int_attribute
from bnfold.onnx.fold.patterns.layers import weight_of
from bnfold.onnx.fold.patterns.merges import (
    Merge,
    conv_attributes,
    conv_kernel,
    gemm_bias,
    ints_attribute,
    is_plain,
    kernel_label,
    sole_reader,
)
from bnfold.onnx.graph.index import GraphIndex
from bnfold.reasons import Reason


def _first_layer(second: NodeProto, op_type: str, index: GraphIndex) -> NodeProto | None:
    """The ``op_type`` node whose output only ``second`` reads, as its data input."""
    if not second.input or not second.input[0]:
        return None
    first = index.producers.get(second.input[0])
    if not is_plain(first, op_type) or not sole_reader(second.input[0], second, index):
        return None
    return first


def _same_dtype(first: np.ndarray, second: np.ndarray) -> np.dtype:
    if first.dtype != second.dtype:
        raise FoldRefused(Reason.DTYPE_MISMATCH, f"the layers' weights are {first.dtype} and {second.dtype}")
    return first.dtype


def _weight_dims(node: NodeProto, index: GraphIndex) -> list[int] | None:
    """The shape of ``node``'s weight, from its initializer's header when it has one (no data read)."""
    if len(node.input) < 2 or not node.input[1]:
        return None
    tensor = index.initializers.get(node.input[1])
    if tensor is not None:
        return [int(d) for d in tensor.dims]
    try:
        return list(index.constants.value(node.input[1]).shape)
    except FoldRefused:
        return None


def _pointwise(conv: NodeProto, dims: list[int]) -> bool:
    spatial = len(dims) - 2
    return (all(d == 1 for d in dims[2:]) and ints_attribute(conv, "strides", [1] * spatial) == [1] * spatial
            and not any(ints_attribute(conv, "pads", [0])))


def _cheaper(first: NodeProto, before: list[int], second: NodeProto, after: list[int]) -> bool:
    """Whether one layer costs no more multiply-adds than the two: the merged layer has the second's kernel
    and output channels and the first's input channels, in as many groups as both share; the first runs at
    the resolution of the second's input, stride times as many positions."""
    groups = math.gcd(int_attribute(first, "group", 1), int_attribute(second, "group", 1))
    in_channels = before[1] * int_attribute(first, "group", 1)
    kernel = math.prod(before[2:]) * math.prod(after[2:])  # one of them is 1x...x1
    merged = after[0] * (in_channels // groups) * kernel
    strides = math.prod(ints_attribute(second, "strides", [1] * (len(after) - 2)))
    return merged <= math.prod(before) * strides + math.prod(after)


def _is_shift(kernel: ConvKernel) -> bool:
    """A per-channel shift as a depthwise 1x1 Conv of unit weights: what a backward fold leaves before a padded
    layer (see ``backward.py``), with its reason already on the batch norm's record."""
    return (kernel.is_pointwise and kernel.groups == kernel.out_channels == kernel.in_channels
            and bool(np.all(kernel.weight == 1)))


class SerialConv:
    name = "serial-conv"

    def plan(self, site: Site) -> Merge | None:
        second, index = site.anchor, site.index
        if not is_plain(second, "Conv"):
            return None
        first = _first_layer(second, "Conv", index)
        if first is None:
            return None
        # Decided from shapes before any weight is read: most Conv -> Conv pairs are no merge, and a weight
        # read for nothing may be a large one from disk or one a fold computes only as it is written.
        before_dims, after_dims = _weight_dims(first, index), _weight_dims(second, index)
        if before_dims is None or after_dims is None or len(before_dims) < 3 or len(after_dims) < 3:
            return None
        if not (_pointwise(first, before_dims) or _pointwise(second, after_dims)):
            return None
        if not _cheaper(first, before_dims, second, after_dims):
            return None
        before = conv_kernel(first, index)
        if _is_shift(before):
            return None
        after = conv_kernel(second, index)
        dtype = _same_dtype(weight_of(first, index), weight_of(second, index))
        merged = compose_serial(before, after)
        return Merge(self.name, second, first.input[0], "Conv", conv_attributes(merged),
                     [("weight", merged.weight), ("bias", merged.bias)], dtype, (first,),
                     f"{index.node_label(first)} ({kernel_label(before)}) and {index.node_label(second)} "
                     f"({kernel_label(after)}) merged into one {kernel_label(merged)} Conv")


class SerialGemm:
    name = "serial-gemm"

    def plan(self, site: Site) -> Merge | None:
        second, index = site.anchor, site.index
        if not (is_plain(second, "Gemm") or is_plain(second, "MatMul")):
            return None
        first = _first_layer(second, "Gemm", index)
        if first is None:
            return None
        shapes = [_weight_dims(first, index), _weight_dims(second, index)]
        if shapes[0] is None or shapes[1] is None or len(shapes[0]) != 2 or len(shapes[1]) != 2:
            return None
        rows, middle = shapes[0][::-1] if int_attribute(first, "transB", 0) else shapes[0]
        columns = shapes[1][0] if second.op_type == "Gemm" and int_attribute(second, "transB", 0) else shapes[1][1]
        if rows * columns > middle * (rows + columns):
            return None  # one rows x columns product would cost more than the two
        if second.op_type == "Gemm" and int_attribute(second, "transA", 0):
            raise FoldRefused(Reason.GEMM_TRANS_A, f"{index.node_label(second)} transposes the first layer's output")
        b1, b2 = weight_of(first, index), weight_of(second, index)
        dtype = _same_dtype(b1, b2)
        left = b1.T if int_attribute(first, "transB", 0) else b1
        right = b2.T if second.op_type == "Gemm" and int_attribute(second, "transB", 0) else b2
        alpha1, beta1 = float_attribute(first, "alpha", 1.0), float_attribute(first, "beta", 1.0)
        alpha2, beta2 = (float_attribute(second, "alpha", 1.0), float_attribute(second, "beta", 1.0)) \
            if second.op_type == "Gemm" else (1.0, 1.0)
        c1 = gemm_bias(first, index, middle, dtype)
        c2 = gemm_bias(second, index, columns, dtype) if second.op_type == "Gemm" else None
        weight, bias = compose_matrices(left * (alpha1 * alpha2), None if c1 is None else c1 * (alpha2 * beta1),
                                        right, None if c2 is None else c2 * beta2)
        constants = [("weight", weight)] + ([] if bias is None else [("bias", bias)])
        return Merge(self.name, second, first.input[0], "Gemm", {"transA": int_attribute(first, "transA", 0)},
                     constants, dtype, (first,),
                     f"{index.node_label(first)} and {index.node_label(second)} merged into one Gemm")
