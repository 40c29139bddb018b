"""Leave-alone rules: a BN that cannot be proven safe to fold stays, with a reason code."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

from bnfold import fold_onnx
from tests.support.graphs import GraphBuilder, assert_equivalent, count_ops


def fold(model, **options):
    return fold_onnx(model, verify=False, **options)


def conv_graph(g: GraphBuilder, channels: int = 4) -> str:
    x = g.input("x", [1, 3, 6, 6])
    return g.node("Conv", [x, g.weight([channels, 3, 3, 3])], name="conv")


def only_record(model, **options):
    report = fold(model, **options).report
    assert len(report.records) == 1
    return report.records[0]


def test_bn_parameters_from_a_graph_input_are_not_constant():
    g = GraphBuilder()
    y = conv_graph(g)
    gamma = g.input("gamma", [4])
    _, beta, mean, var = g.bn_params(4)
    model = g.model([g.node("BatchNormalization", [y, gamma, beta, mean, var])])
    record = only_record(model)
    assert (record.status, record.reason) == ("left", "non_constant_params")


def test_initializer_listed_as_graph_input_is_overridable_unless_allowed():
    g = GraphBuilder()
    y = conv_graph(g)
    params = g.bn_params(4)
    g.inputs.append(helper.make_tensor_value_info(params[2], onnx.TensorProto.FLOAT, [4]))
    model = g.model([g.node("BatchNormalization", [y, *params])])
    assert only_record(model).reason == "overridable_params"
    result = fold(model, allow_overridable=True)
    assert count_ops(result.model) == 0
    assert params[2] in {i.name for i in result.model.graph.input}, "graph inputs are preserved"


def test_training_mode_bn_is_left():
    g = GraphBuilder(opset=15)
    y = conv_graph(g)
    outputs = g.node("BatchNormalization", [y, *g.bn_params(4)], n_outputs=3, training_mode=1)
    model = g.model(outputs, output_shapes=[[1, 4, 4, 4], [4], [4]])
    record = only_record(model)
    assert (record.reason, "training_mode=1" in record.message) == ("training_mode", True)


def test_opset_9_bn_with_statistics_outputs_is_left():
    g = GraphBuilder(opset=9)
    y = conv_graph(g)
    outputs = g.node("BatchNormalization", [y, *g.bn_params(4)], n_outputs=5)
    model = g.model(outputs, output_shapes=[[1, 4, 4, 4], [4], [4], [4], [4]])
    assert only_record(model).reason == "training_mode"


def test_spatial_zero_bn_of_opset_8_is_left():
    g = GraphBuilder(opset=8)
    y = conv_graph(g)
    channels_by_position = 4 * 4 * 4
    params = [g.const(np.random.default_rng(0).uniform(0.5, 2, channels_by_position).reshape(4, 4, 4))
              for _ in range(4)]
    model = g.model([g.node("BatchNormalization", [y, *params], spatial=0)])
    assert only_record(model).reason == "spatial_0"


@pytest.mark.parametrize("opset", [7, 9, 14, 15, 21])
def test_bn_of_every_supported_opset_folds(opset):
    g = GraphBuilder(opset=opset)
    model = g.model([g.bn(conv_graph(g), 4)])
    result = fold(model)
    assert count_ops(result.model) == 0
    assert_equivalent(model, result.model)


def test_layer_output_with_another_reader_is_left():
    g = GraphBuilder()
    y = conv_graph(g)
    model = g.model([g.bn(y, 4), g.node("Relu", [y])])
    record = only_record(model)
    assert (record.status, record.reason) == ("left", "input_fan_out")


def test_layer_output_that_is_a_graph_output_is_left():
    g = GraphBuilder()
    y = conv_graph(g)
    model = g.model([g.bn(y, 4), y])
    assert only_record(model).reason == "input_graph_output"


def test_bn_on_a_graph_input_has_no_linear_neighbour():
    g = GraphBuilder()
    x = g.input("x", [1, 4, 5, 5])
    model = g.model([g.bn(g.node("Relu", [x]), 4)])
    record = only_record(model)
    assert record.reason == "no_linear_neighbour"
    assert "Relu" in record.message


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda p: p.__setitem__(3, np.where(np.arange(4) == 1, -2.0, p[3])), "nonpositive_variance"),
        (lambda p: p.__setitem__(0, np.where(np.arange(4) == 2, np.nan, p[0])), "non_finite_params"),
        (lambda p: p.__setitem__(2, np.where(np.arange(4) == 0, np.inf, p[2])), "non_finite_params"),
    ],
    ids=["negative-variance", "nan-gamma", "inf-mean"],
)
def test_bad_statistics_are_left(mutate, reason):
    g = GraphBuilder()
    y = conv_graph(g)
    rng = np.random.default_rng(3)
    params = [rng.uniform(0.5, 1.5, 4), rng.normal(size=4), rng.normal(size=4), rng.uniform(0.5, 2, 4)]
    mutate(params)
    model = g.model([g.node("BatchNormalization", [y, *(g.const(p) for p in params)])])
    assert only_record(model).reason == reason


def test_fp16_fold_that_would_overflow_is_left():
    g = GraphBuilder(dtype=np.float16)
    x = g.input("x", [1, 3, 6, 6])
    y = g.node("Conv", [x, g.const(np.full((4, 3, 1, 1), 60000.0))])
    gamma, beta, mean, _ = g.bn_params(4)
    var = g.const(np.full(4, 1e-3))
    model = g.model([g.node("BatchNormalization", [y, gamma, beta, mean, var], epsilon=1e-5)])
    record = only_record(model)
    assert (record.status, record.reason) == ("left", "cast_overflow")


def test_shared_weight_is_cloned_not_mutated():
    g = GraphBuilder()
    x = g.input("x", [1, 3, 6, 6])
    weight = g.weight([4, 3, 3, 3], name="shared_w")
    first = g.bn(g.node("Conv", [x, weight]), 4)
    second = g.node("Conv", [x, weight])
    model = g.model([first, second])
    result = fold(model)
    assert count_ops(result.model) == 0
    initializers = {t.name: t for t in result.model.graph.initializer}
    original = {t.name: t for t in model.graph.initializer}["shared_w"]
    assert initializers["shared_w"] == original, "the weight the unfolded conv reads is untouched"
    assert_equivalent(model, result.model)


def test_two_bns_after_convs_sharing_a_weight_each_get_their_own_copy():
    g = GraphBuilder()
    x = g.input("x", [1, 3, 6, 6])
    weight = g.weight([4, 3, 3, 3], name="shared_w")
    outputs = [g.bn(g.node("Conv", [x, weight]), 4) for _ in range(2)]
    model = g.model(outputs)
    result = fold(model)
    assert count_ops(result.model) == 0
    conv_weights = [n.input[1] for n in result.model.graph.node if n.op_type == "Conv"]
    assert len(set(conv_weights)) == 2
    assert_equivalent(model, result.model)


def test_model_metadata_names_and_value_info_are_preserved():
    g = GraphBuilder()
    y = conv_graph(g)
    bn_out = g.bn(y, 4, name="bn")
    model = g.model([g.node("Relu", [bn_out])])
    model.doc_string = "my model"
    model.graph.doc_string = "my graph"
    model.producer_name = "tests"
    onnx.helper.set_model_props(model, {"author": "me"})
    model.graph.value_info.append(helper.make_tensor_value_info(bn_out, onnx.TensorProto.FLOAT, [1, 4, 4, 4]))
    model.graph.value_info.append(helper.make_tensor_value_info(y, onnx.TensorProto.FLOAT, [1, 4, 4, 4]))
    result = fold(model)
    folded = result.model
    assert count_ops(folded) == 0
    assert [i.name for i in folded.graph.input] == [i.name for i in model.graph.input]
    assert [o.name for o in folded.graph.output] == [o.name for o in model.graph.output]
    assert (folded.doc_string, folded.graph.doc_string, folded.producer_name) == ("my model", "my graph", "tests")
    assert {p.key: p.value for p in folded.metadata_props} == {"author": "me"}
    assert list(folded.opset_import) == list(model.opset_import)
    assert [v.name for v in folded.graph.value_info] == [bn_out], "the vanished conv output's info is dropped"
    assert {t.name for t in folded.graph.initializer} <= {t.name for t in model.graph.initializer} | {
        n.input[2] for n in folded.graph.node if n.op_type == "Conv"
    }
    onnx.checker.check_model(folded, full_check=True)


def test_folding_twice_changes_nothing_the_second_time():
    g = GraphBuilder()
    y = conv_graph(g)
    relu = g.node("Relu", [g.bn(y, 4)])
    model = g.model([g.bn(relu, 4)])
    once = fold(model).model
    twice = fold(once).model
    assert once.SerializeToString() == twice.SerializeToString()


def test_input_model_object_is_not_modified():
    g = GraphBuilder()
    model = g.model([g.bn(conv_graph(g), 4)])
    before = model.SerializeToString()
    fold(model)
    assert model.SerializeToString() == before
