"""Batch norms inside other modules, per-channel affine modules and reshape-aware folds, through fold_module.

Each module here is written the way real model code writes it (timm's BatchNormAct2d, torchvision's
FrozenBatchNorm2d, levit's LinearNorm), so what is tested is what the module's own forward computes.
"""

from __future__ import annotations

from collections import Counter

import pytest

torch = pytest.importorskip("torch")
hypothesis = pytest.importorskip("hypothesis")

import torch.nn.functional as F  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from torch import nn  # noqa: E402

from bnfold.torch import fold_module  # noqa: E402


class BatchNormAct(nn.BatchNorm2d):
    """timm's BatchNormAct2d, reduced: batch norm, then dropout and an activation."""

    def __init__(self, channels: int, act: nn.Module | None = None) -> None:
        super().__init__(channels)
        self.drop = nn.Dropout(0.1)
        self.act = act if act is not None else nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch._assert(x.ndim == 4, "expected 4D input")
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.1, self.eps)
        return self.act(self.drop(x))


class ResidualNorm(nn.BatchNorm2d):
    """Reads its input beside the batch norm: folding into the conv before would change that read."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + x


class OtherEpsNorm(nn.BatchNorm2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.1, 0.5)


class FrozenNorm(nn.Module):
    """torchvision's FrozenBatchNorm2d: buffers only, x * scale + shift."""

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(channels))
        self.register_buffer("bias", torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.reshape(1, -1, 1, 1)
        b = self.bias.reshape(1, -1, 1, 1)
        rv = self.running_var.reshape(1, -1, 1, 1)
        rm = self.running_mean.reshape(1, -1, 1, 1)
        scale = w * (rv + self.eps).rsqrt()
        return x * scale + (b - rm * scale)


class SquaringNorm(FrozenNorm):
    """Has batch-norm statistics but is not affine in its input: reported, never folded."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * x


class LinearNorm(nn.Module):
    """timm levit's LinearNorm: the batch norm sees the linear's output with its leading axes merged."""

    def __init__(self, features_in: int, features_out: int, flatten_end: int = 1) -> None:
        super().__init__()
        self.linear = nn.Linear(features_in, features_out)
        self.bn = nn.BatchNorm1d(features_out)
        self.flatten_end = flatten_end

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear(x)
        return self.bn(x.flatten(0, self.flatten_end)).reshape_as(x)


def _randomized(model: nn.Module, seed: int = 0) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            buffers = dict(module.named_buffers(recurse=False))
            if "running_var" in buffers:
                n = buffers["running_var"].shape
                buffers["running_mean"].copy_(torch.randn(n, generator=generator))
                buffers["running_var"].copy_(torch.rand(n, generator=generator) + 0.5)
                for name in ("weight", "bias"):
                    tensor = getattr(module, name, None)
                    if tensor is not None:
                        tensor.copy_(torch.randn(n, generator=generator))
    return model.eval()


def _fold(model: nn.Module, x: torch.Tensor):
    model = _randomized(model)
    with torch.no_grad():
        expected = model(x)
    result = fold_module(model, x)
    assert result.report.verification.passed, result.report.render()
    with torch.no_grad():
        torch.testing.assert_close(result.model(x), expected, rtol=1e-5, atol=1e-5)
    return result


def _reasons(result) -> Counter:
    return Counter(str(r.reason) for r in result.report.left)


def test_batchnorm_with_activation_folds_into_the_conv_before_and_keeps_its_activation():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), BatchNormAct(8), nn.Conv2d(8, 4, 1))
    result = _fold(model, torch.randn(2, 3, 8, 8))
    assert [r.into for r in result.report.folded] == ["0"]
    kept = result.model[1]
    assert type(kept) is BatchNormAct and isinstance(kept.act, nn.SiLU)
    assert result.report.totals.bn_after == 0
    # The batch-norm part is now the identity: the module applies its activation alone.
    probe = torch.randn(1, 8, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(kept(probe), F.silu(probe), rtol=0, atol=0)


def test_batchnorm_with_activation_never_folds_into_the_layer_after_it():
    # Nothing before the batch norm: the conv after it would need the BN's output, which the SiLU changes.
    model = nn.Sequential(BatchNormAct(3), nn.Conv2d(3, 4, 1))
    result = _fold(model, torch.randn(2, 3, 8, 8))
    assert _reasons(result) == Counter({"work_after_bn": 1})


def test_batchnorm_with_identity_activation_folds_into_the_layer_after_it_too():
    model = nn.Sequential(BatchNormAct(3, act=nn.Identity()), nn.Conv2d(3, 4, 1))
    result = _fold(model, torch.randn(2, 3, 8, 8))
    assert [r.pattern for r in result.report.folded] == ["bn-conv"]


class FlagNorm(nn.BatchNorm2d):
    """Its forward depends on a flag: two instances that differ only in it compute different things."""

    def __init__(self, channels: int, use_act: bool) -> None:
        super().__init__(channels)
        self.use_act = use_act
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.1, self.eps)
        return self.act(x) if self.use_act else x


def test_each_instance_is_proven_with_its_own_attributes():
    model = nn.Sequential(FlagNorm(4, True), nn.Conv2d(4, 4, 1), nn.ReLU(), FlagNorm(4, False), nn.Conv2d(4, 4, 1))
    result = _fold(model, torch.randn(2, 4, 6, 6))
    assert _reasons(result) == Counter({"work_after_bn": 1})
    assert [(r.bn, r.pattern) for r in result.report.folded] == [("3", "bn-conv")]


@pytest.mark.parametrize(("norm", "reason"), [(ResidualNorm, "unsupported_bn"), (OtherEpsNorm, "unsupported_bn")])
def test_batchnorm_whose_forward_is_more_than_a_batch_norm_is_left(norm, reason):
    model = nn.Sequential(nn.Conv2d(3, 8, 3), norm(8))
    result = _fold(model, torch.randn(2, 3, 8, 8))
    assert _reasons(result) == Counter({reason: 1})
    assert type(result.model[1]) is norm


def test_frozen_batchnorm_after_a_conv_folds_and_each_one_is_reported():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), FrozenNorm(8), nn.ReLU(), FrozenNorm(8))
    result = _fold(model, torch.randn(2, 3, 8, 8))
    assert [r.bn for r in result.report.folded] == ["1"]
    assert _reasons(result) == Counter({"no_linear_neighbour": 1})
    assert result.report.totals.bn_before == 2


def test_module_with_statistics_that_is_not_affine_is_reported_as_left():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), SquaringNorm(8))
    result = _fold(model, torch.randn(2, 3, 8, 8))
    assert _reasons(result) == Counter({"unsupported_bn": 1})


def test_frozen_batchnorm_of_rank_4_is_not_folded_into_a_conv1d():
    # (1, C, 1, 1) constants turn a conv1d's (N, C, L) output into rank 4 with the channels on axis 2.
    model = nn.Sequential(nn.Conv1d(3, 8, 3), FrozenNorm(8))
    result = _fold(model, torch.randn(8, 3, 8))
    assert _reasons(result) == Counter({"channel_axis": 1})


@pytest.mark.parametrize("flatten_end", [1, -2])
def test_linear_flatten_batchnorm1d_folds_into_the_linear(flatten_end):
    model = LinearNorm(6, 5, flatten_end)
    result = _fold(model, torch.randn(2, 7, 6))
    assert [(r.pattern, r.into) for r in result.report.folded] == [("linear-bn", "linear")]


def test_flatten_that_mixes_conv_channels_is_not_folded():
    class ConvFlattenNorm(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv1d(3, 4, 1)
            self.bn = nn.BatchNorm1d(5)

        def forward(self, x):
            y = self.conv(x)  # (N, 4, 5): the last axis is length, not the conv's channels
            return self.bn(y.flatten(0, 1)).reshape_as(y)

    result = _fold(ConvFlattenNorm(), torch.randn(2, 3, 5))
    assert _reasons(result) == Counter({"reshape_mixes_channels": 1})


_STEPS = st.lists(st.sampled_from(["mul", "add", "sub", "rsub", "div"]), min_size=1, max_size=4)


@settings(max_examples=25, deadline=None)
@given(steps=_STEPS, seed=st.integers(0, 2**16))
def test_any_chain_of_per_channel_constants_folds_exactly(steps, seed):
    generator = torch.Generator().manual_seed(seed)

    class Chain(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            for i in range(len(steps)):
                self.register_buffer(f"c{i}", torch.rand(4, generator=generator) + 0.5)

        def forward(self, x):
            for i, step in enumerate(steps):
                c = getattr(self, f"c{i}").view(1, -1, 1, 1)
                if step == "mul":
                    x = x * c
                elif step == "add":
                    x = x + c
                elif step == "sub":
                    x = x - c
                elif step == "rsub":
                    x = c - x
                else:
                    x = x / c
            return x

    model = nn.Sequential(nn.Conv2d(2, 4, 3), Chain())
    result = _fold(model, torch.randn(2, 2, 6, 6))
    assert len(result.report.folded) == 1
