"""Models as other tools and eras write them: IR-3 model-zoo networks (every initializer listed as a graph
input), legacy BatchNormalization (opset 6, ``is_test``), Paddle's ``-1`` dims. The IR-3 and opset-6
models are the ones the onnx package ships with its backend tests, with their reference outputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import helper, numpy_helper

from bnfold import fold_onnx
from bnfold.cli import main
from bnfold.core.runtime import unoptimized_session
from bnfold.reasons import Reason
from tests.support.graphs import GraphBuilder, assert_equivalent, count_ops, run

ONNX_TEST_DATA = Path(onnx.__file__).parent / "backend" / "test" / "data"
LIGHT = ONNX_TEST_DATA / "light"
PYTORCH_CONVERTED = ONNX_TEST_DATA / "pytorch-converted"


def feed_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    initializers = {tensor.name for tensor in model.graph.initializer}
    return [value for value in model.graph.input if value.name not in initializers]


def light_input(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """The input onnx's backend test runner made the light models' reference outputs from."""
    (value,) = feed_inputs(model)
    shape = [dim.dim_value for dim in value.type.tensor_type.shape.dim]
    count = int(np.prod(shape))
    return {value.name: (np.arange(count).reshape(shape) / count).astype(np.float32)}


# (network, batch norms, foldable): densenet121 keeps those that read a Concat and feed Mul -> Add -> Relu.
LIGHT_BN_MODELS = [("resnet50", 53, 53), ("densenet121", 121, 59), ("inception_v2", 69, 69), ("shufflenet", 49, 49)]


@pytest.mark.parametrize(("network", "batchnorms", "foldable"), LIGHT_BN_MODELS, ids=[m[0] for m in LIGHT_BN_MODELS])
def test_ir3_model_zoo_networks_fold_by_default_and_match_their_reference_outputs(network, batchnorms, foldable):
    path = LIGHT / f"light_{network}.onnx"
    result = fold_onnx(path)
    report = result.report
    assert (len(report.folded_batchnorms), len(report.left)) == (foldable, batchnorms - foldable)
    assert GUARD_FREE(report), "no fold may be left by the guard"
    assert report.verification.passed
    assert any("IR version 3" in note and "constants" in note for note in report.notes)
    model = result.model
    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version == 3
    listed = {value.name for value in model.graph.input}
    assert {tensor.name for tensor in model.graph.initializer} <= listed, "IR 3 lists every initializer"
    assert listed - {tensor.name for tensor in model.graph.initializer} == {v.name for v in feed_inputs(model)}
    feeds = light_input(model)
    expected = numpy_helper.to_array(onnx.load_tensor(str(LIGHT / f"light_{network}_output_0.pb")))
    (folded_output,) = unoptimized_session(model.SerializeToString()).run(None, feeds)
    np.testing.assert_allclose(folded_output, expected, rtol=2e-3, atol=1e-7)


def GUARD_FREE(report) -> bool:  # noqa: N802 - reads as the property it checks
    return all(record.reason != Reason.GUARD_REJECTED for record in report.left)


def test_a_model_computing_its_weights_at_run_time_says_the_parameters_grew():
    """light_resnet50's weights are ConstantOfShape outputs: folded, they are stored (80 KB -> 90 MB)."""
    report = fold_onnx(LIGHT / "light_resnet50.onnx", verify=False).report
    assert report.totals.param_bytes_after > 1000 * report.totals.param_bytes_before
    assert any("parameters grew" in note and "ConstantOfShape" in note for note in report.notes)
    assert "note: parameters grew" in report.render()


def test_an_ir4_model_whose_initializers_are_inputs_still_keeps_them_overridable():
    g = GraphBuilder(seed=3)
    x = g.input("x", [1, 3, 4, 4])
    y = g.bn(g.node("Conv", [x, g.weight([3, 3, 1, 1])]), 3, name="bn")
    model = g.model([y])
    model.graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                             for t in model.graph.initializer)
    report = fold_onnx(model, verify=False).report
    assert [record.reason for record in report.left] == [Reason.OVERRIDABLE_PARAMS]
    assert report.notes == []


@pytest.mark.parametrize("case", ["BatchNorm1d_3d_input_eval", "BatchNorm2d_eval", "BatchNorm3d_momentum_eval"])
def test_opset6_batch_norms_fold_as_depthwise_convs_that_match_the_reference_outputs(case):
    """onnxruntime has no BatchNormalization-6 kernel: the rewritten model runs, verified with onnx.reference."""
    directory = PYTORCH_CONVERTED / f"test_{case}"
    result = fold_onnx(directory / "model.onnx", standalone="conv")
    assert [record.pattern for record in result.report.folded] == ["standalone-conv"]
    verification = result.report.verification
    assert verification.passed and verification.to_dict()["engine"] == "onnx.reference"
    model = result.model
    onnx.checker.check_model(model, full_check=True)
    assert [node.op_type for node in model.graph.node] == ["Conv"]
    given = numpy_helper.to_array(onnx.load_tensor(str(directory / "test_data_set_0" / "input_0.pb")))
    expected = numpy_helper.to_array(onnx.load_tensor(str(directory / "test_data_set_0" / "output_0.pb")))
    (output,) = unoptimized_session(model.SerializeToString()).run(None, {model.graph.input[0].name: given})
    np.testing.assert_allclose(output, expected, rtol=1e-5, atol=1e-6)


def test_opset6_mul_add_rewrite_is_refused_for_mul_and_add_broadcast_by_attribute():
    result = fold_onnx(PYTORCH_CONVERTED / "test_BatchNorm2d_eval" / "model.onnx", standalone="mul-add",
                       verify=False)
    (record,) = result.report.left
    assert record.reason == Reason.UNSUPPORTED_OPSET and "--standalone conv" in record.message


def legacy_conv_bn(opset: int, **bn_attributes) -> onnx.ModelProto:
    """Conv + BN at ``opset``; before opset 7 as exporters of that time wrote it (IR 3, initializers listed)."""
    g = GraphBuilder(seed=5, opset=opset)
    x = g.input("x", [2, 3, 5, 5])
    conv = g.node("Conv", [x, g.weight([4, 3, 3, 3])], name="conv", pads=[1, 1, 1, 1])
    y = g.bn(conv, 4, name="bn", **bn_attributes)
    if opset >= 7:
        return g.model([y])
    listed = [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in g.initializers]
    graph = helper.make_graph(g.nodes, "legacy", g.inputs + listed,
                              [helper.make_tensor_value_info(y, 1, [2, 4, 5, 5])], g.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 3
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.parametrize(("opset", "attributes"), [(6, {"is_test": 1}), (6, {"is_test": 1, "spatial": 1}),
                                                  (7, {"spatial": 1}), (9, {})])
def test_legacy_inference_batch_norms_fold_into_their_conv(opset, attributes):
    model = legacy_conv_bn(opset, **attributes)
    result = fold_onnx(model)
    assert count_ops(result.model) == 0 and result.report.verification.passed
    assert_equivalent(model, result.model, reference=opset < 7)  # onnxruntime has no BatchNormalization-6


@pytest.mark.parametrize(("opset", "attributes", "reason"), [
    (6, {}, Reason.TRAINING_MODE), (6, {"is_test": 0}, Reason.TRAINING_MODE),
    (6, {"is_test": 1, "spatial": 0}, Reason.SPATIAL_0), (7, {"spatial": 0}, Reason.SPATIAL_0)])
def test_legacy_batch_norms_that_are_not_inference_batch_norms_stay(opset, attributes, reason):
    (record,) = fold_onnx(legacy_conv_bn(opset, **attributes), verify=False).report.left
    assert record.reason == reason


def paddle_style_model() -> onnx.ModelProto:
    """Conv + BN whose input and output declare dynamic dims as -1, as Paddle's exporter writes them."""
    g = GraphBuilder(seed=7)
    x = g.input("x", [-1, 3, -1, -1])
    y = g.bn(g.node("Conv", [x, g.weight([4, 3, 3, 3])], name="conv", pads=[1, 1, 1, 1]), 4, name="bn")
    graph = helper.make_graph(g.nodes, "paddle", g.inputs, [helper.make_tensor_value_info(y, 1, [-1, 4, -1, -1])],
                              g.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("how", ["default", "input_shapes", "inputs"])
def test_minus_one_dims_are_dynamic_for_fold_and_verify(how):
    options = {"default": {}, "input_shapes": {"input_shapes": {"x": [2, 3, 8, 6]}},
               "inputs": {"inputs": {"x": np.ones((3, 3, 5, 7), np.float32)}}}[how]
    result = fold_onnx(paddle_style_model(), **options)
    assert [record.status for record in result.report.records] == ["folded"]
    assert result.report.verification.passed


def test_minus_one_dims_on_the_command_line(tmp_path):
    source, target = tmp_path / "paddle.onnx", tmp_path / "folded.onnx"
    onnx.save(paddle_style_model(), source)
    folded = CliRunner().invoke(main, ["fold", str(source), "-o", str(target), "--input-shape", "x:2x3x9x9"])
    assert folded.exit_code == 0, folded.output
    verified = CliRunner().invoke(main, ["verify", str(source), str(target), "--input-shape", "x:1x3x4x4"])
    assert verified.exit_code == 0, verified.output


def test_json_counts_batch_norms_and_elementwise_nodes_apart(tmp_path):
    """A CI script reads "folded" as batch norms: Mul/Add nodes folded without one are counted apart."""
    g = GraphBuilder(seed=9)
    x = g.input("x", [1, 3, 5, 5])
    value = g.node("Conv", [x, g.weight([3, 3, 3, 3])], name="conv0", pads=[1, 1, 1, 1])
    for position in range(4):
        value = g.node("Add", [g.node("Mul", [value, g.const(g.rng.uniform(0.5, 1.5, (3, 1, 1)))]),
                               g.const(g.rng.normal(size=(3, 1, 1)))])
        value = g.node("Conv", [value, g.weight([3, 3, 3, 3])], name=f"conv{position + 1}", pads=[1, 1, 1, 1])
    value = g.node("Relu", [g.bn(value, 3, name="bn")])
    path = tmp_path / "model.onnx"
    onnx.save(g.model([value]), path)
    run = CliRunner().invoke(main, ["inspect", str(path), "--json"])
    payload = json.loads(run.output)
    assert payload["schema"] == 2
    assert (payload["folded"], payload["left"], payload["elementwise_folded"]) == (1, 0, 8)
    assert [record["bn"] for record in payload["batchnorms"]] == ["bn"]
    assert {record["op_type"] for record in payload["elementwise"]} == {"Mul", "Add"}
    report = fold_onnx(path, verify=False).report
    assert repr(report).startswith("FoldReport(1 batch norms folded, 0 left, 8 Mul/Add/Sub/Div nodes folded")


def test_an_ir3_model_folding_inside_an_if_branch_stays_valid():
    """A branch's new weights cannot be listed as its inputs (an If branch takes none): they become Constant
    nodes, and the outer weights it no longer reads leave the main graph's listing with their initializers."""
    g = GraphBuilder(seed=4, opset=9)
    x = g.input("x", [1, 3, 6, 6])
    cond = g.input("cond", [], onnx.TensorProto.BOOL)
    branches = {}
    for name in ("then", "else"):
        start = len(g.nodes)
        y = g.bn(g.node("Conv", [x, g.weight([4, 3, 3, 3])], name=f"{name}_conv"), 4, name=f"{name}_bn")
        nodes = g.nodes[start:]
        del g.nodes[start:]
        branches[name] = helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(y, 1, [1, 4, 4, 4])])
    g.nodes.append(helper.make_node("If", [cond], ["out"], then_branch=branches["then"],
                                    else_branch=branches["else"]))
    listed = [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in g.initializers]
    graph = helper.make_graph(g.nodes, "ir3_if", g.inputs + listed,
                              [helper.make_tensor_value_info("out", 1, [1, 4, 4, 4])], g.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)])
    model.ir_version = 3
    onnx.checker.check_model(model, full_check=True)
    result = fold_onnx(model)
    assert [record.status for record in result.report.records] == ["folded", "folded"]
    assert result.report.verification.passed
    folded = result.model
    onnx.checker.check_model(folded, full_check=True)
    assert not folded.graph.initializer and [v.name for v in folded.graph.input] == ["x", "cond"]
    for flag in (True, False):
        feeds = {"x": np.random.default_rng(1).normal(size=(1, 3, 6, 6)).astype(np.float32), "cond": np.array(flag)}
        np.testing.assert_allclose(run(folded, feeds)[0], run(model, feeds)[0], rtol=1e-5, atol=1e-5)
