"""Merges of linear layers (structural re-parameterization): the plan a merge pattern returns, and ONNX
layers read as float64 kernels of :mod:`bnfold.core.kernels`.

A merge pattern is offered every node of a graph (``Site.anchor``); it returns ``None`` when the node is not
where its layers meet, a :class:`Merge` (pure: new float64 tensors, nothing edited) when they merge exactly,
or raises ``FoldRefused`` when they would not."""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol

import numpy as np
import onnx
from onnx import NodeProto

from bnfold.core.affine import FoldRefused
from bnfold.core.kernels import ConvKernel
from bnfold.onnx.fold.patterns.base import Site, constant, int_attribute
from bnfold.onnx.fold.patterns.layers import bias_of, weight_of
from bnfold.onnx.fold.patterns.runs import is_batchnorm
from bnfold.onnx.graph.index import GraphIndex
from bnfold.reasons import Reason


class Merge(NamedTuple):
    """``site`` becomes one ``op_type`` node reading ``source`` and the ``constants`` (float64, each cast once to
    ``dtype``), with ``attributes``; the ``removed`` nodes (the merged layers and branches) disappear."""

    pattern: str
    site: NodeProto
    source: str
    op_type: str
    attributes: dict[str, Any]
    constants: list[tuple[str, np.ndarray]]
    dtype: np.dtype
    removed: tuple[NodeProto, ...]
    summary: str

    @property
    def batchnorms(self) -> list[NodeProto]:
        return [node for node in self.removed if is_batchnorm(node)]


class MergePattern(Protocol):
    name: str

    def plan(self, site: Site) -> Merge | None:
        """The merge of the layers meeting at ``site``; ``None`` if none meet there; ``FoldRefused`` if they
        do but a merge would be inexact."""
        ...


def is_plain(node: NodeProto | None, op_type: str) -> bool:
    return node is not None and node.op_type == op_type and node.domain in ("", "ai.onnx") and len(node.output) == 1


def ints_attribute(node: NodeProto, name: str, default: list[int]) -> list[int]:
    for attribute in node.attribute:
        if attribute.name == name:
            return [int(v) for v in attribute.ints]
    return default


def _auto_pad(node: NodeProto, index: GraphIndex) -> str:
    for attribute in node.attribute:
        if attribute.name == "auto_pad":
            mode = attribute.s.decode()
            if mode not in ("NOTSET", "VALID", ""):
                raise FoldRefused(Reason.UNSUPPORTED_SHAPE,
                                  f"{index.node_label(node)} pads by auto_pad={mode}, which depends on the input size")
            return mode
    return "NOTSET"


def conv_kernel(conv: NodeProto, index: GraphIndex) -> ConvKernel:
    """A Conv with constant weight (and bias) as a float64 kernel."""
    weight = weight_of(conv, index, min_rank=3)
    spatial = weight.ndim - 2
    _auto_pad(conv, index)
    groups = int_attribute(conv, "group", 1)
    bias = bias_of(conv, index, 2, weight.shape[0], weight.dtype)
    return ConvKernel(
        weight.astype(np.float64),
        bias,
        tuple(ints_attribute(conv, "strides", [1] * spatial)),
        tuple(ints_attribute(conv, "dilations", [1] * spatial)),
        tuple(ints_attribute(conv, "pads", [0] * (2 * spatial))),
        groups,
    )


def pool_kernel(pool: NodeProto, channels: int, index: GraphIndex) -> ConvKernel:
    """An AveragePool as the depthwise kernel it is, where every window divides by its full size."""
    kernel = ints_attribute(pool, "kernel_shape", [])
    spatial = len(kernel)
    pads = ints_attribute(pool, "pads", [0] * (2 * spatial))
    label = index.node_label(pool)
    _auto_pad(pool, index)
    if int_attribute(pool, "ceil_mode", 0):
        raise FoldRefused(Reason.POOL_BORDER, f"{label} has ceil_mode=1: its last windows may be partial")
    if any(pads) and not int_attribute(pool, "count_include_pad", 0):
        raise FoldRefused(Reason.POOL_BORDER,
                          f"{label} pads without count_include_pad: border windows divide by fewer taps")
    return ConvKernel.average_pool(channels, kernel, ints_attribute(pool, "strides", [1] * spatial), pads,
                                   ints_attribute(pool, "dilations", [1] * spatial))


def conv_attributes(kernel: ConvKernel) -> dict[str, Any]:
    return {"group": kernel.groups, "kernel_shape": list(kernel.kernel_shape), "strides": list(kernel.strides),
            "dilations": list(kernel.dilations), "pads": list(kernel.pads)}


def value_dtype(index: GraphIndex, name: str) -> np.dtype | None:
    value_type = index.value_type(name)
    if value_type is None or not value_type.elem_type:
        return None
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(value_type.elem_type))


def sole_reader(value: str, reader: NodeProto, index: GraphIndex) -> bool:
    """``reader`` reads ``value`` once and is its only reader, and ``value`` is no graph output: a merge that
    removes its producer changes nothing anyone else sees."""
    return not index.is_graph_output(value) and index.users(value) == [reader]


def kernel_label(kernel: ConvKernel) -> str:
    return "x".join(str(k) for k in kernel.kernel_shape)


def gemm_bias(gemm: NodeProto, index: GraphIndex, columns: int, dtype: np.dtype) -> np.ndarray | None:
    """A Gemm's C as a float64 matrix of ``columns`` columns (rows: 1 or the batch), ``None`` if absent."""
    bias = constant(index, gemm, 2, "C")
    if bias is None:
        return None
    if bias.dtype != dtype:
        raise FoldRefused(Reason.DTYPE_MISMATCH, f"C dtype {bias.dtype} differs from B dtype {dtype}")
    if bias.ndim > 2:
        raise FoldRefused(Reason.UNSUPPORTED_SHAPE, f"Gemm C of shape {bias.shape}")
    as_2d = bias.astype(np.float64).reshape((1,) * (2 - bias.ndim) + bias.shape)
    return np.broadcast_to(as_2d, (int(as_2d.shape[0]), columns))  # type: ignore[misc]  # 2-D by the reshape
