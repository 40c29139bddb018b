"""White-box tests of bnfold.onnx.session and the guard's repair it drives: how many times a fold session
reads and refolds the model, which stays linear in the number of folds when the folded model is invalid."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

import bnfold.onnx.guard
from bnfold import fold_onnx
from bnfold.onnx.fold.patterns.forward import ConvBn
from bnfold.onnx.store.model_store import ModelStore
from bnfold.reasons import Reason
from tests.support.graphs import GraphBuilder


def conv_bn_chain(count: int, opset: int = 17) -> onnx.ModelProto:
    g = GraphBuilder(seed=11, opset=opset)
    value = g.input("x", [1, 4, 5, 5])
    for position in range(count):
        conv = g.node("Conv", [value, g.weight([4, 4, 3, 3])], name=f"conv{position}", pads=[1, 1, 1, 1])
        value = g.node("Relu", [g.bn(conv, 4, name=f"bn{position}")])
    return g.model([value])


def ir3(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` as IR version 3 declares it: every initializer is also a graph input."""
    model.ir_version = 3
    declared = {value.name for value in model.graph.input}
    model.graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                             for t in model.graph.initializer if t.name not in declared)
    return model


def count_calls(monkeypatch, owner, name: str) -> list[object]:
    calls: list[object] = []
    real = getattr(owner, name)

    def counted(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, counted)
    return calls


def break_conv_bn(monkeypatch, bad: set[str]) -> None:
    """conv-bn gives its Conv a float64 weight (an invalid model) at the batch norms in ``bad``."""
    real = ConvBn.fold

    def broken(self, layer, run, space, mapper, index):
        rewrite = real(self, layer, run, space, mapper, index)
        if {bn.name for bn in run.batchnorms} & bad:
            rewrite.updates[0] = rewrite.updates[0]._replace(dtype=np.dtype(np.float64))
        return rewrite

    monkeypatch.setattr(ConvBn, "fold", broken)


def test_a_valid_fold_reads_the_model_once_and_checks_it_once(monkeypatch, tmp_path):
    path = tmp_path / "model.onnx"
    onnx.save(conv_bn_chain(3), path)
    reads = count_calls(monkeypatch, ModelStore, "read")
    checks = count_calls(monkeypatch, bnfold.onnx.guard.FoldedModelCheck, "__call__")
    records = fold_onnx(path, verify=False).report.records
    assert {record.status for record in records} == {"folded"}
    assert (len(reads), len(checks)) == (1, 1)


@pytest.mark.parametrize("bad", [{"bn3"}, {"bn1", "bn2", "bn4", "bn6", "bn7"}])
def test_named_culprits_cost_one_refold_each(monkeypatch, bad):
    """The checker names the Conv of each bad fold: one refold per bad fold, none for the others."""
    break_conv_bn(monkeypatch, bad)
    checks = count_calls(monkeypatch, bnfold.onnx.guard.FoldedModelCheck, "__call__")
    records = {record.bn: record for record in fold_onnx(conv_bn_chain(8), verify=False).report.records}
    assert {name for name, record in records.items() if record.reason == Reason.GUARD_REJECTED} == bad
    assert {records[name].status for name in set(records) - bad} == {"folded"}
    assert len(checks) == 1 + len(bad)


def test_unnamed_culprits_cost_one_refold_per_fold(monkeypatch):
    """A complaint that names no fold: each fold is tried once, on top of those kept before it."""
    monkeypatch.setattr(bnfold.onnx.guard.FoldedModelCheck, "__call__",
                        lambda self, candidate: "fails (injected)" if any(
                            init.name.startswith("conv2") and "bnfold" in init.name
                            for init in candidate.proto.graph.initializer) else None)
    calls = count_calls(monkeypatch, bnfold.onnx.guard.FoldedModelCheck, "__call__")
    folds = 8
    records = {record.bn: record for record in fold_onnx(conv_bn_chain(folds), verify=False).report.records}
    assert records["bn2"].reason == Reason.GUARD_REJECTED and "fails (injected)" in records["bn2"].message
    assert sum(record.status == "folded" for record in records.values()) == folds - 1
    # The first fold, none applied, one per fold, and the repaired fold.
    assert len(calls) == 1 + 1 + folds + 1


def test_an_ir3_model_folds_valid_at_the_first_check(monkeypatch):
    """IR 3 lists every initializer as a graph input: the listing makes none overridable, and the folds' new
    weights are listed in turn, so the folded model is valid at once and the guard never refolds."""
    checks = count_calls(monkeypatch, bnfold.onnx.guard.FoldedModelCheck, "__call__")
    model = fold_onnx(ir3(conv_bn_chain(6, opset=8)), verify=False).model
    assert len(checks) == 1 and not any(node.op_type == "BatchNormalization" for node in model.graph.node)
    onnx.checker.check_model(model, full_check=True)
    assert {v.name for v in model.graph.input} == {"x"} | {t.name for t in model.graph.initializer}
