"""``parallel-branches``: linear branches reading one input and meeting in an Add, Sub or Sum become one Conv.

A branch is a convolution or an average pool of the input (or nothing: the input itself), followed by a run
of per-channel affine nodes (batch norms, Mul/Add/Sub/Div by constants). That covers RepVGG (3x3 + 1x1 +
identity batch norm), MobileOne and FastViT (k convolutions + a 1x1 scale branch + identity batch norm, and
``x + gamma * (mixer(x) - norm(x))``), RepGhost (a depthwise convolution + a batch norm of its input) and
ACNet/DBB blocks (1xk + kx1 + kxk, average pools); Gemm branches of one input (a distillation head pair, as
RepViT has) become one Gemm. The branches' batch norms usually fold into their
convolutions first; the driver alternates folds and merges until neither changes the graph, so a merge's
result merges again at the next Add.

Each value between a branch's input and the Add must be read by that branch only: the merge removes it."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from onnx import NodeProto

from bnfold.core.affine import ChannelAffine, FoldRefused
from bnfold.core.kernels import ConvKernel, merge_parallel, require_cheaper
from bnfold.onnx.fold.patterns.base import Site, float_attribute, int_attribute
from bnfold.onnx.fold.patterns.layers import weight_of
from bnfold.onnx.fold.patterns.merges import (
    Merge,
    conv_attributes,
    conv_kernel,
    gemm_bias,
    is_plain,
    kernel_label,
    pool_kernel,
    sole_reader,
    value_dtype,
)
from bnfold.onnx.fold.patterns.runs import ChannelSpace, data_input, is_link, link_affine
from bnfold.onnx.graph.index import GraphIndex
from bnfold.reasons import Reason

_HEADS = ("Conv", "AveragePool", "Gemm")


class _Branch(NamedTuple):
    """``chain(head(source))``; ``head`` None: the chain acts on ``source`` itself."""

    source: str
    head: NodeProto | None
    chain: tuple[NodeProto, ...]

    @property
    def nodes(self) -> tuple[NodeProto, ...]:
        return self.chain if self.head is None else (self.head, *self.chain)


def _signs(node: NodeProto, index: GraphIndex) -> list[float] | None:
    """How the operands of ``node`` add up, if it sums its non-constant operands."""
    if node.op_type not in ("Add", "Sub", "Sum") or node.domain not in ("", "ai.onnx") or len(node.output) != 1:
        return None
    if not all(node.input) or any(index.constants.is_constant(name) for name in node.input):
        return None
    if node.op_type == "Add" and len(node.input) == 2:
        return [1.0, 1.0]
    if node.op_type == "Sub" and len(node.input) == 2:
        return [1.0, -1.0]
    if node.op_type == "Sum" and len(node.input) >= 2:
        return [1.0] * len(node.input)
    return None


def _readings(operand: str, reader: NodeProto, index: GraphIndex) -> dict[str, _Branch]:
    """Every way to read ``operand`` as a branch, by the input it starts from: the operand itself, then
    each value up the run of affine nodes above it, then the input of the Conv or AveragePool heading it."""
    readings: dict[str, _Branch] = {}
    chain: list[NodeProto] = []
    current = operand
    while True:
        readings.setdefault(current, _Branch(current, None, tuple(chain)))
        if not sole_reader(current, reader, index):
            return readings
        producer = index.producers.get(current)
        if producer is None or producer.output[0] != current:
            return readings
        if any(is_plain(producer, op) for op in _HEADS) and producer.input:
            readings.setdefault(producer.input[0], _Branch(producer.input[0], producer, tuple(chain)))
            return readings
        if not is_link(producer, index, chains=True):
            return readings
        chain.insert(0, producer)
        reader, current = producer, data_input(producer, index)


def _common_source(readings: list[dict[str, _Branch]]) -> str | None:
    """The input all operands can be read from, preferring the reading with the most layers."""
    common = [name for name in readings[0] if all(name in r for r in readings[1:])]
    if not common:
        return None
    return max(common, key=lambda name: sum(r[name].head is not None for r in readings))


class ParallelBranches:
    name = "parallel-branches"

    def plan(self, site: Site) -> Merge | None:
        node, index = site.anchor, site.index
        signs = _signs(node, index)
        if signs is None:
            return None
        readings = [_readings(operand, node, index) for operand in node.input]
        source = _common_source(readings)
        if source is None:
            return None
        branches = [reading[source] for reading in readings]
        heads = [b.head for b in branches if b.head is not None]
        if not heads or len({id(n) for b in branches for n in b.nodes}) != sum(len(b.nodes) for b in branches):
            return None
        if any(h.op_type == "Gemm" for h in heads):
            return self._gemms(node, source, branches, signs, index)
        dtype = self._dtype(node, heads, index)
        kernels = [self._kernel(b, heads, index).scaled(sign) for b, sign in zip(branches, signs, strict=True)]
        merged = merge_parallel(kernels)
        require_cheaper(kernels, merged)
        described = ", ".join(self._describe(b, index) for b in branches)
        return Merge(
            self.name, node, source, "Conv", conv_attributes(merged),
            [("weight", merged.weight), ("bias", merged.bias)], dtype, tuple(n for b in branches for n in b.nodes),
            f"{len(branches)} branches ({described}) merged into one {kernel_label(merged)} Conv",
        )

    def _gemms(self, node: NodeProto, source: str, branches: list[_Branch], signs: list[float], index: GraphIndex
               ) -> Merge:
        """Gemm branches of one input: ``A @ sum(B_i) + sum(C_i)``, each branch's run scaling its columns."""
        heads = [b.head for b in branches]
        if any(h is None or h.op_type != "Gemm" for h in heads):
            raise FoldRefused(Reason.BRANCH_GEOMETRY, "Gemm branches meet branches of another kind")
        gemms: list[NodeProto] = heads  # type: ignore[assignment]  # every head a Gemm, checked above
        if len({int_attribute(g, "transA", 0) for g in gemms}) != 1:
            raise FoldRefused(Reason.BRANCH_GEOMETRY, "the Gemm branches transpose their input differently")
        weights = [weight_of(g, index) for g in gemms]
        dtype = weights[0].dtype
        if any(w.ndim != 2 for w in weights):
            raise FoldRefused(Reason.UNSUPPORTED_SHAPE, "a Gemm branch's B is not a matrix")
        if any(w.dtype != dtype for w in weights):
            dtypes = sorted({str(w.dtype) for w in weights})
            raise FoldRefused(Reason.DTYPE_MISMATCH, f"the Gemm branches' weights are {dtypes}")
        matrices = [(w.T if int_attribute(g, "transB", 0) else w).astype(np.float64)
                    for g, w in zip(gemms, weights, strict=True)]
        if len({m.shape for m in matrices}) != 1:
            shapes = sorted({m.shape for m in matrices})
            raise FoldRefused(Reason.CHANNEL_MISMATCH, f"the Gemm branches' B are {shapes}")
        columns = matrices[0].shape[1]
        weight, bias = np.zeros(matrices[0].shape), np.zeros((1, columns))
        for branch, sign, gemm, matrix in zip(branches, signs, gemms, matrices, strict=True):
            affine = ChannelAffine.identity(columns)
            for link in branch.chain:
                affine = affine.then(link_affine(link, index, ChannelSpace(1, 2, columns)))
            weight = weight + sign * float_attribute(gemm, "alpha", 1.0) * matrix * affine.scale
            c = gemm_bias(gemm, index, columns, dtype)
            shift = affine.shift if c is None else float_attribute(gemm, "beta", 1.0) * c * affine.scale + affine.shift
            bias = bias + sign * shift
        described = ", ".join(self._describe(b, index) for b in branches)
        return Merge(self.name, node, source, "Gemm", {"transA": int_attribute(gemms[0], "transA", 0)},
                     [("weight", weight), ("bias", bias.reshape(columns) if bias.shape[0] == 1 else bias)], dtype,
                     tuple(n for b in branches for n in b.nodes),
                     f"{len(branches)} Gemm branches ({described}) merged into one Gemm")

    @staticmethod
    def _dtype(node: NodeProto, heads: list[NodeProto], index: GraphIndex) -> np.dtype:
        dtype = value_dtype(index, node.output[0])
        weights = {index.constants.value(h.input[1]).dtype for h in heads if h.op_type == "Conv" and len(h.input) > 1}
        if dtype is None:
            if len(weights) != 1:
                raise FoldRefused(Reason.UNKNOWN_SHAPE, f"the element type of {node.output[0]!r} is unknown")
            dtype = weights.pop()
        if dtype.kind != "f":
            raise FoldRefused(Reason.UNSUPPORTED_DTYPE, f"the branches compute in {dtype}, not a float type")
        if weights - {dtype}:
            raise FoldRefused(Reason.DTYPE_MISMATCH,
                              f"the branches compute in {sorted(str(d) for d in weights | {dtype})}")
        return dtype

    @staticmethod
    def _kernel(branch: _Branch, heads: list[NodeProto], index: GraphIndex) -> ConvKernel:
        head = branch.head
        spatial = _spatial_rank(heads, index)
        if head is not None and head.op_type == "Conv":
            kernel = conv_kernel(head, index)
        else:
            channels = _channels(branch.source, index)
            if head is not None:
                kernel = pool_kernel(head, channels, index)
            else:
                kernel = ConvKernel.diagonal(np.ones(channels), np.zeros(channels), spatial)
        if kernel.spatial != spatial:
            raise FoldRefused(Reason.BRANCH_GEOMETRY, "the branches have different spatial ranks")
        space = ChannelSpace(1, spatial + 2, kernel.out_channels)
        affine = ChannelAffine.identity(kernel.out_channels)
        for link in branch.chain:
            affine = affine.then(link_affine(link, index, space))
        return kernel.then_affine(affine.scale, affine.shift)

    @staticmethod
    def _describe(branch: _Branch, index: GraphIndex) -> str:
        parts = [] if branch.head is None else [index.node_label(branch.head)]
        parts += [index.node_label(n) for n in branch.chain]
        return " -> ".join(parts) or "identity"


def _spatial_rank(heads: list[NodeProto], index: GraphIndex) -> int:
    head = heads[0]
    if head.op_type == "Conv":
        return int(index.constants.value(head.input[1]).ndim) - 2
    value_type = index.value_type(head.input[0])
    if value_type is None or value_type.rank is None:
        raise FoldRefused(Reason.UNKNOWN_SHAPE, f"the rank of {head.input[0]!r} is unknown")
    return value_type.rank - 2


def _channels(value: str, index: GraphIndex) -> int:
    value_type = index.value_type(value)
    if value_type is None or value_type.shape is None or len(value_type.shape) < 2 or value_type.shape[1] is None:
        raise FoldRefused(Reason.UNKNOWN_SHAPE, f"the channel count of {value!r} is unknown")
    return int(value_type.shape[1])
