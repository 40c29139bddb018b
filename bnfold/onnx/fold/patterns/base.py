"""The shape of a fold pattern: *match* a site, *check* safety, *plan* a rewrite; the driver applies
and records it. Plans are pure: they compute new float64 tensors and touch nothing, so a refusal at
any point (including the final cast) leaves the graph as it was."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple, Protocol

import numpy as np
import onnx
from onnx import NodeProto

from bnfold.core.affine import FoldRefused, ScaledWeight
from bnfold.onnx.fold.patterns.runs import AffineRun
from bnfold.onnx.graph.index import GraphIndex
from bnfold.reasons import Reason

FLOAT_TYPES = {
    onnx.TensorProto.FLOAT,
    onnx.TensorProto.FLOAT16,
    onnx.TensorProto.DOUBLE,
    onnx.TensorProto.BFLOAT16,
}

# The pattern whose name lets Mul/Add/Sub/Div by constants join runs.
AFFINE_CHAIN = "affine-chain"


class Site(NamedTuple):
    """An affine node the driver asks the patterns to fold; ``chains``: Mul/Add/Sub/Div may join its run."""

    anchor: NodeProto
    index: GraphIndex  # type: ignore[assignment]  # shadows tuple.index, which no pattern calls
    chains: bool


class TensorUpdate(NamedTuple):
    """Feed ``value`` (float64, cast once to ``dtype`` when applied) to ``node.input[slot]``."""

    node: NodeProto
    slot: int
    value: np.ndarray | ScaledWeight
    dtype: np.dtype
    role: str


class Elementwise(NamedTuple):
    """An elementwise ``op_type`` node with the constant ``value`` (cast once to ``dtype``) as second operand."""

    op_type: str
    value: np.ndarray
    dtype: np.dtype
    role: str

    def constants(self) -> list[tuple[str, np.ndarray]]:
        return [(self.role, self.value)]

    def attributes(self) -> dict[str, Any]:
        return {}


class DepthwiseConv(NamedTuple):
    """``scale * x + shift`` per channel of an N x C x spatial tensor as one depthwise ``Conv`` with a 1x...x1
    kernel: onnxruntime keeps a Conv in its blocked NCHWc layout (as it does a BatchNormalization), where a
    Mul and an Add by constants would each force the tensor out of that layout and back."""

    scale: np.ndarray
    shift: np.ndarray
    spatial_rank: int
    dtype: np.dtype
    role: str = "affine"
    op_type: str = "Conv"

    def constants(self) -> list[tuple[str, np.ndarray]]:
        kernel = self.scale.reshape((self.scale.shape[0], 1) + (1,) * self.spatial_rank)
        return [("weight", kernel), ("bias", self.shift)]

    def attributes(self) -> dict[str, Any]:
        return {"group": int(self.scale.shape[0]), "kernel_shape": [1] * self.spatial_rank}


Replacement = Elementwise | DepthwiseConv


class Rewrite(NamedTuple):
    """How ``run`` disappears: folded into ``target`` (``None`` when it is only re-expressed).

    Afterwards ``run.output`` is produced by ``tail`` (forward folds), by the ``replacement`` nodes
    reading ``run.input`` (what must stay of the run), or ``reader`` reads ``run.input`` instead of
    ``run.output`` (backward folds); ``bias_after`` is added to ``target``'s output by a new node."""

    pattern: str
    run: AffineRun
    target: NodeProto | None
    updates: list[TensorUpdate]
    attributes: Sequence[tuple[NodeProto, str, float]] = ()
    tail: NodeProto | None = None
    reader: NodeProto | None = None
    replacement: Sequence[Replacement] = ()
    bias_after: Elementwise | None = None
    note: str = ""


class Pattern(Protocol):
    name: str

    def plan(self, site: Site) -> Rewrite | None:
        """A rewrite folding the run at ``site``; ``None`` if the site is not this pattern's; ``FoldRefused``
        if it is but folding would be unsafe or inexact."""
        ...


def float_dtype(array: np.ndarray, what: str) -> np.dtype:
    if array.dtype.kind != "f" and array.dtype.name != "bfloat16":
        raise FoldRefused(Reason.UNSUPPORTED_DTYPE, f"{what} has dtype {array.dtype}, not a float type")
    return array.dtype


def constant(index: GraphIndex, node: NodeProto, slot: int, what: str) -> np.ndarray | None:
    """The constant feeding ``node.input[slot]``, ``None`` if the input is absent."""
    if slot >= len(node.input) or not node.input[slot]:
        return None
    try:
        return index.constants.value(node.input[slot])
    except FoldRefused as refusal:
        raise FoldRefused(
            Reason.NON_CONSTANT_WEIGHT if refusal.code == Reason.NON_CONSTANT_PARAMS else refusal.code,
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
