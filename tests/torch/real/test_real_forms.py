"""Real timm and torchvision model code as a .pt2 program, a traced and a scripted TorchScript module: the
TorchScript forms fold every batch norm the .pt2 folds (timm's BatchNormAct2d, bias-free convs included)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("timm")
pytest.importorskip("torchvision")

import bnfold  # noqa: E402
from tests.support.real_models import build  # noqa: E402
from tests.support.torch_cases import max_error  # noqa: E402

# Models whose code scripts: BatchNormAct2d (efficientnet, regnety), plain BatchNorm2d after bias-free convs.
MODELS = ["timm/efficientnet_b0", "timm/regnety_002", "torchvision/resnet18"]


def _folded(result) -> dict[str, str]:
    return {r.bn: r.status for r in result.report.records}


@pytest.mark.parametrize("name", MODELS)
def test_torchscript_folds_what_the_program_folds(name: str) -> None:
    model, x = build(name)
    program = bnfold.fold_module(torch.export.export(model, (x,)))
    assert program.report.verification.passed and not program.report.left
    for how in ("trace", "script"):
        scripted = torch.jit.trace(model, x) if how == "trace" else torch.jit.script(model)
        result = bnfold.fold_module(scripted, x)
        assert result.report.verification.passed, how
        assert _folded(result) == _folded(program), how
        assert max_error(model, result.model, x) < 1e-4, how
