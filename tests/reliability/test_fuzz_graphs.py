"""The quick profile of the random-graph fuzzer (the long one: ``python -m tests.support.fuzz``): on every
random model the fold does not crash, gives a valid and equivalent model, leaves every unsafe batch norm,
and folding its result again changes nothing."""

from __future__ import annotations

import sys

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, assume, given, settings
from onnx import TensorProto, helper, numpy_helper

from bnfold import fold_onnx
from bnfold.errors import InputError
from bnfold.onnx.fold.patterns.forward import ConvBn
from bnfold.onnx.store import limits
from bnfold.onnx.verify.coverage import Coverage
from tests.support.bad_inputs import conv_bn
from tests.support.graph_fuzz import FuzzCase, check, fuzz_cases, generator_problem

QUICK_EXAMPLES = 1000


@settings(max_examples=QUICK_EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(fuzz_cases())
def test_random_graphs_fold_safely_exactly_and_idempotently(case):
    problem = generator_problem(case)
    assume(problem is None or problem[0] != "unrunnable")  # no engine here can run it; nothing to compare
    assert problem is None, f"the generator made an invalid model: {problem[1]}"
    verdict = check(case)
    assert not verdict.problems, f"{case.describe()}: {verdict.problems}"


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_the_oracle_catches_a_fold_that_is_off_by_one_percent(monkeypatch, dtype):
    """The properties are not vacuous: a conv-bn that scales one channel 1% wrong fails them, in the plain
    comparison and in the float64 judgement the oracle falls back on."""
    real = ConvBn.fold

    def off(self, layer, run, space, mapper, index):
        rewrite = real(self, layer, run, space, mapper, index)
        wrong = np.array(rewrite.updates[0].value)
        wrong[0] *= 1.01
        rewrite.updates[0] = rewrite.updates[0]._replace(value=wrong)
        return rewrite

    monkeypatch.setattr(ConvBn, "fold", off)
    model = conv_bn(channels=4)
    if dtype == np.float16:
        for tensor in model.graph.initializer:
            tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor).astype(dtype), tensor.name))
        for value in (*model.graph.input, *model.graph.output):
            value.type.tensor_type.elem_type = TensorProto.FLOAT16
    rng = np.random.default_rng(0)
    case = FuzzCase(model, [{"x": rng.standard_normal((1, 3, 8, 8)).astype(dtype)}], {}, ["Conv"],
                    precision=np.dtype(dtype))
    assert [p for p in check(case).problems if p.startswith("not equivalent")]


def test_the_oracle_catches_a_verification_blind_to_untaken_branches(monkeypatch):
    """The coverage property is not vacuous: a verification that claims every folded site ran fails it on a
    graph, shaped as the fuzzer makes them, with a fold in each If branch and an input taking one."""
    rng = np.random.default_rng(0)
    constants = {name: rng.uniform(0.5, 1.5, 4).astype(np.float32) for name in ("gamma", "beta", "mean", "var")}
    constants["w"] = rng.normal(0, 0.5, (4, 3, 1, 1)).astype(np.float32)

    def branch(prefix: str) -> onnx.GraphProto:
        return helper.make_graph(
            [helper.make_node("Conv", ["x", "w"], [f"{prefix}_c"]),
             helper.make_node("BatchNormalization", [f"{prefix}_c", "gamma", "beta", "mean", "var"], [f"{prefix}_y"],
                              name=f"{prefix}_bn")], prefix, [],
            [helper.make_tensor_value_info(f"{prefix}_y", TensorProto.FLOAT, (1, 4, 2, 2))])

    graph = helper.make_graph(
        [helper.make_node("If", ["cond"], ["y"], then_branch=branch("then"), else_branch=branch("else"))], "fuzz",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, (1, 3, 2, 2)),
         helper.make_tensor_value_info("cond", TensorProto.BOOL, ())],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, (1, 4, 2, 2))],
        [numpy_helper.from_array(value, name) for name, value in constants.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    feeds = [{"x": rng.standard_normal((1, 3, 2, 2)).astype(np.float32), "cond": np.array(flag)}
             for flag in (True, False)]
    case = FuzzCase(model, feeds, {}, ["If", "Conv"])
    assert check(case).problems == []
    monkeypatch.setattr(Coverage, "unexercised", lambda self: [])
    assert [p for p in check(case).problems if p.startswith("coverage")]


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                 HealthCheck.function_scoped_fixture])
@given(case=fuzz_cases())
def test_random_graphs_fold_from_a_file_as_from_memory(case, tmp_path_factory, monkeypatch):
    """Read from a file with every main-graph tensor left on disk until a fold reads it, mapped, and each
    scaled weight computed only as it is written, a few bytes at a time (shared weights, fan-out, refusals,
    folds into a weight already folded and all), the fold gives the very model it gives from memory."""
    monkeypatch.setattr(limits, "LAZY_MIN_BYTES", 1)
    monkeypatch.setattr(limits, "MAP_MIN_BYTES", 1)
    monkeypatch.setattr(limits, "DEFERRED_BLOCK_BYTES", 64)
    monkeypatch.setattr(limits, "DEFERRED_MIN_BYTES", 0)
    monkeypatch.setattr(limits, "HELD_MIN_BYTES", 1)  # every folded weight held, so deferred ones are streamed
    path = tmp_path_factory.mktemp("lazy") / "model.onnx"
    path.write_bytes(case.model.SerializeToString())
    try:
        with pytest.MonkeyPatch.context() as eager:  # in memory, every product is computed when it is cast
            eager.setattr(limits, "DEFERRED_MIN_BYTES", sys.maxsize)
            in_memory = fold_onnx(case.model, verify=False, **case.options)
    except InputError:
        return  # a model the fold refuses from memory (the generator's) is refused from the file too
    from_file = fold_onnx(path, verify=False, **case.options)
    assert [r.to_dict() for r in from_file.report.records] == [r.to_dict() for r in in_memory.report.records]
    assert from_file.model.SerializeToString() == in_memory.model.SerializeToString()
