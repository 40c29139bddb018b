"""The model zoo: non-trivial BatchNorm, faithful layouts, exports that keep BN, and the sample models."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import numpy as np
import onnx
import onnxruntime as ort
import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402
from torch.nn.modules.batchnorm import _BatchNorm  # noqa: E402

from tests.support.zoo import (  # noqa: E402
    ARCHITECTURES,
    FULL_SIZE_KWARGS,
    ExportError,
    count_batchnorm_modules,
    example_input,
    export_onnx,
    resnet,
)

MODELS_DIR = Path(__file__).resolve().parents[2] / "models"
SAMPLE_MODELS = ("resnet_small.onnx", "mlp_bn1d.onnx", "decoder_convtranspose.onnx")
SAMPLE_BUDGET_BYTES = 5 * 1024 * 1024
EXPORTERS = ("torchscript", "dynamo")


def run_onnx(path: Path, inputs: np.ndarray) -> np.ndarray:
    # Without graph optimizations onnxruntime runs BatchNormalization as written, instead of fusing it.
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"input": inputs})[0]


def run_torch(module: nn.Module, inputs: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return module(inputs).numpy()


def batchnorm_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [node for node in model.graph.node if node.op_type == "BatchNormalization"]


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_batchnorm_statistics_are_random_and_non_trivial(name: str) -> None:
    module, _ = ARCHITECTURES[name](seed=0)
    batchnorms = [m for m in module.modules() if isinstance(m, _BatchNorm)]
    assert batchnorms and not module.training
    for batchnorm in batchnorms:
        assert not torch.allclose(batchnorm.running_var, torch.ones_like(batchnorm.running_var))
        assert not torch.allclose(batchnorm.running_mean, torch.zeros_like(batchnorm.running_mean))
        assert not torch.allclose(batchnorm.weight, torch.ones_like(batchnorm.weight))
        assert not torch.allclose(batchnorm.bias, torch.zeros_like(batchnorm.bias))
        assert bool((batchnorm.running_var >= 0.5).all() and (batchnorm.running_var <= 2.0).all())
    all_weights = torch.cat([batchnorm.weight.detach() for batchnorm in batchnorms])
    assert bool((all_weights < 0).any()), "some negative BN scales are needed to catch sign bugs"


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_builders_are_deterministic_in_the_seed(name: str) -> None:
    first, _ = ARCHITECTURES[name](seed=3)
    again, _ = ARCHITECTURES[name](seed=3)
    other, _ = ARCHITECTURES[name](seed=4)
    first_state, again_state, other_state = first.state_dict(), again.state_dict(), other.state_dict()
    assert all(torch.equal(first_state[key], again_state[key]) for key in first_state)
    assert not all(torch.equal(first_state[key], other_state[key]) for key in first_state)


def test_building_leaves_the_global_random_stream_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    resnet(seed=0)
    assert torch.equal(torch.rand(4), expected)


@pytest.mark.parametrize(
    ("name", "parameters", "batchnorms"),
    [
        ("resnet", 11_689_512, 20),  # ResNet-18
        ("resnet_bottleneck", 25_557_032, 53),  # ResNet-50
        ("mobilenet_v2", 3_504_872, 52),
        ("densenet", 7_978_856, 121),  # DenseNet-121
    ],
)
def test_full_size_layouts_match_the_reference_models(name: str, parameters: int, batchnorms: int) -> None:
    """Parameter counts of torchvision's models with 1000 classes, so the layouts are the published ones."""
    module, input_shape = ARCHITECTURES[name](seed=0, **FULL_SIZE_KWARGS[name])
    assert sum(parameter.numel() for parameter in module.parameters()) == parameters
    assert count_batchnorm_modules(module) == batchnorms
    assert input_shape == (1, 3, 224, 224)


def test_every_architecture_has_a_full_size() -> None:
    assert set(FULL_SIZE_KWARGS) == set(ARCHITECTURES)


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_export_keeps_every_batchnorm_and_matches_torch(name: str, exporter: str, tmp_path: Path) -> None:
    module, input_shape = ARCHITECTURES[name](seed=0)
    path = export_onnx(module, input_shape, tmp_path / f"{name}.onnx", exporter=exporter)

    model = onnx.load(path)
    onnx.checker.check_model(model, full_check=True)
    assert len(batchnorm_nodes(model)) == count_batchnorm_modules(module)
    assert [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim] == list(input_shape)
    inputs = example_input(input_shape)
    np.testing.assert_allclose(run_onnx(path, inputs.numpy()), run_torch(module, inputs), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_torchscript_export_honours_opset_17(name: str, tmp_path: Path) -> None:
    module, input_shape = ARCHITECTURES[name](seed=0)
    model = onnx.load(export_onnx(module, input_shape, tmp_path / "model.onnx", opset=17))
    assert model.opset_import[0].version == 17
    assert len(batchnorm_nodes(model)) == count_batchnorm_modules(module)


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_dynamic_batch_export_runs_any_batch_size(exporter: str, tmp_path: Path) -> None:
    module, input_shape = resnet(seed=0)
    path = export_onnx(module, input_shape, tmp_path / "model.onnx", exporter=exporter, dynamic_batch=True)
    batch_dim = onnx.load(path).graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.dim_value
    inputs = example_input((3, *input_shape[1:]), seed=1)
    np.testing.assert_allclose(run_onnx(path, inputs.numpy()), run_torch(module, inputs), rtol=1e-4, atol=1e-5)


class _UnusedBatchNorm(nn.Module):
    """Holds a BatchNorm that forward never calls, so no export can contain it."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.unused = nn.BatchNorm1d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_export_raises_when_batchnorms_go_missing(exporter: str, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="0 BatchNormalization nodes for 1 BN modules"):
        export_onnx(_UnusedBatchNorm().eval(), (1, 4), tmp_path / "model.onnx", exporter=exporter)


def test_export_refuses_a_training_mode_module(tmp_path: Path) -> None:
    module, input_shape = resnet(seed=0)
    with pytest.raises(ValueError, match="eval-mode"):
        export_onnx(module.train(), input_shape, tmp_path / "model.onnx")


def test_dynamo_export_raises_when_it_cannot_reach_the_requested_opset(tmp_path: Path) -> None:
    """Recorded in the zoo docstring; if this starts failing, dynamo learned opset 17: update the docstring."""
    module, input_shape = resnet(seed=0)
    with pytest.raises(ExportError, match="asked for opset 17 but produced opset 18"):
        export_onnx(module, input_shape, tmp_path / "model.onnx", exporter="dynamo", opset=17)


# Sample models -------------------------------------------------------------------------------------


def load_make_models_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_models", MODELS_DIR / "make_models.py")
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_sample_models_exist_and_fit_the_size_budget() -> None:
    sample_files = sorted(MODELS_DIR.glob("*.onnx"))
    assert set(SAMPLE_MODELS) <= {path.name for path in sample_files}
    assert sum(path.stat().st_size for path in sample_files) < SAMPLE_BUDGET_BYTES


@pytest.mark.parametrize("filename", sorted(path.name for path in MODELS_DIR.glob("*.onnx")))
def test_sample_model_is_valid_with_inference_batchnorms(filename: str) -> None:
    model = onnx.load(MODELS_DIR / filename)
    onnx.checker.check_model(model, full_check=True)
    assert model.opset_import[0].version == 17
    batchnorms = batchnorm_nodes(model)
    assert batchnorms
    for node in batchnorms:
        assert all(attribute.i == 0 for attribute in node.attribute if attribute.name == "training_mode")
        assert not any(node.output[1:])


def test_sample_models_are_what_the_script_generates(tmp_path: Path) -> None:
    """The checked-in files must not drift from models/make_models.py."""
    script = load_make_models_script()
    for path in script.write_sample_models(tmp_path):
        regenerated = onnx.load(path)
        checked_in = onnx.load(MODELS_DIR / path.name)
        # The graph carries structure and weights; producer metadata may differ between torch versions.
        assert regenerated.graph.SerializeToString() == checked_in.graph.SerializeToString(), path.name
