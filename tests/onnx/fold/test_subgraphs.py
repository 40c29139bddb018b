"""Batch norms inside If branches, Loop and Scan bodies (nested too) fold like the main graph's, and
outer-scope values stay intact for everyone else who reads them."""

from __future__ import annotations

import json

import numpy as np
import onnx
from click.testing import CliRunner
from onnx import helper, numpy_helper

from bnfold import fold_onnx
from bnfold.cli import main
from bnfold.onnx.graph.index import subgraphs
from bnfold.onnx.graph.types import infer_types
from tests.support.graphs import FLOAT, GraphBuilder, run


def fold(model, **options):
    return fold_onnx(model, verify=False, **options)


def take(g: GraphBuilder, mark: tuple[int, int], *, initializers: bool = True):
    """The nodes (and initializers) ``g`` gained since ``mark``, removed from ``g`` to become a subgraph's."""
    nodes = g.nodes[mark[0]:]
    del g.nodes[mark[0]:]
    inits = g.initializers[mark[1]:] if initializers else []
    if initializers:
        del g.initializers[mark[1]:]
    return nodes, inits


def mark(g: GraphBuilder) -> tuple[int, int]:
    return len(g.nodes), len(g.initializers)


def body(name: str, nodes, inits, outputs, inputs=(), shape=None) -> onnx.GraphProto:
    return helper.make_graph(nodes, name, list(inputs),
                             [helper.make_tensor_value_info(o, FLOAT, shape) for o in outputs], inits)


def all_nodes(graph: onnx.GraphProto):
    for node in graph.node:
        yield node
        for subgraph in subgraphs(node):
            yield from all_nodes(subgraph)


def bn_count(model: onnx.ModelProto) -> int:
    return sum(n.op_type == "BatchNormalization" for n in all_nodes(model.graph))


def assert_same_outputs(original, folded, feeds_list):
    for feeds in feeds_list:
        for want, got in zip(run(original, feeds), run(folded, feeds), strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(np.max(np.abs(want))))


def if_model(*, outer_params: bool = False) -> onnx.ModelProto:
    """then: Conv(x, W_then) -> BN with its own parameters; else: Conv(x, W_outer) -> BN whose weight (and
    optionally parameters) are outer-scope initializers."""
    g = GraphBuilder()
    x = g.input("x", [1, 3, 6, 6])
    cond = g.input("cond", [], onnx.TensorProto.BOOL)
    outer_weight = g.weight([4, 3, 3, 3], name="W_outer")
    outer_bn = g.bn_params(4) if outer_params else None
    start = mark(g)
    then_out = g.bn(g.node("Conv", [x, g.weight([4, 3, 3, 3])], name="then_conv"), 4, name="then_bn")
    then_nodes, then_inits = take(g, start)
    start = mark(g)
    conv = g.node("Conv", [x, outer_weight], name="else_conv")
    params = outer_bn or g.bn_params(4)
    else_out = g.node("BatchNormalization", [conv, *params], name="else_bn")
    else_nodes, else_inits = take(g, start)
    g.nodes.append(helper.make_node(
        "If", [cond], ["y"], name="if",
        then_branch=body("then", then_nodes, then_inits, [then_out]),
        else_branch=body("else", else_nodes, else_inits, [else_out]),
    ))
    return g.model(["y"])


def both_branches():
    x = np.random.default_rng(2).normal(size=(1, 3, 6, 6)).astype(np.float32)
    return [{"x": x, "cond": np.array(flag)} for flag in (True, False)]


def test_bns_in_both_if_branches_fold_and_records_carry_their_scope():
    model = if_model()
    result = fold(model)
    assert bn_count(result.model) == 0
    assert {(r.scope, r.bn, r.status) for r in result.report.records} == {
        ("if/then_branch", "then_bn", "folded"), ("if/else_branch", "else_bn", "folded")}
    onnx.checker.check_model(result.model, full_check=True)
    assert_same_outputs(model, result.model, both_branches())


def test_outer_weight_folded_inside_is_cloned_into_the_subgraph_and_the_unread_original_dropped():
    model = if_model(outer_params=True)
    result = fold(model)
    assert bn_count(result.model) == 0
    else_branch = next(a.g for a in result.model.graph.node[0].attribute if a.name == "else_branch")
    conv = next(n for n in else_branch.node if n.op_type == "Conv")
    assert conv.input[1] in {t.name for t in else_branch.initializer}, "the scaled weight lives in the subgraph"
    assert {t.name for t in result.model.graph.initializer}.isdisjoint({"W_outer"}), "nothing reads it any more"
    assert not result.model.graph.initializer, "the outer BN parameters went with it"
    assert_same_outputs(model, result.model, both_branches())


def test_outer_weight_also_read_by_an_outer_conv_is_left_untouched():
    g = GraphBuilder()
    x = g.input("x", [1, 3, 6, 6])
    weight = g.weight([4, 3, 3, 3], name="W_shared")
    start = mark(g)
    inner = g.bn(g.node("Conv", [x, weight], name="inner_conv"), 4, name="inner_bn")
    nodes, inits = take(g, start)
    outer = g.node("Conv", [x, weight], name="outer_conv")
    cond = g.input("cond", [], onnx.TensorProto.BOOL)
    g.nodes.append(helper.make_node("If", [cond], ["y"], name="if",
                                    then_branch=body("then", nodes, inits, [inner]),
                                    else_branch=body("else", [helper.make_node("Identity", [outer], ["e"])], [],
                                                     ["e"])))
    model = g.model(["y", outer])
    result = fold(model)
    assert bn_count(result.model) == 0
    original = {t.name: t for t in model.graph.initializer}["W_shared"]
    assert {t.name: t for t in result.model.graph.initializer}["W_shared"] == original
    assert_same_outputs(model, result.model, both_branches())


def test_outer_value_still_read_by_a_subgraph_survives_the_outer_sweep():
    # The outer BN's gamma is also read inside the branch: folding the outer BN must not drop it.
    g = GraphBuilder()
    x = g.input("x", [1, 3, 6, 6])
    cond = g.input("cond", [], onnx.TensorProto.BOOL)
    gamma, beta, mean, var = g.bn_params(4)
    bn_out = g.node("BatchNormalization", [g.node("Conv", [x, g.weight([4, 3, 3, 3])]), gamma, beta, mean, var])
    then_mul = helper.make_node("Mul", [bn_out, g.node("Reshape", [gamma, g.const(np.array([1, 4, 1, 1]),
                                                                                     dtype=np.int64)])], ["t"])
    g.nodes.append(helper.make_node("If", [cond], ["y"], name="if",
                                    then_branch=body("then", [then_mul], [], ["t"]),
                                    else_branch=body("else", [helper.make_node("Identity", [bn_out], ["e"])], [],
                                                     ["e"])))
    model = g.model(["y"])
    result = fold(model)
    assert bn_count(result.model) == 0
    names = {t.name for t in result.model.graph.initializer}
    assert gamma in names and {beta, mean, var}.isdisjoint(names)
    onnx.checker.check_model(result.model, full_check=True)
    assert_same_outputs(model, result.model, both_branches())


def test_conv_output_also_read_inside_a_subgraph_is_fan_out():
    g = GraphBuilder()
    x = g.input("x", [1, 3, 6, 6])
    cond = g.input("cond", [], onnx.TensorProto.BOOL)
    y = g.node("Conv", [x, g.weight([4, 3, 3, 3])], name="conv")
    bn = g.bn(y, 4, name="bn")
    g.nodes.append(helper.make_node("If", [cond], ["z"], name="if",
                                    then_branch=body("then", [helper.make_node("Relu", [y], ["t"])], [], ["t"]),
                                    else_branch=body("else", [helper.make_node("Neg", [y], ["e"])], [], ["e"])))
    model = g.model([bn, "z"])
    (record,) = fold(model).report.records
    assert (record.bn, record.status, record.reason) == ("bn", "left", "input_fan_out")


def loop_model(trip_count: int = 3) -> onnx.ModelProto:
    """carry <- carry + BN(Conv(x, W)) inside a Loop body, with an If nested in the body."""
    g = GraphBuilder()
    x = g.input("x", [1, 3, 6, 6])
    start = mark(g)
    conv_bn = g.bn(g.node("Conv", [x, g.weight([4, 3, 3, 3])], name="body_conv"), 4, name="body_bn")
    then_start = mark(g)
    nested = g.bn(g.node("Conv", [x, g.weight([4, 3, 3, 3])], name="nested_conv"), 4, name="nested_bn")
    then_nodes, then_inits = take(g, then_start)
    body_nodes, body_inits = take(g, start)
    positive = helper.make_node("Greater", ["iteration", "one"], ["late"], name="late")
    branch = helper.make_node("If", ["late"], ["picked"], name="if",
                              then_branch=body("then", then_nodes, then_inits, [nested], shape=[1, 4, 4, 4]),
                              else_branch=body("else", [helper.make_node("Identity", [conv_bn], ["same"])], [],
                                               ["same"], shape=[1, 4, 4, 4]))
    body_nodes += [positive, branch,
                   helper.make_node("Add", ["carry", "picked"], ["carry_out"], name="accumulate"),
                   helper.make_node("Identity", ["cond_in"], ["cond_out"], name="keep_going")]
    body_inits.append(numpy_helper.from_array(np.array(1, dtype=np.int64), "one"))
    loop_body = helper.make_graph(
        body_nodes, "body",
        [helper.make_tensor_value_info("iteration", onnx.TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", onnx.TensorProto.BOOL, []),
         helper.make_tensor_value_info("carry", FLOAT, [1, 4, 4, 4])],
        [helper.make_tensor_value_info("cond_out", onnx.TensorProto.BOOL, []),
         helper.make_tensor_value_info("carry_out", FLOAT, [1, 4, 4, 4])],
        body_inits)
    count = g.const(np.array(trip_count), dtype=np.int64)
    start_value = g.const(np.zeros((1, 4, 4, 4)))
    g.nodes.append(helper.make_node("Loop", [count, "", start_value], ["total"], name="loop", body=loop_body))
    return g.model(["total"], output_shapes=[[1, 4, 4, 4]])


def test_loop_body_and_an_if_nested_in_it_fold():
    model = loop_model()
    result = fold(model)
    assert bn_count(result.model) == 0
    assert {(r.scope, r.bn) for r in result.report.folded} == {
        ("loop/body", "body_bn"), ("loop/body/if/then_branch", "nested_bn")}
    onnx.checker.check_model(result.model, full_check=True)
    x = np.random.default_rng(4).normal(size=(1, 3, 6, 6)).astype(np.float32)
    assert_same_outputs(model, result.model, [{"x": x}])


def test_scan_body_folds():
    g = GraphBuilder()
    sequence = g.input("sequence", [5, 1, 3, 6, 6])
    start = mark(g)
    out = g.bn(g.node("Conv", ["step", g.weight([4, 3, 3, 3])], name="scan_conv"), 4, name="scan_bn")
    nodes, inits = take(g, start)
    scan_body = body("scan_body", nodes, inits, [out], [helper.make_tensor_value_info("step", FLOAT, [1, 3, 6, 6])])
    g.nodes.append(helper.make_node("Scan", [sequence], ["stacked"], name="scan", body=scan_body,
                                    num_scan_inputs=1))
    model = g.model(["stacked"])
    result = fold(model)
    assert bn_count(result.model) == 0
    assert result.report.folded[0].scope == "scan/body"
    assert_same_outputs(model, result.model,
                        [{"sequence": np.random.default_rng(5).normal(size=(5, 1, 3, 6, 6)).astype(np.float32)}])


def test_subgraph_values_have_inferred_types():
    # A MatMul folds only where its input is provably 2-D: the rank must come from inference in the branch,
    # with a weight large enough to be replaced by a stand-in during inference.
    g = GraphBuilder()
    x = g.input("x", [2, 96])
    cond = g.input("cond", [], onnx.TensorProto.BOOL)
    start = mark(g)
    hidden = g.node("Relu", [x])
    out = g.bn(g.node("MatMul", [hidden, g.weight([96, 80])], name="branch_matmul"), 80, name="branch_bn")
    nodes, inits = take(g, start)
    g.nodes.append(helper.make_node("If", [cond], ["y"], name="if",
                                    then_branch=body("then", nodes, inits, [out]),
                                    else_branch=body("else", [helper.make_node("Neg", [x], ["e"])], [], ["e"])))
    model = g.model(["y"])
    result = fold(model)
    assert [(r.status, r.pattern) for r in result.report.records] == [("folded", "matmul-bn")]
    x_value = np.random.default_rng(6).normal(size=(2, 96)).astype(np.float32)
    assert_same_outputs(model, result.model, [{"x": x_value, "cond": np.array(True)}])


def test_types_reach_into_loop_bodies_nested_branches_and_scan_bodies():
    types = infer_types(loop_model())
    assert types.flat()["body_conv_out"].shape == (1, 4, 4, 4)
    assert types.flat()["nested_conv_out"].shape == (1, 4, 4, 4), "an If inside the Loop body"
    g = GraphBuilder()
    weight = g.node("Constant", [], value=numpy_helper.from_array(np.ones((4, 3, 3, 3), np.float32)))
    start = mark(g)
    out = g.node("Conv", ["step", weight], name="scan_conv")
    nodes, inits = take(g, start)
    g.nodes.append(helper.make_node(
        "Scan", [g.input("sequence", [5, 1, 3, 6, 6])], ["stacked"], num_scan_inputs=1,
        body=body("scan_body", nodes, inits, [out], [helper.make_tensor_value_info("step", FLOAT, [1, 3, 6, 6])])))
    assert infer_types(g.model(["stacked"])).flat()[out].shape == (1, 4, 4, 4), "with a large Constant weight outside"


def test_bn_left_in_a_subgraph_is_explained_with_its_scope_by_inspect(tmp_path):
    g = GraphBuilder(opset=15)
    x = g.input("x", [1, 3, 6, 6])
    cond = g.input("cond", [], onnx.TensorProto.BOOL)
    start = mark(g)
    outs = g.node("BatchNormalization", [g.node("Conv", [x, g.weight([4, 3, 3, 3])]), *g.bn_params(4)],
                  n_outputs=3, name="train_bn", training_mode=1)
    nodes, inits = take(g, start)
    g.nodes.append(helper.make_node("If", [cond], ["y"], name="if",
                                    then_branch=body("then", nodes, inits, [outs[0]]),
                                    else_branch=body("else", [helper.make_node("Neg", [x], ["e"])], [], ["e"])))
    path = tmp_path / "model.onnx"
    onnx.save(g.model(["y"]), path)
    as_json = CliRunner().invoke(main, ["inspect", str(path), "--json"])
    assert as_json.exit_code == 0, as_json.output
    (record,) = json.loads(as_json.output)["batchnorms"]
    assert (record["scope"], record["bn"], record["reason"]) == ("if/then_branch", "train_bn", "training_mode")
    as_text = CliRunner().invoke(main, ["inspect", str(path)])
    assert "if/then_branch/train_bn" in as_text.output and "training_mode" in as_text.output


def test_folding_a_model_with_subgraphs_twice_changes_nothing_the_second_time():
    model = loop_model()
    once = fold(model).model
    twice = fold(once).model
    assert once.SerializeToString() == twice.SerializeToString()
    assert fold(model).model.SerializeToString() == once.SerializeToString(), "deterministic"


def test_progress_counts_batch_norms_over_all_graphs():
    calls = []
    fold(loop_model(), progress=lambda stage, done, total: calls.append((stage, done, total)))
    assert [c for c in calls if c[0] == "fold"] == [("fold", 1, 2), ("fold", 2, 2)]
