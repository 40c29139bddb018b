"""Constants come in more forms than initializers; folds go through all of them."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from bnfold import fold_onnx
from tests.support.graphs import GraphBuilder, assert_equivalent, count_ops


def fold(model, **options):
    return fold_onnx(model, verify=False, **options)


def constant_node(g: GraphBuilder, array: np.ndarray) -> str:
    return g.node("Constant", [], value=numpy_helper.from_array(np.asarray(array, dtype=np.float32)))


def test_bn_parameters_and_weights_in_constant_nodes_fold():
    g = GraphBuilder()
    rng = g.rng
    x = g.input("x", [1, 3, 6, 6])
    weight = constant_node(g, rng.normal(size=(4, 3, 3, 3)))
    y = g.node("Conv", [x, weight])
    params = [constant_node(g, rng.uniform(0.5, 1.5, 4)), constant_node(g, rng.normal(size=4)),
              constant_node(g, rng.normal(size=4)), constant_node(g, rng.uniform(0.5, 2, 4))]
    model = g.model([g.node("BatchNormalization", [y, *params])])
    result = fold(model)
    assert count_ops(result.model) == 0
    assert count_ops(result.model, "Constant") == 0, "constants the fold consumed are removed"
    assert_equivalent(model, result.model)


def test_scalar_constant_node_forms_are_read():
    g = GraphBuilder()
    x = g.input("x", [1, 1, 4, 4])
    y = g.node("Conv", [x, g.weight([1, 1, 1, 1])])
    gamma = g.node("Constant", [], value_floats=[1.5])
    beta = g.node("Constant", [], value_floats=[-0.25])
    mean = g.node("Constant", [], value_floats=[0.3])
    var = g.node("Constant", [], value_floats=[0.7])
    model = g.model([g.node("BatchNormalization", [y, gamma, beta, mean, var])])
    result = fold(model)
    assert count_ops(result.model) == 0
    assert_equivalent(model, result.model)


def test_identity_of_a_constant_weight_folds():
    g = GraphBuilder()
    x = g.input("x", [1, 3, 6, 6])
    y = g.node("Conv", [x, g.node("Identity", [g.weight([4, 3, 3, 3])])])
    model = g.model([g.bn(y, 4)])
    result = fold(model)
    assert count_ops(result.model) == 0
    assert count_ops(result.model, "Identity") == 0
    assert_equivalent(model, result.model)


def dynamo_style_zero_bias(g: GraphBuilder, x: str, weight: str) -> str:
    """The bias torch's dynamo exporter (optimize=False) gives a bias-less conv."""
    zero = g.node("Constant", [], value=numpy_helper.from_array(np.array(0, dtype=np.int64)))
    like = g.node("CastLike", [zero, x])
    shape = g.node("Shape", [weight])
    channels = g.node("Slice", [shape, g.const(np.array([0]), dtype=np.int64), g.const(np.array([1]), dtype=np.int64)])
    return g.node("Expand", [like, channels])


def test_shape_only_bias_subgraph_folds():
    g = GraphBuilder()
    x = g.input("x", [1, 3, 6, 6])
    weight = g.weight([4, 3, 3, 3])
    y = g.node("Conv", [x, weight, dynamo_style_zero_bias(g, x, weight)])
    model = g.model([g.bn(y, 4)])
    result = fold(model)
    assert count_ops(result.model) == 0
    assert [n.op_type for n in result.model.graph.node] == ["Conv"], "the dead bias subgraph is gone"
    assert_equivalent(model, result.model)


def test_shape_of_a_dynamic_activation_is_not_constant():
    g = GraphBuilder()
    x = g.input("x", ["batch", 3, 6, 6])
    y = g.node("Conv", [x, g.weight([4, 3, 1, 1])])
    gamma = g.node("Cast", [g.node("Shape", [x], start=0, end=1)], to=onnx.TensorProto.FLOAT)
    expanded = g.node("Expand", [gamma, g.const(np.array([4]), dtype=np.int64)])
    _, beta, mean, var = g.bn_params(4)
    model = g.model([g.node("BatchNormalization", [y, expanded, beta, mean, var])])
    record = fold(model).report.records[0]
    assert (record.status, record.reason) == ("left", "non_constant_params")


@pytest.mark.parametrize("dtype", [np.float16, np.float64])
def test_float16_and_float64_models_fold(dtype):
    g = GraphBuilder(dtype=dtype)
    x = g.input("x", [1, 3, 6, 6])
    model = g.model([g.bn(g.node("Gemm", [g.node("Flatten", [x]), g.weight([108, 5])]), 5)])
    result = fold(model)
    assert count_ops(result.model) == 0
    weights = [t for t in result.model.graph.initializer if t.dims == [108, 5]]
    assert weights[0].data_type == helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    assert_equivalent(model, result.model, rtol=1e-2 if dtype == np.float16 else 1e-9,
                      reference=dtype == np.float64)


def test_bfloat16_conv_folds_and_matches_the_reference_evaluator():
    import ml_dtypes

    g = GraphBuilder(dtype=ml_dtypes.bfloat16, opset=22)  # Conv takes bfloat16 from opset 22
    x = g.input("x", [1, 3, 6, 6])
    model = g.model([g.bn(g.node("Conv", [x, g.weight([4, 3, 3, 3])]), 4)])
    result = fold(model)
    assert count_ops(result.model) == 0
    assert_equivalent(model, result.model, rtol=5e-2, reference=True)


def test_fp16_activations_with_fp32_bn_parameters_fold_into_an_fp16_weight():
    # BN-15 allows this mix; onnxslim and onnxscript write invalid models for it.
    g = GraphBuilder(dtype=np.float16, opset=15)
    x = g.input("x", [1, 3, 6, 6])
    y = g.node("Conv", [x, g.weight([4, 3, 3, 3])])
    model = g.model([g.bn(y, 4, param_dtype=np.float32)])
    result = fold(model)
    assert count_ops(result.model) == 0
    conv = result.model.graph.node[0]
    initializers = {t.name: t for t in result.model.graph.initializer}
    assert initializers[conv.input[1]].data_type == onnx.TensorProto.FLOAT16
    assert initializers[conv.input[2]].data_type == onnx.TensorProto.FLOAT16
    assert_equivalent(model, result.model, rtol=1e-2)


def test_fold_math_runs_in_float64_and_rounds_once():
    # Folding in fp16 rounds twice; an fp64 fold of the same parameters is at least as close to the truth.
    g = GraphBuilder(dtype=np.float16, seed=5)
    x = g.input("x", [1, 16, 6, 6])
    model = g.model([g.bn(g.node("Conv", [x, g.weight([32, 16, 3, 3])]), 32)])
    folded = fold(model).model
    initializers = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    conv, bn = model.graph.node
    gamma, beta, mean, var = (initializers[n].astype(np.float64) for n in bn.input[1:])
    exact = initializers[conv.input[1]].astype(np.float64) * (gamma / np.sqrt(var + 1e-5))[:, None, None, None]
    got = numpy_helper.to_array({t.name: t for t in folded.graph.initializer}[folded.graph.node[0].input[1]])
    np.testing.assert_array_equal(got, exact.astype(np.float16))
