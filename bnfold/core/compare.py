"""The one rule by which bnfold judges a candidate's outputs against the original's, for both fronts.

Every output is compared over all runs, in float64, against the ORIGINAL model's output: integers and bools
exactly; NaN and infinities at the same positions (infinities with the same sign); every other element ``i``
passes iff ``|cand[i] - ref[i]| <= atol + rtol * |ref[i]|``, with ``atol = atol_factor * scale`` (``scale``:
the largest finite ``|ref|`` of the output, 1 if that is 0) unless the caller gives an absolute ``atol``.
The rule, its calibration and its limits are in docs/verification.md; this module needs numpy only, so the
ONNX and PyTorch fronts hand it arrays.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from bnfold.core.report import render_table
from bnfold.errors import InputError

#: dtype name -> (rtol, atol_factor), calibrated as docs/verification.md tells.
DEFAULT_TOLERANCES: dict[str, tuple[float, float]] = {
    "float64": (1e-9, 1e-10),
    "float32": (1e-4, 1e-4),
    "float16": (1e-2, 2e-2),
    "bfloat16": (5e-2, 1.5e-1),
}


def default_tolerances(dtype: Any) -> tuple[float, float]:
    """``(rtol, atol_factor)`` for outputs of ``dtype`` (a numpy dtype, type or name such as "bfloat16")."""
    name = dtype if isinstance(dtype, str) else np.dtype(dtype).name
    if name not in DEFAULT_TOLERANCES:
        raise InputError(f"no default tolerance for dtype {name}; give both rtol and atol")
    return DEFAULT_TOLERANCES[name]


def check_tolerances(rtol: float | None, atol: float | None) -> None:
    """Refuse a tolerance the rule cannot use: each is None (the dtype default) or a finite number >= 0."""
    for label, value in (("rtol", rtol), ("atol", atol)):
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise InputError(f"{label} must be a finite number >= 0, got {value}")


@dataclass
class OutputComparison:
    """How one output of the candidate compares with the original's, over all runs."""

    name: str
    dtype: str
    shape: list[int]
    max_abs_error: float
    max_rel_error: float
    mean_abs_error: float
    required_atol: float
    required_rtol: float
    atol: float
    rtol: float
    mismatched: int
    total: int
    passed: bool

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe: an infinite figure (e.g. ``required_rtol`` when a zero reference is missed) is null."""
        return {key: _json_number(value) for key, value in asdict(self).items()}


def failed_output(name: str, dtype: str, shape: list[int], total: int) -> OutputComparison:
    """An output the candidate does not even return in the original's dtype and shape: every element fails."""
    return OutputComparison(name, dtype, shape, math.inf, math.inf, math.inf, math.inf, math.inf,
                            0.0, 0.0, total, total, False)


@dataclass
class VerifyReport:
    """The verdict of one comparison of two models on the same inputs: one :class:`OutputComparison` per
    output, run ``iterations`` times under ``engine``. ``problem`` says why the outputs could not be compared
    one by one at all (e.g. they differ in structure); the verdict then fails."""

    outputs: list[OutputComparison]
    iterations: int
    engine: str
    seconds: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    problem: str | None = None

    @property
    def passed(self) -> bool:
        return self.problem is None and all(output.passed for output in self.outputs)

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "engine": self.engine,
            "iterations": self.iterations,
            "outputs": [output.to_dict() for output in self.outputs],
            "seconds": {stage: round(value, 6) for stage, value in self.seconds.items()},
            "notes": list(self.notes),
            "problem": self.problem,
        }

    def render(self) -> str:
        lines = []
        if self.outputs:
            lines.append(render_table(
                ["output", "dtype", "shape", "max abs err", "max rel err", "mean abs err", "atol", "rtol",
                 "needs atol", "needs rtol", "mismatched", "result"],
                [
                    [o.name, o.dtype, "x".join(map(str, o.shape)) or "scalar", _fmt(o.max_abs_error),
                     _fmt(o.max_rel_error), _fmt(o.mean_abs_error), _fmt(o.atol), _fmt(o.rtol),
                     _fmt(o.required_atol), _fmt(o.required_rtol), f"{o.mismatched}/{o.total}",
                     "ok" if o.passed else "FAIL"]
                    for o in self.outputs
                ],
            ))
        lines.extend(f"note: {note}" for note in self.notes)
        runs = f"{self.iterations} iteration{'s' if self.iterations != 1 else ''} under {self.engine}"
        failed = [o.name for o in self.outputs if not o.passed]
        if self.problem is not None:
            lines.append(f"FAILED: {self.problem}, {runs}")
        elif failed:
            lines.append(f"FAILED: {len(failed)} of {len(self.outputs)} outputs differ beyond tolerance "
                         f"({', '.join(failed)}), {runs}")
        else:
            lines.append(f"PASSED: all {len(self.outputs)} outputs within tolerance, {runs}")
        return "\n".join(lines)


@dataclass
class VerificationSet:
    """Several verdicts on one fold (e.g. under PyTorch and under onnxruntime), passed only if each one is."""

    parts: list[VerifyReport]

    @property
    def passed(self) -> bool:
        return all(part.passed for part in self.parts)

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "checks": [part.to_dict() for part in self.parts]}

    def render(self) -> str:
        return "\n".join(part.render() for part in self.parts)


def compare_output(
    name: str, references: Sequence[np.ndarray], candidates: Sequence[np.ndarray],
    rtol: float | None = None, atol: float | None = None, notes: list[str] | None = None,
) -> OutputComparison:
    """One output over all runs (``references[i]`` and ``candidates[i]`` from run ``i``) under the rule of
    the module docstring. A candidate of another dtype or shape fails whole, with a line in ``notes``."""
    dtype = references[0].dtype
    shape = [int(size) for size in references[-1].shape]
    total = sum(reference.size for reference in references)
    for reference, candidate in zip(references, candidates, strict=True):
        if candidate.dtype != reference.dtype or candidate.shape != reference.shape:
            if notes is not None:
                notes.append(f"output '{name}': the candidate returns {candidate.dtype.name} "
                             f"{list(candidate.shape)}, the original {reference.dtype.name} {list(reference.shape)}")
            return failed_output(name, dtype.name, shape, total)

    if not is_float(dtype):
        # Integers and bools must match exactly; comparing natively keeps int64 beyond 2**53 exact.
        mismatched = sum(int(np.count_nonzero(c != r)) for r, c in zip(references, candidates, strict=True))
        statistics = _Statistics(rtol=0.0, atol=0.0)
        if dtype.kind in "biu":
            for reference, candidate in zip(references, candidates, strict=True):
                for ref, cand in zip(_float64_chunks(reference), _float64_chunks(candidate), strict=True):
                    statistics.add(ref, cand)
        elif mismatched:
            statistics.max_abs = statistics.max_rel = statistics.required_atol = math.inf
        return statistics.comparison(name, dtype.name, shape, mismatched, total)

    if rtol is None or atol is None:
        default_rtol, atol_factor = default_tolerances(dtype)
        rtol = default_rtol if rtol is None else rtol
        if atol is None:
            atol = atol_factor * _scale(references)
    statistics = _Statistics(rtol=rtol, atol=atol)
    nonfinite_mismatched = 0
    for reference, candidate in zip(references, candidates, strict=True):
        for ref, cand in zip(_float64_chunks(reference), _float64_chunks(candidate), strict=True):
            both_finite = np.isfinite(ref) & np.isfinite(cand)
            if both_finite.all():
                statistics.add(ref, cand)
                continue
            same_special = (np.isnan(ref) & np.isnan(cand)) | (np.isinf(ref) & (ref == cand))
            nonfinite_mismatched += int(np.count_nonzero(~both_finite & ~same_special))
            statistics.add(ref[both_finite], cand[both_finite])
    return statistics.comparison(name, dtype.name, shape, statistics.beyond + nonfinite_mismatched, total)


def is_float(dtype: np.dtype) -> bool:
    """numpy floats and the ml_dtypes ones onnx uses (bfloat16, float8 variants), which numpy calls 'V'."""
    return dtype.kind == "f" or dtype.name.startswith(("bfloat", "float"))


def _scale(references: Sequence[np.ndarray]) -> float:
    """The largest finite magnitude of the reference output over all runs, or 1 if that is 0."""
    largest = 0.0
    for reference in references:
        for values in _float64_chunks(reference):
            largest = max(largest, float(np.max(np.abs(values[np.isfinite(values)]), initial=0.0)))
    return largest or 1.0


# Elements compared at a time: their float64 copies stay in the CPU's cache, and no output, however large, is
# ever copied whole.
COMPARE_CHUNK = 1 << 16


def _float64_chunks(array: np.ndarray) -> Iterator[np.ndarray]:
    """``array``'s elements in order, as float64 slices of at most ``COMPARE_CHUNK``."""
    flat = array.reshape(-1)
    for start in range(0, flat.size, COMPARE_CHUNK):
        yield flat[start:start + COMPARE_CHUNK].astype(np.float64)


@dataclass
class _Statistics:
    """Running error figures over finite element pairs, at fixed tolerances."""

    rtol: float
    atol: float
    max_abs: float = 0.0
    max_rel: float = 0.0
    sum_abs: float = 0.0
    count: int = 0
    required_atol: float = 0.0
    required_rtol: float = 0.0
    beyond: int = 0

    def add(self, reference: np.ndarray, candidate: np.ndarray) -> None:
        if reference.size == 0:
            return
        error = np.abs(candidate - reference)
        magnitude = np.abs(reference)
        allowed_by_rtol = self.rtol * magnitude
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):  # a subnormal |ref| overflows
            # fmax passes over NaN, which is 0 / 0 here: a zero error, or a zero excess, at a zero reference
            # needs no tolerance; the initial 0 stands for those and for errors within atol (excess <= 0).
            relative = np.fmax.reduce(error / magnitude, initial=0.0)
            needed_rtol = np.fmax.reduce((error - self.atol) / magnitude, initial=0.0)
        self.max_abs = max(self.max_abs, float(error.max()))
        self.max_rel = max(self.max_rel, float(relative))
        self.sum_abs += float(error.sum())
        self.count += error.size
        self.required_atol = max(self.required_atol, float((error - allowed_by_rtol).max()))
        self.required_rtol = max(self.required_rtol, float(needed_rtol))
        self.beyond += int(np.count_nonzero(error > self.atol + allowed_by_rtol))

    def comparison(self, name: str, dtype: str, shape: list[int], mismatched: int, total: int) -> OutputComparison:
        mean_abs = self.sum_abs / self.count if self.count else 0.0
        return OutputComparison(name, dtype, shape, self.max_abs, self.max_rel, mean_abs, self.required_atol,
                                self.required_rtol, self.atol, self.rtol, mismatched, total, mismatched == 0)


def _fmt(value: float) -> str:
    return f"{value:.3g}" if math.isfinite(value) else "inf"


def _json_number(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value
