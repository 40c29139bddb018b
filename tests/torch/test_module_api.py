"""fold_module: layer coverage, refusals with reasons, and keeping the user's model intact."""

from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

from bnfold.errors import InputError  # noqa: E402
from bnfold.torch import FoldResult, fold_module  # noqa: E402
from tests.support.torch_cases import by_name, fold_and_measure, max_error, outcome, randomize  # noqa: E402

EXACT = 1e-5
CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
CONVT = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


class Pair(nn.Module):
    def __init__(self, first: nn.Module, second: nn.Module) -> None:
        super().__init__()
        self.first, self.second = first, second

    def forward(self, x):
        return self.second(self.first(x))


def _input(dims: int, channels: int) -> torch.Tensor:
    return torch.randn(2, channels, *([5] * dims))


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("groups", [1, 2, 4])
@pytest.mark.parametrize("transposed", [False, True], ids=["conv", "convtranspose"])
def test_layer_then_bn_folds(dims: int, groups: int, transposed: bool) -> None:
    layer = (CONVT if transposed else CONV)[dims](4, 8, 3, groups=groups, bias=groups != 2)
    model = randomize(Pair(layer, BN[dims](8)), seed=dims * 7 + groups)
    result, error = fold_and_measure(model, _input(dims, 4))
    assert outcome(result) == {"second": "convtranspose-bn" if transposed else "conv-bn"}
    assert error < EXACT and result.model.first.bias is not None


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("groups", [1, 2, 4])
def test_bn_then_unpadded_conv_folds_group_aware(dims: int, groups: int) -> None:
    model = randomize(Pair(BN[dims](4), CONV[dims](4, 8, 3, groups=groups, stride=2, bias=False)), seed=groups)
    result, error = fold_and_measure(model, _input(dims, 4))
    assert outcome(result) == {"first": "bn-conv"} and error < EXACT


@pytest.mark.parametrize(
    ("padding", "mode", "expected"),
    [(1, "zeros", "padding"), ("valid", "zeros", "bn-conv"), (1, "reflect", "bn-conv"),
     (1, "replicate", "bn-conv"), (1, "circular", "bn-conv"), ("same", "zeros", "padding")],
)
def test_bn_then_conv_padding_rule(padding, mode: str, expected: str) -> None:
    """A shift before zero padding is not a constant bias; copying padding modes carry it exactly."""
    model = randomize(Pair(nn.BatchNorm2d(4), nn.Conv2d(4, 6, 3, padding=padding, padding_mode=mode)))
    result, error = fold_and_measure(model, torch.randn(2, 4, 6, 6))
    assert outcome(result) == {"first": expected} and error < EXACT


def test_bn_with_zero_shift_folds_before_a_padded_conv() -> None:
    model = randomize(Pair(nn.BatchNorm2d(4, affine=False), nn.Conv2d(4, 6, 3, padding=1)))
    model.first.running_mean.zero_()
    result, error = fold_and_measure(model, torch.randn(2, 4, 6, 6))
    assert outcome(result) == {"first": "bn-conv"} and error < EXACT


def test_bn_before_conv_transpose_needs_zero_shift() -> None:
    model = randomize(Pair(nn.BatchNorm2d(4), nn.ConvTranspose2d(4, 6, 2, stride=2)))
    result, error = fold_and_measure(model, torch.randn(2, 4, 5, 5))
    assert outcome(result) == {"first": "uneven_taps"} and error == 0.0


def test_bn_then_linear_folds_on_2d_input() -> None:
    model = randomize(Pair(nn.BatchNorm1d(6), nn.Linear(6, 3)))
    result, error = fold_and_measure(model, torch.randn(4, 6))
    assert outcome(result) == {"first": "bn-linear"} and error < EXACT


def test_affine_free_bn_folds_into_linear_and_conv() -> None:
    """torch.nn.utils.fusion.fuse_linear_bn_weights raises TypeError for affine=False."""
    linear = randomize(Pair(nn.Linear(5, 6), nn.BatchNorm1d(6, affine=False)))
    result, error = fold_and_measure(linear, torch.randn(3, 5))
    assert outcome(result) == {"second": "linear-bn"} and error < EXACT
    conv = randomize(Pair(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6, affine=False)))
    result, error = fold_and_measure(conv, torch.randn(2, 3, 6, 6))
    assert outcome(result) == {"second": "conv-bn"} and error < EXACT


@pytest.mark.parametrize(
    ("prepare", "reason"),
    [
        (lambda m: m.second.train(), "training_mode"),
        (lambda m: setattr(m, "second", nn.BatchNorm2d(6, track_running_stats=False).eval()), "no_running_stats"),
        (lambda m: m.second.running_var.__setitem__(0, float("inf")), "non_finite_params"),
        (lambda m: m.second.register_forward_hook(lambda *a: None), "hooks"),
        (lambda m: m.first.register_forward_hook(lambda *a: None), "hooks"),
        (lambda m: nn.utils.parametrizations.weight_norm(m.first), "unsupported_layer"),
    ],
    ids=["train-bn", "no-stats", "inf-var", "bn-hook", "layer-hook", "parametrized"],
)
def test_unfoldable_bn_is_left_with_reason(prepare, reason: str) -> None:
    model = randomize(Pair(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6)))
    prepare(model)
    result = fold_module(model, (torch.randn(2, 3, 6, 6),))
    assert outcome(result) == {"second": reason}
    assert by_name(result)["second"].message
    assert result.report.verification.passed


def test_shared_parameters_are_left() -> None:
    model = randomize(Pair(nn.Linear(4, 4), nn.BatchNorm1d(4)))
    model.tied = nn.Linear(4, 4)
    model.tied.weight = model.first.weight
    result = fold_module(model, (torch.randn(3, 4),))
    assert outcome(result) == {"second": "module_reused"}


class Reads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x)) * self.conv.weight.mean()


def test_parameters_read_by_forward_block_the_fold() -> None:
    result = fold_module(randomize(Reads()), (torch.randn(1, 3, 5, 5),))
    assert outcome(result) == {"bn": "module_reused"}


class WithExtras(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4)
        self.label = "kept"
        self.calls = 0

    def forward(self, x):
        return self.bn(self.conv(x))

    def describe(self) -> str:
        return f"{self.label}:{type(self.conv).__name__}"


def test_copy_mode_keeps_class_methods_attributes_and_hooks_and_never_touches_the_original() -> None:
    model = randomize(WithExtras())
    seen = []
    model.register_forward_hook(lambda module, args, output: seen.append(output.shape))
    snapshot = copy.deepcopy(model.state_dict())
    x = torch.randn(2, 3, 6, 6)
    result = fold_module(model, (x,))
    assert isinstance(result, FoldResult)
    folded = result.model
    assert type(folded) is WithExtras and folded is not model
    assert folded.describe() == "kept:Conv2d" and folded.label == "kept"
    assert isinstance(folded.bn, nn.Identity) and folded.conv.bias is not None
    assert isinstance(model.bn, nn.BatchNorm2d) and model.conv.bias is None
    assert all(torch.equal(snapshot[k], v) for k, v in model.state_dict().items())
    seen.clear()
    folded(x)
    assert seen == [torch.Size([2, 4, 4, 4])]
    assert max_error(model, folded, x) < EXACT


def test_inplace_mode_changes_the_given_model() -> None:
    model = randomize(WithExtras())
    weight = model.conv.weight
    result = fold_module(model, (torch.randn(2, 3, 6, 6),), inplace=True)
    assert result.model is model and isinstance(model.bn, nn.Identity)
    assert model.conv.weight is weight


def test_train_mode_model_is_refused_unless_allowed() -> None:
    model = randomize(WithExtras()).train()
    with pytest.raises(InputError, match="training mode"):
        fold_module(model)
    result = fold_module(model, allow_train_mode=True)
    assert outcome(result) == {"bn": "conv-bn"}
    assert model.training and not result.model.training
    x = torch.randn(2, 3, 6, 6)
    assert max_error(copy.deepcopy(model).eval(), result.model, x) < EXACT


def test_verification_report_object() -> None:
    result = fold_module(randomize(WithExtras()), input_shapes=[(2, 3, 6, 6)])
    verification = result.report.verification
    assert verification.passed is True
    data = verification.to_dict()
    assert data["passed"] is True and data["outputs"][0]["max_abs_error"] < 1e-4
    assert "PASSED" in verification.render()
    assert result.report.to_dict()["verification"]["passed"] is True


def test_no_inputs_means_no_verification() -> None:
    result = fold_module(randomize(WithExtras()))
    assert result.report.verification is None and len(result.report.folded) == 1


def test_export_onnx_checks_under_onnxruntime(tmp_path) -> None:
    path = tmp_path / "folded.onnx"
    result = fold_module(randomize(WithExtras()), input_shapes=[(2, 3, 6, 6)], export_onnx=str(path))
    assert result.report.verification.passed, result.report.render()
    assert [p.engine for p in result.report.verification.parts] == [
        "pytorch", "onnxruntime (optimizations disabled)",
    ]
    assert path.exists()


def test_not_a_module_is_an_input_error() -> None:
    with pytest.raises(InputError):
        fold_module("model.pt")


def test_report_counts_modules_and_notes_a_list_of_inputs_taken_as_arguments() -> None:
    model = randomize(Pair(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))).eval()
    x = torch.randn(2, 3, 6, 6)
    as_tuple = fold_module(model, (x,)).report
    assert "modules 3 -> 3" in as_tuple.render()
    assert as_tuple.notes == []
    as_list = fold_module(model, [x]).report
    assert as_list.verification.passed
    assert as_list.notes == [
        "example_inputs is a list: its items were passed as positional arguments "
        "(pass a tuple to say so, or (items,) to pass the list as one argument)"
    ]
