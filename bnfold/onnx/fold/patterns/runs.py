"""Runs of per-channel affine nodes: BatchNormalization, and Mul/Add/Sub/Div by a constant.

A run is a chain of such nodes in which every value between two of them has exactly one reader;
composed, it is one :class:`~bnfold.core.affine.ChannelAffine`. Whether a constant acts per channel depends
on the channel axis of the layer the run folds into and on the tensor's rank (numpy broadcasting
aligns shapes from the last axis, so a ``(C,)`` constant against NCHW scales W, not C). A run is
therefore always read *for* a layer, through a :class:`ChannelSpace`.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import numpy as np
from onnx import NodeProto

from bnfold.core.affine import ChannelAffine, FoldRefused
from bnfold.onnx.fold.batchnorm import batchnorm_affine
from bnfold.onnx.graph.index import GraphIndex
from bnfold.reasons import Reason

ELEMENTWISE_OPS = ("Mul", "Add", "Sub", "Div")
# Before opset 7, Mul/Add/Sub/Div broadcast only by their ``broadcast``/``axis`` attributes (a ``(C,)``
# constant may then act on axis 1): such nodes are never read as links of a run.
FIRST_NUMPY_BROADCAST_OPSET = 7
_SHIFT_OPS = ("Add", "Sub")


class ChannelSpace(NamedTuple):
    """Where a run's channels are: ``axis`` of a rank-``rank`` tensor with ``channels`` entries. Each run
    channel covers ``block`` consecutive channels of the layer (1 unless a reshape merged axes)."""

    axis: int
    rank: int
    channels: int
    block: int = 1

    def constant_shape(self) -> tuple[int, ...]:
        """Shape of a per-channel constant that broadcasts onto this axis."""
        return (self.channels,) + (1,) * (self.rank - 1 - self.axis)


class AffineRun(NamedTuple):
    """Consecutive affine nodes reading ``input`` and producing ``output``; ``affine`` is their composition."""

    nodes: tuple[NodeProto, ...]
    affine: ChannelAffine
    input: str
    output: str

    @property
    def batchnorms(self) -> list[NodeProto]:
        return [n for n in self.nodes if is_batchnorm(n)]

    def worth_replacing_by(self, added_nodes: int) -> bool:
        """Whether a rewrite that adds ``added_nodes`` elementwise nodes is progress: it removes a
        batch norm, or leaves fewer nodes than it takes away."""
        return bool(self.batchnorms) or added_nodes < len(self.nodes)


def is_batchnorm(node: NodeProto) -> bool:
    return node.op_type == "BatchNormalization" and node.domain in ("", "ai.onnx")


def elementwise_slots(node: NodeProto, index: GraphIndex) -> tuple[int, int] | None:
    """``(data slot, constant slot)`` of a Mul/Add/Sub/Div whose one operand is constant and which is
    affine in the other; ``None`` for anything else."""
    if node.op_type not in ELEMENTWISE_OPS or node.domain not in ("", "ai.onnx"):
        return None
    if index.opset < FIRST_NUMPY_BROADCAST_OPSET:
        return None
    if len(node.input) != 2 or len(node.output) != 1 or not all(node.input):
        return None
    constant = [index.constants.is_constant(name) for name in node.input]
    if constant == [False, True]:
        return 0, 1
    if constant == [True, False] and node.op_type != "Div":
        return 1, 0
    return None


def is_link(node: NodeProto, index: GraphIndex, chains: bool) -> bool:
    """A node a run may contain: a batch norm, or (with ``chains``) a Mul/Add/Sub/Div by a constant."""
    return is_batchnorm(node) or (chains and elementwise_slots(node, index) is not None)


def data_input(node: NodeProto, index: GraphIndex) -> str:
    if is_batchnorm(node):
        return node.input[0]
    slots = elementwise_slots(node, index)
    assert slots is not None, "only links have a data input"
    return node.input[slots[0]]


def link_affine(node: NodeProto, index: GraphIndex, space: ChannelSpace) -> ChannelAffine:
    """The map ``node`` applies along ``space``, or ``FoldRefused`` if it is not per-channel there."""
    label = index.node_label(node)
    if is_batchnorm(node):
        if space.axis != 1:
            raise FoldRefused(
                Reason.CHANNEL_AXIS,
                f"{label} normalizes axis 1, but the layer's channels are axis {space.axis} of a "
                f"rank-{space.rank} tensor",
            )
        affine = batchnorm_affine(node, index)
    else:
        slots = elementwise_slots(node, index)
        assert slots is not None, "only links have a per-channel map"
        values = index.constants.value(node.input[slots[1]])
        if values.dtype.kind != "f" and values.dtype.name != "bfloat16":
            raise FoldRefused(Reason.UNSUPPORTED_DTYPE, f"{label} has a {values.dtype} constant, not a float one")
        vector = _per_channel(values, space, node.op_type, label)
        affine = ChannelAffine.from_elementwise(node.op_type, vector, constant_first=slots[1] == 0)
    if affine.channels != space.channels:
        raise FoldRefused(
            Reason.CHANNEL_MISMATCH, f"{label} has {affine.channels} channels but the layer has {space.channels}"
        )
    return affine


def _per_channel(values: np.ndarray, space: ChannelSpace, op: str, label: str) -> np.ndarray:
    """The per-channel vector of a constant, proven by broadcasting its actual shape against the rank."""
    code = Reason.BIAS_NOT_PER_CHANNEL if op in _SHIFT_OPS else Reason.SCALE_NOT_PER_CHANNEL
    shape = values.shape
    if len(shape) > space.rank:
        raise FoldRefused(code, f"{label}: a constant of shape {shape} adds axes to a rank-{space.rank} tensor")
    for position, extent in enumerate(shape):
        axis = space.rank - len(shape) + position
        if extent != 1 and (axis != space.axis or extent != space.channels):
            raise FoldRefused(
                code,
                f"{label}: a constant of shape {shape} broadcasts along axis {axis} of the rank-{space.rank} "
                f"tensor, not only along the channel axis {space.axis}",
            )
    return np.broadcast_to(values.reshape(-1), (space.channels,))


def next_link(node: NodeProto, index: GraphIndex, chains: bool) -> NodeProto | None:
    """The link that is the only reader of ``node``'s output, as its data input."""
    output = node.output[0]
    readers = index.users(output)
    if index.is_graph_output(output) or len(readers) != 1:
        return None
    reader = readers[0]
    if not is_link(reader, index, chains) or data_input(reader, index) != output:
        return None
    return reader


def links_from(first: NodeProto, index: GraphIndex, chains: bool) -> list[NodeProto]:
    """``first`` and the links that follow it, each the only reader of the one before."""
    links = [first]
    while (following := next_link(links[-1], index, chains)) is not None:
        links.append(following)
    return links


def producing_link(value: str, index: GraphIndex, chains: bool) -> NodeProto | None:
    producer = index.producers.get(value)
    if producer is None or not is_link(producer, index, chains) or producer.output[0] != value:
        return None
    return producer


def read_run(nodes: list[NodeProto], index: GraphIndex, space: ChannelSpace, *, required: int) -> AffineRun:
    """The run of the first ``required`` nodes (each must be per-channel on ``space``) extended by as
    many of the following ``nodes`` as are."""
    affine = ChannelAffine.identity(space.channels)
    taken = 0
    for position, node in enumerate(nodes):
        try:
            step = link_affine(node, index, space)
        except FoldRefused:
            if position < required:
                raise
            break
        affine = affine.then(step)
        taken += 1
    chosen = tuple(nodes[:taken])
    return AffineRun(chosen, affine, data_input(chosen[0], index), chosen[-1].output[0])


def require_sole_reader(value: str, reader: NodeProto, index: GraphIndex, side: Literal["input", "output"]) -> None:
    """``reader`` must be the only reader of ``value``, which must not be a graph output: a fold changes
    the value (``side`` says which side of the batch norm it is on, for the reason code)."""
    graph_output, fan_out = _SOLE_READER_REASONS[side]
    if index.is_graph_output(value):
        raise FoldRefused(graph_output, f"{value!r} is a graph output, so it must keep its value")
    readers = index.users(value)
    if readers != [reader]:
        raise FoldRefused(
            fan_out, f"{value!r} has {len(readers)} readers; folding would change what the others read"
        )


_SOLE_READER_REASONS = {
    "input": (Reason.INPUT_GRAPH_OUTPUT, Reason.INPUT_FAN_OUT),
    "output": (Reason.OUTPUT_GRAPH_OUTPUT, Reason.OUTPUT_FAN_OUT),
}
