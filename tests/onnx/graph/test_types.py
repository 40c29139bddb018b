"""Types from shape inference: a model with little tensor data is inferred as it is, a heavy one on its
skeleton; both must give every value the same type and shape.

White-box tests of :mod:`bnfold.onnx.graph.types`: they call and replace its private ``_needs_skeleton``."""

from __future__ import annotations

import numpy as np
import onnx
from hypothesis import HealthCheck, given, settings
from onnx import TensorProto, helper, numpy_helper

from bnfold.onnx.graph import types
from bnfold.onnx.store import limits
from bnfold.onnx.store.io import read_model_lazy
from tests.support.graph_fuzz import fuzz_cases


def both_ways(model):
    direct, needs = types.infer_types(model), types._needs_skeleton
    types._needs_skeleton = lambda _model: True
    try:
        return direct, types.infer_types(model)
    finally:
        types._needs_skeleton = needs


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(fuzz_cases())
def test_a_model_and_its_skeleton_infer_the_same_types(case):
    assert not types._needs_skeleton(case.model)
    direct, skeleton = both_ways(case.model)
    assert direct == skeleton


def test_a_model_read_lazily_infers_the_same_types_from_itself_as_from_its_skeleton(tmp_path):
    path = tmp_path / "model.onnx"
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((64, 32, 3, 3)).astype(np.float32), "w")
    shape = numpy_helper.from_array(np.array([1, -1], dtype=np.int64), "shape")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1]),
         helper.make_node("Reshape", ["y", "shape"], ["z"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 32, 8, 8])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)], [weight, shape])
    path.write_bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString())
    model = read_model_lazy(path)
    assert model.graph.initializer[0].data_location == TensorProto.EXTERNAL  # the weight stayed in the file
    assert not types._needs_skeleton(model)
    direct, skeleton = both_ways(model)
    assert direct == skeleton and direct.main["z"] == types.ValueType(TensorProto.FLOAT, (1, 4096))


def test_much_tensor_data_or_a_small_tensor_on_disk_takes_the_skeleton():
    heavy = numpy_helper.from_array(np.zeros(limits.SKELETON_FROM_BYTES // 4, np.float32), "heavy")
    small_on_disk = numpy_helper.from_array(np.array([1, -1], dtype=np.int64), "shape")
    small_on_disk.data_location = TensorProto.EXTERNAL
    for tensor in (heavy, small_on_disk):
        graph = helper.make_graph([], "g", [], [], [tensor])
        assert types._needs_skeleton(helper.make_model(graph))


def test_sibling_scopes_keep_their_own_types_of_a_shared_name_on_a_skeleton_too():
    """Both If branches hold a large initializer ``w`` (rank 1 in one, rank 2 in the other) and compute ``a``
    from it: each branch's table has its own, whether inference ran on the model or on its skeleton."""
    def branch(name: str, shape: tuple[int, ...]) -> onnx.GraphProto:
        weight = numpy_helper.from_array(np.ones(shape, np.float32), "w")
        return helper.make_graph([helper.make_node("Identity", ["w"], ["a"]),
                                  helper.make_node("ReduceSum", ["a"], ["s"], keepdims=0)], name, [],
                                 [helper.make_tensor_value_info("s", TensorProto.FLOAT, [])], [weight])
    node = helper.make_node("If", ["cond"], ["out"], then_branch=branch("then", (100,)),
                            else_branch=branch("else", (10, 10)))
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    direct, skeleton = both_ways(model)
    assert direct == skeleton
    then_types, else_types = direct.scopes[(0, "then_branch")], direct.scopes[(0, "else_branch")]
    assert (then_types["a"].shape, else_types["a"].shape) == ((100,), (10, 10))
    assert (then_types["w"].shape, else_types["w"].shape) == ((100,), (10, 10))
    assert "a" not in direct.main and "w" not in direct.main
