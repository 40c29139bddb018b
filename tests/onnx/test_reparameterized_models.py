"""Real re-parameterizable timm models, exported in their train-time structure (every branch and batch norm
kept, random weights and batch-norm statistics), fold to no more Conv nodes than the authors' own deploy form
(``timm.utils.reparameterize_model``) and verify against the original."""

from __future__ import annotations

import copy
from pathlib import Path

import onnx
import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

from bnfold import fold_onnx  # noqa: E402
from tests.support.zoo import export_onnx, randomize_batchnorm  # noqa: E402

MODELS = ["repvgg_a0", "mobileone_s0", "fastvit_t8", "repghostnet_050"]
SHAPE = (1, 3, 64, 64)


def op_count(path: Path, op_type: str) -> int:
    return sum(node.op_type == op_type for node in onnx.load(path, load_external_data=False).graph.node)


@pytest.mark.parametrize("name", MODELS)
def test_train_time_export_folds_to_the_deploy_form(name, tmp_path):
    torch.manual_seed(0)
    model = randomize_batchnorm(timm.create_model(name, pretrained=False).eval(), seed=1)
    train = export_onnx(model, SHAPE, tmp_path / "train.onnx")
    deploy = export_onnx(timm.utils.reparameterize_model(copy.deepcopy(model)), SHAPE, tmp_path / "deploy.onnx")
    result = fold_onnx(train)
    report = result.report
    assert report.verification.passed, report.render()
    assert report.totals.bn_after == 0, report.render()
    folded = tmp_path / "folded.onnx"
    result.write(folded)
    for op_type in ("Conv", "Add", "Sub", "Mul", "BatchNormalization"):
        assert op_count(folded, op_type) <= op_count(deploy, op_type), op_type
    merged = [r for r in report.records if r.pattern == "parallel-branches" and r.op_type != "BatchNormalization"]
    assert merged and all(r.status == "folded" for r in merged), report.render()
