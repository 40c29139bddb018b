"""Forward folds (BN right after Conv / ConvTranspose / Gemm / MatMul): every form folds exactly."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bnfold import fold_onnx
from tests.support.graphs import GraphBuilder, assert_equivalent, conv_forms, count_ops


def fold(model: onnx.ModelProto, **options):
    return fold_onnx(model, verify=False, **options)


def conv_bn_model(spatial: int, groups: int, c_in: int, c_out: int, kernel: int, stride: int, dilation: int,
                  bias: bool, seed: int = 0, dtype=np.float32) -> onnx.ModelProto:
    g = GraphBuilder(seed, dtype)
    size = 9
    x = g.input("x", [1, c_in] + [size] * spatial)
    inputs = [x, g.weight([c_out, c_in // groups] + [kernel] * spatial)]
    if bias:
        inputs.append(g.weight([c_out]))
    y = g.node("Conv", inputs, group=groups, strides=[stride] * spatial, dilations=[dilation] * spatial,
               pads=[1] * (2 * spatial))
    return g.model([g.bn(y, c_out)])


@pytest.mark.parametrize("spatial", [1, 2, 3])
@pytest.mark.parametrize(("groups", "c_in", "c_out"), [(1, 3, 4), (2, 4, 6), (4, 4, 4), (4, 4, 8)])
@pytest.mark.parametrize("bias", [True, False])
def test_conv_bn_folds_for_every_conv_form(spatial, groups, c_in, c_out, bias):
    model = conv_bn_model(spatial, groups, c_in, c_out, kernel=3, stride=2, dilation=1 + (spatial == 2), bias=bias)
    result = fold(model)
    assert count_ops(result.model) == 0
    assert result.report.folded[0].pattern == "conv-bn"
    assert_equivalent(model, result.model)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(form=conv_forms())
def test_conv_bn_fold_is_exact_for_random_attributes(form):
    model = conv_bn_model(**form)
    result = fold(model)
    assert count_ops(result.model) == 0
    assert_equivalent(model, result.model, seed=form["seed"])


def convtranspose_bn_model(groups: int, c_in: int, c_out: int, bias: bool, stride: int = 2, seed: int = 0,
                           spatial: int = 2) -> onnx.ModelProto:
    g = GraphBuilder(seed)
    x = g.input("x", [1, c_in] + [5] * spatial)
    inputs = [x, g.weight([c_in, c_out // groups] + [3] * spatial)]
    if bias:
        inputs.append(g.weight([c_out]))
    y = g.node("ConvTranspose", inputs, group=groups, strides=[stride] * spatial)
    return g.model([g.bn(y, c_out)])


@pytest.mark.parametrize(
    ("groups", "c_in", "c_out"),
    [(1, 4, 6), (2, 4, 6), (4, 4, 4), (4, 4, 8), (2, 6, 4), (3, 3, 3)],
    ids=["plain", "grouped", "depthwise", "channel-multiplier", "grouped-shrinking", "depthwise-3"],
)
@pytest.mark.parametrize("bias", [True, False])
def test_convtranspose_bn_scales_output_channels_per_group(groups, c_in, c_out, bias):
    # The anchor bug (pytorch#180995, onnxscript#2879): scaling axis 0 or ignoring groups.
    model = convtranspose_bn_model(groups, c_in, c_out, bias)
    result = fold(model)
    assert count_ops(result.model) == 0
    assert result.report.folded[0].pattern == "convtranspose-bn"
    assert_equivalent(model, result.model)


@pytest.mark.parametrize("spatial", [1, 3])
def test_convtranspose_bn_folds_in_1d_and_3d(spatial):
    model = convtranspose_bn_model(2, 4, 6, True, spatial=spatial)
    result = fold(model)
    assert count_ops(result.model) == 0
    assert_equivalent(model, result.model)


def gemm_bn_model(trans_a: int, trans_b: int, alpha: float, beta: float, c_shape: tuple[int, ...] | None,
                  seed: int = 0) -> onnx.ModelProto:
    g = GraphBuilder(seed)
    m, k, n = 3, 5, 4
    x = g.input("x", [k, m] if trans_a else [m, k])
    inputs = [x, g.weight([n, k] if trans_b else [k, n])]
    if c_shape is not None:
        inputs.append(g.weight(c_shape))
    y = g.node("Gemm", inputs, transA=trans_a, transB=trans_b, alpha=alpha, beta=beta)
    return g.model([g.bn(y, n)])


@pytest.mark.parametrize("trans_a", [0, 1])
@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize(("alpha", "beta"), [(1.0, 1.0), (0.7, 2.5)])
@pytest.mark.parametrize("c_shape", [None, (4,), (1, 4), (3, 4), (3, 1), ()], ids=str)
def test_gemm_bn_honours_every_attribute(trans_a, trans_b, alpha, beta, c_shape):
    # onnxscript#3027: a Gemm with beta != 1 was folded wrongly; every attribute must keep its meaning.
    model = gemm_bn_model(trans_a, trans_b, alpha, beta, c_shape)
    result = fold(model)
    assert count_ops(result.model) == 0
    assert result.report.folded[0].pattern == "gemm-bn"
    assert_equivalent(model, result.model)


def matmul_model(input_shape, bias_shape=None, bias_first=False, seed=0) -> onnx.ModelProto:
    g = GraphBuilder(seed)
    n = 4
    x = g.input("x", input_shape)
    y = g.node("MatMul", [x, g.weight([input_shape[-1], n])])
    if bias_shape is not None:
        bias = g.weight(bias_shape)
        y = g.node("Add", [bias, y] if bias_first else [y, bias])
    return g.model([g.bn(y, n)])


@pytest.mark.parametrize("bias_shape", [None, (4,), (1, 4), (1,), ()], ids=str)
@pytest.mark.parametrize("bias_first", [False, True])
def test_matmul_bn_folds_in_2d_with_or_without_bias(bias_shape, bias_first):
    model = matmul_model([3, 5], bias_shape, bias_first)
    result = fold(model)
    assert count_ops(result.model) == 0
    assert result.report.folded[0].pattern == "matmul-bn"
    assert count_ops(result.model, "MatMul") == 1
    assert count_ops(result.model, "Add") == 1
    assert_equivalent(model, result.model)


def test_matmul_bn_refuses_a_per_element_bias():
    model = matmul_model([3, 5], bias_shape=(3, 4))
    record = fold(model).report.records[0]
    assert (record.status, record.reason) == ("left", "bias_not_per_channel")


def test_matmul_bn_never_folds_by_size_coincidence():
    # Input (N, C, L) with L == C: the BN channel axis is 1, the MatMul feature axis is 2.
    g = GraphBuilder()
    x = g.input("x", [2, 4, 5])
    y = g.node("MatMul", [x, g.weight([5, 4])])
    model = g.model([g.bn(y, 4)])
    record = fold(model).report.records[0]
    assert (record.status, record.reason) == ("left", "matmul_rank")


def test_conv_bn_bn_chain_folds_both():
    g = GraphBuilder()
    x = g.input("x", [1, 3, 8, 8])
    y = g.node("Conv", [x, g.weight([5, 3, 3, 3])], pads=[1, 1, 1, 1])
    model = g.model([g.bn(g.bn(y, 5), 5)])
    result = fold(model)
    assert count_ops(result.model) == 0
    assert [r.into for r in result.report.folded] == [result.model.graph.node[0].name] * 2
    assert_equivalent(model, result.model)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    trans_a=st.integers(0, 1),
    trans_b=st.integers(0, 1),
    alpha=st.floats(-2, 2).filter(lambda v: abs(v) > 0.1),
    beta=st.floats(-2, 2),
    c_shape=st.sampled_from([None, (4,), (1, 4), (3, 4), (3, 1), ()]),
    dtype=st.sampled_from([np.float32, np.float16, np.float64]),
    seed=st.integers(0, 2**16),
)
def test_gemm_bn_fold_is_exact_for_random_attributes_and_dtypes(trans_a, trans_b, alpha, beta, c_shape, dtype, seed):
    g = GraphBuilder(seed, dtype)
    x = g.input("x", [5, 3] if trans_a else [3, 5])
    inputs = [x, g.weight([4, 5] if trans_b else [5, 4])]
    if c_shape is not None:
        inputs.append(g.weight(c_shape))
    model = g.model([g.bn(g.node("Gemm", inputs, transA=trans_a, transB=trans_b, alpha=alpha, beta=beta), 4)])
    result = fold(model)
    assert count_ops(result.model) == 0
    tolerance = {np.float16: 2e-2, np.float32: 1e-4, np.float64: 1e-9}[dtype]
    assert_equivalent(model, result.model, rtol=tolerance, seed=seed, reference=dtype == np.float64)
