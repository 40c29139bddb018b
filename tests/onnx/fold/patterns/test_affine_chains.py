"""Affine chains: runs of per-channel Mul/Add/Sub/Div by constants (with or without BNs) fold as one map."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import numpy_helper

from bnfold import fold_onnx
from tests.support.graphs import GraphBuilder, assert_equivalent, count_ops, node_kinds

ELEMENTWISE = ("Mul", "Add", "Sub", "Div")


def fold(model: onnx.ModelProto, **options):
    return fold_onnx(model, verify=False, **options)


def elementwise_count(model: onnx.ModelProto) -> int:
    return sum(count_ops(model, op) for op in ELEMENTWISE)


def chain(g: GraphBuilder, x: str, steps: list[tuple[str, tuple[int, ...], bool]]) -> str:
    """``(op, constant shape, constant first)`` steps; Div constants stay away from zero."""
    for op, shape, constant_first in steps:
        values = g.rng.uniform(0.5, 1.5, shape) * g.rng.choice([-1.0, 1.0], shape)
        constant = g.const(values)
        x = g.node(op, [constant, x] if constant_first else [x, constant])
    return x


def conv_chain_model(steps, channels: int = 4, width: int = 6, pads: int = 1, seed: int = 0,
                     dtype=np.float32) -> onnx.ModelProto:
    g = GraphBuilder(seed, dtype)
    x = g.input("x", [2, 3, 5, width])
    y = g.node("Conv", [x, g.weight([channels, 3, 3, 3])], pads=[pads] * 4, name="conv")
    return g.model([chain(g, y, steps)])


@pytest.mark.parametrize(
    "steps",
    [
        [("Mul", (1, 4, 1, 1), False), ("Add", (4, 1, 1), False)],
        [("Mul", (4, 1, 1), True), ("Add", (1, 4, 1, 1), True)],
        [("Sub", (1, 4, 1, 1), False), ("Div", (4, 1, 1), False)],
        [("Sub", (4, 1, 1), True)],
        [("Mul", (), False), ("Add", (1,), True), ("Div", (1, 1, 1, 1), False)],
    ],
    ids=["mul-add", "commuted", "sub-div", "constant-minus-x", "scalars"],
)
def test_per_channel_chain_after_conv_folds_into_it(steps):
    model = conv_chain_model(steps)
    result = fold(model)
    assert [n.op_type for n in result.model.graph.node] == ["Conv"]
    records = result.report.records
    assert [r.op_type for r in records] == [op for op, _, _ in steps]
    assert {(r.status, r.pattern, r.into) for r in records} == {("folded", "affine-chain", "conv")}
    assert_equivalent(model, result.model)


def test_a_c_shaped_constant_against_nchw_broadcasts_over_width_and_is_left():
    # onnxslim's bug: (C,) against NCHW with W == C scales columns, not channels.
    model = conv_chain_model([("Mul", (4,), False), ("Add", (4,), True)], channels=4, width=4)
    result = fold(model)
    assert elementwise_count(result.model) == 2
    assert result.report.records == []
    assert_equivalent(model, result.model)


@pytest.mark.parametrize("shape", [(1, 4, 5, 6), (4, 5, 1), (1, 1, 5, 1), (1, 1, 1, 1, 1)], ids=str)
def test_constants_that_are_not_per_channel_are_left(shape):
    model = conv_chain_model([("Add", shape, False)])
    result = fold(model)
    assert elementwise_count(result.model) == 1
    assert_equivalent(model, result.model)


def test_a_bn_after_a_non_per_channel_add_is_left_with_the_reason():
    g = GraphBuilder()
    x = g.input("x", [1, 3, 5, 4])
    y = g.node("Conv", [x, g.weight([4, 3, 3, 3])], pads=[1, 1, 1, 1])
    model = g.model([g.bn(chain(g, y, [("Add", (4,), False)]), 4)])
    (record,) = fold(model).report.records
    assert (record.status, record.reason) == ("left", "bias_not_per_channel")
    assert "axis 3" in record.message


def test_decomposed_batchnorm_folds_into_the_conv():
    # A converter's BN: Sub mean, Div sqrt(var + eps) (computed by constant nodes), Mul gamma, Add beta.
    g = GraphBuilder(2)
    x = g.input("x", [1, 3, 6, 6])
    y = g.node("Conv", [x, g.weight([4, 3, 3, 3])], name="conv")
    shape = (1, 4, 1, 1)
    mean, var, gamma, beta = (g.const(g.rng.uniform(0.5, 2.0, shape)) for _ in range(4))
    std = g.node("Sqrt", [g.node("Add", [var, g.const(np.array(1e-5))])])
    y = g.node("Sub", [y, mean])
    y = g.node("Div", [y, std])
    y = g.node("Mul", [y, gamma])
    model = g.model([g.node("Add", [y, beta])])
    result = fold(model)
    assert [n.op_type for n in result.model.graph.node] == ["Conv"]
    assert [r.op_type for r in result.report.folded] == ["Sub", "Div", "Mul", "Add"]
    assert_equivalent(model, result.model)


def test_chain_with_batchnorms_inside_folds_as_one_and_records_the_batchnorms():
    g = GraphBuilder(4)
    x = g.input("x", [1, 3, 6, 6])
    y = g.node("Conv", [x, g.weight([4, 3, 3, 3])], name="conv")
    y = g.bn(chain(g, y, [("Mul", (4, 1, 1), True)]), 4, name="bn_a")
    y = g.bn(chain(g, y, [("Add", (1, 4, 1, 1), False)]), 4, name="bn_b")
    model = g.model([y])
    result = fold(model)
    assert [n.op_type for n in result.model.graph.node] == ["Conv"]
    assert [(r.bn, r.pattern, r.into) for r in result.report.records] == [
        ("bn_a", "conv-bn", "conv"), ("bn_b", "conv-bn", "conv")]
    assert "together with mul" in result.report.records[0].message
    assert_equivalent(model, result.model)


def test_skipping_affine_chain_folds_only_the_batchnorms():
    g = GraphBuilder(4)
    x = g.input("x", [1, 3, 6, 6])
    y = g.node("Conv", [x, g.weight([4, 3, 3, 3])])
    model = g.model([chain(g, g.bn(y, 4), [("Mul", (4, 1, 1), False)])])
    result = fold(model, skip=["affine-chain"])
    assert [n.op_type for n in result.model.graph.node] == ["Conv", "Mul"]
    assert [r.op_type for r in result.report.records] == ["BatchNormalization"]
    assert_equivalent(model, result.model)


@pytest.mark.parametrize("pads", [0, 1])
def test_chain_before_a_conv_folds_backward(pads):
    g = GraphBuilder(6)
    x = g.input("x", [1, 3, 6, 6])
    y = chain(g, g.node("Relu", [x]), [("Mul", (3, 1, 1), False), ("Sub", (1, 3, 1, 1), True)])
    model = g.model([g.node("Conv", [y, g.weight([4, 3, 3, 3]), g.weight([4])], pads=[pads] * 4, name="conv")])
    result = fold(model)
    remainder = ["Shift"] if pads else []
    assert node_kinds(result.model) == ["Relu", *remainder, "Conv"]
    assert {r.into for r in result.report.records} == {"conv"}
    assert_equivalent(model, result.model)


def test_a_lone_add_before_a_padded_conv_stays_as_it_is():
    g = GraphBuilder()
    x = g.input("x", [1, 3, 6, 6])
    y = chain(g, g.node("Relu", [x]), [("Add", (3, 1, 1), False)])
    model = g.model([g.node("Conv", [y, g.weight([4, 3, 3, 3])], pads=[1, 1, 1, 1])])
    result = fold(model)
    assert result.report.records == []
    assert result.model.SerializeToString() == fold(result.model).model.SerializeToString()


def test_chain_with_nothing_to_fold_into_stays():
    g = GraphBuilder()
    x = g.input("x", [1, 3, 6, 6])
    model = g.model([g.node("Relu", [chain(g, g.node("Relu", [x]), [("Mul", (3, 1, 1), False),
                                                                       ("Add", (3, 1, 1), False)])])])
    result = fold(model)
    assert elementwise_count(result.model) == 2 and result.report.records == []


@pytest.mark.parametrize("input_shape", [[3, 5], [2, 3, 5], [2, 2, 3, 5]], ids=["2d", "3d", "4d"])
def test_last_axis_chain_after_a_matmul_of_any_rank_folds(input_shape):
    g = GraphBuilder(7)
    y = g.node("MatMul", [g.input("x", input_shape), g.weight([5, 4])])
    model = g.model([chain(g, y, [("Add", (4,), False), ("Mul", (1, 4), True), ("Sub", (4,), False)])])
    result = fold(model)
    assert count_ops(result.model, "MatMul") == 1 and count_ops(result.model, "Gemm") == 0
    assert elementwise_count(result.model) == 1, "one Add holds the folded shift"
    assert_equivalent(model, result.model)


def test_gemm_chain_folds_into_its_bias():
    g = GraphBuilder(8)
    x = g.input("x", [3, 5])
    y = g.node("Gemm", [x, g.weight([4, 5]), g.weight([4])], transB=1, beta=0.5)
    model = g.model([chain(g, y, [("Mul", (4,), True), ("Add", (1, 4), False)])])
    result = fold(model)
    assert [n.op_type for n in result.model.graph.node] == ["Gemm"]
    assert_equivalent(model, result.model)


def test_division_by_a_constant_with_a_zero_is_left():
    g = GraphBuilder()
    x = g.input("x", [1, 3, 6, 6])
    y = g.node("Conv", [x, g.weight([4, 3, 3, 3])])
    model = g.model([g.node("Div", [y, g.const(np.array([1.0, 0.0, 2.0, 3.0]).reshape(4, 1, 1))])])
    result = fold(model)
    assert count_ops(result.model, "Div") == 1 and result.report.records == []


def test_constant_divided_by_the_tensor_is_not_affine_and_is_left():
    g = GraphBuilder()
    x = g.input("x", [1, 3, 6, 6])
    y = g.node("Conv", [x, g.weight([4, 3, 3, 3])])
    model = g.model([g.node("Div", [g.const(np.full((4, 1, 1), 2.0)), y])])
    result = fold(model)
    assert count_ops(result.model, "Div") == 1 and result.report.records == []


def test_mixed_precision_chain_folds_into_the_fp16_layer():
    model = conv_chain_model([("Mul", (4, 1, 1), False), ("Add", (4, 1, 1), True)], dtype=np.float16)
    result = fold(model)
    assert [n.op_type for n in result.model.graph.node] == ["Conv"]
    assert {numpy_helper.to_array(t).dtype for t in result.model.graph.initializer} == {np.dtype(np.float16)}
    onnx.checker.check_model(result.model, full_check=True)
    assert_equivalent(model, result.model, rtol=2e-2)


# Every shape broadcasts against the (2, 4, 5, 4) conv output; only those with 4 on axis 1 are per-channel.
_SHAPES_AGAINST_NCHW = st.sampled_from(
    [(), (1,), (4,), (1, 1), (4, 1, 1), (1, 4, 1, 1), (1, 4), (5, 1), (5, 4), (4, 1, 4), (4, 5, 4), (1, 4, 5, 1),
     (2, 1, 1, 1), (2, 4, 1, 1), (1, 1, 1, 4)]
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    steps=st.lists(st.tuples(st.sampled_from(ELEMENTWISE), _SHAPES_AGAINST_NCHW, st.booleans()), min_size=1,
                   max_size=4),
    seed=st.integers(0, 2**16),
)
def test_random_chains_fold_exactly_the_per_channel_prefix(steps, seed):
    steps = [(op, shape, first and op != "Div") for op, shape, first in steps]
    g = GraphBuilder(seed)
    x = g.input("x", [2, 3, 5, 4])
    y = g.node("Conv", [x, g.weight([4, 3, 3, 3])], pads=[1, 1, 1, 1])
    model = g.model([chain(g, y, steps)])
    result = fold(model)
    per_channel = [all(d == 1 or (len(shape) - i == 3 and d == 4) for i, d in enumerate(shape))
                   for _, shape, _ in steps]
    foldable = next((i for i, ok in enumerate(per_channel) if not ok), len(steps))
    assert elementwise_count(result.model) == len(steps) - foldable
    assert len(result.report.records) == foldable
    assert_equivalent(model, result.model, seed=seed)


def test_integer_elementwise_nodes_are_not_touched():
    g = GraphBuilder()
    shape = g.input("s", [4], elem_type=onnx.TensorProto.INT64)
    model = g.model([g.node("Mul", [shape, g.const(np.array(2), dtype=np.int64)])],
                    output_types=[onnx.TensorProto.INT64])
    result = fold(model)
    assert result.report.records == [] and count_ops(result.model, "Mul") == 1
    assert result.model.SerializeToString() == model.SerializeToString()
