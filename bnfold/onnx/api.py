"""The Python API over ONNX models: fold, inspect, verify."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import ModelProto

from bnfold.core.report import BnRecord, FoldReport
from bnfold.errors import BnfoldError, InputError
from bnfold.onnx.fold.driver import fold_model, model_totals, totals
from bnfold.onnx.fold.patterns import (
    ALL_PATTERNS,
    OPT_IN_PATTERNS,
    PATTERN_NAMES,
    STANDALONE_MODES,
    STANDALONE_PATTERNS,
)
from bnfold.onnx.graph.types import infer_types
from bnfold.onnx.guard import FoldedModelCheck, Rejections, SiteKey, guarded, mark_guarded, repair
from bnfold.onnx.store import limits
from bnfold.onnx.store.external import HeldTensors
from bnfold.onnx.store.io import (
    check_supported,
    has_external_tensors,
    inline_main_tensors,
    read_model_lazy,
    tensor_bytes,
    write_model,
)

ModelLike = ModelProto | str | os.PathLike[str]
Inputs = Mapping[str, np.ndarray] | Sequence[Mapping[str, np.ndarray]] | str | os.PathLike[str] | None
Progress = Callable[[str, int, int], None]


class FoldResult:
    """The folded model and the report of what was folded, what was left and why.

    For a model read from a path with external data, ``base_dir`` is the input's directory: tensors the
    fold did not touch are still read from the input's data files, so write the model with :meth:`write`
    (or :func:`bnfold.write_model` with ``base_dir``), which copies them into the output's own data file.
    """

    def __init__(self, model: ModelProto, report: FoldReport, base_dir: Path | None = None,
                 source: Path | None = None, held: HeldTensors | None = None) -> None:
        self._model = model
        self.report = report
        self._base_dir = base_dir
        # Until someone asks for the model, the tensors the fold did not touch stay in the input file
        # (``source``, see io.read_model_lazy) and the ones it wrote stay beside the model (``held``): numpy
        # arrays, or weights scaled from the input file, computed as they are written.
        self._source = source
        self._held = held or {}

    @property
    def model(self) -> ModelProto:
        """The folded model, every tensor of its main graph in memory (external data stays external)."""
        if self._source is not None or self._held:
            inline_main_tensors(self._model, self._source, self._held)
            self._source, self._held = None, {}
        return self._model

    @property
    def base_dir(self) -> Path | None:
        return self._base_dir if self._source is not None or has_external_tensors(self._model) else None

    def write(self, path: str | os.PathLike[str], *, external_data: str | None = None,
              external_threshold: int = limits.PROTOBUF_LIMIT) -> list[Path]:
        """:func:`bnfold.write_model` for this result; returns the paths written."""
        return write_model(self._model, path, external_data=external_data, external_threshold=external_threshold,
                           base_dir=self.base_dir, held=self._held)


def _editable(model: ModelLike) -> tuple[ModelProto, ModelLike, Path | None]:
    """A model bnfold may edit, the untouched original to verify against (the caller's proto or path),
    and the directory external tensors are read from. Read from a path, large tensors stay on disk until a
    fold needs them (see :func:`bnfold.onnx.store.io.read_model_lazy`), so at most one copy of what is folded
    is ever in memory."""
    if isinstance(model, ModelProto):
        check_supported(model)
        if has_external_tensors(model):
            raise InputError("the model keeps tensors in external files that are not loaded; pass its path, "
                             "so bnfold reads them from the model's own directory")
        copy = ModelProto()
        copy.CopyFrom(model)
        return copy, model, None
    if isinstance(model, str | os.PathLike):
        editable = read_model_lazy(model)
        return editable, model, Path(model).parent if has_external_tensors(editable) else None
    raise InputError(f"expected an onnx.ModelProto or a path, got {type(model).__name__}")


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


def _check(model: ModelLike, what: str) -> None:
    """onnx's full check; from the file for a path, so external data and models over 2 GB are covered."""
    if isinstance(model, ModelProto) and tensor_bytes(model) >= limits.PROTOBUF_LIMIT:
        return  # a caller's proto this large cannot be serialized for the checker; folded ones are staged
    try:
        onnx.checker.check_model(model if isinstance(model, ModelProto) else os.fspath(model), full_check=True)
    except Exception as error:  # noqa: BLE001 - besides ValidationError, the checker raises ValueError on bad data
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise InputError(f"{what} fails onnx.checker: {first_line}") from None


@contextlib.contextmanager
def _blaming(original: ModelLike) -> Iterator[None]:
    """Blame the input when it is invalid itself; anything else is bnfold's bug, and nothing is written."""
    try:
        yield
    except BnfoldError:
        raise
    except Exception as error:
        _check(original, "the input model")
        raise BnfoldError(f"internal error while folding ({type(error).__name__}: {error})") from error


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
    enabled = enabled_patterns(only, skip, standalone)
    folded, original, base_dir = _editable(model)
    loaded = time.perf_counter()
    before = model_totals(folded)
    unfolded = [folded]  # the model just read serves the first attempt; the guard's refolds read it again

    # The values the latest attempt held outside its model; the model the guard settles on is the latest.
    latest_held: HeldTensors = {}
    with _blaming(original):
        types = infer_types(folded)  # every attempt folds the same model: one inference serves them and the guard
        check = FoldedModelCheck(folded, types, lambda: _editable(model)[0], base_dir, latest_held)

    def attempt(rejected: Rejections) -> tuple[ModelProto, list[BnRecord]]:
        working = unfolded.pop() if unfolded else _editable(model)[0]
        events: dict[SiteKey, str] = {}
        latest_held.clear()
        with _blaming(original):
            records = fold_model(working, guarded(ALL_PATTERNS, rejected, events), enabled,
                                 allow_overridable=allow_overridable, progress=progress, base_dir=base_dir,
                                 held=latest_held, types=types)
        return working, mark_guarded(records, events)

    folded, records = attempt({})
    first_problem = check(folded)
    if first_problem is not None:
        _check(original, "the input model")
        folded, records = repair(attempt, check, records, first_problem)
    report = FoldReport(records, totals(before, model_totals(folded)))
    report.seconds = {"load": loaded - started, "fold": time.perf_counter() - loaded}
    if verify:
        from bnfold.onnx.verify.verify import (  # onnxruntime and onnx.reference: only when verifying
            UnwrittenModel,
            verify_onnx,
        )

        verified = time.perf_counter()
        # The folded model as it is: its weights where the fold left them, so none is written or copied.
        report.verification = verify_onnx(
            original, UnwrittenModel(folded, base_dir, latest_held), inputs=inputs, input_shapes=input_shapes,
            iterations=iterations, seed=seed, rtol=rtol, atol=atol, progress=progress,
        )
        report.seconds["verify"] = time.perf_counter() - verified
    source = Path(model) if isinstance(model, str | os.PathLike) else None
    return FoldResult(folded, report, base_dir, source, dict(latest_held))


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


__all__ = ["FoldResult", "enabled_patterns", "fold_onnx", "inspect_onnx"]
