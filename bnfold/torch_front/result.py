"""The result type of fold_module (importable without torch)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from bnfold.report import FoldReport

if TYPE_CHECKING:
    from torch import nn


@dataclass
class FoldResult:
    """The folded model (same class as the input) and what was done to it."""

    model: nn.Module
    report: FoldReport
