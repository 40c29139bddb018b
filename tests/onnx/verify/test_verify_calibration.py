"""verify_onnx against the requirements its default tolerances are calibrated on (docs/verification.md):
exact folds of ResNet-sized networks pass, one channel 1% off fails (the training-mode case: test_verify.py)."""

from __future__ import annotations

import copy
import io
import warnings
from collections.abc import Iterator, Sequence

import numpy as np
import onnx
import pytest

from bnfold.core.compare import DEFAULT_TOLERANCES
from bnfold.onnx.verify.verify import verify_onnx

torch = pytest.importorskip("torch")
nn = torch.nn

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
