"""The Python API over ONNX models: fold, inspect, verify."""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
from onnx import ModelProto

from bnfold.core.report import FoldReport
from bnfold.core.result import FoldResult
from bnfold.errors import InputError
from bnfold.onnx.fold.driver import model_totals, totals
from bnfold.onnx.fold.patterns import (
    OPT_IN_PATTERNS,
    PATTERN_NAMES,
    STANDALONE_MODES,
    STANDALONE_PATTERNS,
)
from bnfold.onnx.session import FoldSession, ModelLike, Progress, fold_notes
from bnfold.onnx.store import limits
from bnfold.onnx.store.io import has_external_tensors
from bnfold.onnx.store.model_store import ModelStore

# A mapping of arrays, a path (.npz, ONNX test data .pb or test_data_set directory), or several of those.
Inputs = (Mapping[str, np.ndarray] | Sequence[Mapping[str, np.ndarray] | str | os.PathLike[str]] | str
          | os.PathLike[str] | None)


class OnnxFolded:
    """The ONNX side of a :class:`~bnfold.core.result.FoldResult`: the folded model and its writer.

    Until someone asks for :attr:`model`, the folded model stays in its :attr:`store`: tensors the fold did
    not touch in the input's files, the ones it wrote beside the proto (arrays, or weights scaled from the
    input file and computed as they are written). :meth:`write` streams each from where it is.
    """

    def __init__(self, store: ModelStore) -> None:
        self.store = store

    @property
    def model(self) -> ModelProto:
        """The folded model, every tensor of its main graph in memory (external data stays external)."""
        return self.store.inline()

    @property
    def base_dir(self) -> Path | None:
        """The input's directory while the model still reads tensors from the input's files, else None."""
        return self.store.base_dir if has_external_tensors(self.store.proto) else None

    def write(self, path: Path, *, external_data: str | None = None,
              external_threshold: int = limits.PROTOBUF_LIMIT, overwrite_input: bool = False) -> list[Path]:
        """:func:`bnfold.write_model` for this result; returns the paths written. No file of the input (model
        file, external data files) is replaced unless ``overwrite_input`` and ``path`` is the input itself."""
        return self.store.write(path, external_data=external_data, external_threshold=external_threshold,
                                overwrite_input=overwrite_input)


def enabled_patterns(only: Iterable[str] | None = None, skip: Iterable[str] | None = None,
                     standalone: str | None = None) -> list[str]:
    """Validate pattern names (an unknown name is an error, never silently ignored).

    Opt-in patterns are enabled only by name in ``only`` or, for ``standalone-mul-add`` and
    ``standalone-conv``, by ``standalone="mul-add"`` or ``"conv"``; ``skip`` wins over both."""
    only_list, skip_list = list(only or ()), list(skip or ())
    unknown = sorted(set(only_list + skip_list) - set(PATTERN_NAMES))
    if unknown:
        raise InputError(f"unknown pattern(s) {', '.join(unknown)}; known: {', '.join(PATTERN_NAMES)}")
    if standalone is not None and standalone not in STANDALONE_MODES:
        raise InputError(f"unknown standalone mode {standalone!r}; known: {', '.join(STANDALONE_MODES)}")
    chosen = only_list or [name for name in PATTERN_NAMES if name not in OPT_IN_PATTERNS]
    if standalone is not None:
        chosen.append(STANDALONE_PATTERNS[standalone].name)
    return [name for name in PATTERN_NAMES if name in chosen and name not in skip_list]


def fold_onnx(
    model: ModelLike,
    *,
    verify: bool = True,
    only: Iterable[str] | None = None,
    skip: Iterable[str] | None = None,
    allow_overridable: bool = False,
    standalone: str | None = None,
    inputs: Inputs = None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    iterations: int = 3,
    seed: int = 0,
    rtol: float | None = None,
    atol: float | None = None,
    progress: Progress | None = None,
) -> FoldResult:
    """Fold every batch norm that can be folded exactly and safely; the input is never modified.

    ``only``/``skip`` choose patterns by name (see ``bnfold.onnx.fold.patterns.PATTERN_NAMES``).
    ``standalone="mul-add"`` rewrites each batch norm nothing folds as one Mul and one Add,
    ``standalone="conv"`` as one depthwise Conv where it can (see ``bnfold.onnx.fold.patterns.standalone``).
    ``allow_overridable`` treats initializers that are also graph inputs as constants. With
    ``verify`` (default) original and folded models are run under onnxruntime with graph
    optimizations disabled and compared; the verdict is ``result.report.verification``.
    Raises :class:`bnfold.errors.InputError` for unusable input.
    """
    started = time.perf_counter()
    session = FoldSession(model, enabled_patterns(only, skip, standalone), allow_overridable=allow_overridable,
                          progress=progress)
    loaded = time.perf_counter()
    folded = session.fold()
    model_sizes = totals(session.before, model_totals(folded.store.proto))
    report = FoldReport(folded.records, model_sizes, notes=fold_notes(folded.store.proto, model_sizes))
    report.seconds = {"load": loaded - started, "fold": time.perf_counter() - loaded}
    if verify:
        # onnxruntime and onnx.reference: only when verifying
        from bnfold.onnx.verify.verify import check_unchanged, verify_onnx

        verified = time.perf_counter()
        if report.folded:
            # The folded model as it is: its weights where the fold left them, so none is written or copied.
            report.verification = verify_onnx(
                session.original, folded.store, inputs=inputs, input_shapes=input_shapes,
                iterations=iterations, seed=seed, rtol=rtol, atol=atol, progress=progress,
                folded_sites=[(record.scope, record.bn) for record in report.folded],
            )
        else:  # nothing folded: the model written is the input, so there is nothing to run or compare
            report.verification = check_unchanged(session.original)
        report.seconds["verify"] = time.perf_counter() - verified
    return FoldResult(OnnxFolded(folded.store), report)


def inspect_onnx(
    model: ModelLike,
    *,
    only: Iterable[str] | None = None,
    skip: Iterable[str] | None = None,
    allow_overridable: bool = False,
    standalone: str | None = None,
) -> FoldReport:
    """What :func:`fold_onnx` would fold and, for every batch norm it would leave, which rule keeps it."""
    return fold_onnx(model, verify=False, only=only, skip=skip, allow_overridable=allow_overridable,
                     standalone=standalone).report


__all__ = ["FoldResult", "OnnxFolded", "enabled_patterns", "fold_onnx", "inspect_onnx"]
