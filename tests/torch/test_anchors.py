"""Every silent-wrong case measured in shared/research/torch-anchors.md sections 3 and 4.

Each case must fold correctly (error at rounding level) or be left with a reason code.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

from bnfold.torch import fold_module  # noqa: E402
from tests.support.torch_cases import by_name, fold_and_measure, max_error, outcome, randomize  # noqa: E402

FP32_EXACT = 1e-5


class Section3(nn.Module):
    """§3: Conv→BN→ReLU, ConvT→BN, BN→Conv(1×1), Conv feeding BN and a residual add, Linear→BN1d."""

    def __init__(self, relu_before_bnpre: bool = False) -> None:
        super().__init__()
        self.relu_before_bnpre = relu_before_bnpre
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.convt, self.bnt = nn.ConvTranspose2d(8, 8, 2, stride=2), nn.BatchNorm2d(8)
        self.bnpre, self.conv2 = nn.BatchNorm2d(8), nn.Conv2d(8, 8, 1)
        self.conv3, self.bn3 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.fc, self.bnfc = nn.Linear(8, 10), nn.BatchNorm1d(10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.bnt(self.convt(x))
        if self.relu_before_bnpre:
            x = torch.relu(x)
        x = self.conv2(self.bnpre(x))
        y = self.conv3(x)
        x = self.bn3(y) + y
        return self.bnfc(self.fc(x.mean((2, 3))))

    def describe(self) -> str:
        return "section 3"


def test_section3_experiment_folds_all_safe_pairs_and_keeps_class() -> None:
    model = randomize(Section3())
    result, error = fold_and_measure(model, torch.randn(2, 3, 8, 8))
    assert outcome(result) == {
        "bn1": "conv-bn", "bnt": "convtranspose-bn", "bnpre": "convtranspose-bn",  # chained after bnt
        "bn3": "input_fan_out", "bnfc": "linear-bn",
    }
    assert error < FP32_EXACT
    assert type(result.model) is Section3 and result.model.describe() == "section 3"
    assert isinstance(result.model.bn1, nn.Identity) and isinstance(result.model.bn3, nn.BatchNorm2d)


def test_section3_bn_before_conv_folds_forward_into_the_1x1_conv() -> None:
    model = randomize(Section3(relu_before_bnpre=True))
    result, error = fold_and_measure(model, torch.randn(2, 3, 8, 8))
    assert outcome(result)["bnpre"] == "bn-conv"
    assert result.report.folded and error < FP32_EXACT


class ConvTwoBns(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn_a, self.bn_b = nn.Conv2d(4, 6, 3), nn.BatchNorm2d(6), nn.BatchNorm2d(6)

    def forward(self, x):
        return self.bn_b(self.bn_a(self.conv(x)))


def test_chained_bns_both_fold() -> None:
    """pt2e dropped the second BN unfolded (err 4.41)."""
    result, error = fold_and_measure(randomize(ConvTwoBns()), torch.randn(2, 4, 7, 7))
    assert outcome(result) == {"bn_a": "conv-bn", "bn_b": "conv-bn"}
    assert error < FP32_EXACT


class FanOut(nn.Module):
    def __init__(self, linear: bool) -> None:
        super().__init__()
        self.layer = nn.Linear(6, 6) if linear else nn.Conv2d(6, 6, 3, padding=1)
        self.bn = nn.BatchNorm1d(6) if linear else nn.BatchNorm2d(6)

    def forward(self, x):
        y = self.layer(x)
        return self.bn(y) + y


@pytest.mark.parametrize("linear", [False, True], ids=["conv", "linear"])
def test_layer_output_with_other_users_is_left(linear: bool) -> None:
    """pt2e 3.83 (conv) and JIT/pt2e 4.67 (linear)."""
    x = torch.randn(3, 6) if linear else torch.randn(2, 6, 5, 5)
    result, error = fold_and_measure(randomize(FanOut(linear)), x)
    assert outcome(result) == {"bn": "input_fan_out"}
    assert error == 0.0


class ConvCalledTwice(nn.Module):
    def __init__(self, two_bns: bool) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.bn_other = nn.BatchNorm2d(4) if two_bns else None

    def forward(self, x):
        first = self.bn(self.conv(x))
        second = self.conv(x)
        if self.bn_other is not None:
            second = self.bn_other(second)
        return first + second


@pytest.mark.parametrize("two_bns", [False, True], ids=["one-bn", "two-bns"])
def test_module_called_at_two_sites_is_left(two_bns: bool) -> None:
    """FX/IND/pt2e/AIMET 2.94 with one BN; 8.52/9.32/6.91 with two (pytorch #104593, #197539)."""
    result, error = fold_and_measure(randomize(ConvCalledTwice(two_bns)), torch.randn(2, 4, 6, 6))
    assert set(outcome(result).values()) == {"module_reused"}
    assert error == 0.0


class SharedBn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv_a, self.conv_b, self.bn = nn.Conv2d(3, 5, 3), nn.Conv2d(3, 5, 1, bias=False), nn.BatchNorm2d(5)

    def forward(self, x):
        return self.bn(self.conv_a(x)) + self.bn(self.conv_b(x))[..., 1:-1, 1:-1]


def test_one_bn_module_after_two_convs_folds_into_both() -> None:
    result, error = fold_and_measure(randomize(SharedBn()), torch.randn(2, 3, 8, 8))
    record = result.report.folded[0]
    assert record.bn == "bn" and record.into == "conv_a, conv_b"
    assert error < FP32_EXACT


class LinearOn3d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc, self.bn = nn.Linear(4, 4), nn.BatchNorm1d(4)

    def forward(self, x):
        return self.bn(self.fc(x))


@pytest.mark.parametrize("with_inputs", [True, False])
def test_linear_on_3d_input_is_left_unless_its_rank_is_proven(with_inputs: bool) -> None:
    """FX/JIT/AIMET fold BN1d(4) over axis 1 into Linear's last axis: err 2.43 (pytorch #118990)."""
    model = randomize(LinearOn3d())
    x = torch.randn(3, 4, 4)
    result = fold_module(model, (x,) if with_inputs else None)
    assert outcome(result) == {"bn": "channel_axis" if with_inputs else "unknown_shape"}
    assert max_error(model, result.model, x) == 0.0


def test_linear_on_2d_input_is_proven_by_example_inputs() -> None:
    result, error = fold_and_measure(randomize(LinearOn3d()), torch.randn(5, 4))
    assert outcome(result) == {"bn": "linear-bn"} and error < FP32_EXACT


class ConvTBn(nn.Module):
    def __init__(self, c_in: int, c_out: int, groups: int, dims: int = 2) -> None:
        super().__init__()
        conv = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[dims]
        bn = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims]
        self.convt = conv(c_in, c_out, 3, stride=2, padding=1, output_padding=1, groups=groups)
        self.bn = bn(c_out)

    def forward(self, x):
        return self.bn(self.convt(x))


@pytest.mark.parametrize(
    ("c_in", "c_out", "groups"),
    [(8, 8, 1), (8, 4, 1), (4, 8, 1), (4, 6, 2), (4, 8, 4), (8, 8, 8), (6, 12, 3)],
    ids=["8-8", "8-4", "4-8", "g2", "multiplier", "depthwise", "g3"],
)
def test_conv_transpose_folds_for_every_groups(c_in: int, c_out: int, groups: int) -> None:
    """Inductor 3.45 (8→8), ultralytics 1.6–3.4, UT RuntimeError/broken module for groups>1 (#180995)."""
    model = randomize(ConvTBn(c_in, c_out, groups), seed=c_in * 10 + groups)
    result, error = fold_and_measure(model, torch.randn(2, c_in, 5, 5))
    assert outcome(result) == {"bn": "convtranspose-bn"}
    assert error < FP32_EXACT


class CustomBn(nn.BatchNorm2d):
    """A BN subclass from user code (FX TraceError; AIMET skip)."""


class SubclassBn(nn.Module):
    def __init__(self, bn: nn.Module) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), bn

    def forward(self, x):
        return self.bn(self.conv(x))


@pytest.mark.parametrize("bn", [CustomBn(4), nn.SyncBatchNorm(4)], ids=["custom-subclass", "syncbn"])
def test_bn_subclasses_in_eval_fold(bn: nn.Module) -> None:
    result, error = fold_and_measure(randomize(SubclassBn(bn)), torch.randn(2, 3, 6, 6))
    assert outcome(result) == {"bn": "conv-bn"} and error < FP32_EXACT


def test_syncbn_without_inputs_is_unproven_since_it_takes_any_rank() -> None:
    result = fold_module(randomize(SubclassBn(nn.SyncBatchNorm(4))))
    assert outcome(result) == {"bn": "unknown_shape"}


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.head_a = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))
        self.head_b = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))
        self.conv, self.bn = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        branch = x.mean() > 0
        x = self.stem(x)
        x = self.head_a(x) if branch else self.head_b(x)
        return self.bn(self.conv(x))


@pytest.mark.parametrize("with_inputs", [True, False])
def test_data_dependent_control_flow_folds_traceable_regions(with_inputs: bool) -> None:
    """FX TraceError, export GuardOnDataDependentSymNode: fold what each region proves, and what the
    uncaptured forward's own source proves (``self.bn(self.conv(x))``, each child used once)."""
    model = randomize(DataDependent())
    x = torch.randn(2, 3, 6, 6).abs()
    result = fold_module(model, (x,) if with_inputs else None)
    assert outcome(result) == {"stem.1": "conv-bn", "head_a.1": "conv-bn", "head_b.1": "conv-bn", "bn": "conv-bn"}
    assert max_error(model, result.model, x) < FP32_EXACT
    assert max_error(model, result.model, -x) < FP32_EXACT


class SourcePairs(nn.Module):
    """Untraceable (a data-dependent branch); pairs of children the source alone proves, or does not."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)  # x = conv1(x); x = bn1(x)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)  # y = conv2(x); ... bn2(y): not adjacent
        self.bn3, self.conv3 = nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1)  # conv3(bn3(x)): BN before the layer
        self.conv4, self.bn4 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)  # conv4 called twice

    def forward(self, x):
        x = self.conv1(x)
        x = self.bn1(x)
        y = self.conv2(x)
        if y.mean() > 0:
            y = y * 2
        x = self.bn2(y)
        x = self.conv3(self.bn3(x))
        if x.mean() > 100:
            return self.conv4(x)
        return self.bn4(self.conv4(x))


def test_uncaptured_forward_folds_pairs_its_source_proves() -> None:
    model = randomize(SourcePairs())
    x = torch.randn(2, 3, 6, 6)
    result = fold_module(model, (x,))
    assert outcome(result) == {
        "bn1": "conv-bn", "bn2": "capture_failed", "bn3": "bn-conv", "bn4": "capture_failed",
    }
    assert max_error(model, result.model, x) < FP32_EXACT
    assert max_error(model, result.model, x + 1000) < FP32_EXACT


class ReachesIntoARegion(nn.Module):
    """A branch the example input does not take runs ``head.0`` without the batch norm after it."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
        self.blocks = nn.ModuleList([nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)) for _ in range(2)])

    def forward(self, x):
        if x.mean() > 100:
            return self.head[0](x)
        x = self.head(x)
        for block in self.blocks:
            x = block(x)
        return x


def test_region_reached_into_by_uncaptured_code_is_left() -> None:
    """The reference run never sees the other branch; the uncaptured forward's source says it may run
    ``head[0]`` alone, so ``head`` is not folded, while blocks called whole still fold."""
    model = randomize(ReachesIntoARegion())
    x = torch.randn(2, 3, 6, 6)
    result = fold_module(model, (x,))
    assert outcome(result) == {"head.1": "module_reused", "blocks.0.1": "conv-bn", "blocks.1.1": "conv-bn"}
    assert "may use head other than by calling it" in by_name(result)["head.1"].message
    assert max_error(model, result.model, x + 1000) < FP32_EXACT


class ItemLoop(nn.Module):
    """Untraceable by torch.fx (``int()`` of a tensor) but fine for torch.export with example inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        self.repeats = 2

    def forward(self, x):
        y = self.bn(self.conv(x))
        for _ in range(int(x.shape[0]) * self.repeats):
            y = y * 0.5
        return y


def test_torch_export_is_the_fallback_when_fx_fails() -> None:
    model = randomize(ItemLoop())
    x = torch.randn(2, 3, 6, 6)
    result, error = fold_and_measure(model, x)
    assert outcome(result) == {"bn": "conv-bn"} and error < FP32_EXACT


class RegisteredConvBnComputesBnConv(nn.Module):
    """Child order says (conv, bn) but the dataflow is conv(bn(x)): MMCV's order rule gives err 4.04."""

    def __init__(self, padding: int) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=padding), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.conv(self.bn(x))


def test_dataflow_not_module_order_decides() -> None:
    model = randomize(RegisteredConvBnComputesBnConv(padding=0))
    result, error = fold_and_measure(model, torch.randn(2, 4, 7, 7))
    assert outcome(result) == {"bn": "bn-conv"} and error < FP32_EXACT
    padded = randomize(RegisteredConvBnComputesBnConv(padding=1))
    result, error = fold_and_measure(padded, torch.randn(2, 4, 7, 7))
    assert outcome(result) == {"bn": "padding"} and error == 0.0


def test_data_parallel_wrapper_is_unwrapped_and_rewrapped() -> None:
    """FX TraceError, JIT NotSupportedError on DataParallel."""
    inner = randomize(SubclassBn(nn.BatchNorm2d(4)))
    wrapped = nn.DataParallel(inner)
    x = torch.randn(2, 3, 6, 6)
    result, error = fold_and_measure(wrapped, x)
    assert type(result.model) is nn.DataParallel and result.model is not wrapped
    assert isinstance(result.model.module.bn, nn.Identity) and isinstance(inner.bn, nn.BatchNorm2d)
    assert outcome(result) == {"bn": "conv-bn"} and error < FP32_EXACT


class Fp16Case(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(16, 32, 3), nn.BatchNorm2d(32)

    def forward(self, x):
        return self.bn(self.conv(x))


def test_fp16_fold_is_computed_in_float64_and_cast_once() -> None:
    """UT folds in fp16 (err 0.107 vs 0.083 unfused); folding in high precision then casting is best."""
    model = randomize(Fp16Case(), seed=3)
    with torch.no_grad():
        model.bn.running_var.uniform_(1e-3, 1e-2)
    x = torch.randn(2, 16, 8, 8)
    exact = model.double()(x.double())
    half = model.half()
    result = fold_module(half, (x.half(),))
    assert result.report.verification.passed, result.report.render()
    unfused_error = (half(x.half()).double() - exact).abs().max().item()
    folded_error = (result.model(x.half()).double() - exact).abs().max().item()
    assert result.model.conv.weight.dtype == torch.float16 and result.model.conv.bias.dtype == torch.float16
    assert folded_error <= unfused_error * 1.5


def test_fp16_overflow_is_left_as_cast_overflow() -> None:
    """gamma=300, var=0: a fused fp16 weight would contain inf while the unfused model is finite."""
    model = randomize(Fp16Case(), seed=4)
    with torch.no_grad():
        model.bn.weight.fill_(300.0)
        model.bn.running_var.zero_()
        model.conv.weight.mul_(4.0)
    half = model.half()
    x = torch.randn(1, 16, 5, 5).half()
    result = fold_module(half, (x,))
    assert outcome(result) == {"bn": "cast_overflow"}
    assert torch.equal(result.model(x), half(x))


def test_bf16_model_folds() -> None:
    """AIMET TypeError on bf16 (numpy has no bfloat16)."""
    model = randomize(Fp16Case(), seed=5).to(torch.bfloat16)
    x = torch.randn(2, 16, 6, 6).to(torch.bfloat16)
    result = fold_module(model, (x,))
    assert outcome(result) == {"bn": "conv-bn"}
    assert result.report.verification.passed, result.report.render()
    assert result.model.conv.weight.dtype == torch.bfloat16
