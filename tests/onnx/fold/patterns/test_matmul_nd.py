"""N-D MatMul -> Transpose/Reshape -> BN: folds into the MatMul weight and a bias Add, never into a Gemm."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from bnfold import fold_onnx
from tests.support.graphs import GraphBuilder, assert_equivalent, count_ops


def fold(model: onnx.ModelProto, **options):
    return fold_onnx(model, verify=False, **options)


def only_record(result):
    (record,) = result.report.records
    return record


def matmul_mapped_bn(input_shape: list[int], mapper: str, bias: bool, *, perm: list[int] | None = None,
                     target: list[int] | None = None, features: int = 4, bn_channels: int | None = None,
                     dtype=np.float32, param_dtype=None, seed: int = 0) -> onnx.ModelProto:
    g = GraphBuilder(seed, dtype, opset=15)
    x = g.input("x", input_shape)
    y = g.node("MatMul", [x, g.weight([input_shape[-1], features])], name="matmul")
    if bias:
        y = g.node("Add", [y, g.weight([features])], name="bias")
    if mapper == "Transpose":
        y = g.node("Transpose", [y], perm=perm)
    else:
        y = g.node("Reshape", [y, g.const(np.array(target), dtype=np.int64)])
    return g.model([g.bn(y, bn_channels or features, param_dtype=param_dtype)])


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize(
    ("input_shape", "perm"),
    [([2, 3, 5], [0, 2, 1]), ([2, 3, 3, 5], [0, 3, 1, 2]), ([3, 2, 5], [1, 2, 0])],
    ids=["ntc-to-nct", "nhwc-to-nchw", "tnc-to-nct"],
)
def test_transpose_that_brings_the_features_to_axis_1_folds(bias, input_shape, perm):
    model = matmul_mapped_bn(input_shape, "Transpose", bias, perm=perm)
    result = fold(model)
    assert count_ops(result.model) == 0
    assert count_ops(result.model, "Gemm") == 0 and count_ops(result.model, "MatMul") == 1
    assert count_ops(result.model, "Add") == 1
    assert (only_record(result).pattern, only_record(result).into) == ("matmul-nd-bn", "matmul")
    assert_equivalent(model, result.model)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize(("input_shape", "target"), [([2, 3, 5], [6, 4]), ([2, 3, 5], [-1, 4]), ([3, 5], [3, 2, 2, 1])],
                         ids=["merge-rows", "inferred-rows", "split-features"])
def test_reshape_that_keeps_channel_blocks_folds(bias, input_shape, target):
    channels = target[1]
    model = matmul_mapped_bn(input_shape, "Reshape", bias, target=target, bn_channels=channels)
    result = fold(model)
    assert count_ops(result.model) == 0 and count_ops(result.model, "Gemm") == 0
    assert_equivalent(model, result.model)


def test_transpose_that_leaves_another_axis_on_axis_1_is_left():
    model = matmul_mapped_bn([2, 3, 5], "Transpose", True, perm=[2, 1, 0], features=3)
    record = only_record(fold(model))
    assert (record.status, record.reason) == ("left", "channel_axis")


def test_reshape_that_splits_the_features_across_axes_is_left():
    # (2, 3, 4) -> (2, 4, 3): axis 1 now indexes rows of a re-cut tensor, not the 4 features.
    model = matmul_mapped_bn([2, 3, 5], "Reshape", False, target=[2, 4, 3])
    record = only_record(fold(model))
    assert (record.status, record.reason) == ("left", "reshape_mixes_channels")


def test_nd_matmul_straight_into_a_bn_is_left():
    g = GraphBuilder()
    y = g.node("MatMul", [g.input("x", [2, 4, 5]), g.weight([5, 4])])
    record = only_record(fold(g.model([g.bn(y, 4)])))
    assert (record.status, record.reason) == ("left", "matmul_rank")


def test_matmul_output_read_elsewhere_is_left():
    g = GraphBuilder()
    y = g.node("MatMul", [g.input("x", [2, 3, 5]), g.weight([5, 4])])
    model = g.model([g.bn(g.node("Transpose", [y], perm=[0, 2, 1]), 4), g.node("Relu", [y])])
    assert only_record(fold(model)).reason == "input_fan_out"


def test_skipping_matmul_nd_bn_leaves_it():
    model = matmul_mapped_bn([2, 3, 5], "Transpose", True, perm=[0, 2, 1])
    record = only_record(fold(model, skip=["matmul-nd-bn"]))
    assert (record.status, record.reason) == ("left", "pattern_disabled")


@pytest.mark.parametrize("bias", [True, False])
def test_mixed_precision_nd_matmul_folds_into_fp16(bias):
    model = matmul_mapped_bn([2, 3, 5], "Transpose", bias, perm=[0, 2, 1], dtype=np.float16,
                             param_dtype=np.float32)
    result = fold(model)
    assert count_ops(result.model) == 0
    onnx.checker.check_model(result.model, full_check=True)
    assert {numpy_helper.to_array(t).dtype for t in result.model.graph.initializer} == {np.dtype(np.float16)}
    assert_equivalent(model, result.model, rtol=2e-2)
