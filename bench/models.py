"""The benchmark models, built in code with fixed seeds (nothing is downloaded), and their dtype variants.

Every model is an eval-mode PyTorch module from :mod:`tests.support.zoo` (or one of the pattern models
below) whose BatchNorm layers carry random, non-trivial statistics, exported by the TorchScript exporter
at opset 17 with every BatchNorm kept as an inference ``BatchNormalization`` node. torch is imported only by
the builders, which run in a worker process (:func:`build_task`).
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from bench.harness import model_bytes

OPSET = 17
SEED = 0
# ResNet-101's stage depths: 104 Conv+BN pairs, twice ResNet-50's for about the same bytes per width.
SCALE_DEPTHS = (3, 4, 23, 3)
SCALE_IMAGE_SIZE = 32  # the fold does not depend on it; a small image keeps the equivalence runs cheap
MB = 10**6


@dataclass(frozen=True)
class Case:
    """One benchmark model: how to build it and what it shows."""

    name: str
    build: Callable[[], tuple[Any, tuple[int, ...]]]
    shows: str
    # Keyword arguments for bnfold.fold_onnx, e.g. the opt-in standalone rewrite.
    fold_options: dict[str, Any] = field(default_factory=dict)
    # Whether onnxruntime's own BASIC-level fusions can fold this model's batch norms.
    ort_fuses: bool = True


def _zoo():
    # The zoo imports torch, which only the build worker may pay for.
    from tests.support import zoo

    return zoo


def _resnet50() -> tuple[Any, tuple[int, ...]]:
    return _zoo().resnet(depths=(3, 4, 6, 3), width=64, bottleneck=True, num_classes=1000, image_size=224, seed=SEED)


def _mobilenet_v2() -> tuple[Any, tuple[int, ...]]:
    return _zoo().mobilenet_v2(width_mult=1.0, num_classes=1000, image_size=224, seed=SEED)


def _densenet121() -> tuple[Any, tuple[int, ...]]:
    return _zoo().densenet(**_zoo().FULL_SIZE_KWARGS["densenet"], seed=SEED)


def _unet() -> tuple[Any, tuple[int, ...]]:
    return _zoo().unet_decoder(width=32, depth=4, image_size=128, seed=SEED)


def _mlp() -> tuple[Any, tuple[int, ...]]:
    return _zoo().mlp(in_features=1024, hidden=(4096, 4096, 4096), out_features=1000, seed=SEED)


def _bn_before_conv() -> tuple[Any, tuple[int, ...]]:
    """Conv -> ReLU -> BN -> Conv: the BN sits after the activation (a common Keras layout), so it can only
    fold forward into the next convolution, which onnxruntime never does. Half of the receiving convs are
    1x1 (the shift reaches the bias), half 3x3 with zero padding (the shift stays, added by a depthwise 1x1
    Conv)."""
    import torch
    from torch import nn

    width, blocks, image = 64, 6, 112

    def construct() -> nn.Module:
        layers: list[nn.Module] = [nn.Conv2d(3, width, 3, 2, 1), nn.ReLU(), nn.BatchNorm2d(width)]
        for block in range(blocks):
            kernel = 1 if block % 2 == 0 else 3
            layers += [nn.Conv2d(width, width, kernel, 1, kernel // 2), nn.ReLU(), nn.BatchNorm2d(width)]
        layers += [nn.Conv2d(width, width, 3, 2, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10)]
        return nn.Sequential(*layers)

    return _seeded(construct, torch), (1, 3, image, image)


def _affine_chain() -> tuple[Any, tuple[int, ...]]:
    """Transformer-style feed-forward blocks on tokens: MatMul -> Add bias -> per-feature Mul -> Add (a
    decomposed or frozen BN) -> ReLU -> MatMul -> Add bias -> per-feature Mul (LayerScale), then the residual
    Add. onnxruntime fuses per-channel Mul/Add only into a Conv, never into a MatMul."""
    import torch
    from torch import nn

    tokens, dim, hidden, blocks = 196, 384, 1536, 4

    class Projection(nn.Module):
        """``x @ W + b`` with W stored as (in, out), exported as a MatMul on the initializer itself (the
        TorchScript exporter puts a Transpose node in front of an nn.Linear weight used on 3-D input)."""

        def __init__(self, features_in: int, features_out: int) -> None:
            super().__init__()
            bound = 1 / math.sqrt(features_in)
            self.weight = nn.Parameter(torch.empty(features_in, features_out).uniform_(-bound, bound))
            self.bias = nn.Parameter(torch.empty(features_out).uniform_(-bound, bound))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x @ self.weight + self.bias

    class ScaleShift(nn.Module):
        def __init__(self, features: int, shift: bool) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.empty(features).uniform_(0.5, 1.5))
            self.shift = nn.Parameter(0.5 * torch.randn(features)) if shift else None

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.scale + self.shift if self.shift is not None else x * self.scale

    class FeedForward(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(Projection(dim, hidden), ScaleShift(hidden, shift=True), nn.ReLU(),
                                      Projection(hidden, dim), ScaleShift(dim, shift=False))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.body(x)

    return _seeded(lambda: nn.Sequential(*[FeedForward() for _ in range(blocks)]), torch), (1, tokens, dim)


def _standalone_bn() -> tuple[Any, tuple[int, ...]]:
    """Residual blocks whose BN normalizes the sum (Conv -> ReLU -> Conv -> Add -> BN -> ReLU): no linear
    layer is next to it on either side, so it can only become a Mul and an Add (``--standalone mul-add``) or a
    depthwise 1x1 Conv (``--standalone conv``)."""
    import torch
    from torch import nn

    width, blocks, image = 64, 6, 56

    class PostNormBlock(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(width, width, 3, 1, 1), nn.ReLU(), nn.Conv2d(width, width, 3, 1, 1))
            self.norm = nn.BatchNorm2d(width)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(self.norm(x + self.body(x)))

    def construct() -> nn.Module:
        layers: list[nn.Module] = [nn.Conv2d(3, width, 3, 1, 1), nn.ReLU(), *[PostNormBlock() for _ in range(blocks)]]
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10)]
        return nn.Sequential(*layers)

    return _seeded(construct, torch), (1, 3, image, image)


def _seeded(construct: Callable[[], Any], torch: Any) -> Any:
    """Build under the benchmark seed and give every BN random statistics, as the zoo does."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        module = construct()
    return _zoo().randomize_batchnorm(module, SEED).eval()


CASES: dict[str, Case] = {case.name: case for case in (
    Case("resnet50", _resnet50, "ResNet-50 (bottleneck), Conv+BN, 224x224"),
    Case("mobilenet_v2", _mobilenet_v2, "MobileNetV2 1.0, depthwise Conv+BN (eps 1e-3), 224x224"),
    Case("densenet121", _densenet121, "DenseNet-121: Conv+BN and pre-activation BN->ReLU->Conv (unfoldable)"),
    Case("unet", _unet, "U-Net (width 32, depth 4), ConvTranspose+BN and Conv+BN, 128x128"),
    Case("mlp", _mlp, "MLP 1024-4096x3-1000, Linear->BatchNorm1d (Gemm+BN), batch 1", ort_fuses=False),
    Case("bn_before_conv", _bn_before_conv, "Conv->ReLU->BN->Conv (BN folds forward), 112x112", ort_fuses=False),
    Case("affine_chain", _affine_chain, "token MLP: MatMul->Mul->Add and MatMul->Mul chains, 196x384",
         ort_fuses=False),
    Case("standalone_bn", _standalone_bn, "post-norm residual blocks Add->BN->ReLU, 56x56",
         fold_options={"standalone": "mul-add"}, ort_fuses=False),
    Case("standalone_bn_conv", _standalone_bn, "the standalone_bn model folded with --standalone conv",
         fold_options={"standalone": "conv"}, ort_fuses=False),
)}


# --- the size family for the scale curve -----------------------------------------------------------

def _resnet_scaled(width: int) -> tuple[Any, tuple[int, ...]]:
    return _zoo().resnet(depths=SCALE_DEPTHS, width=width, bottleneck=True, num_classes=1000,
                         image_size=SCALE_IMAGE_SIZE, seed=SEED)


def _parameter_bytes(width: int) -> int:
    module, _ = _resnet_scaled(width)
    return 4 * sum(tensor.numel() for tensor in module.state_dict().values())


def scale_width(target_mb: float) -> int:
    """The ResNet-101-layout width whose float32 parameters take about ``target_mb`` MB."""
    # Parameter counts are a quadratic in the width (convolutions ~ w^2, BN and the head ~ w): fit it.
    widths = (4, 8, 16)
    a, b, c = np.polyfit(widths, [_parameter_bytes(width) for width in widths], 2)
    root = (-b + math.sqrt(b * b - 4 * a * (c - target_mb * MB))) / (2 * a)
    return max(1, round(root))


def scale_case(target_mb: float) -> Case:
    width = scale_width(target_mb)
    return Case(f"resnet101_w{width}", lambda: _resnet_scaled(width),
                f"ResNet-101 layout (104 BN) at width {width}, about {target_mb:g} MB")


# --- export ----------------------------------------------------------------------------------------

def export(case: Case, path: Path) -> Path:
    """Export ``case`` to ``path``; a model over protobuf's 2 GB limit gets one external data file next to
    it (the TorchScript exporter writes one file per tensor, which is not how such models are shipped)."""
    zoo = _zoo()
    module, input_shape = case.build()
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".export-") as staging:
        staged = Path(staging) / path.name
        zoo.export_onnx(module, input_shape, staged, opset=OPSET, seed=SEED)
        del module
        if any(name != path.name for name in os.listdir(staging)):
            model = onnx.load(staged)
            onnx.save(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
                      location=f"{path.name}.data", size_threshold=1024)
        else:
            shutil.move(staged, path)
    return path


# --- dtype variants --------------------------------------------------------------------------------

_FLOAT_TYPES = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE)


def with_float_type(model: onnx.ModelProto, elem_type: int) -> onnx.ModelProto:
    """A copy of ``model`` computing in ``elem_type``: every floating-point initializer, Constant, Cast target
    and graph input/output/value type converted (numpy's round-to-nearest-even), attributes such as epsilon
    kept. Used for the float16 variants and for the float64 ground truth of the precision benchmark."""
    converted = onnx.ModelProto()
    converted.CopyFrom(model)
    target = onnx.helper.tensor_dtype_to_np_dtype(elem_type)
    graph = converted.graph

    def convert(tensor: TensorProto) -> None:
        if tensor.data_type in _FLOAT_TYPES and tensor.data_type != elem_type:
            tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor).astype(target), tensor.name))

    for tensor in graph.initializer:
        convert(tensor)
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.TENSOR:
                convert(attribute.t)
            elif node.op_type == "Cast" and attribute.name == "to" and attribute.i in _FLOAT_TYPES:
                attribute.i = elem_type
    for value in (*graph.input, *graph.output, *graph.value_info):
        if value.type.tensor_type.elem_type in _FLOAT_TYPES:
            value.type.tensor_type.elem_type = elem_type
    return converted


def resolve(request: str) -> Case:
    """A case by name, or ``scale:<MB>`` for the scale family member of about that size."""
    return scale_case(float(request.split(":", 1)[1])) if request.startswith("scale:") else CASES[request]


def build_task(args: list[str]) -> dict[str, Any]:
    """Worker task ``build OUT_DIR REQUEST...``: export each requested model to ``OUT_DIR/<name>/model.onnx``
    (in a worker, so that torch's memory and import never count against a measured tool)."""
    out_dir, *requests = args
    built = []
    for request in requests:
        case = resolve(request)
        directory = Path(out_dir) / case.name
        directory.mkdir(parents=True, exist_ok=True)
        path = export(case, directory / "model.onnx")
        built.append({"name": case.name, "path": str(path), "shows": case.shows, "fold_options": case.fold_options,
                      "ort_fuses": case.ort_fuses})
    return {"models": built}


@dataclass(frozen=True)
class BuiltModel:
    """An exported benchmark model and what the benchmark needs to know about it."""

    name: str
    path: Path
    shows: str
    fold_options: dict[str, Any]
    ort_fuses: bool
    bytes: int
    external: bool
    batchnorms: int
    nodes: int
    dtype: str = "float32"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shows": self.shows, "bytes": self.bytes, "external_data": self.external,
                "batchnorms": self.batchnorms, "nodes": self.nodes, "dtype": self.dtype,
                "fold_options": self.fold_options, "ort_fuses": self.ort_fuses}


def describe(path: Path, **known: Any) -> BuiltModel:
    model = onnx.load(path, load_external_data=False)
    external = any(tensor.data_location == TensorProto.EXTERNAL for tensor in model.graph.initializer)
    batchnorms = sum(node.op_type == "BatchNormalization" for node in model.graph.node)
    return BuiltModel(path=path, bytes=model_bytes(path), external=external, batchnorms=batchnorms,
                      nodes=len(model.graph.node), **known)


def float16_variant(model: BuiltModel) -> BuiltModel:
    """``model`` converted to float16 (see :func:`with_float_type`), in a directory of its own."""
    path = model.path.parent.with_name(f"{model.path.parent.name}_fp16") / "model.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(with_float_type(onnx.load(model.path), TensorProto.FLOAT16), path)
    return describe(path, name=f"{model.name}_fp16", shows=model.shows, fold_options=model.fold_options,
                    ort_fuses=model.ort_fuses, dtype="float16")
