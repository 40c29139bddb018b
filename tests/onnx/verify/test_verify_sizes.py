"""verify_onnx on models with dynamic dims: generated inputs take sizes the model runs at (two of them), a
fault that a size of 1 would hide is caught, a model no size runs gets one line naming the input and the
option to pass, and no comparison is vacuous."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from bnfold.errors import InputError
from bnfold.onnx.verify.verify import verify_onnx


def model(nodes: list[onnx.NodeProto], inputs: list[tuple[str, int, list]], initializers: dict[str, np.ndarray],
          output_shape: list | None = None) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info(name, kind, shape) for name, kind, shape in inputs],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, output_shape)],
        [numpy_helper.from_array(value, name) for name, value in initializers.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def image_model(weight: np.ndarray) -> onnx.ModelProto:
    """A detector-like neck: Conv 3x3 -> MaxPool 2x2 -> Resize x2 -> Add of the conv output, which runs only
    where H and W are even (1x1 is not)."""
    return model(
        [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
         helper.make_node("MaxPool", ["c"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
         helper.make_node("Resize", ["p", "", "scales"], ["r"], mode="nearest"),
         helper.make_node("Add", ["c", "r"], ["y"])],
        [("x", TensorProto.FLOAT, ["N", 3, "H", "W"])],
        {"w": weight, "scales": np.array([1, 1, 2, 2], np.float32)})


WEIGHT = np.random.default_rng(0).normal(0, 0.5, (4, 3, 3, 3)).astype(np.float32)


def test_an_image_model_that_cannot_run_at_1x1_runs_at_two_ladder_sizes():
    report = verify_onnx(image_model(WEIGHT), image_model(WEIGHT))
    assert report.passed and report.sizes == [{"x": [1, 3, 224, 224]}, {"x": [2, 3, 256, 256]}]
    assert report.iterations == 4 and report.to_dict()["sizes"] == report.sizes


def test_a_damaged_corner_tap_that_a_1x1_image_never_reads_fails():
    damaged = WEIGHT.copy()
    damaged[:, :, 0, 0] *= 1.5
    corner_only = model([helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])],
                        [("x", TensorProto.FLOAT, ["N", 3, "H", "W"])], {"w": WEIGHT})
    corner_damaged = model([helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])],
                           [("x", TensorProto.FLOAT, ["N", 3, "H", "W"])], {"w": damaged})
    assert verify_onnx(corner_only, corner_damaged, input_shapes={"x": [1, 3, 1, 1]}).passed  # the old default
    report = verify_onnx(corner_only, corner_damaged)
    assert report.status == "failed" and report.outputs[0].mismatched > 0


def test_an_audio_model_that_needs_a_long_window_gets_one():
    window = np.ones((1, 1, 400), np.float32) / 400
    audio = model([helper.make_node("Unsqueeze", ["x", "axis"], ["u"]),
                   helper.make_node("Conv", ["u", "window"], ["y"], strides=[160])],
                  [("x", TensorProto.FLOAT, ["batch", "samples"])], {"window": window, "axis": np.array([1])})
    report = verify_onnx(audio, audio)
    assert report.passed and report.sizes == [{"x": [1, 1024]}, {"x": [2, 16000]}]


def test_a_model_no_size_runs_gets_one_line_naming_the_input_and_the_options():
    fixed = model([helper.make_node("Reshape", ["x", "shape"], ["y"])], [("x", TensorProto.FLOAT, ["N", "L"])],
                  {"shape": np.array([5, 7], np.int64)})
    with pytest.raises(InputError) as raised:
        verify_onnx(fixed, fixed)
    message = str(raised.value)
    assert "\n" not in message and "x 1x16" in message and "x 1x1" in message
    assert "--input-shape (x:...)" in message and "--inputs" in message
    assert verify_onnx(fixed, fixed, input_shapes={"x": [5, 7]}).passed


def test_an_integer_input_that_needs_a_real_value_is_named():
    """A wake-word model's ``sr``: drawn from [0, 2), it makes the Gather index out of range."""
    vad = model([helper.make_node("Sub", ["sr", "base"], ["index"]),
                 helper.make_node("Gather", ["table", "index"], ["scale"]),
                 helper.make_node("Mul", ["x", "scale"], ["y"])],
                [("x", TensorProto.FLOAT, ["N", "T"]), ("sr", TensorProto.INT64, [])],
                {"base": np.array(16000, np.int64), "table": np.array([1.0], np.float32)})
    with pytest.raises(InputError, match="integer input\\(s\\) sr were drawn from \\[0, 2\\): give their values "
                                         "with --inputs"):
        verify_onnx(vad, vad)
    given = {"x": np.ones((1, 512), np.float32), "sr": np.array(16000, np.int64)}
    assert verify_onnx(vad, vad, inputs=given).passed


def test_static_models_run_once_per_iteration_at_their_declared_size():
    conv = model([helper.make_node("Conv", ["x", "w"], ["y"])], [("x", TensorProto.FLOAT, [1, 3, 5, 5])],
                 {"w": WEIGHT})
    report = verify_onnx(conv, conv, iterations=2)
    assert report.iterations == 2 and report.sizes == [] and report.passed


def test_no_comparison_is_vacuous():
    identity = model([helper.make_node("Identity", ["x"], ["y"])], [("x", TensorProto.FLOAT, ["N", 3])], {})
    with pytest.raises(InputError, match="input 'x' of shape \\[0, 3\\] has no element"):
        verify_onnx(identity, identity, input_shapes={"x": [0, 3]})
    with pytest.raises(InputError, match="input 'x' has no element"):
        verify_onnx(identity, identity, inputs={"x": np.zeros((0, 3), np.float32)})
    # An output that is empty whatever the input: compared, but proves nothing.
    empty = model([helper.make_node("Slice", ["x", "start", "end", "axis"], ["y"])],
                  [("x", TensorProto.FLOAT, [2, 3])],
                  {name: np.array([value], np.int64) for name, value in
                   (("start", 1), ("end", 1), ("axis", 1))})
    report = verify_onnx(empty, empty)
    assert report.status == "unverified" and not report.passed and report.outputs[0].empty
