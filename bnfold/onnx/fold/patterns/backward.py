"""Backward folds: a run of affine nodes right before a linear layer scales the layer's input channels
and moves its shift through the layer into the bias.

Scaling is always exact: a layer is linear in each input channel and zero padding commutes with a
per-channel scale (``a * 0 = 0``). The shift is exact in the bias only where every output position
sums every kernel tap over real input; where the layer pads with zeros (Conv) or receives uneven
numbers of taps (ConvTranspose), :func:`_shift_before` keeps the exact remainder instead.
"""

from __future__ import annotations

import numpy as np
from onnx import NodeProto

from bnfold.core.affine import FoldRefused, ScaledWeight, contract_shift, contract_shift_transposed
from bnfold.onnx.fold.patterns.base import (
    DepthwiseConv,
    Elementwise,
    Rewrite,
    Site,
    TensorUpdate,
    constant,
    float_attribute,
    int_attribute,
)
from bnfold.onnx.fold.patterns.layers import Layer, bias_of, is_op, tensor_rank, weight_of
from bnfold.onnx.fold.patterns.mapping import is_mapper, space_before
from bnfold.onnx.fold.patterns.runs import (
    AffineRun,
    ChannelSpace,
    elementwise_slots,
    links_from,
    read_run,
    require_sole_reader,
)
from bnfold.onnx.graph.index import GraphIndex
from bnfold.reasons import Reason


class _BackwardUnit:
    """Find the layer reading the end of the run at the site (maybe through a mapper), check that the run's
    values have no other reader, read the whole run on the layer's input channels."""

    name: str
    through_mappers = False

    def layer(self, reader: NodeProto, value: str, index: GraphIndex) -> Layer | None:
        """``reader`` as a layer of this unit's kind that reads ``value`` as its data input, else ``None``."""
        raise NotImplementedError

    def fold(self, layer: Layer, run: AffineRun, space: ChannelSpace, reader: NodeProto,
             index: GraphIndex) -> Rewrite | None:
        raise NotImplementedError

    def plan(self, site: Site) -> Rewrite | None:
        index = site.index
        links = links_from(site.anchor, index, site.chains)
        end = links[-1].output[0]
        found = self._locate(end, index)
        if found is None:
            return None
        layer, mapper = found
        reader = mapper or layer.node
        require_sole_reader(end, reader, index, "output")
        if mapper is not None:
            require_sole_reader(mapper.output[0], layer.node, index, "output")
        space = layer.space if mapper is None else space_before(mapper, layer.space, index)
        run = read_run(links, index, space, required=len(links))
        return self.fold(layer, run, space, reader, index)

    def _locate(self, value: str, index: GraphIndex) -> tuple[Layer, NodeProto | None] | None:
        for reader in index.users(value):
            if self.through_mappers and is_mapper(reader) and reader.input[0] == value:
                for inner in index.users(reader.output[0]):
                    layer = self.layer(inner, reader.output[0], index)
                    if layer is not None:
                        return layer, reader
            layer = self.layer(reader, value, index)
            if layer is not None:
                return layer, None
        return None


def _reads(node: NodeProto, value: str, op_type: str) -> bool:
    return is_op(node, op_type) and len(node.input) > 1 and node.input[0] == value and node.input[1] != value


def _ints(node: NodeProto, name: str) -> list[int]:
    for attribute in node.attribute:
        if attribute.name == name:
            return [int(i) for i in attribute.ints]
    return []


def _auto_pad(node: NodeProto) -> str:
    for attribute in node.attribute:
        if attribute.name == "auto_pad":
            return attribute.s.decode()
    return "NOTSET"


def _shift_before(unit: str, layer: Layer, run: AffineRun, space: ChannelSpace, updates: list[TensorUpdate],
                  code: Reason, why: str) -> Rewrite | None:
    """Fold the scale and keep the shift, exactly, before the layer.

    Per channel ``a*x + b = a*(x + b/a)``, and the layer is linear in each input channel with zero
    padding commuting with the scale, so ``layer_W(pad0(a*x + b)) = layer_{W*a}(pad0(x + b/a))`` at
    every position, borders included. Needs every ``a != 0``. The shift is added by a depthwise 1x1 Conv
    with unit weights (as exact as an Add): onnxruntime's ORT_ENABLE_ALL keeps it in the blocked NCHWc layout
    the layer runs in, where an Add of a constant leaves it (the Add was 1.7% slower than the unfolded BN
    there, the Conv 1.2% faster, and both as fast at the lower levels; bench model bn_before_conv)."""
    scale = run.affine.scale
    if np.any(scale == 0):
        channel = int(np.argmax(scale == 0))
        raise FoldRefused(code, f"{why}, and channel {channel} has scale 0, so its shift cannot be kept before it")
    if not run.worth_replacing_by(1):
        return None
    remainder = DepthwiseConv(np.ones_like(scale), run.affine.shift / scale, space.rank - 2, layer.dtype, "shift")
    return Rewrite(unit, run, layer.node, updates, replacement=[remainder],
                   note=f"scale folded; {why}, so the shift stays before it, added by a depthwise 1x1 Conv")


class BnConv(_BackwardUnit):
    """run -> Conv: weight ``[C_out, C_in/g, k...]``, input channel ``c`` is column ``c mod C_in/g`` of
    the rows of group ``c // (C_in/g)``. The shift reaches the bias only without zero padding."""

    name = "bn-conv"

    def layer(self, reader: NodeProto, value: str, index: GraphIndex) -> Layer | None:
        if not _reads(reader, value, "Conv"):
            return None
        weight = weight_of(reader, index, min_rank=3)
        channels = weight.shape[1] * int_attribute(reader, "group", 1)
        return Layer(reader, weight, ChannelSpace(1, weight.ndim, channels), reader.output[0])

    def fold(self, layer: Layer, run: AffineRun, space: ChannelSpace, reader: NodeProto,
             index: GraphIndex) -> Rewrite | None:
        conv, weight, dtype = layer.node, layer.weight, layer.dtype
        groups = int_attribute(conv, "group", 1)
        scaled = ScaledWeight(weight, run.affine.scale, axis=1, groups=groups)
        updates = [TensorUpdate(conv, 1, scaled, dtype, "weight")]
        shift = run.affine.shift
        if not np.any(shift):
            return Rewrite(self.name, run, conv, updates, reader=reader)
        if _zero_padded(conv, weight):
            return _shift_before(self.name, layer, run, space, updates, Reason.PADDING,
                                 f"{index.node_label(conv)} pads its input with zeros")
        bias = bias_of(conv, index, 2, weight.shape[0], dtype)
        new_bias = bias + contract_shift(weight, shift, axis=1, groups=groups)
        updates.append(TensorUpdate(conv, 2, new_bias, dtype, "bias"))
        return Rewrite(self.name, run, conv, updates, reader=reader)


def _zero_padded(conv: NodeProto, weight: np.ndarray) -> bool:
    auto_pad = _auto_pad(conv)
    if auto_pad == "VALID":
        return False
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        return any(k > 1 for k in weight.shape[2:])
    return any(_ints(conv, "pads"))


class BnConvTranspose(_BackwardUnit):
    """run -> ConvTranspose: weight ``[C_in, C_out/g, k...]``, input channel ``c`` is row ``c``. Output
    positions receive a shift evenly only for a 1x1 kernel at stride 1 without pads or output padding."""

    name = "bn-convtranspose"

    def layer(self, reader: NodeProto, value: str, index: GraphIndex) -> Layer | None:
        if not _reads(reader, value, "ConvTranspose"):
            return None
        weight = weight_of(reader, index, min_rank=3)
        return Layer(reader, weight, ChannelSpace(1, weight.ndim, weight.shape[0]), reader.output[0])

    def fold(self, layer: Layer, run: AffineRun, space: ChannelSpace, reader: NodeProto,
             index: GraphIndex) -> Rewrite | None:
        deconv, weight, dtype = layer.node, layer.weight, layer.dtype
        groups = int_attribute(deconv, "group", 1)
        updates = [TensorUpdate(deconv, 1, ScaledWeight(weight, run.affine.scale, axis=0), dtype, "weight")]
        shift = run.affine.shift
        if not np.any(shift):
            return Rewrite(self.name, run, deconv, updates, reader=reader)
        if not _even_taps(deconv, weight):
            return _shift_before(self.name, layer, run, space, updates, Reason.UNEVEN_TAPS,
                                 f"{index.node_label(deconv)} gives output positions different numbers of taps")
        bias = bias_of(deconv, index, 2, weight.shape[1] * groups, dtype)
        updates.append(TensorUpdate(deconv, 2, bias + contract_shift_transposed(weight, shift, groups), dtype, "bias"))
        return Rewrite(self.name, run, deconv, updates, reader=reader)


def _even_taps(deconv: NodeProto, weight: np.ndarray) -> bool:
    return (
        all(k == 1 for k in weight.shape[2:])
        and all(s == 1 for s in _ints(deconv, "strides"))
        and not any(_ints(deconv, "pads"))
        and not any(_ints(deconv, "output_padding"))
        and not _ints(deconv, "output_shape")
        and _auto_pad(deconv) in ("NOTSET", "VALID")
    )


class BnGemm(_BackwardUnit):
    """run -> [Flatten/Reshape ->] Gemm reading it as A: ``alpha*(a*x + b)*B' + beta*C`` becomes
    ``alpha*x*(a*B') + (beta*C + alpha*b*B')`` with ``beta`` set to 1. A flattening that keeps each
    channel as one contiguous block of features repeats the channel's ``(a, b)`` over the block."""

    name = "bn-gemm"
    through_mappers = True

    def layer(self, reader: NodeProto, value: str, index: GraphIndex) -> Layer | None:
        if not _reads(reader, value, "Gemm"):
            return None
        if int_attribute(reader, "transA", 0):
            raise FoldRefused(
                Reason.GEMM_TRANS_A,
                f"{index.node_label(reader)} transposes A: its rows, not its features, are the channels",
            )
        weight = weight_of(reader, index)
        if weight.ndim != 2:
            raise FoldRefused(Reason.UNSUPPORTED_SHAPE, f"Gemm B has rank {weight.ndim}")
        features = weight.shape[1 if int_attribute(reader, "transB", 0) else 0]
        return Layer(reader, weight, ChannelSpace(1, 2, features), reader.output[0])

    def fold(self, layer: Layer, run: AffineRun, space: ChannelSpace, reader: NodeProto,
             index: GraphIndex) -> Rewrite:
        gemm, weight, dtype = layer.node, layer.weight, layer.dtype
        trans_b = int_attribute(gemm, "transB", 0)
        features = run.affine.repeat(space.block)
        scaled = ScaledWeight(weight, features.scale, axis=1 if trans_b else 0)
        updates = [TensorUpdate(gemm, 1, scaled, dtype, "weight")]
        if not np.any(features.shift):
            return Rewrite(self.name, run, gemm, updates, reader=reader)
        weight64 = weight.astype(np.float64)
        moved = float_attribute(gemm, "alpha", 1.0) * (features.shift @ (weight64.T if trans_b else weight64))
        bias = constant(index, gemm, 2, "C")
        if bias is None:
            new_bias = moved
        else:
            if bias.dtype != dtype:
                raise FoldRefused(Reason.DTYPE_MISMATCH, f"C dtype {bias.dtype} differs from B dtype {dtype}")
            if bias.ndim > 2:
                raise FoldRefused(Reason.UNSUPPORTED_SHAPE, f"Gemm C of shape {bias.shape}")
            new_bias = float_attribute(gemm, "beta", 1.0) * bias.astype(np.float64) + moved
        updates.append(TensorUpdate(gemm, 2, new_bias, dtype, "bias"))
        return Rewrite(self.name, run, gemm, updates, attributes=[(gemm, "beta", 1.0)], reader=reader)


class BnMatMul(_BackwardUnit):
    """run -> [Transpose/Flatten/Reshape ->] ``MatMul(A, W)`` with a 2-D W, any rank of A: the features
    are A's last axis, so W's rows scale and ``b @ W`` is added after the MatMul (into its bias Add if
    it has one, else by a new Add; never by converting to Gemm)."""

    name = "bn-matmul"
    through_mappers = True

    def layer(self, reader: NodeProto, value: str, index: GraphIndex) -> Layer | None:
        if not _reads(reader, value, "MatMul"):
            return None
        weight = weight_of(reader, index)
        if weight.ndim != 2:
            raise FoldRefused(
                Reason.MATMUL_RANK, f"{index.node_label(reader)} has a batched weight of rank {weight.ndim}"
            )
        rank = tensor_rank(index, value, "the MatMul input")
        return Layer(reader, weight, ChannelSpace(rank - 1, rank, weight.shape[0]), reader.output[0])

    def fold(self, layer: Layer, run: AffineRun, space: ChannelSpace, reader: NodeProto,
             index: GraphIndex) -> Rewrite | None:
        matmul, weight, dtype = layer.node, layer.weight, layer.dtype
        features = run.affine.repeat(space.block)
        updates = [TensorUpdate(matmul, 1, ScaledWeight(weight, features.scale, axis=0), dtype, "weight")]
        if not np.any(features.shift):
            return Rewrite(self.name, run, matmul, updates, reader=reader)
        moved = features.shift @ weight.astype(np.float64)
        bias_add = _bias_add(matmul, index)
        if bias_add is not None:
            slot = elementwise_slots(bias_add, index)[1]  # type: ignore[index]  # matched by its slots
            bias = index.constants.value(bias_add.input[slot])
            if bias.dtype != dtype:
                raise FoldRefused(Reason.DTYPE_MISMATCH, f"Add constant dtype {bias.dtype} differs from {dtype}")
            updates.append(TensorUpdate(bias_add, slot, bias.astype(np.float64) + moved, dtype, "bias"))
            return Rewrite(self.name, run, matmul, updates, reader=reader)
        if not run.worth_replacing_by(1):
            return None
        bias_after = Elementwise("Add", moved, dtype, "bias")
        return Rewrite(self.name, run, matmul, updates, reader=reader, bias_after=bias_after)


def _bias_add(matmul: NodeProto, index: GraphIndex) -> NodeProto | None:
    """The Add of a constant that is the only reader of ``matmul``'s output, if any."""
    output = matmul.output[0]
    readers = index.users(output)
    if index.is_graph_output(output) or len(readers) != 1 or not is_op(readers[0], "Add"):
        return None
    return readers[0] if elementwise_slots(readers[0], index) is not None else None


BACKWARD_PATTERNS = (BnConv(), BnConvTranspose(), BnGemm(), BnMatMul())
