"""verify_onnx: what the models take and return, the inputs they run on, and every way those go wrong."""

from __future__ import annotations

import math
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from bnfold.errors import InputError
from bnfold.onnx.verify.verify import verify_onnx
from tests.support.verify_models import make_model, scaled, unary

# --- interfaces and inputs --------------------------------------------------------------------------


@pytest.mark.parametrize("candidate, message", [
    (make_model([helper.make_node("Relu", ["z"], ["y"])], [("z", TensorProto.FLOAT, (2, 3))],
                [("y", TensorProto.FLOAT)]), "different inputs"),
    (unary("Relu", elem_type=TensorProto.DOUBLE), "input 'x' is float in the original but double"),
    (make_model([helper.make_node("Relu", ["x"], ["out"])], [("x", TensorProto.FLOAT, (2, 3))],
                [("out", TensorProto.FLOAT)]), "different outputs"),
], ids=["input-names", "input-types", "output-names"])
def test_interface_mismatch_raises_input_error(candidate, message):
    with pytest.raises(InputError, match=message):
        verify_onnx(unary("Relu"), candidate)


def test_generated_inputs_are_reproducible_and_differ_per_iteration():
    echo = unary("Identity")
    first = verify_onnx(echo, scaled(1.001), seed=3)
    again = verify_onnx(echo, scaled(1.001), seed=3)
    other = verify_onnx(echo, scaled(1.001), seed=4)
    assert first.outputs[0].max_abs_error == again.outputs[0].max_abs_error
    assert first.outputs[0].max_abs_error != other.outputs[0].max_abs_error
    one, three = verify_onnx(echo, scaled(1.001), iterations=1), verify_onnx(echo, scaled(1.001), iterations=3)
    assert one.outputs[0].total * 3 == three.outputs[0].total


def test_generated_integer_and_bool_inputs():
    gather = make_model([helper.make_node("Gather", ["table", "index"], ["y"])],
                        [("index", TensorProto.INT64, [5])], [("y", TensorProto.FLOAT)],
                        [("table", np.array([1.0, 2.0], np.float32))])
    assert verify_onnx(gather, gather).passed  # indices drawn from [0, 2) stay in range
    negate = unary("Not", elem_type=TensorProto.BOOL)
    assert verify_onnx(negate, negate).passed


def test_dynamic_dims_take_two_sizes_from_the_ladder_or_come_from_input_shapes():
    model = unary("Relu", shape=["N", 3, None])
    report = verify_onnx(model, model)
    # N is the batch (1, then 2), axis 2 a spatial dim (224, then the next rung): both sizes are reported.
    assert report.sizes == [{"x": [1, 3, 224]}, {"x": [2, 3, 256]}]
    assert report.iterations == 4 and "x 1x3x224; x 2x3x256" in report.render()

    report = verify_onnx(model, model, input_shapes={"x": [4, 3, 5]})
    assert report.outputs[0].shape == [4, 3, 5] and report.sizes == [{"x": [4, 3, 5]}] and report.iterations == 3


def test_a_symbolic_dim_given_for_one_input_is_reused_for_the_others():
    add = make_model([helper.make_node("Add", ["a", "b"], ["y"])],
                     [("a", TensorProto.FLOAT, ["N", 2]), ("b", TensorProto.FLOAT, ["N", 2])],
                     [("y", TensorProto.FLOAT)])
    report = verify_onnx(add, add, input_shapes={"a": [3, 2]})
    assert report.passed and report.outputs[0].shape == [3, 2]
    assert report.sizes == [{"a": [3, 2], "b": [3, 2]}]


@pytest.mark.parametrize("input_shapes, message", [
    ({"x": [4, 4, 5]}, "declares as \\[N, 3, \\?\\]"),
    ({"x": [4, 3]}, "declares as"),
    ({"nope": [1]}, "unknown input"),
])
def test_input_shapes_that_contradict_the_model_raise(input_shapes, message):
    model = unary("Relu", shape=["N", 3, None])
    with pytest.raises(InputError, match=message):
        verify_onnx(model, model, input_shapes=input_shapes)


def test_npz_inputs_are_one_iteration(tmp_path: Path):
    path = tmp_path / "inputs.npz"
    np.savez(path, x=np.ones((2, 3), np.float32))
    report = verify_onnx(unary("Relu"), unary("Relu"), inputs=path, iterations=5)
    assert report.iterations == 1 and report.passed


def test_bfloat16_arrays_read_back_from_npz(tmp_path: Path):
    path = tmp_path / "inputs.npz"
    np.savez(path, x=np.ones((2, 3), ml_dtypes.bfloat16))  # stored as raw 2-byte records
    model = unary("Identity", elem_type=TensorProto.BFLOAT16)
    assert verify_onnx(model, model, inputs=str(path)).passed


@pytest.mark.parametrize("arrays, message", [
    ({}, "lacks? model input\\(s\\) x"),
    ({"x": np.ones((2, 3), np.float32), "z": np.ones(1)}, "z that are not model inputs"),
    ({"x": np.ones((2, 3), np.float64)}, "dtype float64, the model expects float32"),
    ({"x": np.ones((3, 2), np.float32)}, "shape \\[3, 2\\]"),
], ids=["missing", "extra", "dtype", "shape"])
def test_bad_npz_inputs_raise(tmp_path: Path, arrays, message):
    path = tmp_path / "inputs.npz"
    np.savez(path, **arrays)
    with pytest.raises(InputError, match=message):
        verify_onnx(unary("Relu"), unary("Relu"), inputs=path)


def test_a_sequence_of_mappings_is_one_iteration_each():
    draws = [{"x": np.full((2, 3), value, np.float32)} for value in (1.0, -1.0)]
    report = verify_onnx(unary("Relu"), unary("Relu"), inputs=draws)
    assert report.iterations == 2 and report.outputs[0].total == 12
    with pytest.raises(InputError, match="iteration 2"):
        verify_onnx(unary("Relu"), unary("Relu"), inputs=[draws[0], {"x": np.ones(3, np.float32)}])


@pytest.mark.parametrize("kwargs, message", [
    ({"inputs": []}, "empty"),
    ({"inputs": 3}, "inputs must be"),
    ({"inputs": "missing.npz"}, "cannot read inputs"),
    ({"inputs": {"x": np.ones((2, 3), np.float32)}, "input_shapes": {"x": [2, 3]}}, "generated inputs only"),
    ({"iterations": 0}, "iterations"),
    ({"atol": -1.0}, "atol"),
    ({"rtol": math.nan}, "rtol"),
])
def test_unusable_options_raise(kwargs, message):
    with pytest.raises(InputError, match=message):
        verify_onnx(unary("Relu"), unary("Relu"), **kwargs)


def test_scalar_bool_input_is_generated_as_an_array():
    condition = onnx.helper.make_tensor_value_info("c", onnx.TensorProto.BOOL, [])
    out = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.BOOL, [])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Not", ["c"], ["y"])], "g", [condition], [out])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    model.ir_version = 10
    assert verify_onnx(model, model).passed
