"""Parallel linear branches in a .pt2 program merge into one convolution after the batch norms fold: RepVGG-style
blocks in code (any kernel, padding, groups, identity and scale branches), and real timm models exported in
their train-time structure against their authors' deploy form."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from bnfold import fold_torch_file  # noqa: E402
from tests.support.torch_cases import randomize  # noqa: E402

X = torch.randn(1, 4, 9, 9, generator=torch.Generator().manual_seed(0))


class Block(nn.Module):
    """``sum of conv+BN branches [+ BN(x)] [- scale * x]``; the branches' kernels share their centres."""

    def __init__(self, kernels: list[int], groups: int, stride: int, identity: bool, scale: bool) -> None:
        super().__init__()
        self.branches = nn.ModuleList(nn.Sequential(nn.Conv2d(4, 4, k, stride, k // 2, groups=groups, bias=False),
                                                    nn.BatchNorm2d(4)) for k in kernels)
        self.identity = nn.BatchNorm2d(4) if identity and stride == 1 else None
        self.scale = nn.Parameter(torch.randn(4, 1, 1)) if scale and stride == 1 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.branches[0](x)
        for branch in self.branches[1:]:
            out = out + branch(x)
        if self.identity is not None:
            out += self.identity(x)
        if self.scale is not None:
            out = out - self.scale * x
        return torch.relu(out)


def fold_program(model: nn.Module, tmp_path: Path, example: torch.Tensor = X):
    path = tmp_path / "model.pt2"
    torch.export.save(torch.export.export(model, (example,)), str(path))
    return fold_torch_file(path)


def call_targets(program) -> list[str]:
    return [str(n.target) for n in program.graph.nodes if n.op == "call_function"]


@settings(max_examples=12, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(kernels=st.lists(st.sampled_from([1, 3, 5]), min_size=1, max_size=3), groups=st.sampled_from([1, 2, 4]),
       stride=st.integers(1, 2), identity=st.booleans(), scale=st.booleans(), seed=st.integers(0, 2**16))
def test_blocks_merge_into_one_conv_and_verify(tmp_path, kernels, groups, stride, identity, scale, seed):
    model = randomize(Block(kernels, groups, stride, identity, scale), seed)
    result = fold_program(model, tmp_path)
    assert result.report.verification.passed, result.report.render()
    targets = call_targets(result.model)
    assert sum("conv" in t for t in targets) == 1
    assert not any("batch_norm" in t or "add" in t or "sub" in t for t in targets)
    with torch.no_grad():
        torch.testing.assert_close(result.model.module()(X), model(X), rtol=1e-4, atol=1e-4)


def test_a_branch_read_elsewhere_stays(tmp_path):
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.big, self.small = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1)

        def forward(self, x):
            small = self.small(x)
            return self.big(x) + small, small

    result = fold_program(randomize(Shared()), tmp_path)
    assert sum("conv" in t for t in call_targets(result.model)) == 2
    assert result.report.verification.passed


# Loading a .pt2 costs seconds per model (bnfold loads it twice): two models whose blocks cover the rest, k conv
# branches + scale + identity (MobileOne) and x + gamma * (mixer(x) - norm(x)) (FastViT); ONNX tests all four.
MODELS = ["mobileone_s0", "fastvit_t8"]


@pytest.mark.parametrize("name", MODELS)
def test_timm_train_time_program_folds_to_the_deploy_form(name, tmp_path):
    timm = pytest.importorskip("timm")
    model = randomize(timm.create_model(name, pretrained=False), seed=1)
    example = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    # Each convolution module of these models is called once: the deploy form's count of convolutions.
    deploy = timm.utils.reparameterize_model(copy.deepcopy(model))
    result = fold_program(model, tmp_path, example)
    assert result.report.verification.passed, result.report.render()
    assert result.report.totals.bn_after == 0
    folded = sum("conv" in t for t in call_targets(result.model))
    assert folded <= sum(isinstance(m, nn.modules.conv._ConvNd) for m in deploy.modules())
