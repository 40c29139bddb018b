"""What the fold units need to know about a linear layer: its node, its constant weight, the channel
space a run next to it lives in, and its bias."""

from __future__ import annotations

from typing import NamedTuple, TypeGuard

import numpy as np
from onnx import NodeProto

from bnfold.core.affine import FoldRefused
from bnfold.onnx.fold.patterns.base import constant, float_dtype
from bnfold.onnx.fold.patterns.runs import ChannelSpace
from bnfold.onnx.graph.index import GraphIndex
from bnfold.reasons import Reason


class Layer(NamedTuple):
    """A linear ``node`` whose channels on one side are ``space``.

    ``output`` is the value after the layer: its own output, or that of ``bias_add``, the Add of a
    constant that makes a MatMul a linear layer with a bias."""

    node: NodeProto
    weight: np.ndarray
    space: ChannelSpace
    output: str
    bias_add: NodeProto | None = None

    @property
    def dtype(self) -> np.dtype:
        return self.weight.dtype


def is_op(node: NodeProto | None, op_type: str) -> TypeGuard[NodeProto]:
    return node is not None and node.op_type == op_type and node.domain in ("", "ai.onnx")


def weight_of(node: NodeProto, index: GraphIndex, slot: int = 1, min_rank: int = 2) -> np.ndarray:
    weight = constant(index, node, slot, "weight")
    if weight is None:
        raise FoldRefused(Reason.NON_CONSTANT_WEIGHT, f"{index.node_label(node)} has no weight input")
    float_dtype(weight, "weight")
    if weight.ndim < min_rank:
        raise FoldRefused(Reason.UNSUPPORTED_SHAPE, f"{index.node_label(node)} weight has rank {weight.ndim}")
    return weight


def bias_of(node: NodeProto, index: GraphIndex, slot: int, channels: int, dtype: np.dtype) -> np.ndarray:
    """The per-output-channel bias of a Conv or ConvTranspose in float64; zeros when it has none."""
    bias = constant(index, node, slot, "bias")
    if bias is None:
        return np.zeros(channels)
    if bias.shape != (channels,):
        raise FoldRefused(Reason.CHANNEL_MISMATCH, f"bias of shape {bias.shape} for {channels} channels")
    if bias.dtype != dtype:
        raise FoldRefused(Reason.DTYPE_MISMATCH, f"bias dtype {bias.dtype} differs from weight dtype {dtype}")
    return bias.astype(np.float64)


def tensor_rank(index: GraphIndex, name: str, what: str) -> int:
    value_type = index.value_type(name)
    if value_type is None or value_type.rank is None:
        raise FoldRefused(Reason.UNKNOWN_SHAPE, f"the rank of {what} {name!r} is unknown")
    return value_type.rank
