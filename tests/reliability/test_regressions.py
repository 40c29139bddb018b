"""One test per bug the fuzzers and the bad-input catalog found (docs/reliability.md lists them)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, numpy_helper

from bnfold import InputError, fold_onnx
from bnfold.cli import main
from tests.support.bad_inputs import conv_bn
from tests.support.graphs import GraphBuilder, assert_equivalent, count_ops


def fold_twice(model: onnx.ModelProto, **options):
    once = fold_onnx(model, verify=False, **options)
    twice = fold_onnx(once.model, verify=False, **options)
    return once, twice


def assert_idempotent(model: onnx.ModelProto, **options) -> onnx.ModelProto:
    once, twice = fold_twice(model, **options)
    assert twice.report.folded == []
    assert twice.model.SerializeToString() == once.model.SerializeToString()
    assert_equivalent(model, once.model)
    return once.model


@pytest.mark.parametrize("opset", [9, 13])
def test_float64_models_of_opsets_9_to_13_verify_under_the_reference_evaluator(opset):
    """onnx.reference's BatchNormalization-9 always normalizes with batch statistics, so every correct fold of
    a float64 model at these opsets failed verification (exit 1, nothing written)."""
    model = conv_bn(opset=opset)
    for tensor in model.graph.initializer:
        tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float64), tensor.name))
    for value in (*model.graph.input, *model.graph.output):
        value.type.tensor_type.elem_type = TensorProto.DOUBLE
    report = fold_onnx(model).report
    assert report.verification.engine == "onnx.reference"
    assert report.verification.passed


def test_float64_grouped_conv_transpose_verifies_under_the_reference_evaluator():
    """onnx.reference's grouped ConvTranspose takes the wrong weight rows, adds the whole bias to each group and
    keeps one channel per group, so verification of a float64 model with one compared against wrong numbers."""
    g = GraphBuilder(seed=8, dtype=np.float64)
    x = g.input("x", [2, 4, 3, 3])
    up = g.node("ConvTranspose", [x, g.weight([4, 3, 2, 2]), g.weight([6])], group=2, strides=[2, 2])
    model = g.model([g.bn(up, 6)])
    result = fold_onnx(model)
    assert count_ops(result.model) == 0
    assert result.report.verification.engine == "onnx.reference"
    assert result.report.verification.passed


def test_a_shift_a_fold_leaves_folds_on_in_the_same_run():
    """MatMul -> BN leaves the shift as an Add, which folds into the Gemm after it; the driver used to leave
    that to a second run."""
    g = GraphBuilder(seed=5)
    x = g.input("x", [2, 6])
    hidden = g.bn(g.node("MatMul", [x, g.weight([6, 4])]), 4)
    gemm = g.node("Gemm", [hidden, g.weight([3, 4]), g.weight([3])], alpha=2.0, transB=1)
    model = g.model([g.node("Relu", [g.bn(gemm, 3)])])
    assert count_ops(assert_idempotent(model), "Add") == 0


def test_a_fold_that_unblocks_an_earlier_node_is_done_in_the_same_run():
    """A Sub before Flatten -> MatMul can fold only once the MatMul's own batch norm has left a bias Add."""
    g = GraphBuilder(seed=6)
    x = g.input("x", [2, 5])
    sub = g.node("Sub", [g.node("MatMul", [x, g.weight([5, 5])]), g.weight([5])])
    matmul = g.node("MatMul", [g.node("Flatten", [sub], axis=1), g.weight([5, 3])])
    model = g.model([g.node("Div", [g.bn(matmul, 3), g.weight([3])])])
    assert_idempotent(model)


def test_a_renamed_value_keeps_its_type_for_later_folds():
    """The standalone Mul + Add fold into the MatMul with a new bias Add after it; the MatMul's renamed output
    had no known rank, so the Sub after the Reshape folded only in a second run."""
    g = GraphBuilder(seed=7)
    x = g.input("x", [2, 1, 1, 5])
    normalized = g.bn(g.bn(g.node("Relu", [x]), 1), 1)
    matmul = g.node("MatMul", [normalized, g.weight([5, 8])])
    reshaped = g.node("Reshape", [matmul, g.const(np.array([0, 1, -1]), dtype=np.int64)])
    model = g.model([g.node("Flatten", [g.node("Sub", [reshaped, g.weight([1, 1, 1])])], axis=0)])
    assert_idempotent(model, standalone="mul-add")


def non_utf8_model(tmp_path: Path) -> Path:
    model = conv_bn()
    model.graph.node[0].name = "NAMEXX"
    path = tmp_path / "model.onnx"
    path.write_bytes(model.SerializeToString().replace(b"NAMEXX", b"\xff\xfe\xfd\xfc\xfb\xfa"))
    return path


def non_utf8_value_name(tmp_path: Path) -> Path:
    """The invalid text in repeated fields (node inputs and outputs) and in a singular one (the value info)."""
    model = conv_bn()
    path = tmp_path / "model.onnx"
    path.write_bytes(model.SerializeToString().replace(b"\x12\x04conv", b"\x12\x04\xff\xfe\xfd\xfc"))
    return path


def tensor_of_unknown_type(tmp_path: Path) -> Path:
    model = conv_bn()
    model.graph.initializer[0].data_type = 33
    path = tmp_path / "model.onnx"
    path.write_bytes(model.SerializeToString())
    return path


@pytest.mark.parametrize(("build", "message"), [
    (non_utf8_model, "not UTF-8"),
    (non_utf8_value_name, "field onnx.NodeProto.output holds text that is not UTF-8"),
    (tensor_of_unknown_type, "fails onnx.checker: Invalid tensor data type 33"),
], ids=["text-not-utf8", "repeated-text-not-utf8", "checker-value-error"])
def test_malformed_models_the_fuzzer_found_are_the_inputs_fault(tmp_path, build, message):
    """Protobuf hands invalid UTF-8 text back as bytes, and onnx's checker raises ValueError (not
    ValidationError) for an unknown tensor type: both ended as 'internal error', exit 3."""
    path = build(tmp_path)
    with pytest.raises(InputError, match=message):
        fold_onnx(path)
    result = CliRunner().invoke(main, ["fold", str(path), "-o", str(tmp_path / "out.onnx")])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1 and message in result.stderr
    assert not (tmp_path / "out.onnx").exists()


def test_usage_errors_are_one_line_too():
    result = CliRunner().invoke(main, ["fold", "--no-such-option"], prog_name="bnfold")
    assert result.exit_code == 2
    assert result.stderr == "bnfold: error: No such option '--no-such-option' (see 'bnfold fold --help')\n"
