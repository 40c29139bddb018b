"""Real architectures built in code (tests.support.zoo), folded as modules, .pt2 and TorchScript."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

from bnfold.torch import fold_module  # noqa: E402
from tests.support import zoo  # noqa: E402
from tests.support.torch_cases import max_error  # noqa: E402
from tests.torch.test_files import fold_and_write  # noqa: E402

EXACT = 1e-5
BATCH = 2

# What each architecture folds, and what it must leave (with the reason).
EXPECTED = {
    "resnet": ({"conv-bn": 12}, {}),
    "resnet_bottleneck": ({"conv-bn": 17}, {}),
    "mobilenet_v2": ({"conv-bn": 52}, {}),
    # pre-activation layers BN -> ReLU -> conv: a ReLU between BN and conv leaves nothing to fold into
    "densenet": ({"conv-bn": 7}, {"no_linear_neighbour": 9}),
    "unet_decoder": ({"conv-bn": 7, "convtranspose-bn": 3}, {}),
    "mlp": ({"linear-bn": 2}, {}),
    "paper_mlp": ({"linear-bn": 3}, {}),
}


def _build(name: str) -> tuple[nn.Module, torch.Tensor]:
    model, shape = zoo.ARCHITECTURES[name](seed=11)
    return model, zoo.example_input((BATCH, *shape[1:]), seed=1)


def _summary(result) -> tuple[Counter, Counter]:
    return (
        Counter(r.pattern for r in result.report.folded),
        Counter(r.reason for r in result.report.left),
    )


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_architecture_folds_exactly(name: str) -> None:
    model, x = _build(name)
    result = fold_module(model, (x,))
    assert result.report.verification.passed, result.report.render()
    assert type(result.model) is type(model)
    assert max_error(model, result.model, x) < EXACT
    folded, left = _summary(result)
    want_folded, want_left = EXPECTED[name]
    assert folded == Counter(want_folded), result.report.render()
    assert left == Counter(want_left), result.report.render()


def test_paper_mlp_without_inputs_needs_proof_of_rank() -> None:
    """Linear -> BN1d folds only when the rank is proven; the paper MLP flattens its input first."""
    model, x = _build("paper_mlp")
    result = fold_module(model)
    assert all(r.reason == "unknown_shape" or r.status == "folded" for r in result.report.records)
    assert max_error(model, result.model, x) < EXACT


@pytest.mark.parametrize("name", ["resnet", "mobilenet_v2", "unet_decoder"])
def test_architecture_file_round_trips(tmp_path: Path, name: str) -> None:
    model, x = _build(name)
    program, script = tmp_path / "m.pt2", tmp_path / "m.ts"
    torch.export.save(torch.export.export(model, (x,)), str(program))
    torch.jit.save(torch.jit.trace(model, x), str(script))  # the zoo classes are not scriptable
    report = fold_and_write(program, tmp_path / "f.pt2")
    assert report.verification.passed and len(report.folded) == len(fold_module(model, (x,)).report.folded)
    assert max_error(model, torch.export.load(str(tmp_path / "f.pt2")).module(), x) < EXACT
    traced = fold_and_write(script, tmp_path / "f.ts", input_shapes=[tuple(x.shape)])
    assert traced.verification.passed
    # a traced file folds as completely as the .pt2 of the same model (bias-free convs get a bias)
    assert {r.bn: r.status for r in traced.records} == {r.bn: r.status for r in report.records}
    assert (traced.totals.bn_after, len(traced.left)) == (report.totals.bn_after, len(report.left))
    assert max_error(model, torch.jit.load(str(tmp_path / "f.ts")), x) < EXACT
