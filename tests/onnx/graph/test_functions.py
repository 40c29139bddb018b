"""Batch norms inside model-local functions fold when their parameters are Constant nodes of the function."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from bnfold import fold_onnx
from tests.support.graphs import FLOAT, run

DOMAIN = "custom"


def fold(model, **options):
    return fold_onnx(model, verify=False, **options)


def constant(name: str, array: np.ndarray) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], name=f"{name}_node",
                            value=numpy_helper.from_array(np.asarray(array, dtype=np.float32), name))


def bn_constants(rng: np.random.Generator, channels: int) -> list[onnx.NodeProto]:
    gamma = rng.uniform(0.5, 1.5, channels) * rng.choice([-1.0, 1.0], channels)
    return [constant("gamma", gamma), constant("beta", rng.normal(size=channels)),
            constant("mean", rng.normal(size=channels)), constant("var", rng.uniform(0.5, 2.0, channels))]


def block(nodes: list[onnx.NodeProto], name: str = "Block", attributes: tuple[str, ...] = ()) -> onnx.FunctionProto:
    return helper.make_function(DOMAIN, name, ["x"], ["y"], nodes, [helper.make_opsetid("", 17)],
                                attributes=list(attributes))


def conv_bn_function(seed: int = 0) -> onnx.FunctionProto:
    rng = np.random.default_rng(seed)
    return block([
        constant("weight", rng.normal(size=(4, 3, 3, 3))),
        helper.make_node("Conv", ["x", "weight"], ["conv"], name="conv", pads=[1, 1, 1, 1]),
        *bn_constants(rng, 4),
        helper.make_node("BatchNormalization", ["conv", "gamma", "beta", "mean", "var"], ["y"], name="bn"),
    ])


def model_calling(function: onnx.FunctionProto, input_shapes: list[list[int]],
                  output_shapes: list[list[int]] | None = None) -> onnx.ModelProto:
    inputs = [helper.make_tensor_value_info(f"x{i}", FLOAT, shape) for i, shape in enumerate(input_shapes)]
    calls = [helper.make_node(function.name, [f"x{i}"], [f"y{i}"], domain=DOMAIN, name=f"call{i}")
             for i in range(len(input_shapes))]
    outputs = [helper.make_tensor_value_info(f"y{i}", FLOAT, output_shapes[i] if output_shapes else None)
               for i in range(len(input_shapes))]
    model = helper.make_model(helper.make_graph(calls, "main", inputs, outputs),
                              opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)],
                              functions=[function])
    model.ir_version = 10
    model = onnx.shape_inference.infer_shapes(model)  # the checker wants the output shapes declared
    del model.graph.value_info[:]
    onnx.checker.check_model(model, full_check=True)
    return model


def feeds_for(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    return {i.name: rng.normal(size=[d.dim_value for d in i.type.tensor_type.shape.dim]).astype(np.float32)
            for i in model.graph.input}


def assert_same_outputs(original: onnx.ModelProto, folded: onnx.ModelProto) -> None:
    feeds = feeds_for(original)
    for want, got in zip(run(original, feeds), run(folded, feeds), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(np.max(np.abs(want))))


def ops(function: onnx.FunctionProto) -> list[str]:
    return [node.op_type for node in function.node]


def test_conv_bn_inside_a_function_folds_into_constant_nodes():
    model = model_calling(conv_bn_function(), [[1, 3, 6, 6], [2, 3, 5, 5]])
    result = fold(model)
    (record,) = result.report.records
    assert (record.scope, record.bn, record.status, record.pattern) == ("function:custom.Block", "bn", "folded",
                                                                        "conv-bn")
    function = result.model.functions[0]
    assert ops(function) == ["Constant", "Constant", "Conv"], "new weight and bias as Constants; old ones swept"
    assert list(function.output) == ["y"] and function.node[-1].output[0] == "y"
    assert not result.model.graph.initializer
    onnx.checker.check_model(result.model, full_check=True)
    assert_same_outputs(model, result.model)
    assert result.report.totals.bn_before == 1 and result.report.totals.bn_after == 0


def matmul_bn_function() -> onnx.FunctionProto:
    rng = np.random.default_rng(3)
    return block([
        constant("weight", rng.normal(size=(6, 5))),
        helper.make_node("MatMul", ["x", "weight"], ["product"], name="matmul"),
        *bn_constants(rng, 5),
        helper.make_node("BatchNormalization", ["product", "gamma", "beta", "mean", "var"], ["y"], name="bn"),
    ], name="Dense")


def test_function_value_types_come_from_call_sites_that_agree():
    # MatMul -> BN folds only when the input is provably 2-D, which the function body alone cannot tell.
    model = model_calling(matmul_bn_function(), [[2, 6], [3, 6]])
    result = fold(model)
    assert [(r.status, r.pattern) for r in result.report.records] == [("folded", "matmul-bn")]
    assert_same_outputs(model, result.model)


def test_call_sites_with_different_ranks_leave_the_types_unknown():
    model = model_calling(matmul_bn_function(), [[2, 6], [4, 5, 6]], [[2, 5], [4, 5, 5]])
    (record,) = fold(model).report.records
    assert record.status == "left" and "rank" in record.message


def test_function_with_attribute_references_is_left_whole():
    function = conv_bn_function()
    function.node[-1].attribute.append(helper.make_attribute_ref("epsilon", onnx.AttributeProto.FLOAT))
    function.attribute.append("epsilon")
    model = model_calling(function, [[1, 3, 6, 6]])
    model.graph.node[0].attribute.append(helper.make_attribute("epsilon", 1e-3))
    result = fold(model)
    (record,) = result.report.records
    assert (record.status, record.reason) == ("left", "function_attribute_reference")
    assert "epsilon" in record.message
    assert result.model.SerializeToString() == model.SerializeToString()


def test_bn_parameters_from_a_function_input_are_not_constant():
    rng = np.random.default_rng(1)
    function = helper.make_function(DOMAIN, "Block", ["x", "gamma"], ["y"], [
        constant("weight", rng.normal(size=(4, 3, 3, 3))),
        helper.make_node("Conv", ["x", "weight"], ["conv"], name="conv"),
        *bn_constants(rng, 4)[1:],
        helper.make_node("BatchNormalization", ["conv", "gamma", "beta", "mean", "var"], ["y"], name="bn"),
    ], [helper.make_opsetid("", 17)])
    (record,) = fold(model_calling_with_gamma(function)).report.records
    assert (record.status, record.reason) == ("left", "non_constant_params")


def model_calling_with_gamma(function: onnx.FunctionProto) -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("Block", ["x", "gamma"], ["y"], domain=DOMAIN)], "main",
        [helper.make_tensor_value_info("x", FLOAT, [1, 3, 6, 6]), helper.make_tensor_value_info("gamma", FLOAT, [4])],
        [helper.make_tensor_value_info("y", FLOAT, [1, 4, 4, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)],
                              functions=[function])
    model.ir_version = 10
    return model


def test_folding_a_model_with_functions_twice_changes_nothing_the_second_time():
    model = model_calling(conv_bn_function(), [[1, 3, 6, 6]])
    once = fold(model).model
    assert once.SerializeToString() == fold(once).model.SerializeToString()
    assert once.SerializeToString() == fold(model).model.SerializeToString()
