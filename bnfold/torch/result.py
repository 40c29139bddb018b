"""The result type of fold_module (importable without torch)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from bnfold.core.report import BnRecord, FoldReport, Totals

if TYPE_CHECKING:
    from torch import nn


@dataclass
class FoldResult:
    """The folded model (same class as the input) and what was done to it."""

    model: nn.Module
    report: FoldReport


class _Plan(Protocol):
    records: list[BnRecord]


class GraphFolder(Protocol):
    """Folds one captured graph (.pt2 program or TorchScript module): plan every BN, then apply."""

    def plan(self) -> Any: ...

    def apply(self, plan: Any) -> None: ...

    def totals(self) -> tuple[int, int, int]: ...


def run_folder(folder: GraphFolder) -> FoldReport:
    """Plan, apply and report, with totals counted before and after."""
    before = folder.totals()
    plan: _Plan = folder.plan()
    folder.apply(plan)
    return FoldReport(records=plan.records, totals=Totals.between(before, folder.totals()))
