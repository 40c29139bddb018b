"""Many patterns in one model: everything foldable folds, verifies and stays put on a second run; every
batch norm left says which rule kept it, in the report and in ``bnfold inspect``."""

from __future__ import annotations

import json

import numpy as np
import onnx
from click.testing import CliRunner

from bnfold import fold_onnx
from bnfold.cli import main
from tests.support.graphs import GraphBuilder, count_ops


def every_pattern_model() -> onnx.ModelProto:
    g = GraphBuilder(11)
    x = g.input("x", [2, 3, 6, 6])
    y = g.node("Conv", [g.bn(g.node("Relu", [x]), 3, name="bn_before_conv"), g.weight([4, 3, 1, 1])], name="conv1")
    y = g.node("Mul", [y, g.const(np.arange(1.0, 5.0).reshape(4, 1, 1))])
    y = g.node("Add", [g.const(np.full((4, 1, 1), 0.5)), y])
    y = g.node("Conv", [g.node("Relu", [y]), g.weight([4, 4, 3, 3])], pads=[1, 1, 1, 1], name="conv2")
    y = g.bn(g.node("Relu", [g.bn(y, 4, name="bn_after_conv")]), 4, name="bn_before_flatten")
    y = g.node("Gemm", [g.node("Flatten", [y]), g.weight([144, 8]), g.weight([8])], name="gemm")
    tokens = g.node("Reshape", [y, g.const(np.array([2, 2, 4]), dtype=np.int64)])
    z = g.node("MatMul", [tokens, g.weight([4, 5])], name="matmul")
    z = g.bn(g.node("Transpose", [z], perm=[0, 2, 1]), 5, name="bn_after_transpose")
    return g.model([z])


def test_a_model_with_every_pattern_folds_verifies_and_is_idempotent():
    model = every_pattern_model()
    result = fold_onnx(model)
    assert result.report.verification.passed
    assert count_ops(result.model) == 0
    patterns = {r.bn: r.pattern for r in result.report.records if r.op_type == "BatchNormalization"}
    assert patterns == {
        "bn_before_conv": "bn-conv",
        "bn_after_conv": "conv-bn",
        "bn_before_flatten": "bn-gemm",
        "bn_after_transpose": "matmul-nd-bn",
    }
    assert [r.op_type for r in result.report.records if r.pattern == "affine-chain"] == ["Mul", "Add"]
    again = fold_onnx(result.model, verify=False)
    assert again.report.folded == []
    assert again.model.SerializeToString() == result.model.SerializeToString()


def left_behind_model() -> onnx.ModelProto:
    g = GraphBuilder(12)
    x = g.input("x", [1, 3, 5, 4])
    relu = g.node("Relu", [x])
    outputs = [g.node("Relu", [g.bn(relu, 3, name="after_relu")])]
    _, beta, mean, var = g.bn_params(3)
    zero_scale = g.node("BatchNormalization", [relu, g.const(np.array([1.0, 0.0, 2.0])), beta, mean, var],
                        name="zero_scale")
    outputs.append(g.node("Conv", [zero_scale, g.weight([2, 3, 3, 3])], pads=[1, 1, 1, 1]))
    shared = g.bn(relu, 3, name="shared_output")
    outputs += [g.node("Conv", [shared, g.weight([2, 3, 1, 1])]), g.node("Sigmoid", [shared])]
    conv = g.node("Conv", [x, g.weight([4, 3, 1, 1])])
    columns = g.node("Add", [conv, g.const(np.arange(4.0))])
    outputs.append(g.bn(columns, 4, name="columns_bias"))
    outputs.append(g.bn(g.node("MatMul", [g.node("Relu", [x]), g.weight([4, 4])]), 3, name="nd_matmul"))
    return g.model(outputs)


EXPECTED_REASONS = {
    "after_relu": "no_linear_neighbour",
    "zero_scale": "padding",
    "shared_output": "output_fan_out",
    "columns_bias": "bias_not_per_channel",
    "nd_matmul": "matmul_rank",
}


def test_every_left_batchnorm_names_the_rule_that_kept_it():
    report = fold_onnx(left_behind_model(), verify=False).report
    assert {r.bn: r.reason for r in report.records} == EXPECTED_REASONS
    assert all(r.status == "left" and r.message for r in report.records)


def test_inspect_explains_every_batchnorm_left(tmp_path):
    path = tmp_path / "model.onnx"
    onnx.save(left_behind_model(), path)
    runner = CliRunner()
    as_json = runner.invoke(main, ["inspect", str(path), "--json"])
    assert as_json.exit_code == 0, as_json.output
    payload = json.loads(as_json.output)
    assert {r["bn"]: r["reason"] for r in payload["batchnorms"]} == EXPECTED_REASONS
    assert {r["op_type"] for r in payload["batchnorms"]} == {"BatchNormalization"}
    as_text = runner.invoke(main, ["inspect", str(path)])
    for name, reason in EXPECTED_REASONS.items():
        assert any(name in line and reason in line for line in as_text.output.splitlines()), (name, as_text.output)
