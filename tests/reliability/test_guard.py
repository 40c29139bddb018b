"""The per-pattern guard: a rewrite that would make the model fail onnx.checker or an onnxruntime load, or a
pattern that crashes, costs only the batch norms it touches; they stay with reason ``guard_rejected``.

White-box tests of :mod:`bnfold.onnx.guard`: some replace its private ``_ort_load_failure`` to inject a failure
that no real model provokes."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

import bnfold.onnx.guard
from bnfold import fold_onnx
from bnfold.cli import main
from bnfold.errors import InternalError
from bnfold.onnx.fold.patterns.forward import ConvBn
from bnfold.reasons import Reason
from tests.support.graphs import GraphBuilder, assert_equivalent, count_ops


def model_with_three_conv_bns_and_a_gemm_bn() -> onnx.ModelProto:
    g = GraphBuilder(seed=3)
    x = g.input("x", [2, 3, 6, 6])
    value = x
    for position, channels in enumerate((4, 5, 6), start=1):
        conv = g.node("Conv", [value, g.weight([channels, value == x and 3 or channels - 1, 3, 3])],
                      name=f"conv{position}", pads=[1, 1, 1, 1])
        value = g.node("Relu", [g.bn(conv, channels, name=f"bn{position}")])
    flat = g.node("Flatten", [value])
    gemm = g.node("Gemm", [flat, g.weight([6 * 6 * 6, 7])], name="gemm")
    return g.model([g.bn(gemm, 7, name="bn_gemm")])


def break_conv_bn(monkeypatch, where: set[str] | None = None, crash: bool = False) -> None:
    """conv-bn plans a rewrite that gives its Conv a float64 weight (an invalid model), or crashes, at the
    batch norms named in ``where`` (all if None)."""
    real = ConvBn.fold

    def broken(self, layer, run, space, mapper, index):
        rewrite = real(self, layer, run, space, mapper, index)
        if where is None or {bn.name for bn in run.batchnorms} & where:
            if crash:
                raise RuntimeError("injected failure")
            rewrite.updates[0] = rewrite.updates[0]._replace(dtype=np.dtype(np.float64))
        return rewrite

    monkeypatch.setattr(ConvBn, "fold", broken)


def by_name(result) -> dict[str, object]:
    return {record.bn: record for record in result.report.records}


def test_one_bad_rewrite_costs_only_its_own_batch_norm(monkeypatch):
    model = model_with_three_conv_bns_and_a_gemm_bn()
    break_conv_bn(monkeypatch, where={"bn2"})
    result = fold_onnx(model)
    records = by_name(result)
    assert (records["bn2"].status, records["bn2"].reason) == ("left", Reason.GUARD_REJECTED)
    assert "conv-bn" in records["bn2"].message and "onnx.checker" in records["bn2"].message
    assert [records[name].status for name in ("bn1", "bn3", "bn_gemm")] == ["folded"] * 3
    onnx.checker.check_model(result.model, full_check=True)
    assert count_ops(result.model) == 1
    assert result.report.verification.passed
    assert_equivalent(model, result.model)


def test_a_pattern_broken_everywhere_costs_only_that_pattern(monkeypatch):
    model = model_with_three_conv_bns_and_a_gemm_bn()
    break_conv_bn(monkeypatch)
    records = by_name(fold_onnx(model, verify=False))
    assert {name: records[name].reason for name in ("bn1", "bn2", "bn3")} == dict.fromkeys(
        ("bn1", "bn2", "bn3"), Reason.GUARD_REJECTED)
    assert records["bn_gemm"].status == "folded"


def test_a_crashing_pattern_costs_only_its_site(monkeypatch):
    model = model_with_three_conv_bns_and_a_gemm_bn()
    break_conv_bn(monkeypatch, where={"bn1"}, crash=True)
    result = fold_onnx(model)
    records = by_name(result)
    assert records["bn1"].reason == Reason.GUARD_REJECTED
    assert "internal error in pattern conv-bn (RuntimeError: injected failure)" in records["bn1"].message
    assert [records[name].status for name in ("bn2", "bn3", "bn_gemm")] == ["folded"] * 3
    assert result.report.verification.passed


def test_a_model_onnxruntime_cannot_load_is_repaired_too(monkeypatch):
    """The checker passes; the bias conv-bn creates counts as a node of a new kernel signature, and
    onnxruntime refuses every model with it (both stood in for by fakes, since a real such rewrite would be
    a bug onnx's checker misses)."""
    real_signatures = bnfold.onnx.guard.kernel_signatures

    def signatures(graph, elem_types):
        new = {("test", "NewKernel", frozenset(), frozenset())} if b"conv2.bias" in graph.SerializeToString() else set()
        return real_signatures(graph, elem_types) | new

    def load_failure(source):
        return "no kernel (injected)" if isinstance(source, bytes) and b"conv2.bias" in source else None

    monkeypatch.setattr(bnfold.onnx.guard, "kernel_signatures", signatures)
    monkeypatch.setattr(bnfold.onnx.guard, "_ort_load_failure", load_failure)
    records = by_name(fold_onnx(model_with_three_conv_bns_and_a_gemm_bn(), verify=False))
    assert records["bn2"].reason == Reason.GUARD_REJECTED and "onnxruntime cannot load" in records["bn2"].message
    assert [records[name].status for name in ("bn1", "bn3", "bn_gemm")] == ["folded"] * 3


def test_onnxruntime_is_not_asked_when_the_fold_makes_no_new_kind_of_node(monkeypatch):
    """Conv+BN and Gemm+BN folds change weights and add biases of the layer's own type: every kernel the
    folded model needs, the original already needed, so loading it in onnxruntime proves nothing new."""
    def load_failure(source):
        raise AssertionError("onnxruntime was asked")

    monkeypatch.setattr(bnfold.onnx.guard, "_ort_load_failure", load_failure)
    records = by_name(fold_onnx(model_with_three_conv_bns_and_a_gemm_bn(), verify=False))
    assert {record.status for record in records.values()} == {"folded"}


def test_a_new_kind_of_node_is_loaded_in_onnxruntime(monkeypatch):
    """The standalone rewrite makes a Mul and an Add, which the original has nowhere: onnxruntime loads the
    result."""
    asked = []
    real = bnfold.onnx.guard._ort_load_failure
    monkeypatch.setattr(bnfold.onnx.guard, "_ort_load_failure", lambda source: asked.append(source) or real(source))
    g = GraphBuilder(seed=5)
    bn = g.bn(g.node("Relu", [g.input("x", [1, 3, 6, 6])]), 3, name="bn")
    model = g.model([g.node("Relu", [bn])])
    records = by_name(fold_onnx(model, verify=False, standalone="mul-add"))
    assert records["bn"].status == "folded" and len(asked) == 1


def test_the_cli_warns_on_stderr_and_writes_the_repaired_model(monkeypatch, tmp_path):
    source, out = tmp_path / "model.onnx", tmp_path / "out.onnx"
    onnx.save(model_with_three_conv_bns_and_a_gemm_bn(), source)
    break_conv_bn(monkeypatch, where={"bn3"})
    result = CliRunner().invoke(main, ["fold", str(source), "-o", str(out), "--json"])
    assert result.exit_code == 0, result.stderr
    assert result.stderr.startswith("bnfold: warning: bn3: internal error") and "conv-bn" in result.stderr
    onnx.checker.check_model(onnx.load(out), full_check=True)
    assert count_ops(onnx.load(out)) == 1


def test_when_no_rejection_gives_a_valid_model_nothing_is_written(monkeypatch, tmp_path):
    monkeypatch.setattr(bnfold.onnx.guard.FoldedModelCheck, "__call__", lambda self, candidate: "fails (injected)")
    with pytest.raises(InternalError, match="^internal error"):
        fold_onnx(model_with_three_conv_bns_and_a_gemm_bn(), verify=False)
    source, out = tmp_path / "model.onnx", tmp_path / "out.onnx"
    onnx.save(model_with_three_conv_bns_and_a_gemm_bn(), source)
    result = CliRunner().invoke(main, ["fold", str(source), "-o", str(out)])
    assert result.exit_code == 3 and result.stderr.count("\n") == 1 and not out.exists()
