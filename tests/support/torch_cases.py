"""Helpers shared by the PyTorch-front tests: random BN statistics and fold-and-measure."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from bnfold.core.report import BnRecord
from bnfold.torch import FoldResult, fold_module


def randomize(module: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights and random non-trivial BN statistics (some negative gammas); returns eval mode."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
        for bn in module.modules():
            if isinstance(bn, _BatchNorm) and bn.running_mean is not None:
                channels = bn.running_mean.shape[0]
                bn.running_mean.copy_(torch.randn(channels, generator=generator))
                bn.running_var.copy_(torch.rand(channels, generator=generator) * 1.5 + 0.25)
                if bn.affine:
                    sign = torch.where(torch.rand(channels, generator=generator) < 0.2, -1.0, 1.0)
                    bn.weight.copy_(sign * (torch.rand(channels, generator=generator) + 0.5))
                    bn.bias.copy_(torch.randn(channels, generator=generator))
    return module.eval()


def by_name(result: FoldResult) -> dict[str, BnRecord]:
    return {record.bn: record for record in result.report.records}


def outcome(result: FoldResult) -> dict[str, str]:
    """``{bn: pattern}`` for folded and ``{bn: reason}`` for left batch norms."""
    return {r.bn: (r.pattern if r.status == "folded" else r.reason) or "" for r in result.report.records}


def max_error(original: nn.Module, folded: nn.Module, *inputs: torch.Tensor) -> float:
    """Max abs difference of the outputs, divided by ``max(1, max |original output|)``."""
    with torch.no_grad():
        want, got = original(*inputs).double(), folded(*inputs).double()
    return (want - got).abs().max().item() / max(1.0, want.abs().max().item())


def fold_and_measure(model: nn.Module, *inputs: torch.Tensor, **options) -> tuple[FoldResult, float]:
    """Fold (with the inputs as example inputs), assert the report's check passed, return the error."""
    result = fold_module(model, inputs, **options)
    assert result.report.verification is not None and result.report.verification.passed, (
        result.report.render()
    )
    return result, max_error(model, result.model, *inputs)
