"""Where channels go through a Transpose, Reshape or Flatten between a layer and a run.

Folding across such a node is exact only when it provably keeps the channel: a Transpose moves it to
another axis; a Reshape or Flatten keeps it only when the layer's side is a feature axis that is the
tensor's last axis and the run's side holds channel ``c`` as the contiguous feature block
``[c*S, (c+1)*S)`` (row-major order, ``S`` the product of the run's trailing dimensions).
"""

from __future__ import annotations

import math
from typing import TypeGuard

from onnx import NodeProto

from bnfold.core.affine import FoldRefused
from bnfold.onnx.fold.patterns.runs import ChannelSpace
from bnfold.onnx.graph.index import GraphIndex
from bnfold.reasons import Reason

MAPPER_OPS = ("Transpose", "Reshape", "Flatten")


def is_mapper(node: NodeProto | None) -> TypeGuard[NodeProto]:
    return node is not None and node.op_type in MAPPER_OPS and node.domain in ("", "ai.onnx")


def _permutation(node: NodeProto, rank: int) -> list[int]:
    for attribute in node.attribute:
        if attribute.name == "perm":
            perm = [int(p) for p in attribute.ints]
            if sorted(perm) != list(range(rank)):
                raise FoldRefused(Reason.UNSUPPORTED_SHAPE, f"Transpose perm {perm} for a rank-{rank} tensor")
            return perm
    return list(reversed(range(rank)))


def _static_shape(index: GraphIndex, name: str, what: str) -> tuple[int | None, ...]:
    value_type = index.value_type(name)
    if value_type is None or value_type.shape is None:
        raise FoldRefused(Reason.UNKNOWN_SHAPE, f"the shape of {what} {name!r} is unknown")
    return value_type.shape


def _feature_blocks(run_shape: tuple[int | None, ...], features: int, mapper: NodeProto) -> ChannelSpace:
    """The run's space when its ``[N, C, S...]`` tensor and the layer's ``[..., features]`` tensor are
    the same row-major data."""
    trailing: tuple[int, ...] = run_shape[1:]  # type: ignore[assignment]  # a None in it is refused first
    if len(run_shape) < 2 or any(d is None for d in trailing) or math.prod(trailing) != features:
        raise FoldRefused(
            Reason.RESHAPE_MIXES_CHANNELS,
            f"{mapper.op_type} {mapper.name!r} does not keep each channel of shape {list(run_shape)} as one "
            f"contiguous block of the {features} features",
        )
    return ChannelSpace(1, len(run_shape), int(trailing[0]), math.prod(trailing[1:]))


def _require_innermost(layer_space: ChannelSpace, mapper: NodeProto) -> None:
    if layer_space.axis != layer_space.rank - 1:
        raise FoldRefused(
            Reason.RESHAPE_MIXES_CHANNELS,
            f"{mapper.op_type} {mapper.name!r} reshapes a tensor whose channel axis is not its last axis",
        )


def space_after(mapper: NodeProto, layer_space: ChannelSpace, index: GraphIndex) -> ChannelSpace:
    """The run's space when ``mapper`` reads the layer's output (forward folds)."""
    if mapper.op_type == "Transpose":
        perm = _permutation(mapper, layer_space.rank)
        return ChannelSpace(perm.index(layer_space.axis), layer_space.rank, layer_space.channels)
    _require_innermost(layer_space, mapper)
    return _feature_blocks(_static_shape(index, mapper.output[0], "the reshaped tensor"), layer_space.channels, mapper)


def space_before(mapper: NodeProto, layer_space: ChannelSpace, index: GraphIndex) -> ChannelSpace:
    """The run's space when the layer reads ``mapper``'s output (backward folds)."""
    if mapper.op_type == "Transpose":
        perm = _permutation(mapper, layer_space.rank)
        return ChannelSpace(perm[layer_space.axis], layer_space.rank, layer_space.channels)
    _require_innermost(layer_space, mapper)
    return _feature_blocks(_static_shape(index, mapper.input[0], "the tensor reshaped"), layer_space.channels, mapper)
