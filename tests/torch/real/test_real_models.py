"""fold_module on real timm and torchvision model code (random weights and BN state, nothing downloaded).

Each model is folded on one 64x64 input; the fold must verify, leave the original untouched, keep the
model's class, and fold at least the batch norms ``torch.jit.freeze`` + ``optimize_for_inference`` removes
(measured by ``python -m bench.torch_coverage``, which prints the whole table).
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("timm")
pytest.importorskip("torchvision")

from bnfold.torch import fold_module  # noqa: E402
from tests.support.real_models import MODELS, build  # noqa: E402

# Batch norms torch.jit.freeze(torch.jit.script(m)) + optimize_for_inference removes (correctly) per model.
JIT_REMOVED = {
    "timm/efficientnet_b0": 49,
    "timm/mobilenetv3_small_100": 34,
    "timm/regnety_002": 44,
    "timm/densenet121": 1,
    "timm/levit_128s": 4,
    "timm/cs3darknet_s": 32,
    "timm/repvgg_a0": 44,
    "timm/mixnet_s": 15,  # its output then differs by as much as float32 rounding does here (see real_models)
    "torchvision/resnet18": 20,
    "torchvision/mobilenet_v3_small": 34,
    "torchvision/resnet18_fpn_frozen_bn": 0,
}
# Where bnfold folds more than the anchor: levit's Linear -> flatten -> BatchNorm1d pairs (48, beside the 2
# plain ones) and every FrozenBatchNorm2d after a conv, which TorchScript sees as plain Mul/Add.
FOLDS_AT_LEAST = {
    "timm/levit_128s": 50,
    "torchvision/resnet18_fpn_frozen_bn": 20,
}


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_real_model_folds_and_verifies(name: str) -> None:
    model, x = build(name)
    before = _state(model)
    with torch.no_grad():
        expected = model(x)
    result = fold_module(model, x)
    report = result.report
    assert report.verification.passed, report.render()
    assert type(result.model) is type(model)
    assert result.model is not model
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[key], after[key]) for key in before), "the original model was modified"
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
    floor = max(FOLDS_AT_LEAST.get(name, 0), JIT_REMOVED[name])
    assert len(report.folded) >= floor, report.render()
