"""Real architectures built in code, exported by both PyTorch exporters with BN kept, folded and verified."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from bnfold import fold_onnx  # noqa: E402
from tests.support.zoo import ARCHITECTURES, export_onnx  # noqa: E402

# BNs that must stay: DenseNet's pre-activation BN -> ReLU -> Conv has no linear neighbour to fold into.
EXPECTED_LEFT = {"densenet": 9}


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("exports")


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_architecture_folds_and_verifies(architecture, exporter, exports):
    module, shape = ARCHITECTURES[architecture]()
    path = export_onnx(module, shape, exports / f"{architecture}-{exporter}.onnx", exporter=exporter)
    result = fold_onnx(path)
    report = result.report
    assert report.verification.passed, report.render()
    left = report.left
    assert len(left) == EXPECTED_LEFT.get(architecture, 0), report.render()
    assert all(r.reason == "no_linear_neighbour" for r in left)
    assert report.totals.bn_after == len(left)
    assert report.totals.nodes_after < report.totals.nodes_before
