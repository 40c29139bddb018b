"""The shape of a fold pattern: *match* a site, *check* safety, *plan* a rewrite; the driver applies
and records it. Plans are pure: they compute new float64 tensors and touch nothing, so a refusal at
any point (including the final cast) leaves the graph as it was."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import onnx
from onnx import NodeProto

from bnfold.affine import ChannelAffine, FoldRefused
from bnfold.onnx_front.graph import GraphIndex

FLOAT_TYPES = {
    onnx.TensorProto.FLOAT,
    onnx.TensorProto.FLOAT16,
    onnx.TensorProto.DOUBLE,
    onnx.TensorProto.BFLOAT16,
}


@dataclass
class TensorUpdate:
    """Feed ``value`` (float64, cast once to ``dtype`` when applied) to ``node.input[slot]``."""

    node: NodeProto
    slot: int
    value: np.ndarray
    dtype: np.dtype
    role: str


@dataclass
class Rewrite:
    pattern: str
    target: NodeProto
    updates: list[TensorUpdate]
    attributes: list[tuple[NodeProto, str, float]] = field(default_factory=list)
    # Forward folds: this node's output feeds the BN; afterwards it produces the BN's output instead.
    tail: NodeProto | None = None
    # MatMul without a bias: the BN becomes ``Add(tail output, appended_bias)``.
    appended_bias: tuple[np.ndarray, np.dtype] | None = None


class Pattern(Protocol):
    name: str

    def plan(self, bn: NodeProto, affine: ChannelAffine, index: GraphIndex) -> Rewrite | None:
        """A rewrite folding ``bn``; ``None`` if the site is not this pattern's; ``FoldRefused`` if unsafe."""
        ...


def exclusive_producer(index: GraphIndex, name: str, reader: NodeProto) -> NodeProto | None:
    """The node producing ``name`` if ``reader`` is its only reader; refuses fan-out and graph outputs."""
    producer = index.producers.get(name)
    if producer is None:
        return None
    if index.is_graph_output(name):
        raise FoldRefused("producer_graph_output", f"{name!r} is a graph output, so it must keep its value")
    readers = index.users(name)
    if readers != [reader]:
        raise FoldRefused(
            "producer_fan_out",
            f"{index.node_label(producer)} output {name!r} has {len(readers)} readers; folding would change them",
        )
    return producer


def float_dtype(array: np.ndarray, what: str) -> np.dtype:
    if array.dtype.kind != "f" and array.dtype.name != "bfloat16":
        raise FoldRefused("unsupported_dtype", f"{what} has dtype {array.dtype}, not a float type")
    return array.dtype


def constant(index: GraphIndex, node: NodeProto, slot: int, what: str) -> np.ndarray | None:
    """The constant feeding ``node.input[slot]``, ``None`` if the input is absent."""
    if slot >= len(node.input) or not node.input[slot]:
        return None
    try:
        return index.constants.value(node.input[slot])
    except FoldRefused as refusal:
        raise FoldRefused(
            "non_constant_weight" if refusal.code == "non_constant_params" else refusal.code,
            f"{what} of {index.node_label(node)}: {refusal.message}",
        ) from None


def int_attribute(node: NodeProto, name: str, default: int) -> int:
    for attribute in node.attribute:
        if attribute.name == name:
            return int(attribute.i)
    return default


def float_attribute(node: NodeProto, name: str, default: float) -> float:
    for attribute in node.attribute:
        if attribute.name == name:
            return float(attribute.f)
    return default
