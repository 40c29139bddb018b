"""A deterministic model zoo built in code: the architectures bnfold's tests, samples and benchmarks fold.

Nothing is downloaded and torchvision is not used; the builders re-create the published layer layouts
(:data:`FULL_SIZE_KWARGS` reproduces torchvision's parameter counts). Every builder takes ``seed`` and
returns an eval-mode module whose BatchNorm layers carry random, non-trivial statistics
(:func:`randomize_batchnorm`), together with its example input shape (batch 1). Default sizes are small:
each model exports in under a second with TorchScript and in one to three seconds with dynamo.

:func:`export_onnx` exports with BatchNormalization kept as separate inference nodes and raises
:class:`ExportError` when the exporter fused or changed any of them, or ignored the requested opset.

Exporter findings (torch 2.13, onnxscript 0.7; opsets 17, 18 and the default 20; every architecture here):

- TorchScript exporter (``dynamo=False``) with ``training=TrainingMode.PRESERVE``: keeps every BN of every
  architecture here as an inference BatchNormalization (``training_mode=0``, one output), at opset 17 and
  at its default, 20. It gives the cleanest graph: parameters are initializers and a bias-less Conv has
  no bias input. With the default ``TrainingMode.EVAL`` it fuses Conv+BN (resnet, resnet_bottleneck and
  mobilenet_v2 lose all BNs, densenet keeps only its 9 pre-activation BNs, unet_decoder only the 3 after
  ConvTranspose) but never Gemm+BN. ``do_constant_folding=False`` is not needed to keep BN in these models;
  it is set so no parameter arithmetic is pre-computed.
- Dynamo exporter (``dynamo=True``) with ``optimize=False``: keeps every BN of every architecture here. The
  graph is noisier: each bias-less Conv gets a zero bias computed in-graph (Shape -> Expand -> CastLike ->
  Expand) instead of an initializer, Flatten becomes Reshape, global pooling becomes a ReduceMean whose
  axes are a computed input, and each node carries stack-trace metadata. With the default
  ``optimize=True`` it fuses Conv+BN, ConvTranspose+BN and Gemm+BN (only densenet's 9 pre-activation BNs
  survive).
- Dynamo cannot export opset 17 for resnet, resnet_bottleneck, mobilenet_v2 or densenet: it translates at
  opset 18 and ONNX's version converter cannot move those computed-axes ReduceMean nodes down, so the
  model silently stays at 18 (``export_onnx`` raises). unet_decoder, mlp and paper_mlp convert to 17.
  Use ``opset=None`` (20) or 18 or more with dynamo.

No architecture/exporter pair here loses BN when exported through :func:`export_onnx`.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import onnx
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

Exporter = Literal["torchscript", "dynamo"]
BuiltModel = tuple[nn.Module, tuple[int, ...]]

_BATCH_DIM_NAME = "batch"


class ExportError(RuntimeError):
    """The exported graph is not the one asked for: BatchNorm fused, removed or training-mode, or another opset."""


def randomize_batchnorm(module: nn.Module, seed: int) -> nn.Module:
    """Give every BatchNorm in ``module`` random non-trivial statistics and affine parameters, in place.

    Default statistics (mean 0, variance 1, weight 1, bias 0) make BatchNorm the identity up to epsilon,
    so a wrong fold would still look right. About a fifth of the weights are negative because a negative
    scale is what breaks folds across order-sensitive ops such as max-pooling.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for batchnorm in module.modules():
            if not isinstance(batchnorm, _BatchNorm):
                continue
            if batchnorm.running_mean is None or batchnorm.running_var is None:
                raise ValueError(f"{batchnorm} has no running statistics (track_running_stats=False)")
            channels = batchnorm.num_features
            batchnorm.running_mean.copy_(0.5 * torch.randn(channels, generator=generator))
            batchnorm.running_var.copy_(torch.empty(channels).uniform_(0.5, 2.0, generator=generator))
            if batchnorm.affine:
                magnitude = torch.empty(channels).uniform_(0.5, 1.5, generator=generator)
                negative = torch.rand(channels, generator=generator) < 0.2
                batchnorm.weight.copy_(torch.where(negative, -magnitude, magnitude))
                batchnorm.bias.copy_(0.5 * torch.randn(channels, generator=generator))
    return module


def _build(construct: Callable[[], nn.Module], seed: int) -> nn.Module:
    """Construct with torch's default initialisation under ``seed``, then randomize BN and switch to eval.

    The global RNG is forked so that building a model does not change the caller's random stream.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = construct()
    return randomize_batchnorm(module, seed).eval()


def _conv_bn(
    in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1, eps: float = 1e-5
) -> list[nn.Module]:
    return [
        nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_channels, eps=eps),
    ]


# ResNet ---------------------------------------------------------------------------------------------


class _BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_channels: int, planes: int, stride: int) -> None:
        super().__init__()
        out_channels = planes * self.expansion
        self.residual = nn.Sequential(
            *_conv_bn(in_channels, planes, 3, stride), nn.ReLU(), *_conv_bn(planes, out_channels, 3)
        )
        self.shortcut = _shortcut(in_channels, out_channels, stride)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.residual(x) + self.shortcut(x))


class _Bottleneck(nn.Module):
    """The ResNet v1.5 bottleneck (stride on the 3x3 convolution), as in torchvision."""

    expansion = 4

    def __init__(self, in_channels: int, planes: int, stride: int) -> None:
        super().__init__()
        out_channels = planes * self.expansion
        self.residual = nn.Sequential(
            *_conv_bn(in_channels, planes, 1),
            nn.ReLU(),
            *_conv_bn(planes, planes, 3, stride),
            nn.ReLU(),
            *_conv_bn(planes, out_channels, 1),
        )
        self.shortcut = _shortcut(in_channels, out_channels, stride)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.residual(x) + self.shortcut(x))


def _shortcut(in_channels: int, out_channels: int, stride: int) -> nn.Module:
    if stride == 1 and in_channels == out_channels:
        return nn.Identity()
    return nn.Sequential(*_conv_bn(in_channels, out_channels, 1, stride))


def resnet(
    *,
    depths: Sequence[int] = (1, 1, 1, 1),
    width: int = 8,
    bottleneck: bool = False,
    num_classes: int = 10,
    image_size: int = 32,
    seed: int = 0,
) -> BuiltModel:
    """ResNet: 7x7 stem, one stage per entry of ``depths`` (channels ``width * 2**stage``), residual adds.

    ``depths=(3, 4, 6, 3), width=64, bottleneck=True`` is ResNet-50-like; ``(2, 2, 2, 2)`` basic is ResNet-18.
    """
    block = _Bottleneck if bottleneck else _BasicBlock

    def construct() -> nn.Module:
        layers: list[nn.Module] = [*_conv_bn(3, width, 7, 2), nn.ReLU(), nn.MaxPool2d(3, 2, 1)]
        in_channels = width
        for stage, depth in enumerate(depths):
            planes = width * 2**stage
            for index in range(depth):
                stride = 2 if stage > 0 and index == 0 else 1
                layers.append(block(in_channels, planes, stride))
                in_channels = planes * block.expansion
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(in_channels, num_classes)]
        return nn.Sequential(*layers)

    return _build(construct, seed), (1, 3, image_size, image_size)


# MobileNetV2 ----------------------------------------------------------------------------------------

# (expansion t, output channels c, repeats n, first stride s) from the MobileNetV2 paper, table 2.
_MOBILENET_V2_SETTINGS = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
# TensorFlow-trained MobileNets use eps=1e-3; a non-default epsilon catches folds that assume 1e-5.
_MOBILENET_BN_EPS = 1e-3


def _make_divisible(value: float, divisor: int = 8) -> int:
    """Round channel counts to a multiple of ``divisor`` without losing more than 10%, as the reference does."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


class _InvertedResidual(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = in_channels * expansion
        eps = _MOBILENET_BN_EPS
        layers: list[nn.Module] = []
        if expansion != 1:
            layers += [*_conv_bn(in_channels, hidden, 1, eps=eps), nn.ReLU6()]
        layers += [
            *_conv_bn(hidden, hidden, 3, stride, groups=hidden, eps=eps),
            nn.ReLU6(),
            *_conv_bn(hidden, out_channels, 1, eps=eps),
        ]
        self.block = nn.Sequential(*layers)
        self.use_residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x) if self.use_residual else self.block(x)


def mobilenet_v2(*, width_mult: float = 0.25, num_classes: int = 10, image_size: int = 32, seed: int = 0) -> BuiltModel:
    """MobileNetV2: inverted residuals with depthwise conv + BN and ReLU6.

    Unlike the reference, the final 1280-channel layer also scales with ``width_mult`` below 1 so small
    models stay small; at ``width_mult=1`` the layout and parameter count match torchvision.
    """

    def construct() -> nn.Module:
        eps = _MOBILENET_BN_EPS
        in_channels = _make_divisible(32 * width_mult)
        last_channels = _make_divisible(1280 * width_mult)
        layers: list[nn.Module] = [*_conv_bn(3, in_channels, 3, 2, eps=eps), nn.ReLU6()]
        for expansion, channels, repeats, first_stride in _MOBILENET_V2_SETTINGS:
            out_channels = _make_divisible(channels * width_mult)
            for index in range(repeats):
                stride = first_stride if index == 0 else 1
                layers.append(_InvertedResidual(in_channels, out_channels, stride, expansion))
                in_channels = out_channels
        layers += [
            *_conv_bn(in_channels, last_channels, 1, eps=eps),
            nn.ReLU6(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(last_channels, num_classes),
        ]
        return nn.Sequential(*layers)

    return _build(construct, seed), (1, 3, image_size, image_size)


# DenseNet -------------------------------------------------------------------------------------------


class _DenseLayer(nn.Module):
    """Pre-activation BN -> ReLU -> Conv1x1 -> BN -> ReLU -> Conv3x3, concatenated onto the input."""

    def __init__(self, in_channels: int, growth_rate: int, bottleneck_factor: int) -> None:
        super().__init__()
        inner = bottleneck_factor * growth_rate
        self.layers = nn.Sequential(
            nn.BatchNorm2d(in_channels),
            nn.ReLU(),
            nn.Conv2d(in_channels, inner, 1, bias=False),
            nn.BatchNorm2d(inner),
            nn.ReLU(),
            nn.Conv2d(inner, growth_rate, 3, padding=1, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.layers(x)], dim=1)


def densenet(
    *,
    growth_rate: int = 8,
    block_config: Sequence[int] = (2, 2, 2),
    num_init_features: int = 16,
    bottleneck_factor: int = 4,
    num_classes: int = 10,
    image_size: int = 32,
    seed: int = 0,
) -> BuiltModel:
    """DenseNet-BC: dense blocks of concatenating pre-activation layers, halving transition layers.

    ``growth_rate=32, block_config=(6, 12, 24, 16), num_init_features=64`` is DenseNet-121.
    """

    def construct() -> nn.Module:
        layers: list[nn.Module] = [
            *_conv_bn(3, num_init_features, 7, 2),
            nn.ReLU(),
            nn.MaxPool2d(3, 2, 1),
        ]
        channels = num_init_features
        for block_index, num_layers in enumerate(block_config):
            for _ in range(num_layers):
                layers.append(_DenseLayer(channels, growth_rate, bottleneck_factor))
                channels += growth_rate
            if block_index < len(block_config) - 1:
                layers += [
                    nn.BatchNorm2d(channels),
                    nn.ReLU(),
                    nn.Conv2d(channels, channels // 2, 1, bias=False),
                    nn.AvgPool2d(2),
                ]
                channels //= 2
        layers += [
            nn.BatchNorm2d(channels),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(channels, num_classes),
        ]
        return nn.Sequential(*layers)

    return _build(construct, seed), (1, 3, image_size, image_size)


# U-Net ----------------------------------------------------------------------------------------------

# Upsampling layouts cycled through the decoder levels, deepest first, so a small decoder covers them all:
# a grouped 2x2/2 with bias, a 4x4/2 padded without bias, a 3x3/2 with output_padding and bias.
_UPSAMPLERS: tuple[dict[str, Any], ...] = (
    {"kernel_size": 2, "stride": 2, "groups": 2, "bias": True},
    {"kernel_size": 4, "stride": 2, "padding": 1, "bias": False},
    {"kernel_size": 3, "stride": 2, "padding": 1, "output_padding": 1, "bias": True},
)


def _conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(*_conv_bn(in_channels, out_channels, 3), nn.ReLU())


class _UNet(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, width: int, depth: int) -> None:
        super().__init__()
        level_channels = [width * 2**level for level in range(depth)]
        self.encoder = nn.ModuleList()
        previous = in_channels
        for channels in level_channels:
            self.encoder.append(_conv_bn_relu(previous, channels))
            previous = channels
        self.pool = nn.MaxPool2d(2)
        self.bottom = _conv_bn_relu(previous, 2 * previous)
        previous *= 2
        self.upsamplers = nn.ModuleList()
        self.decoder = nn.ModuleList()
        for level, channels in enumerate(reversed(level_channels)):
            upsample = nn.ConvTranspose2d(previous, channels, **_UPSAMPLERS[level % len(_UPSAMPLERS)])
            self.upsamplers.append(nn.Sequential(upsample, nn.BatchNorm2d(channels), nn.ReLU()))
            self.decoder.append(_conv_bn_relu(2 * channels, channels))
            previous = channels
        self.head = nn.Conv2d(previous, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for encode in self.encoder:
            x = encode(x)
            skips.append(x)
            x = self.pool(x)
        x = self.bottom(x)
        for upsample, decode, skip in zip(self.upsamplers, self.decoder, reversed(skips), strict=True):
            x = decode(torch.cat([upsample(x), skip], dim=1))
        return self.head(x)


def unet_decoder(
    *,
    width: int = 8,
    depth: int = 3,
    in_channels: int = 3,
    out_channels: int = 2,
    image_size: int = 32,
    seed: int = 0,
) -> BuiltModel:
    """U-Net whose decoder upsamples with ConvTranspose2d -> BN -> ReLU and concatenates encoder skips.

    The encoder is a plain conv stack that only exists to feed the skips. The deepest upsampler is a
    grouped (groups=2) transposed convolution, so ``width`` must be even.
    """
    if width % 2 or image_size % 2**depth:
        raise ValueError(f"need an even width and image_size divisible by 2**depth, got {width}, {image_size}")
    module = _build(lambda: _UNet(in_channels, out_channels, width, depth), seed)
    return module, (1, in_channels, image_size, image_size)


# MLPs -----------------------------------------------------------------------------------------------


def _linear_bn_stack(
    in_features: int, hidden: Sequence[int], out_features: int, activation: type[nn.Module]
) -> nn.Sequential:
    layers: list[nn.Module] = []
    previous = in_features
    for features in hidden:
        layers += [nn.Linear(previous, features), nn.BatchNorm1d(features), activation()]
        previous = features
    layers.append(nn.Linear(previous, out_features))
    return nn.Sequential(*layers)


def mlp(
    *, in_features: int = 32, hidden: Sequence[int] = (64, 64), out_features: int = 10, seed: int = 0
) -> BuiltModel:
    """MLP of Linear -> BatchNorm1d -> ReLU blocks and a final Linear."""
    module = _build(lambda: _linear_bn_stack(in_features, hidden, out_features, nn.ReLU), seed)
    return module, (1, in_features)


def paper_mlp(*, hidden_units: int = 100, hidden_layers: int = 3, seed: int = 0) -> BuiltModel:
    """The MNIST network of Ioffe & Szegedy (2015), section 4.1: 784 inputs, 3 x 100 sigmoid units, 10 outputs.

    BN sits between each hidden Linear and its sigmoid, as in the paper.
    """
    hidden = [hidden_units] * hidden_layers
    module = _build(lambda: _linear_bn_stack(784, hidden, 10, nn.Sigmoid), seed)
    return module, (1, 784)


ARCHITECTURES: dict[str, Callable[..., BuiltModel]] = {
    "resnet": resnet,
    "resnet_bottleneck": functools.partial(resnet, bottleneck=True),
    "mobilenet_v2": mobilenet_v2,
    "densenet": densenet,
    "unet_decoder": unet_decoder,
    "mlp": mlp,
    "paper_mlp": paper_mlp,
}
"""Every architecture by name; called with only ``seed`` (or nothing) each builds a small model."""

FULL_SIZE_KWARGS: dict[str, dict[str, Any]] = {
    "resnet": {"depths": (2, 2, 2, 2), "width": 64, "num_classes": 1000, "image_size": 224},  # ResNet-18
    "resnet_bottleneck": {"depths": (3, 4, 6, 3), "width": 64, "num_classes": 1000, "image_size": 224},
    "mobilenet_v2": {"width_mult": 1.0, "num_classes": 1000, "image_size": 224},
    "densenet": {
        "growth_rate": 32,
        "block_config": (6, 12, 24, 16),
        "num_init_features": 64,
        "num_classes": 1000,
        "image_size": 224,
    },
    "unet_decoder": {"width": 64, "depth": 4, "image_size": 256},
    "mlp": {"in_features": 1024, "hidden": (4096, 4096, 4096), "out_features": 1000},
    "paper_mlp": {},
}
"""Keyword arguments that make each registry entry published-size, for benchmarks."""


# Export ---------------------------------------------------------------------------------------------


def count_batchnorm_modules(module: nn.Module) -> int:
    return sum(isinstance(submodule, _BatchNorm) for submodule in module.modules())


def example_input(input_shape: Sequence[int], seed: int = 0) -> torch.Tensor:
    """The standard-normal input tensor used for export and for comparing outputs, fixed by ``seed``."""
    return torch.randn(tuple(input_shape), generator=torch.Generator().manual_seed(seed))


def export_onnx(
    module: nn.Module,
    input_shape: Sequence[int],
    path: str | Path,
    *,
    exporter: Exporter = "torchscript",
    opset: int | None = None,
    seed: int = 0,
    dynamic_batch: bool = False,
) -> Path:
    """Export eval-mode ``module`` to ``path`` with every BatchNorm kept as an inference BatchNormalization.

    The example input is :func:`example_input` of ``input_shape`` and ``seed``. ``opset=None`` takes the
    exporter's default. The graph input is ``input`` and the output ``output``; with ``dynamic_batch``
    their first dimension is the symbol ``batch``, otherwise all dimensions are static. Raises
    :class:`ExportError` unless the graph holds exactly one inference BatchNormalization per BatchNorm
    module and, when ``opset`` is given, has that opset.
    """
    if module.training:
        raise ValueError("export_onnx needs an eval-mode module; training-mode BN uses batch statistics")
    path = Path(path)
    example = example_input(input_shape, seed)
    if exporter == "torchscript":
        _export_torchscript(module, example, path, opset, dynamic_batch)
    elif exporter == "dynamo":
        _export_dynamo(module, example, path, opset, dynamic_batch)
    else:
        raise ValueError(f"unknown exporter {exporter!r}; expected 'torchscript' or 'dynamo'")
    model = onnx.load(path, load_external_data=False)
    _check_opset(model, opset, exporter)
    _check_batchnorms_kept(model, count_batchnorm_modules(module), exporter)
    return path


def _export_torchscript(
    module: nn.Module, example: torch.Tensor, path: Path, opset: int | None, dynamic_batch: bool
) -> None:
    # In EVAL mode the TorchScript exporter fuses Conv+BN; PRESERVE keeps BN and, because the module is
    # in eval mode, exports it as an inference BatchNormalization.
    batch_axes = {0: _BATCH_DIM_NAME}
    with warnings.catch_warnings():
        # Choosing this deprecated exporter is deliberate; its deprecation notices would only clutter output.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            module,
            (example,),
            str(path),
            dynamo=False,
            opset_version=opset,
            training=torch.onnx.TrainingMode.PRESERVE,
            do_constant_folding=False,
            input_names=["input"],
            output_names=["output"],
            dynamic_axes={"input": batch_axes, "output": batch_axes} if dynamic_batch else None,
        )


def _export_dynamo(
    module: nn.Module, example: torch.Tensor, path: Path, opset: int | None, dynamic_batch: bool
) -> None:
    # optimize=False stops the exporter's optimizer from fusing Conv+BN, ConvTranspose+BN and Gemm+BN.
    dynamic_shapes = ({0: torch.export.Dim(_BATCH_DIM_NAME)},) if dynamic_batch else None
    program = torch.onnx.export(
        module,
        (example,),
        dynamo=True,
        optimize=False,
        verbose=False,
        opset_version=opset,
        input_names=["input"],
        output_names=["output"],
        dynamic_shapes=dynamic_shapes,
    )
    program.save(str(path))


def _check_opset(model: onnx.ModelProto, requested: int | None, exporter: str) -> None:
    exported = next(entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx"))
    if requested is not None and exported != requested:
        raise ExportError(f"{exporter} export asked for opset {requested} but produced opset {exported}")


def _check_batchnorms_kept(model: onnx.ModelProto, expected: int, exporter: str) -> None:
    if model.functions:
        raise ExportError(f"{exporter} export produced local functions; expected a flat graph")
    batchnorms = [node for node in model.graph.node if node.op_type == "BatchNormalization"]
    if len(batchnorms) != expected:
        raise ExportError(f"{exporter} export has {len(batchnorms)} BatchNormalization nodes for {expected} BN modules")
    for node in batchnorms:
        training_mode = next((a.i for a in node.attribute if a.name == "training_mode"), 0)
        if training_mode or any(node.output[1:]):
            raise ExportError(f"{exporter} exported {node.name!r} as a training-mode BatchNormalization")
