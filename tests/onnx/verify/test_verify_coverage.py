"""A folded site that no verification input executes is never reported as verified: fold_onnx and
verify_onnx name it and the verdict is 'unverified' (not passed), until inputs that reach it are given."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import bnfold
from bnfold.onnx.verify.verify import verify_onnx
from tests.support.verify_models import random_bn_statistics

SHAPE, OUT = [1, 3, 8, 8], [1, 4, 8, 8]


def _conv_bn(prefix: str, source: str, output: str) -> list[onnx.NodeProto]:
    return [helper.make_node("Conv", [source, "w"], [f"{prefix}_c"], pads=[1, 1, 1, 1], name=f"{prefix}_conv"),
            helper.make_node("BatchNormalization", [f"{prefix}_c", "gamma", "beta", "mean", "var"], [output],
                             name=f"{prefix}_bn")]


def _branch(name: str, nodes: list[onnx.NodeProto], output: str, elem: int = TensorProto.FLOAT) -> onnx.GraphProto:
    return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(output, elem, OUT)])


def _weights(seed: int = 0, dtype: type = np.float32) -> list[onnx.TensorProto]:
    rng = np.random.default_rng(seed)
    arrays = {"w": rng.normal(0, 0.5, (4, 3, 3, 3)), **random_bn_statistics(rng, 4)}
    return [numpy_helper.from_array(value.astype(dtype), name) for name, value in arrays.items()]


def branchy_model(nested: bool = False, dtype: type = np.float32) -> onnx.ModelProto:
    """``If(sum(x) > 1000)``: the then branch (never taken by standard normal inputs) holds a Conv -> BN, the
    else branch another. With ``nested``, the then branch holds the Conv -> BN inside a Loop of one
    iteration inside a second If on the same condition. A float64 model runs under onnx.reference (onnxruntime
    has no float64 Conv)."""
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    then_nodes = _conv_bn("then", "x", "then_y")
    if nested:
        body = helper.make_graph(
            [*_conv_bn("loop", "x", "loop_y"), helper.make_node("Identity", ["keep"], ["keep_out"])], "body",
            [helper.make_tensor_value_info("i", TensorProto.INT64, []),
             helper.make_tensor_value_info("keep", TensorProto.BOOL, [])],
            [helper.make_tensor_value_info("keep_out", TensorProto.BOOL, []),
             helper.make_tensor_value_info("loop_y", elem, OUT)])
        inner_then = _branch("inner_then", [
            helper.make_node("Loop", ["one", "cond"], ["stacked"], body=body, name="loop"),
            helper.make_node("Squeeze", ["stacked", "zero_axis"], ["inner_y"])], "inner_y", elem)
        inner_else = _branch("inner_else", [helper.make_node("Conv", ["x", "w"], ["inner_y"], pads=[1, 1, 1, 1])],
                             "inner_y", elem)
        then_nodes = [helper.make_node("If", ["cond"], ["then_y"], then_branch=inner_then, else_branch=inner_else,
                                       name="inner_if")]
    graph = helper.make_graph(
        [helper.make_node("ReduceSum", ["x"], ["total"], keepdims=0),
         helper.make_node("Greater", ["total", "threshold"], ["cond"]),
         helper.make_node("If", ["cond"], ["y"], name="gate",
                          then_branch=_branch("then", then_nodes, "then_y", elem),
                          else_branch=_branch("else", _conv_bn("else", "x", "else_y"), "else_y", elem))],
        "g", [helper.make_tensor_value_info("x", elem, SHAPE)],
        [helper.make_tensor_value_info("y", elem, OUT)],
        [*_weights(dtype=dtype), numpy_helper.from_array(np.array(1000.0, dtype), "threshold"),
         numpy_helper.from_array(np.array(1, np.int64), "one"),
         numpy_helper.from_array(np.array([0], np.int64), "zero_axis")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


LARGE = {"x": np.full(SHAPE, 10.0, np.float32)}  # sum 1920 > 1000: the then branch
SMALL = {"x": np.zeros(SHAPE, np.float32)}


@pytest.mark.parametrize("nested", [False, True], ids=["if", "if-loop-if"])
def test_a_fold_in_a_branch_no_input_takes_is_unverified_not_passed(nested):
    result = bnfold.fold_onnx(branchy_model(nested))
    assert len(result.report.folded) == 2
    verification = result.report.verification
    assert verification.status == "unverified" and not verification.passed
    [site] = verification.unexercised
    assert site.startswith("gate/then_branch/") and site.endswith("then_bn" if not nested else "loop_bn")
    assert verification.to_dict()["status"] == "unverified"
    assert verification.render().splitlines()[-1].startswith("UNVERIFIED: 1 folded site(s) never ran")


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["onnxruntime", "onnx.reference"])
@pytest.mark.parametrize("nested", [False, True], ids=["if", "if-loop-if"])
def test_inputs_that_reach_every_folded_site_verify_it(nested, dtype):
    model = branchy_model(nested, dtype)
    large, small = ({name: value.astype(dtype) for name, value in feeds.items()} for feeds in (LARGE, SMALL))
    only_then = bnfold.fold_onnx(model, inputs=[large]).report.verification
    assert only_then.engine == ("onnxruntime" if dtype is np.float32 else "onnx.reference")
    assert only_then.status == "unverified" and only_then.unexercised == ["gate/else_branch/else_bn"]
    both = bnfold.fold_onnx(model, inputs=[large, small]).report.verification
    assert both.status == "passed" and both.passed and both.unexercised == [] and both.iterations == 2


def test_a_damaged_site_in_a_branch_fails_once_an_input_reaches_it():
    original = branchy_model()
    damaged = bnfold.fold_onnx(original).model
    gate = next(node for node in damaged.graph.node if node.op_type == "If")
    then_branch = next(attribute.g for attribute in gate.attribute if attribute.name == "then_branch")
    weight_name = next(node.input[1] for node in then_branch.node if node.op_type == "Conv")
    weight = next(t for g in (damaged.graph, then_branch) for t in g.initializer if t.name == weight_name)
    array = numpy_helper.to_array(weight).copy()
    array[0, 0, 0, 0] += 1.0  # a corner tap of one output channel: only the then branch reads it
    weight.CopyFrom(numpy_helper.from_array(array, weight.name))
    sites = [("gate/then_branch", "then_bn"), ("gate/else_branch", "else_bn")]
    unreached = verify_onnx(original, damaged, folded_sites=sites)
    assert unreached.status == "unverified" and unreached.unexercised == ["gate/then_branch/then_bn"]
    reached = verify_onnx(original, damaged, folded_sites=sites, inputs=[LARGE, SMALL])
    assert reached.status == "failed" and not reached.passed


def test_the_written_model_carries_no_probe():
    result = bnfold.fold_onnx(branchy_model(nested=True), inputs=[LARGE, SMALL])
    assert result.report.verification.passed
    model = result.model
    assert [output.name for output in model.graph.output] == ["y"]
    assert all(len(node.output) == 1 for node in model.graph.node if node.op_type == "If")


def test_sites_in_the_main_graph_need_no_probe_and_a_model_without_folds_is_not_run():
    original = helper.make_model(helper.make_graph(
        _conv_bn("main", "x", "y"), "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, SHAPE)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, OUT)], _weights()),
        opset_imports=[helper.make_opsetid("", 17)])
    verification = bnfold.fold_onnx(original).report.verification
    assert verification.status == "passed" and verification.unexercised == []
    reshape = helper.make_model(helper.make_graph(
        [helper.make_node("Reshape", ["x", "fixed"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "L"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [5, 7])],
        [numpy_helper.from_array(np.array([5, 7], np.int64), "fixed")]), opset_imports=[helper.make_opsetid("", 17)])
    # It runs only at N * L = 35, a size no ladder tries: nothing folded, so nothing needs to run.
    unchanged = bnfold.fold_onnx(reshape).report.verification
    assert unchanged.status == "unchanged" and unchanged.passed and unchanged.iterations == 0
    assert unchanged.render().startswith("UNCHANGED: the folded model is the original")


def test_verify_of_two_files_checks_that_every_changed_subgraph_ran(tmp_path, capsys):
    """``bnfold verify`` knows no fold records: every If branch that differs from the original's must run."""
    from bnfold.cli import run_command

    original, folded = tmp_path / "original.onnx", tmp_path / "folded.onnx"
    onnx.save(branchy_model(), original)
    onnx.save(bnfold.fold_onnx(branchy_model()).model, folded)
    assert run_command(["verify", str(original), str(folded)]) == 1
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("UNVERIFIED: 1 folded site(s) never ran on these inputs (gate/then_branch)")
    large, small = tmp_path / "large.npz", tmp_path / "small.npz"
    np.savez(large, **LARGE)
    np.savez(small, **SMALL)
    assert run_command(["verify", str(original), str(folded), "--inputs", str(large), "--inputs", str(small)]) == 0
    assert run_command(["verify", str(original), str(original)]) == 0  # nothing differs: nothing must be reached


def test_a_fold_inside_a_function_runs_when_a_call_runs():
    """A model-local function's body is shared by its calls: its sites ran where a call ran; a branch
    inside the body cannot be probed, and the report says so instead of passing."""
    constants = [helper.make_node("Constant", [], [tensor.name], value=tensor) for tensor in _weights()]

    def function(name: str, nodes: list[onnx.NodeProto]) -> onnx.FunctionProto:
        return helper.make_function("local", name, ["x"], ["y"], [*constants, *nodes],
                                    [helper.make_opsetid("", 17)])

    flat = function("Flat", _conv_bn("f", "x", "y"))
    gated = function("Gated", [
        helper.make_node("ReduceSum", ["x"], ["total"], keepdims=0),
        helper.make_node("Constant", [], ["threshold"], value_float=1000.0),
        helper.make_node("Greater", ["total", "threshold"], ["cond"]),
        helper.make_node("If", ["cond"], ["y"], name="inner",
                         then_branch=_branch("then", _conv_bn("g", "x", "g_y"), "g_y"),
                         else_branch=_branch("else", [helper.make_node("Conv", ["x", "w"], ["e_y"],
                                                                       pads=[1, 1, 1, 1])], "e_y"))])
    for body, expected in ((flat, []), (gated, ["function:local.Gated/inner/then_branch/g_bn"])):
        graph = helper.make_graph([helper.make_node(body.name, ["x"], ["y"], domain="local")], "g",
                                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, SHAPE)],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, OUT)])
        model = helper.make_model(graph, functions=[body], opset_imports=[
            helper.make_opsetid("", 17), helper.make_opsetid("local", 1)])
        result = bnfold.fold_onnx(model, inputs=[LARGE, SMALL])
        assert len(result.report.folded) == 1
        verification = result.report.verification
        assert verification.unexercised == expected
        assert verification.passed is (not expected)
        if expected:
            assert "sites in subgraphs of functions are not probed" in " ".join(verification.notes)
