"""The one result of a fold, whatever the front: the report, the folded model, and how to write it."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from bnfold.core.report import FoldReport


class FoldedModel(Protocol):
    """What a front hands to :class:`FoldResult`: its folded model, in the front's own type, and its writer.
    Core stays free of onnx and torch because only the fronts implement this."""

    @property
    def model(self) -> Any: ...

    @property
    def write(self) -> Callable[..., list[Path]]:
        """``write(path, **options)``: the model written atomically to ``path``; the paths written (the options
        are the front's own)."""


class FoldResult:
    """The folded model and the report of what was folded, what was left and why.

    ``model`` is the front's own type: an ``onnx.ModelProto``, an ``nn.Module``, a
    ``torch.export.ExportedProgram`` or a ``torch.jit.ScriptModule``. A failed verification is a verdict in
    ``report.verification``, never an exception; the caller decides whether to :meth:`write` anyway.
    """

    def __init__(self, folded: FoldedModel, report: FoldReport) -> None:
        self.folded = folded
        self.report = report

    @property
    def model(self) -> Any:
        return self.folded.model

    def write(self, path: str | os.PathLike[str], **options: Any) -> list[Path]:
        """Write the folded model atomically to ``path`` (front-specific ``options``); the paths written."""
        return self.folded.write(Path(path), **options)
