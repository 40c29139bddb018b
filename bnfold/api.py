"""The Python API over ONNX models: fold, inspect, verify."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import ModelProto

from bnfold.errors import BnfoldError, InputError
from bnfold.onnx_front.fold import fold_model, model_totals, totals
from bnfold.onnx_front.io import PROTOBUF_LIMIT, read_model
from bnfold.patterns import ALL_PATTERNS, PATTERN_NAMES
from bnfold.report import FoldReport
from bnfold.verify import VerifyReport, verify_onnx

ModelLike = ModelProto | str | os.PathLike[str]
Inputs = Mapping[str, np.ndarray] | Sequence[Mapping[str, np.ndarray]] | str | os.PathLike[str] | None
Progress = Callable[[str, int, int], None]


@dataclass
class FoldResult:
    """The folded model and the report of what was folded, what was left and why."""

    model: ModelProto
    report: FoldReport


def _editable(model: ModelLike) -> tuple[ModelProto, ModelLike]:
    """A model bnfold may edit, and the untouched original to verify against (the caller's proto or
    path), so at most one extra copy of the model is ever in memory."""
    if isinstance(model, ModelProto):
        copy = ModelProto()
        copy.CopyFrom(model)
        return copy, model
    if isinstance(model, str | os.PathLike):
        return read_model(model), model
    raise InputError(f"expected an onnx.ModelProto or a path, got {type(model).__name__}")


def _original(model: ModelLike) -> ModelProto:
    return model if isinstance(model, ModelProto) else read_model(model)


def enabled_patterns(only: Iterable[str] | None = None, skip: Iterable[str] | None = None) -> list[str]:
    """Validate pattern names (an unknown name is an error, never silently ignored)."""
    only_list, skip_list = list(only or ()), list(skip or ())
    unknown = sorted(set(only_list + skip_list) - set(PATTERN_NAMES))
    if unknown:
        raise InputError(f"unknown pattern(s) {', '.join(unknown)}; known: {', '.join(PATTERN_NAMES)}")
    chosen = only_list or list(PATTERN_NAMES)
    return [name for name in PATTERN_NAMES if name in chosen and name not in skip_list]


def _check(model: ModelProto, what: str) -> None:
    if model.ByteSize() >= PROTOBUF_LIMIT:
        return  # the checker needs a serialized copy; large models are checked from their file
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise InputError(f"{what} fails onnx.checker: {first_line}") from None


def fold_onnx(
    model: ModelLike,
    *,
    verify: bool = True,
    only: Iterable[str] | None = None,
    skip: Iterable[str] | None = None,
    allow_overridable: bool = False,
    inputs: Inputs = None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    iterations: int = 3,
    seed: int = 0,
    rtol: float | None = None,
    atol: float | None = None,
    progress: Progress | None = None,
) -> FoldResult:
    """Fold every batch norm that can be folded exactly and safely; the input is never modified.

    ``only``/``skip`` choose patterns by name (see ``bnfold.patterns.PATTERN_NAMES``).
    ``allow_overridable`` treats initializers that are also graph inputs as constants. With
    ``verify`` (default) original and folded models are run under onnxruntime with graph
    optimizations disabled and compared; the verdict is ``result.report.verification``.
    Raises :class:`bnfold.errors.InputError` for unusable input.
    """
    started = time.perf_counter()
    enabled = enabled_patterns(only, skip)
    folded, original = _editable(model)
    loaded = time.perf_counter()
    before = model_totals(folded)
    # Blame the input when it is invalid itself; anything else is bnfold's bug, and nothing is written.
    try:
        records = fold_model(folded, ALL_PATTERNS, enabled, allow_overridable=allow_overridable, progress=progress)
    except Exception as error:
        _check(_original(original), "the input model")
        raise BnfoldError(f"internal error while folding ({type(error).__name__}: {error})") from error
    report = FoldReport(records, totals(before, model_totals(folded)))
    try:
        _check(folded, "the folded model")
    except InputError as error:
        _check(_original(original), "the input model")
        raise BnfoldError(f"internal error: {error}") from None
    report.seconds = {"load": loaded - started, "fold": time.perf_counter() - loaded}
    if verify:
        verified = time.perf_counter()
        report.verification = verify_onnx(
            original, folded, inputs=inputs, input_shapes=input_shapes, iterations=iterations,
            seed=seed, rtol=rtol, atol=atol, progress=progress,
        )
        report.seconds["verify"] = time.perf_counter() - verified
    return FoldResult(folded, report)


def inspect_onnx(
    model: ModelLike,
    *,
    only: Iterable[str] | None = None,
    skip: Iterable[str] | None = None,
    allow_overridable: bool = False,
) -> FoldReport:
    """What :func:`fold_onnx` would fold and, for every batch norm it would leave, which rule keeps it."""
    return fold_onnx(model, verify=False, only=only, skip=skip, allow_overridable=allow_overridable).report


__all__ = ["FoldResult", "VerifyReport", "enabled_patterns", "fold_onnx", "inspect_onnx", "verify_onnx"]
