"""The PyTorch side of :class:`bnfold.FoldResult`, and the plan-apply-report loop of the graph folders.

Importable without torch: torch is imported when a result is written."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from bnfold.core.atomic import atomic_destination, same_file
from bnfold.core.report import BnRecord, FoldReport, Totals
from bnfold.errors import InputError, OutputError


class TorchFolded:
    """A folded ``nn.Module``, ``ExportedProgram`` or ``ScriptModule`` and how it is saved.

    ``save`` writes it to the path it is given; ``source`` is the file it was read from, which it never
    replaces unless asked to (``overwrite_input=True``)."""

    def __init__(self, model: Any, save: Callable[[Path], None], source: Path | None = None) -> None:
        self._model = model
        self._save = save
        self._source = source

    @property
    def model(self) -> Any:
        return self._model

    def write(self, path: Path, *, overwrite_input: bool = False) -> list[Path]:
        if self._source is not None and not overwrite_input and same_file(self._source, path):
            raise InputError(f"{path}: the output path must differ from the input path (the input is never "
                             "modified unless overwrite_input=True)")
        if not path.parent.is_dir():
            raise OutputError(f"the output directory {path.parent} does not exist")
        with atomic_destination(path) as temporary:
            try:
                self._save(temporary)
            except Exception as error:
                raise OutputError(f"cannot write the folded model: {type(error).__name__}: {error}") from error
        return [path]


def save_module(module: Any) -> Callable[[Path], None]:
    """``torch.save`` of a whole module (its class is pickled by reference, so loading needs its code)."""

    def save(path: Path) -> None:
        import torch

        torch.save(module, str(path))

    return save


def save_bytes(data: bytes) -> Callable[[Path], None]:
    """Write bytes already serialized (and verified after loading them back)."""

    def save(path: Path) -> None:
        path.write_bytes(data)

    return save


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
