"""Forward folds: a run of affine nodes right after a linear layer scales the layer's output channels
and moves its shift into the bias. One unit per layer type; the algebra lives in :mod:`bnfold.core.affine`.

The run may start above the site the driver offers (nodes it already visited but could not fold on
their own, e.g. a MatMul's bias Add) and extends below it while the nodes stay per-channel."""

from __future__ import annotations

import numpy as np
from onnx import NodeProto

from bnfold.core.affine import FoldRefused, ScaledWeight
from bnfold.onnx.fold.patterns.base import (
    Elementwise,
    Rewrite,
    Site,
    TensorUpdate,
    constant,
    float_attribute,
    int_attribute,
)
from bnfold.onnx.fold.patterns.layers import Layer, bias_of, is_op, tensor_rank, weight_of
from bnfold.onnx.fold.patterns.mapping import is_mapper, space_after
from bnfold.onnx.fold.patterns.runs import (
    AffineRun,
    ChannelSpace,
    data_input,
    elementwise_slots,
    link_affine,
    links_from,
    producing_link,
    read_run,
    require_sole_reader,
)
from bnfold.onnx.graph.index import GraphIndex
from bnfold.reasons import Reason


class _ForwardUnit:
    """Find the layer above the site, check that nothing else reads what the fold changes, read the run."""

    name: str
    through_mappers = False

    def layer(self, value: str, index: GraphIndex) -> Layer | None:
        """The layer whose output is ``value``; ``None`` if it is not this unit's kind."""
        raise NotImplementedError

    def fold(self, layer: Layer, run: AffineRun, space: ChannelSpace, mapper: NodeProto | None,
             index: GraphIndex) -> Rewrite | None:
        raise NotImplementedError

    def accepts(self, layer: Layer, mapper: NodeProto | None) -> bool:
        return True

    def plan(self, site: Site) -> Rewrite | None:
        index = site.index
        above: list[NodeProto] = []
        value = data_input(site.anchor, index)
        while (found := self._locate(value, index)) is None:
            link = producing_link(value, index, site.chains)
            if link is None:
                return None
            above.insert(0, link)
            value = data_input(link, index)
        layer, mapper = found
        if not self.accepts(layer, mapper):
            return None
        links = above + links_from(site.anchor, index, site.chains)
        if mapper is not None:
            require_sole_reader(layer.output, mapper, index, "input")
        require_sole_reader(value, links[0], index, "input")
        for upper, lower in zip(links, links[1 : len(above) + 1], strict=False):
            require_sole_reader(upper.output[0], lower, index, "input")
        space = layer.space if mapper is None else space_after(mapper, layer.space, index)
        run = read_run(links, index, space, required=len(above) + 1)
        return self.fold(layer, run, space, mapper, index)

    def _locate(self, value: str, index: GraphIndex) -> tuple[Layer, NodeProto | None] | None:
        producer = index.producers.get(value)
        if self.through_mappers and is_mapper(producer):
            layer = self.layer(producer.input[0], index)
            if layer is not None:
                return layer, producer
        layer = self.layer(value, index)
        return None if layer is None else (layer, None)


def _producer(value: str, index: GraphIndex, op_type: str) -> NodeProto | None:
    producer = index.producers.get(value)
    return producer if is_op(producer, op_type) and producer.output[0] == value else None


class ConvBn(_ForwardUnit):
    """Conv (1/2/3-D, any group, stride, dilation) -> run: weight ``[C_out, C_in/g, k...]``, axis 0."""

    name = "conv-bn"

    def layer(self, value: str, index: GraphIndex) -> Layer | None:
        conv = _producer(value, index, "Conv")
        if conv is None:
            return None
        weight = weight_of(conv, index, min_rank=3)
        return Layer(conv, weight, ChannelSpace(1, weight.ndim, weight.shape[0]), value)

    def fold(self, layer: Layer, run: AffineRun, space: ChannelSpace, mapper: NodeProto | None,
             index: GraphIndex) -> Rewrite:
        conv, weight = layer.node, layer.weight
        bias = bias_of(conv, index, 2, weight.shape[0], layer.dtype)
        return Rewrite(
            self.name,
            run,
            conv,
            [
                TensorUpdate(conv, 1, ScaledWeight(weight, run.affine.scale, axis=0), layer.dtype, "weight"),
                TensorUpdate(conv, 2, run.affine.apply(bias), layer.dtype, "bias"),
            ],
            tail=conv,
        )


class ConvTransposeBn(_ForwardUnit):
    """ConvTranspose -> run: weight ``[C_in, C_out/g, k...]``, so output channel ``o`` of group ``q``
    is column ``o - q*C_out/g`` of the rows that group reads."""

    name = "convtranspose-bn"

    def layer(self, value: str, index: GraphIndex) -> Layer | None:
        deconv = _producer(value, index, "ConvTranspose")
        if deconv is None:
            return None
        weight = weight_of(deconv, index, min_rank=3)
        groups = int_attribute(deconv, "group", 1)
        if groups < 1 or weight.shape[0] % groups:
            raise FoldRefused(Reason.UNSUPPORTED_SHAPE, f"ConvTranspose weight {weight.shape} with group={groups}")
        return Layer(deconv, weight, ChannelSpace(1, weight.ndim, weight.shape[1] * groups), value)

    def fold(self, layer: Layer, run: AffineRun, space: ChannelSpace, mapper: NodeProto | None,
             index: GraphIndex) -> Rewrite:
        deconv, weight = layer.node, layer.weight
        groups = int_attribute(deconv, "group", 1)
        bias = bias_of(deconv, index, 2, space.channels, layer.dtype)
        scaled = ScaledWeight(weight, run.affine.scale, axis=1, groups=groups)
        return Rewrite(
            self.name,
            run,
            deconv,
            [
                TensorUpdate(deconv, 1, scaled, layer.dtype, "weight"),
                TensorUpdate(deconv, 2, run.affine.apply(bias), layer.dtype, "bias"),
            ],
            tail=deconv,
        )


class GemmBn(_ForwardUnit):
    """Gemm -> run on the 2-D output's axis 1: ``alpha*A*B + beta*C`` with B's output axis by ``transB``.

    ``beta`` is folded into the new ``C`` and set to 1, so every attribute keeps its meaning."""

    name = "gemm-bn"

    def layer(self, value: str, index: GraphIndex) -> Layer | None:
        gemm = _producer(value, index, "Gemm")
        if gemm is None:
            return None
        weight = weight_of(gemm, index)
        if weight.ndim != 2:
            raise FoldRefused(Reason.UNSUPPORTED_SHAPE, f"Gemm B has rank {weight.ndim}")
        axis = 0 if int_attribute(gemm, "transB", 0) else 1
        return Layer(gemm, weight, ChannelSpace(1, 2, weight.shape[axis]), value)

    def fold(self, layer: Layer, run: AffineRun, space: ChannelSpace, mapper: NodeProto | None,
             index: GraphIndex) -> Rewrite:
        gemm, weight, dtype = layer.node, layer.weight, layer.dtype
        channels = space.channels
        affine = run.affine
        beta = float_attribute(gemm, "beta", 1.0)
        bias = constant(index, gemm, 2, "C")
        if bias is None:
            new_bias = affine.shift
        else:
            if bias.dtype != dtype:
                raise FoldRefused(Reason.DTYPE_MISMATCH, f"C dtype {bias.dtype} differs from B dtype {dtype}")
            as_2d = bias.astype(np.float64).reshape((1,) * (2 - bias.ndim) + bias.shape)
            if bias.ndim > 2 or as_2d.shape[1] not in (1, channels):  # type: ignore[misc]  # 2-D unless refused
                raise FoldRefused(Reason.UNSUPPORTED_SHAPE, f"Gemm C of shape {bias.shape}")
            new_bias = (beta * as_2d) * affine.scale + affine.shift
            if bias.ndim < 2 and new_bias.shape[0] == 1:
                new_bias = new_bias.reshape(channels)
        axis = 0 if int_attribute(gemm, "transB", 0) else 1
        return Rewrite(
            self.name,
            run,
            gemm,
            [
                TensorUpdate(gemm, 1, ScaledWeight(weight, affine.scale, axis=axis), dtype, "weight"),
                TensorUpdate(gemm, 2, new_bias, dtype, "bias"),
            ],
            attributes=[(gemm, "beta", 1.0)],
            tail=gemm,
        )


class MatMulBn(_ForwardUnit):
    """``MatMul(A, W)`` [-> ``Add`` of a per-feature constant] -> run: the features are the output's last
    axis, so W's last axis scales and the shift becomes (or joins) the bias Add.

    ``matmul-bn``: a 2-D output read directly, the only case where a BN's channel axis 1 is the feature
    axis (matching sizes alone prove nothing). ``matmul-nd-bn``: any rank, also through one Transpose,
    Reshape or Flatten that provably maps the features onto the run's channel axis. Never converts a
    MatMul to Gemm."""

    def __init__(self, name: str, *, any_rank: bool) -> None:
        self.name = name
        self.through_mappers = any_rank
        self._any_rank = any_rank

    def layer(self, value: str, index: GraphIndex) -> Layer | None:
        bias_add = _producer(value, index, "Add")
        slots = None if bias_add is None else elementwise_slots(bias_add, index)
        matmul = _producer(value if slots is None else bias_add.input[slots[0]], index, "MatMul")  # type: ignore[union-attr]
        if matmul is None:
            return None
        weight = weight_of(matmul, index)
        if self._any_rank:
            rank = tensor_rank(index, matmul.output[0], "the MatMul output")
        else:
            input_type = index.value_type(matmul.input[0])
            rank = None if input_type is None else input_type.rank  # type: ignore[assignment]  # 2, or refused
            if rank != 2 or weight.ndim != 2:
                raise FoldRefused(
                    Reason.MATMUL_RANK,
                    f"MatMul input rank is {'unknown' if rank is None else rank}, weight rank {weight.ndim}: only "
                    "in 2-D is a BN's channel axis the feature axis",
                )
        space = ChannelSpace(rank - 1, rank, weight.shape[-1])
        return Layer(matmul, weight, space, value, bias_add if slots is not None else None)

    def accepts(self, layer: Layer, mapper: NodeProto | None) -> bool:
        return not self._any_rank or mapper is not None or layer.space.rank != 2

    def fold(self, layer: Layer, run: AffineRun, space: ChannelSpace, mapper: NodeProto | None,
             index: GraphIndex) -> Rewrite | None:
        matmul, dtype = layer.node, layer.dtype
        features = run.affine.repeat(space.block)
        updates = [TensorUpdate(matmul, 1, ScaledWeight(layer.weight, features.scale, axis=-1), dtype, "weight")]
        if layer.bias_add is not None:
            add = layer.bias_add
            require_sole_reader(matmul.output[0], add, index, "input")
            data_slot, bias_slot = elementwise_slots(add, index)  # type: ignore[misc]  # matched by its slots
            bias = index.constants.value(add.input[bias_slot])
            if bias.dtype != dtype:
                raise FoldRefused(Reason.DTYPE_MISMATCH, f"Add constant dtype {bias.dtype} differs from {dtype}")
            features_bias = link_affine(add, index, layer.space).shift
            updates.append(TensorUpdate(add, bias_slot, features.apply(features_bias), dtype, "bias"))
            return Rewrite(self.name, run, matmul, updates, tail=mapper or add)
        if not np.any(run.affine.shift):
            return Rewrite(self.name, run, matmul, updates, tail=mapper or matmul)
        if not run.worth_replacing_by(1):
            return None
        shift = Elementwise("Add", run.affine.shift.reshape(space.constant_shape()), dtype, "shift")
        return Rewrite(self.name, run, matmul, updates, replacement=[shift])


FORWARD_PATTERNS = (
    ConvBn(),
    ConvTransposeBn(),
    GemmBn(),
    MatMulBn("matmul-bn", any_rank=False),
    MatMulBn("matmul-nd-bn", any_rank=True),
)
