"""Forward folds: a BN right after a linear layer scales the layer's output channels and moves its
shift into the bias. One unit per layer type; the algebra lives in :mod:`bnfold.affine`."""

from __future__ import annotations

import numpy as np
from onnx import NodeProto

from bnfold.affine import ChannelAffine, FoldRefused, scale_weight
from bnfold.onnx_front.graph import GraphIndex
from bnfold.patterns.base import (
    Rewrite,
    TensorUpdate,
    constant,
    exclusive_producer,
    float_attribute,
    float_dtype,
    int_attribute,
)


def _layer(bn: NodeProto, index: GraphIndex, op_type: str) -> NodeProto | None:
    producer = index.producers.get(bn.input[0])
    if producer is None or producer.op_type != op_type or producer.domain not in ("", "ai.onnx"):
        return None
    return exclusive_producer(index, bn.input[0], bn)


def _bias(index: GraphIndex, layer: NodeProto, slot: int, channels: int, dtype: np.dtype) -> np.ndarray:
    bias = constant(index, layer, slot, "bias")
    if bias is None:
        return np.zeros(channels)
    if bias.shape != (channels,):
        raise FoldRefused("channel_mismatch", f"bias of shape {bias.shape} for {channels} channels")
    if bias.dtype != dtype:
        raise FoldRefused("dtype_mismatch", f"bias dtype {bias.dtype} differs from weight dtype {dtype}")
    return bias.astype(np.float64)


def _check_channels(affine: ChannelAffine, channels: int, layer: str) -> None:
    if affine.channels != channels:
        raise FoldRefused(
            "channel_mismatch", f"BN has {affine.channels} channels but {layer} produces {channels}"
        )


class ConvBn:
    """Conv (1/2/3-D, any group, stride, dilation) -> BN: weight ``[C_out, C_in/g, k...]``, axis 0."""

    name = "conv-bn"

    def plan(self, bn: NodeProto, affine: ChannelAffine, index: GraphIndex) -> Rewrite | None:
        conv = _layer(bn, index, "Conv")
        if conv is None:
            return None
        weight = constant(index, conv, 1, "weight")
        dtype = float_dtype(weight, "weight")
        if weight.ndim < 3:
            raise FoldRefused("unsupported_shape", f"Conv weight has rank {weight.ndim}")
        _check_channels(affine, weight.shape[0], index.node_label(conv))
        bias = _bias(index, conv, 2, weight.shape[0], dtype)
        return Rewrite(
            self.name,
            conv,
            [
                TensorUpdate(conv, 1, scale_weight(weight, affine.scale, axis=0), dtype, "weight"),
                TensorUpdate(conv, 2, affine.apply(bias), dtype, "bias"),
            ],
            tail=conv,
        )


class ConvTransposeBn:
    """ConvTranspose -> BN: weight ``[C_in, C_out/g, k...]``, so output channel ``o`` of group ``q``
    is column ``o - q*C_out/g`` of the rows that group reads."""

    name = "convtranspose-bn"

    def plan(self, bn: NodeProto, affine: ChannelAffine, index: GraphIndex) -> Rewrite | None:
        deconv = _layer(bn, index, "ConvTranspose")
        if deconv is None:
            return None
        weight = constant(index, deconv, 1, "weight")
        dtype = float_dtype(weight, "weight")
        groups = int_attribute(deconv, "group", 1)
        if weight.ndim < 3 or groups < 1 or weight.shape[0] % groups:
            raise FoldRefused("unsupported_shape", f"ConvTranspose weight {weight.shape} with group={groups}")
        channels = weight.shape[1] * groups
        _check_channels(affine, channels, index.node_label(deconv))
        bias = _bias(index, deconv, 2, channels, dtype)
        return Rewrite(
            self.name,
            deconv,
            [
                TensorUpdate(deconv, 1, scale_weight(weight, affine.scale, axis=1, groups=groups), dtype, "weight"),
                TensorUpdate(deconv, 2, affine.apply(bias), dtype, "bias"),
            ],
            tail=deconv,
        )


class GemmBn:
    """Gemm -> BN on the 2-D output's axis 1: ``alpha*A*B + beta*C`` with B's output axis by ``transB``.

    ``beta`` is folded into the new ``C`` and set to 1, so every attribute keeps its meaning."""

    name = "gemm-bn"

    def plan(self, bn: NodeProto, affine: ChannelAffine, index: GraphIndex) -> Rewrite | None:
        gemm = _layer(bn, index, "Gemm")
        if gemm is None:
            return None
        weight = constant(index, gemm, 1, "B")
        dtype = float_dtype(weight, "B")
        if weight.ndim != 2:
            raise FoldRefused("unsupported_shape", f"Gemm B has rank {weight.ndim}")
        axis = 0 if int_attribute(gemm, "transB", 0) else 1
        channels = weight.shape[axis]
        _check_channels(affine, channels, index.node_label(gemm))
        beta = float_attribute(gemm, "beta", 1.0)
        bias = constant(index, gemm, 2, "C")
        if bias is None:
            new_bias = affine.shift
        else:
            if bias.dtype != dtype:
                raise FoldRefused("dtype_mismatch", f"C dtype {bias.dtype} differs from B dtype {dtype}")
            as_2d = bias.astype(np.float64).reshape((1,) * (2 - bias.ndim) + bias.shape)
            if bias.ndim > 2 or as_2d.shape[1] not in (1, channels):
                raise FoldRefused("unsupported_shape", f"Gemm C of shape {bias.shape}")
            new_bias = (beta * as_2d) * affine.scale + affine.shift
            if bias.ndim < 2 and new_bias.shape[0] == 1:
                new_bias = new_bias.reshape(channels)
        return Rewrite(
            self.name,
            gemm,
            [
                TensorUpdate(gemm, 1, scale_weight(weight, affine.scale, axis=axis), dtype, "weight"),
                TensorUpdate(gemm, 2, new_bias, dtype, "bias"),
            ],
            attributes=[(gemm, "beta", 1.0)],
            tail=gemm,
        )


class MatMulBn:
    """2-D ``MatMul(A, W)`` [-> ``Add`` of a per-feature constant] -> BN. The BN channel axis (1) is the
    MatMul's output-feature axis only when A is provably 2-D; matching sizes alone prove nothing."""

    name = "matmul-bn"

    def plan(self, bn: NodeProto, affine: ChannelAffine, index: GraphIndex) -> Rewrite | None:
        producer = index.producers.get(bn.input[0])
        if producer is None or producer.domain not in ("", "ai.onnx"):
            return None
        if producer.op_type == "Add":
            return self._plan_with_add(bn, producer, affine, index)
        if producer.op_type != "MatMul":
            return None
        matmul = exclusive_producer(index, bn.input[0], bn)
        weight, dtype = self._weight(matmul, affine, index)
        return Rewrite(
            self.name,
            matmul,
            [TensorUpdate(matmul, 1, scale_weight(weight, affine.scale, axis=1), dtype, "weight")],
            appended_bias=(affine.shift, dtype),
        )

    def _plan_with_add(
        self, bn: NodeProto, add: NodeProto, affine: ChannelAffine, index: GraphIndex
    ) -> Rewrite | None:
        for matmul_slot in (0, 1):
            matmul = index.producers.get(add.input[matmul_slot])
            if matmul is not None and matmul.op_type == "MatMul" and matmul.domain in ("", "ai.onnx"):
                break
        else:
            return None
        bias_slot = 1 - matmul_slot
        if not index.constants.is_constant(add.input[bias_slot]):
            return None
        exclusive_producer(index, bn.input[0], bn)
        exclusive_producer(index, add.input[matmul_slot], add)
        weight, dtype = self._weight(matmul, affine, index)
        bias = index.constants.value(add.input[bias_slot])
        out_rank = 2
        if bias.ndim > out_rank or any(d != 1 for d in bias.shape[:-1]) or (
            bias.ndim and bias.shape[-1] not in (1, affine.channels)
        ):
            raise FoldRefused(
                "bias_not_per_channel", f"Add constant of shape {bias.shape} does not broadcast per feature"
            )
        if bias.dtype != dtype:
            raise FoldRefused("dtype_mismatch", f"Add constant dtype {bias.dtype} differs from {dtype}")
        new_bias = affine.apply(np.broadcast_to(bias.astype(np.float64).reshape(-1), (affine.channels,)))
        return Rewrite(
            self.name,
            matmul,
            [
                TensorUpdate(matmul, 1, scale_weight(weight, affine.scale, axis=1), dtype, "weight"),
                TensorUpdate(add, bias_slot, new_bias, dtype, "bias"),
            ],
            tail=add,
        )

    def _weight(self, matmul: NodeProto, affine: ChannelAffine, index: GraphIndex) -> tuple[np.ndarray, np.dtype]:
        weight = constant(index, matmul, 1, "weight")
        dtype = float_dtype(weight, "weight")
        if weight.ndim != 2:
            raise FoldRefused("matmul_rank", f"MatMul weight has rank {weight.ndim}; only 2-D folds here")
        input_type = index.value_type(matmul.input[0])
        if input_type is None or input_type.rank != 2:
            rank = "unknown" if input_type is None or input_type.rank is None else input_type.rank
            raise FoldRefused(
                "matmul_rank", f"MatMul input rank is {rank}; only in 2-D is the BN channel axis the feature axis"
            )
        _check_channels(affine, weight.shape[1], index.node_label(matmul))
        return weight, dtype


FORWARD_PATTERNS = (ConvBn(), ConvTransposeBn(), GemmBn(), MatMulBn())
