"""verify_onnx: the documented comparison rule, and the engines it runs the models under."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from bnfold.core.compare import COMPARE_CHUNK, DEFAULT_TOLERANCES, default_tolerances
from bnfold.errors import InputError
from bnfold.onnx.verify.verify import verify_onnx
from tests.support.verify_models import conv_bn_and_folded, make_model, scaled, unary

# --- a training-mode BN folded fails; the same fold of an inference-mode BN passes -----------------


def test_training_mode_batchnorm_folded_with_running_statistics_fails():
    # With training_mode=1 the BN normalises by the statistics of the batch it is given, so folding
    # the running statistics computes a different function. onnxruntime runs it (three outputs).
    original, folded = conv_bn_and_folded(np.float32, training_mode=True, batch=4, opset=15)

    report = verify_onnx(original, folded)

    assert report.engine == "onnxruntime"
    assert not report.passed
    assert report.outputs[0].max_abs_error > 0.1 * report.outputs[0].atol / DEFAULT_TOLERANCES["float32"][1]


def test_the_same_fold_of_an_inference_batchnorm_passes():
    original, folded = conv_bn_and_folded(np.float32, batch=4, opset=15)
    assert verify_onnx(original, folded).passed


# --- the comparison rule --------------------------------------------------------------------------


def test_identical_models_pass_with_zero_error():
    model = unary("Relu")
    report = verify_onnx(model, model)
    assert report.passed and report.engine == "onnxruntime" and report.iterations == 3
    [output] = report.outputs
    assert (output.max_abs_error, output.max_rel_error, output.mean_abs_error) == (0.0, 0.0, 0.0)
    assert (output.mismatched, output.total, output.shape, output.dtype) == (0, 18, [2, 3], "float32")
    assert "PASSED" in report.render()
    json.dumps(report.to_dict(), allow_nan=False)


def test_default_atol_scales_with_the_output_and_dtype_defaults_apply():
    inputs = {"x": np.array([[100.0, -300.0, 5.0]], dtype=np.float32)}
    report = verify_onnx(scaled(1.0, shape=(1, 3)), scaled(1.0, shape=(1, 3)), inputs=inputs)
    rtol, atol_factor = default_tolerances(np.float32)
    assert report.outputs[0].rtol == rtol
    assert report.outputs[0].atol == pytest.approx(atol_factor * 300.0)
    assert default_tolerances("bfloat16") == DEFAULT_TOLERANCES["bfloat16"]
    with pytest.raises(InputError, match="int32"):
        default_tolerances(np.int32)


def test_user_tolerances_change_the_verdict_and_required_values_are_tight():
    original, candidate = scaled(1.0), scaled(1.001)  # relative error 1e-3 everywhere
    default = verify_onnx(original, candidate)
    assert not default.passed
    needed = default.outputs[0].required_rtol
    assert needed > 0

    assert verify_onnx(original, candidate, rtol=needed * 1.001).passed
    assert not verify_onnx(original, candidate, rtol=needed * 0.999).passed
    assert verify_onnx(original, candidate, atol=1.0).passed  # absolute, not scaled
    exact = verify_onnx(original, original, atol=0.0, rtol=0.0)
    assert exact.passed and exact.outputs[0].atol == 0.0
    strict = verify_onnx(original, scaled(1.0 + 2**-20), atol=0.0, rtol=0.0)
    assert not strict.passed and strict.outputs[0].mismatched > 0


def test_nan_must_match_in_position_and_is_left_out_of_the_statistics():
    inputs = {"x": np.array([[-1.0, 4.0, -9.0], [16.0, -0.5, 1.0]], dtype=np.float32)}
    report = verify_onnx(unary("Sqrt"), unary("Sqrt"), inputs=inputs)
    assert report.passed and report.outputs[0].max_abs_error == 0.0

    abs_then_sqrt = make_model(
        [helper.make_node("Abs", ["x"], ["a"]), helper.make_node("Sqrt", ["a"], ["y"])],
        [("x", TensorProto.FLOAT, (2, 3))], [("y", TensorProto.FLOAT)])
    report = verify_onnx(unary("Sqrt"), abs_then_sqrt, inputs=inputs)
    output = report.outputs[0]
    assert not report.passed
    assert output.mismatched == 3  # the three NaN positions; the finite ones agree exactly
    assert output.max_abs_error == 0.0


def test_infinities_must_match_in_sign():
    inputs = {"x": np.array([0.0, -0.0, 2.0], dtype=np.float32)}
    one_over = make_model([helper.make_node("Reciprocal", ["x"], ["y"])], [("x", TensorProto.FLOAT, [3])],
                          [("y", TensorProto.FLOAT)])
    one_over_abs = make_model(
        [helper.make_node("Abs", ["x"], ["a"]), helper.make_node("Reciprocal", ["a"], ["y"])],
        [("x", TensorProto.FLOAT, [3])], [("y", TensorProto.FLOAT)])
    assert verify_onnx(one_over, one_over, inputs=inputs).passed
    report = verify_onnx(one_over, one_over_abs, inputs=inputs)
    assert not report.passed and report.outputs[0].mismatched == 1


def test_outputs_larger_than_a_comparison_chunk_count_every_element_once():
    chunk = COMPARE_CHUNK
    size = 3 * chunk + 5
    x = np.random.default_rng(0).standard_normal(size).astype(np.float32)
    delta = np.zeros(size, np.float32)
    x[chunk - 1], x[chunk], x[2 * chunk] = np.nan, np.inf, -np.inf  # the first two match; -inf + NaN does not
    delta[2 * chunk] = np.nan
    delta[chunk + 1], delta[-1] = 1.0, -1.0  # beyond tolerance, in the second chunk and the last element
    shifted = make_model([helper.make_node("Add", ["x", "delta"], ["y"])], [("x", TensorProto.FLOAT, [size])],
                         [("y", TensorProto.FLOAT)], [("delta", delta)])

    [output] = verify_onnx(unary("Identity", shape=[size]), shifted, inputs={"x": x}).outputs

    finite = np.isfinite(x)
    errors = np.abs((x + delta)[finite].astype(np.float64) - x[finite].astype(np.float64))
    assert (output.mismatched, output.total, output.passed) == (3, size, False)
    assert output.atol == pytest.approx(DEFAULT_TOLERANCES["float32"][1] * np.max(np.abs(x[finite])))
    assert output.max_abs_error == errors.max()
    assert output.mean_abs_error == pytest.approx(errors.sum() / (size - 3))


def test_integer_outputs_must_be_exactly_equal_whatever_the_tolerance():
    argmax = unary("ArgMax", out_type=TensorProto.INT64, axis=1)
    argmin = unary("ArgMin", out_type=TensorProto.INT64, axis=1)
    same = verify_onnx(argmax, argmax)
    assert same.passed and same.outputs[0].dtype == "int64"
    report = verify_onnx(argmax, argmin, atol=100.0, rtol=100.0, inputs={"x": np.eye(2, 3, dtype=np.float32)})
    output = report.outputs[0]
    assert not report.passed and (output.atol, output.rtol) == (0.0, 0.0)
    assert output.mismatched == 2 and output.max_abs_error == 1.0


def test_bool_outputs_are_compared_exactly():
    greater = make_model([helper.make_node("Greater", ["x", "zero"], ["y"])], [("x", TensorProto.FLOAT, [5])],
                         [("y", TensorProto.BOOL)], [("zero", np.array(0.0, np.float32))])
    less = make_model([helper.make_node("Less", ["x", "zero"], ["y"])], [("x", TensorProto.FLOAT, [5])],
                      [("y", TensorProto.BOOL)], [("zero", np.array(0.0, np.float32))])
    assert verify_onnx(greater, greater).passed
    assert not verify_onnx(greater, less).passed


def test_shape_mismatch_between_outputs_fails_with_a_note():
    reduced = unary("ReduceSum", keepdims=1)
    flat = unary("ReduceSum", keepdims=0)
    report = verify_onnx(reduced, flat)
    assert not report.passed
    assert any("candidate returns" in note for note in report.notes)
    json.dumps(report.to_dict(), allow_nan=False)


def test_report_is_json_safe_when_a_zero_reference_is_missed():
    inputs = {"x": np.array([0.0, 1.0], dtype=np.float32)}
    shifted = make_model([helper.make_node("Add", ["x", "k"], ["y"])], [("x", TensorProto.FLOAT, [2])],
                         [("y", TensorProto.FLOAT)], [("k", np.array(0.5, np.float32))])
    report = verify_onnx(unary("Identity", shape=[2]), shifted, inputs=inputs)
    # No rtol passes an error at a zero reference; relative to the atol floor, the error is finite.
    assert math.isinf(report.outputs[0].required_rtol) and math.isfinite(report.outputs[0].max_rel_error)
    payload = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert payload["outputs"][0]["required_rtol"] is None and payload["passed"] is False
    assert "FAILED" in report.render()


# --- engines ----------------------------------------------------------------------------------------


def test_float64_conv_falls_back_to_the_reference_evaluator_and_the_fold_passes():
    original, folded = conv_bn_and_folded(np.float64)
    report = verify_onnx(original, folded)
    assert report.engine == "onnx.reference"
    assert any("NOT_IMPLEMENTED" in note for note in report.notes)
    assert report.passed, report.render()
    assert report.outputs[0].max_abs_error < 1e-12


def test_float16_fold_passes_under_onnxruntime():
    original, folded = conv_bn_and_folded(np.float16)
    report = verify_onnx(original, folded)
    assert report.engine == "onnxruntime" and report.passed, report.render()


def test_bfloat16_models_run_under_the_reference_evaluator():
    model = unary("Identity", elem_type=TensorProto.BFLOAT16)
    report = verify_onnx(model, model)
    assert report.engine == "onnx.reference" and report.passed
    assert report.outputs[0].dtype == "bfloat16"


@pytest.mark.parametrize("dtype, engine", [(np.float32, "onnxruntime"), (np.float64, "onnx.reference")])
def test_models_given_as_paths_with_external_data(tmp_path: Path, dtype, engine):
    original, folded = conv_bn_and_folded(dtype)
    onnx.save(original, tmp_path / "original.onnx")
    onnx.save(folded, tmp_path / "folded.onnx", save_as_external_data=True, location="folded.bin",
              size_threshold=0)
    assert (tmp_path / "folded.bin").exists()  # the weights live next to the model, as for > 2 GB models
    report = verify_onnx(tmp_path / "original.onnx", str(tmp_path / "folded.onnx"))
    assert report.passed and report.engine == engine


def test_unloadable_models_raise_input_error_naming_the_model(tmp_path: Path):
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a model")
    with pytest.raises(InputError, match="candidate"):
        verify_onnx(unary("Relu"), garbage)
    unknown_op = make_model([helper.make_node("NoSuchOp", ["x"], ["y"])], [("x", TensorProto.FLOAT, (2, 3))],
                            [("y", TensorProto.FLOAT)])
    with pytest.raises(InputError, match="onnxruntime cannot load the original model"):
        verify_onnx(unknown_op, unary("Relu"))


def test_progress_is_reported_per_iteration():
    calls = []
    verify_onnx(unary("Relu"), unary("Relu"), iterations=2, progress=lambda *call: calls.append(call))
    assert calls == [("run", 1, 2), ("run", 2, 2)]



@pytest.mark.parametrize("elem_type", [TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE])
def test_overflow_infinities_nan_and_subnormals_raise_no_numpy_warning(elem_type):
    """Nothing numpy would warn about (0/0, inf - inf, overflow in a cast or a product) reaches the user."""
    import warnings

    dtype = helper.tensor_dtype_to_np_dtype(elem_type)
    values = np.array([0.0, -0.0, 1e-42, 6e4, -6e4, np.inf, np.nan, 3.0], dtype=dtype)
    one_over = make_model([helper.make_node("Reciprocal", ["x"], ["y"])], [("x", elem_type, [8])], [("y", elem_type)])
    squared = make_model([helper.make_node("Mul", ["x", "x"], ["y"])], [("x", elem_type, [8])], [("y", elem_type)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for original, candidate in ((one_over, one_over), (one_over, squared), (squared, one_over)):
            verify_onnx(original, candidate, inputs={"x": values}).to_dict()
            verify_onnx(original, candidate, iterations=2).render()
