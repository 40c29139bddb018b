"""verify_onnx: the documented comparison rule, its calibrated defaults, and every way inputs go wrong."""

from __future__ import annotations

import copy
import io
import json
import math
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from bnfold.core.compare import COMPARE_CHUNK, DEFAULT_TOLERANCES, default_tolerances
from bnfold.errors import InputError
from bnfold.onnx.verify.verify import verify_onnx

# --- ONNX graphs built in code ---------------------------------------------------------------------


def make_model(
    nodes: Sequence[onnx.NodeProto],
    inputs: Sequence[tuple[str, int, Sequence[int | str] | None]],
    outputs: Sequence[tuple[str, int]],
    initializers: Sequence[tuple[str, np.ndarray]] = (),
    opset: int = 17,
) -> onnx.ModelProto:
    """``initializers`` are ``(name, array)`` pairs; outputs have no declared shape."""
    graph = helper.make_graph(
        list(nodes), "g",
        [helper.make_tensor_value_info(name, elem_type, shape) for name, elem_type, shape in inputs],
        [helper.make_tensor_value_info(name, elem_type, None) for name, elem_type in outputs],
        [numpy_helper.from_array(array, name) for name, array in initializers],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def unary(op_type: str, elem_type: int = TensorProto.FLOAT, shape: Sequence[int | str] = (2, 3),
          out_type: int | None = None, **attributes) -> onnx.ModelProto:
    """``y = op_type(x)``."""
    return make_model([helper.make_node(op_type, ["x"], ["y"], **attributes)],
                      [("x", elem_type, shape)], [("y", out_type or elem_type)])


def scaled(factor: float, dtype: type = np.float32, shape: Sequence[int | str] = (2, 3)) -> onnx.ModelProto:
    """``y = x * factor``."""
    elem_type = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    return make_model([helper.make_node("Mul", ["x", "k"], ["y"])], [("x", elem_type, shape)],
                      [("y", elem_type)], [("k", np.array(factor, dtype=dtype))])


def random_bn_statistics(rng: np.random.Generator, channels: int) -> dict[str, np.ndarray]:
    return {
        "gamma": rng.uniform(0.5, 1.5, channels),
        "beta": rng.normal(0.0, 0.5, channels),
        "mean": rng.normal(0.0, 0.5, channels),
        "var": rng.uniform(0.5, 2.0, channels),
    }


def conv_bn_and_folded(
    dtype: type, *, training_mode: bool = False, batch: int = 1, seed: int = 0, opset: int = 17
) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """Conv -> BatchNormalization, and the Conv with the BN's running statistics folded in float64."""
    rng = np.random.default_rng(seed)
    elem_type = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    weight = rng.normal(0.0, 0.5, (4, 3, 3, 3))
    stats = random_bn_statistics(rng, 4)
    epsilon = float(np.float32(1e-5))  # the attribute is stored as float32
    bn_outputs = ["y", "running_mean", "running_var"] if training_mode else ["y"]
    original = make_model(
        [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
         helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], bn_outputs,
                          epsilon=epsilon, **({"training_mode": 1} if training_mode else {}))],
        [("x", elem_type, [batch, 3, 8, 8])], [("y", elem_type)],
        [("w", weight.astype(dtype)), *((name, value.astype(dtype)) for name, value in stats.items())],
        opset=opset,
    )
    scale = stats["gamma"] / np.sqrt(stats["var"] + epsilon)
    folded = make_model(
        [helper.make_node("Conv", ["x", "w", "b"], ["y"], pads=[1, 1, 1, 1])],
        [("x", elem_type, [batch, 3, 8, 8])], [("y", elem_type)],
        [("w", (weight * scale[:, None, None, None]).astype(dtype)),
         ("b", (stats["beta"] - scale * stats["mean"]).astype(dtype))],
        opset=opset,
    )
    return original, folded


# --- torch CNNs with random, non-trivial BN statistics ------------------------------------------


class Bottleneck(nn.Module):
    """ResNet-50's block: 1x1 -> 3x3 -> 1x1 convolutions, each followed by a batch norm."""

    def __init__(self, in_channels: int, width: int, stride: int) -> None:
        super().__init__()
        out_channels = 4 * width
        self.conv1, self.bn1 = nn.Conv2d(in_channels, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                                          nn.BatchNorm2d(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)))
        return torch.relu(self.bn3(self.conv3(y)) + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, blocks: Sequence[int], widths: Sequence[int], classes: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 7, 2, 3, bias=False), nn.BatchNorm2d(widths[0]),
                                  nn.ReLU(), nn.MaxPool2d(3, 2, 1))
        layers, channels = [], widths[0]
        for stage, (count, width) in enumerate(zip(blocks, widths, strict=True)):
            for index in range(count):
                layers.append(Bottleneck(channels, width, 2 if stage and not index else 1))
                channels = 4 * width
        self.blocks = nn.Sequential(*layers)
        self.fc = nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = nn.functional.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1)
        return self.fc(torch.flatten(features, 1))


def randomized(model: nn.Module, seed: int) -> nn.Module:
    """He-initialised convolutions (activations neither die nor vanish) and random BN statistics."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu", generator=generator)
        elif isinstance(module, nn.BatchNorm2d):
            channels = module.num_features
            module.running_mean.copy_(torch.randn(channels, generator=generator) * 0.5)
            module.running_var.copy_(torch.rand(channels, generator=generator) * 1.5 + 0.5)
            module.weight.data.copy_(torch.rand(channels, generator=generator) + 0.5)
            module.bias.data.copy_(torch.randn(channels, generator=generator) * 0.5)
            module.eps = float(np.float32(module.eps))  # what the exported attribute holds
    return model.eval()


def conv_bn_pairs(model: nn.Module) -> Iterator[tuple[nn.Module, str, str]]:
    """``(parent, conv attribute, bn attribute)`` for every convolution followed by a batch norm."""
    for parent in model.modules():
        children = list(parent.named_children())
        for (conv_name, conv), (bn_name, bn) in zip(children, children[1:], strict=False):
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                yield parent, conv_name, bn_name


def folded_copy(model: nn.Module, off_by: tuple[str, int, float] | None = None) -> nn.Module:
    """Every conv+BN folded in float64 and cast once; ``off_by = (conv path, channel, factor)`` spoils
    one channel's scale in one layer, as a buggy fold would."""
    folded = copy.deepcopy(model)
    paths = {module: path for path, module in folded.named_modules()}
    for parent, conv_name, bn_name in list(conv_bn_pairs(folded)):
        conv, bn = getattr(parent, conv_name), getattr(parent, bn_name)
        scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
        if off_by is not None and paths[conv] == off_by[0]:
            scale[off_by[1]] *= off_by[2]
        replacement = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                                conv.padding, conv.dilation, conv.groups, bias=True)
        replacement.weight.data = (conv.weight.double() * scale[:, None, None, None]).float()
        replacement.bias.data = (bn.bias.double() - scale * bn.running_mean.double()).float()
        setattr(parent, conv_name, replacement)
        setattr(parent, bn_name, nn.Identity())
    return folded.eval()


def to_onnx(model: nn.Module, shape: Sequence[int]) -> onnx.ModelProto:
    """PRESERVE keeps eval-mode batch norms as BatchNormalization nodes; no constant folding."""
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation notice
        torch.onnx.export(model, (torch.zeros(*shape),), buffer, dynamo=False, input_names=["x"],
                          output_names=["y"], training=torch.onnx.TrainingMode.PRESERVE,
                          do_constant_folding=False)
    return onnx.load_from_string(buffer.getvalue())


def batchnorm_count(model: onnx.ModelProto) -> int:
    return sum(node.op_type == "BatchNormalization" for node in model.graph.node)


# --- the three requirements the default tolerances are calibrated against -------------------------


def test_exact_fold_of_a_resnet50_sized_network_passes():
    model = randomized(ResNet([3, 4, 6, 3], [64, 128, 256, 512], classes=1000), seed=0)
    original, folded = to_onnx(model, (1, 3, 64, 64)), to_onnx(folded_copy(model), (1, 3, 64, 64))
    assert (batchnorm_count(original), batchnorm_count(folded)) == (53, 0)

    report = verify_onnx(original, folded)

    output = report.outputs[0]
    scale = output.atol / DEFAULT_TOLERANCES["float32"][1]
    print(f"\nexact fold, ResNet-50 sized: max abs error {output.max_abs_error:.3g}, output scale {scale:.3g}, "
          f"error/scale {output.max_abs_error / scale:.2g}, atol {output.atol:.3g}")
    assert report.passed, report.render()
    assert report.engine == "onnxruntime"
    assert 0 < output.max_abs_error < output.atol / 20, "the fold noise should sit far below the tolerance"


def alive_channel(model: ResNet, block: int) -> int:
    """The channel of ``block``'s output with the largest mean activation: one a wrong fold of that
    block's last convolution must visibly change (a channel ReLU always zeroes would not)."""
    captured = []
    handle = model.blocks[block].register_forward_hook(lambda _module, _args, out: captured.append(out))
    with torch.no_grad():
        model(torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1)))
    handle.remove()
    return int(captured[0].mean(dim=(0, 2, 3)).argmax())


@pytest.mark.parametrize("block", [1, 3], ids=["middle-layer", "last-layer"])
def test_fold_with_one_channel_scale_off_by_one_percent_fails(block):
    model = randomized(ResNet([1, 1, 1, 1], [8, 16, 32, 64], classes=10), seed=0)
    channel = alive_channel(model, block)
    original = to_onnx(model, (1, 3, 32, 32))
    exact = to_onnx(folded_copy(model), (1, 3, 32, 32))
    wrong = to_onnx(folded_copy(model, off_by=(f"blocks.{block}.conv3", channel, 1.01)), (1, 3, 32, 32))

    exact_report, wrong_report = verify_onnx(original, exact), verify_onnx(original, wrong)

    noise, error = exact_report.outputs[0].max_abs_error, wrong_report.outputs[0].max_abs_error
    print(f"\nblock {block} channel {channel} off by 1%: max abs error {error:.3g} (exact fold {noise:.3g}), "
          f"atol {wrong_report.outputs[0].atol:.3g}")
    assert exact_report.passed, exact_report.render()
    assert not wrong_report.passed, wrong_report.render()


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
    assert math.isinf(report.outputs[0].required_rtol) and math.isinf(report.outputs[0].max_rel_error)
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


def test_dynamic_dims_default_to_one_with_a_note_or_come_from_input_shapes():
    model = unary("Relu", shape=["N", 3, None])
    report = verify_onnx(model, model)
    assert report.outputs[0].shape == [1, 3, 1]
    assert "dynamic dim 'N' of input 'x' set to 1" in report.notes
    assert "dynamic dim 2 of input 'x' set to 1" in report.notes

    report = verify_onnx(model, model, input_shapes={"x": [4, 3, 5]})
    assert report.outputs[0].shape == [4, 3, 5] and report.notes == []


def test_a_symbolic_dim_given_for_one_input_is_reused_for_the_others():
    add = make_model([helper.make_node("Add", ["a", "b"], ["y"])],
                     [("a", TensorProto.FLOAT, ["N", 2]), ("b", TensorProto.FLOAT, ["N", 2])],
                     [("y", TensorProto.FLOAT)])
    report = verify_onnx(add, add, input_shapes={"a": [3, 2]})
    assert report.passed and report.outputs[0].shape == [3, 2]
    assert report.notes == ["dynamic dim 'N' of input 'b' set to 3 (as given for input 'a')"]


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
    ({}, "lack model input\\(s\\) x"),
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
