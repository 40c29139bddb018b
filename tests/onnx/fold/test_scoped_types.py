"""Value types are resolved per scope: sibling If branches, Loop bodies and function bodies may reuse a value
name with another rank, and a fold must rest only on the types of its own scope (and of the graphs around
it). ``matmul-bn`` is the probe: it folds a batch norm into a MatMul only where the product is provably 2-D;
at rank 3 the batch norm's channel axis (1) is not the MatMul's output axis (-1), so folding would be wrong
whenever the two axes have the same size, as they do here."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from bnfold import fold_onnx
from tests.support.graphs import run

C = 4  # every axis a batch norm could scale has this size, so a wrong fold still has valid shapes
FLOAT = TensorProto.FLOAT
DOMAIN = "scoped"


def value(name: str, rank: int) -> onnx.ValueInfoProto:
    """A float value of ``rank`` whose dims are all dynamic (the checker wants outputs to declare a rank)."""
    return helper.make_tensor_value_info(name, FLOAT, [f"{name}_{axis}" for axis in range(rank)])


def tensor(name: str, array) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array, dtype=np.float32), name)


def matmul_bn_nodes(rng: np.random.Generator, x: str, product: str, out: str, tag: str, *, as_constants: bool
                    ) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """``out = BN(MatMul(x, W))`` with ``product`` as the MatMul's output name (the name scopes share);
    parameters as initializers of the graph, or as Constant nodes (a function body)."""
    gamma = rng.uniform(0.5, 1.5, C) * rng.choice([-1.0, 1.0], C)
    values = {f"{tag}_w": rng.normal(size=(C, C)), f"{tag}_gamma": gamma, f"{tag}_beta": rng.normal(size=C),
              f"{tag}_mean": rng.normal(size=C), f"{tag}_var": rng.uniform(0.5, 2.0, C)}
    nodes = [helper.make_node("MatMul", [x, f"{tag}_w"], [product], name=f"{tag}_matmul"),
             helper.make_node("BatchNormalization", [product, *list(values)[1:]], [out], name=f"{tag}_bn")]
    if as_constants:
        constants = [helper.make_node("Constant", [], [name], value=tensor(name, array))
                     for name, array in values.items()]
        return constants + nodes, []
    return nodes, [tensor(name, value) for name, value in values.items()]


def branch(rng, x: str, tag: str, flat: str) -> onnx.GraphProto:
    """A branch computing ``BN(MatMul(a, W))`` with ``a = x`` and the product under the names every scope
    shares (``a``, ``product``), flattened to rank 2."""
    nodes, inits = matmul_bn_nodes(rng, "a", "product", f"{tag}_y", tag, as_constants=False)
    nodes = [helper.make_node("Identity", [x], ["a"]), *nodes, helper.make_node("Flatten", [f"{tag}_y"], [flat])]
    return helper.make_graph(nodes, tag, [], [value(flat, 2)], inits)


def finish(nodes, inputs, outputs, functions=(), opset: int = 17) -> onnx.ModelProto:
    model = helper.make_model(helper.make_graph(nodes, "main", inputs, outputs),
                              opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(DOMAIN, 1)],
                              functions=list(functions))
    model.ir_version = 10
    onnx.checker.check_model(model, full_check=True)
    return model


def main_inputs(*extra: onnx.ValueInfoProto) -> list[onnx.ValueInfoProto]:
    return [helper.make_tensor_value_info("x2", FLOAT, [3, C]), helper.make_tensor_value_info("x3", FLOAT, [2, C, C]),
            *extra]


def if_model(rank2_first: bool, *, condition_on_shape: bool = False) -> onnx.ModelProto:
    """An If whose branches both name their MatMul output ``product``: rank 2 in one, rank 3 in the other.
    The condition is a data input, or computed from a shape (Shape -> Gather -> Greater)."""
    rng = np.random.default_rng(1)
    rank2, rank3 = branch(rng, "x2", "two", "flat_two"), branch(rng, "x3", "three", "flat_three")
    then_branch, else_branch = (rank2, rank3) if rank2_first else (rank3, rank2)
    nodes, inputs = [], main_inputs()
    if condition_on_shape:
        nodes = [helper.make_node("Shape", ["x3"], ["shape"]),
                 helper.make_node("Gather", ["shape", "zero"], ["batch"], axis=0),
                 helper.make_node("Greater", ["batch", "one"], ["cond"])]
        consts = [helper.make_node("Constant", [], ["zero"], value=numpy_helper.from_array(np.array(0, np.int64))),
                  helper.make_node("Constant", [], ["one"], value=numpy_helper.from_array(np.array(1, np.int64)))]
        nodes = consts + nodes
    else:
        inputs.append(helper.make_tensor_value_info("cond", TensorProto.BOOL, []))
    # The else branch is listed first: the last scope visited used to win the name.
    nodes.append(helper.make_node("If", ["cond"], ["out"], name="choose", else_branch=else_branch,
                                  then_branch=then_branch))
    return finish(nodes, inputs, [value("out", 2)])


def records_by_bn(result) -> dict[str, str]:
    return {record.bn: record.status for record in result.report.records}


def assert_same_outputs(original: onnx.ModelProto, folded: onnx.ModelProto, feeds_list) -> None:
    for feeds in feeds_list:
        for want, got in zip(run(original, feeds), run(folded, feeds), strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(np.max(np.abs(want))))


def feeds(rng: np.random.Generator, **extra) -> dict[str, np.ndarray]:
    return {"x2": rng.normal(size=(3, C)).astype(np.float32), "x3": rng.normal(size=(2, C, C)).astype(np.float32),
            **extra}


@pytest.mark.parametrize("rank2_first", [True, False])
def test_if_branches_reusing_a_name_at_two_ranks_fold_only_the_rank2_batch_norm(rank2_first):
    model = if_model(rank2_first)
    result = fold_onnx(model, verify=False)
    assert records_by_bn(result) == {"two_bn": "folded", "three_bn": "left"}
    rng = np.random.default_rng(2)
    assert_same_outputs(model, result.model, [feeds(rng, cond=np.array(flag)) for flag in (True, False)])


def test_if_condition_computed_from_a_shape():
    model = if_model(False, condition_on_shape=True)  # x3's batch is 2 > 1: the rank-3 branch runs
    result = fold_onnx(model)
    assert records_by_bn(result) == {"two_bn": "folded", "three_bn": "left"}
    # The folded batch norm sits in the branch this shape never takes: verification says so.
    assert result.report.verification.unexercised == ["choose/else_branch/two_bn"]
    assert_same_outputs(model, result.model, [feeds(np.random.default_rng(3))])


def test_an_if_and_a_loop_beside_it_reusing_a_name():
    """The Loop body's ``a`` and ``product`` are rank 3; the If branch's, rank 2."""
    rng = np.random.default_rng(4)
    rank2 = branch(rng, "x2", "two", "flat_two")
    identity = helper.make_graph([helper.make_node("Flatten", ["x2"], ["flat_x"])], "other", [],
                                 [value("flat_x", 2)])
    loop_nodes, loop_inits = matmul_bn_nodes(rng, "a", "product", "loop_y", "loop", as_constants=False)
    loop_nodes = [helper.make_node("Identity", ["x3"], ["a"]), *loop_nodes,
                  helper.make_node("Identity", ["carried"], ["carried_out"]),
                  helper.make_node("Identity", ["keep"], ["keep_out"])]
    body = helper.make_graph(
        loop_nodes, "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("keep", TensorProto.BOOL, []),
         value("carried", 2)],
        [helper.make_tensor_value_info("keep_out", TensorProto.BOOL, []),
         value("carried_out", 2), value("loop_y", 3)],
        loop_inits)
    nodes = [
        helper.make_node("If", ["cond"], ["out"], name="choose", then_branch=rank2, else_branch=identity),
        helper.make_node("Constant", [], ["trips"], value=numpy_helper.from_array(np.array(2, np.int64))),
        helper.make_node("Constant", [], ["go"], value=numpy_helper.from_array(np.array(True))),
        helper.make_node("Loop", ["trips", "go", "x2"], ["final", "stacked"], name="loop", body=body),
    ]
    model = finish(nodes, main_inputs(helper.make_tensor_value_info("cond", TensorProto.BOOL, [])),
                   [value("out", 2), value("final", 2), value("stacked", 4)])
    result = fold_onnx(model, verify=False)
    assert records_by_bn(result) == {"two_bn": "folded", "loop_bn": "left"}
    assert_same_outputs(model, result.model, [feeds(rng, cond=np.array(flag)) for flag in (True, False)])


def test_nested_branches_reusing_a_name_at_two_ranks():
    """An If inside the then-branch of an If: the inner branches share ``product``, the outer else-branch too."""
    rng = np.random.default_rng(5)
    inner = helper.make_node("If", ["cond2"], ["inner_flat"], name="inner",
                             then_branch=branch(rng, "x3", "three", "f3"),
                             else_branch=branch(rng, "x2", "two", "f2"))
    outer_then = helper.make_graph([inner], "outer_then", [], [value("inner_flat", 2)])
    outer_else = branch(rng, "x3", "other", "f_other")
    model = finish([helper.make_node("If", ["cond"], ["out"], name="outer", then_branch=outer_then,
                                     else_branch=outer_else)],
                   main_inputs(helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
                               helper.make_tensor_value_info("cond2", TensorProto.BOOL, [])),
                   [value("out", 2)])
    result = fold_onnx(model, verify=False)
    assert records_by_bn(result) == {"two_bn": "folded", "three_bn": "left", "other_bn": "left"}
    assert_same_outputs(model, result.model, [feeds(rng, cond=np.array(a), cond2=np.array(b))
                                              for a in (True, False) for b in (True, False)])


def dense_function() -> onnx.FunctionProto:
    nodes, _ = matmul_bn_nodes(np.random.default_rng(6), "x", "product", "y", "dense", as_constants=True)
    return helper.make_function(DOMAIN, "Dense", ["x"], ["y"], nodes, [helper.make_opsetid("", 17)])


def call(source: str, output: str, name: str) -> onnx.NodeProto:
    return helper.make_node("Dense", [source], [output], domain=DOMAIN, name=name)


def test_a_function_called_from_two_branches_with_one_name_at_two_ranks_is_not_folded():
    """Both branches call the function on a value named ``arg``: rank 2 in one branch, rank 3 in the other."""
    then_branch = helper.make_graph([helper.make_node("Identity", ["x2"], ["arg"]), call("arg", "r2", "call2"),
                                     helper.make_node("Flatten", ["r2"], ["flat2"])], "then", [],
                                    [value("flat2", 2)])
    else_branch = helper.make_graph([helper.make_node("Identity", ["x3"], ["arg"]), call("arg", "r3", "call3"),
                                     helper.make_node("Flatten", ["r3"], ["flat3"])], "else", [],
                                    [value("flat3", 2)])
    model = finish([helper.make_node("If", ["cond"], ["out"], name="choose", else_branch=else_branch,
                                     then_branch=then_branch)],
                   main_inputs(helper.make_tensor_value_info("cond", TensorProto.BOOL, [])),
                   [value("out", 2)], functions=[dense_function()])
    result = fold_onnx(model, verify=False)
    (record,) = result.report.records
    assert (record.scope, record.status) == ("function:scoped.Dense", "left") and "rank" in record.message
    rng = np.random.default_rng(7)
    assert_same_outputs(model, result.model, [feeds(rng, cond=np.array(flag)) for flag in (True, False)])


@pytest.mark.parametrize(("sources", "status"), [(["x2", "x3"], "left"), (["x2", "x2"], "folded")])
def test_a_function_folds_only_at_the_rank_every_call_site_gives_it(sources, status):
    """The main graph names a rank-2 value ``product`` too: the body's own ``product`` is another value."""
    nodes = [helper.make_node("Identity", ["x2"], ["product"])]
    nodes += [call(source, f"y{position}", f"call{position}") for position, source in enumerate(sources)]
    outputs = [value("product", 2), value("y0", 2), value("y1", 3 if sources[1] == "x3" else 2)]
    model = finish(nodes, main_inputs(), outputs, functions=[dense_function()])
    result = fold_onnx(model)
    assert [record.status for record in result.report.records] == [status]
    assert result.report.verification.passed
    assert_same_outputs(model, result.model, [feeds(np.random.default_rng(8))])
