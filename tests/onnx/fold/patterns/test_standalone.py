"""Standalone BNs (no linear neighbour): left by default, one Mul + one Add with ``standalone="mul-add"``, one
depthwise Conv with ``standalone="conv"`` where the tensor has spatial axes and a Conv kernel exists."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

from bnfold import InputError, enabled_patterns, fold_onnx, inspect_onnx
from bnfold.cli import main
from tests.support.graphs import GraphBuilder, assert_equivalent, count_ops


def fold(model: onnx.ModelProto, **options):
    return fold_onnx(model, verify=False, **options)


def relu_bn_model(shape=(2, 3, 4, 4), dtype=np.float32, param_dtype=None, opset: int = 17) -> onnx.ModelProto:
    g = GraphBuilder(1, dtype, opset=opset)
    x = g.input("x", list(shape))
    bn = g.bn(g.node("Relu", [x]), shape[1], name="bn", param_dtype=param_dtype)
    return g.model([g.node("Relu", [bn])])


def test_standalone_bn_is_left_by_default_with_a_hint():
    (record,) = fold(relu_bn_model()).report.records
    assert (record.status, record.reason) == ("left", "no_linear_neighbour")
    assert "Relu" in record.message and "--standalone" in record.message and "mul-add" in record.message


@pytest.mark.parametrize("shape", [(2, 3), (2, 3, 5), (2, 3, 4, 4), (1, 3, 2, 2, 2)],
                         ids=["1d", "ncl", "nchw", "ncdhw"])
def test_standalone_bn_becomes_one_mul_and_one_add(shape):
    model = relu_bn_model(shape)
    result = fold(model, standalone="mul-add")
    assert [n.op_type for n in result.model.graph.node] == ["Relu", "Mul", "Add", "Relu"]
    (record,) = result.report.records
    assert (record.status, record.pattern) == ("folded", "standalone-mul-add")
    constants = [numpy_helper.to_array(t) for t in result.model.graph.initializer]
    assert {c.shape for c in constants} == {(3,) + (1,) * (len(shape) - 2)}
    assert_equivalent(model, result.model)


@pytest.mark.parametrize("shape", [(2, 3, 5), (2, 3, 4, 4), (1, 3, 2, 2, 2)], ids=["ncl", "nchw", "ncdhw"])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_standalone_bn_becomes_one_depthwise_conv(shape, dtype):
    model = relu_bn_model(shape, dtype=dtype)
    result = fold(model, standalone="conv")
    assert [n.op_type for n in result.model.graph.node] == ["Relu", "Conv", "Relu"]
    conv = result.model.graph.node[1]
    attributes = {a.name: onnx.helper.get_attribute_value(a) for a in conv.attribute}
    assert attributes == {"group": 3, "kernel_shape": [1] * (len(shape) - 2)}
    (record,) = result.report.records
    assert (record.status, record.pattern) == ("folded", "standalone-conv")
    constants = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
    assert constants[conv.input[1]].shape == (3, 1) + (1,) * (len(shape) - 2)
    assert constants[conv.input[2]].shape == (3,)
    assert {c.dtype for c in constants.values()} == {np.dtype(dtype)}
    onnx.checker.check_model(result.model, full_check=True)
    assert_equivalent(model, result.model, rtol=1e-4 if dtype == np.float32 else 2e-2)


@pytest.mark.parametrize(("shape", "dtype"), [((2, 3), np.float32), ((2, 3, 4, 4), np.float64)],
                         ids=["no-spatial-axes", "float64-has-no-conv-kernel"])
def test_conv_mode_uses_mul_and_add_where_a_conv_cannot_run(shape, dtype):
    model = relu_bn_model(shape, dtype=dtype)
    result = fold(model, standalone="conv")
    assert [n.op_type for n in result.model.graph.node] == ["Relu", "Mul", "Add", "Relu"]
    assert result.report.records[0].pattern == "standalone-conv"
    assert_equivalent(model, result.model, reference=dtype == np.float64)


def test_conv_mode_takes_the_per_channel_chain_after_the_bn_too():
    g = GraphBuilder(2)
    x = g.input("x", [1, 3, 4, 4])
    bn = g.bn(g.node("Relu", [x]), 3)
    shifted = g.node("Add", [g.node("Mul", [bn, g.const(np.array([2.0, -1.0, 0.5]).reshape(3, 1, 1))]),
                             g.const(np.array(0.25))])
    model = g.model([g.node("Relu", [shifted])])
    result = fold(model, standalone="conv")
    assert [n.op_type for n in result.model.graph.node] == ["Relu", "Conv", "Relu"]
    assert_equivalent(model, result.model)


def test_standalone_bn_after_a_residual_add_absorbs_the_following_chain():
    g = GraphBuilder(2)
    x = g.input("x", [1, 3, 4, 4])
    total = g.node("Add", [x, g.node("Relu", [x])])
    bn = g.bn(total, 3)
    scaled = g.node("Mul", [bn, g.const(np.array([2.0, -1.0, 0.5]).reshape(3, 1, 1))])
    model = g.model([g.node("Relu", [scaled])])
    result = fold(model, standalone="mul-add")
    assert [n.op_type for n in result.model.graph.node] == ["Relu", "Add", "Mul", "Add", "Relu"]
    assert_equivalent(model, result.model)


def test_a_bn_that_folds_into_a_layer_is_not_rewritten():
    g = GraphBuilder()
    x = g.input("x", [1, 3, 6, 6])
    model = g.model([g.bn(g.node("Conv", [x, g.weight([4, 3, 3, 3])]), 4)])
    (record,) = fold(model, standalone="mul-add").report.records
    assert record.pattern == "conv-bn"


def test_a_bn_that_cannot_fold_safely_is_rewritten_and_says_why():
    g = GraphBuilder()
    x = g.input("x", [1, 3, 6, 6])
    y = g.node("Conv", [x, g.weight([4, 3, 3, 3])])
    model = g.model([g.bn(y, 4), g.node("Relu", [y])])
    result = fold(model, standalone="mul-add")
    (record,) = result.report.records
    assert record.pattern == "standalone-mul-add" and "readers" in record.message
    assert_equivalent(model, result.model)


def test_training_mode_bn_is_never_rewritten():
    g = GraphBuilder(opset=15)
    x = g.input("x", [2, 3, 4, 4])
    outputs = g.node("BatchNormalization", [g.node("Relu", [x]), *g.bn_params(3)], n_outputs=3, training_mode=1)
    model = g.model(outputs, output_shapes=[[2, 3, 4, 4], [3], [3]])
    (record,) = fold(model, standalone="mul-add").report.records
    assert (record.status, record.reason) == ("left", "training_mode")


def test_mixed_precision_standalone_constants_take_the_activation_dtype():
    model = relu_bn_model(dtype=np.float16, param_dtype=np.float32, opset=15)
    result = fold(model, standalone="mul-add")
    assert count_ops(result.model) == 0
    assert {numpy_helper.to_array(t).dtype for t in result.model.graph.initializer} == {np.dtype(np.float16)}
    onnx.checker.check_model(result.model, full_check=True)
    assert_equivalent(model, result.model, rtol=2e-2)


@pytest.mark.parametrize("mode", ["mul-add", "conv"])
def test_standalone_rewrite_is_idempotent(mode):
    once = fold(relu_bn_model(), standalone=mode).model
    twice = fold(once, standalone=mode).model
    assert once.SerializeToString() == twice.SerializeToString()


def test_standalone_option_and_pattern_names_are_validated():
    assert "standalone-mul-add" not in enabled_patterns()
    assert "standalone-mul-add" in enabled_patterns(standalone="mul-add")
    assert "standalone-mul-add" in enabled_patterns(only=["standalone-mul-add"])
    assert "standalone-mul-add" not in enabled_patterns(skip=["standalone-mul-add"], standalone="mul-add")
    assert "standalone-conv" in enabled_patterns(standalone="conv")
    assert "standalone-conv" not in enabled_patterns(standalone="mul-add")
    with pytest.raises(InputError, match="standalone mode"):
        enabled_patterns(standalone="mul")
    report = inspect_onnx(relu_bn_model(), standalone="mul-add")
    assert report.records[0].pattern == "standalone-mul-add"


def test_cli_standalone_option_for_inspect_and_fold(tmp_path):
    path = tmp_path / "model.onnx"
    onnx.save(relu_bn_model(), path)
    runner = CliRunner()
    left = runner.invoke(main, ["inspect", str(path), "--json"])
    assert left.exit_code == 0 and json.loads(left.output)["batchnorms"][0]["reason"] == "no_linear_neighbour"
    rewritten = runner.invoke(main, ["inspect", str(path), "--standalone", "mul-add", "--json"])
    assert json.loads(rewritten.output)["batchnorms"][0]["pattern"] == "standalone-mul-add"
    folded = runner.invoke(main, ["fold", str(path), "-o", str(tmp_path / "out.onnx"), "--standalone", "mul-add"])
    assert folded.exit_code == 0, folded.output
    assert count_ops(onnx.load(tmp_path / "out.onnx")) == 0
    conv = runner.invoke(main, ["fold", str(path), "-o", str(tmp_path / "conv.onnx"), "--standalone", "conv"])
    assert conv.exit_code == 0, conv.output
    assert [n.op_type for n in onnx.load(tmp_path / "conv.onnx").graph.node] == ["Relu", "Conv", "Relu"]
    unknown = runner.invoke(main, ["fold", str(path), "--standalone", "mul"])
    assert unknown.exit_code == 2
