"""The one rule by which bnfold judges a candidate's outputs against the original's, for both fronts.

Every output is compared run by run, in float64, against the ORIGINAL model's output: integers and bools
exactly; NaN and infinities at the same positions (infinities with the same sign); every other element ``i``
passes iff ``|cand[i] - ref[i]| <= atol[i] + rtol * |ref[i]|``, with ``atol[i] = atol_factor * scale[i]``
unless the caller gives an absolute ``atol``. ``scale[i]`` is the largest finite ``|ref|`` of element ``i``'s
channel in that run (see :func:`channel_scales`), so that large values in one channel cannot widen the
tolerance of the others. An output
that has no element in any run proves nothing: it is ``empty``, and the verdict is not a pass. The rule, its
calibration and its limits are in docs/verification.md; this module needs numpy only, so the ONNX and PyTorch
fronts hand it arrays, one run at a time (:class:`OutputAccumulator`), and keep none of them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

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

#: A channel (axis 1 of an output of rank 3 or more) has a scale of its own if it has at least this many
#: elements in a run; fewer (a [1, 1000, 1, 1] classifier output) cannot tell a channel's magnitude.
CHANNEL_MIN_ELEMENTS = 16

Status = Literal["passed", "failed", "unverified", "unchanged"]


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
    """How one output of the candidate compares with the original's, over all runs. ``atol`` is the
    strictest absolute tolerance applied (channels' and runs' scales may differ), ``required_atol`` the
    smallest that would have passed expressed at that strictest scale; ``empty``: no run gave an element, so
    nothing was compared."""

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
    empty: bool = False

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe: an infinite figure (only ever in a failed output) is null."""
        return {key: _json_number(value) for key, value in asdict(self).items()}


def failed_output(name: str, dtype: str, shape: list[int], total: int) -> OutputComparison:
    """An output the candidate does not even return in the original's dtype and shape: every element fails."""
    return OutputComparison(name, dtype, shape, math.inf, math.inf, math.inf, math.inf, math.inf,
                            0.0, 0.0, total, total, False)


@dataclass
class VerifyReport:
    """The verdict of one comparison of two models on the same inputs: one :class:`OutputComparison` per
    output, run ``iterations`` times under ``engine``. ``problem`` says why the outputs could not be compared
    one by one at all (e.g. they differ in structure); the verdict then fails. ``unexercised`` names changed
    parts of the model (folded sites) that no run executed: their outputs prove nothing about them, so the
    verdict is ``unverified``, not passed. ``unchanged``: the candidate is the original, nothing was run."""

    outputs: list[OutputComparison]
    iterations: int
    engine: str
    seconds: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    problem: str | None = None
    unexercised: list[str] = field(default_factory=list)
    sizes: list[dict[str, list[int]]] = field(default_factory=list)
    unchanged: bool = False
    expected: VerifyReport | None = None  # the candidate against expected outputs given with the inputs

    @property
    def status(self) -> Status:
        if self.problem is not None or any(not o.passed and not o.empty for o in self.outputs):
            return "failed"
        if self.expected is not None and self.expected.status == "failed":
            return "failed"
        if self.unchanged:
            return "unchanged"
        if self.unexercised or any(o.empty for o in self.outputs) or not self.outputs:
            return "unverified"
        return "passed"

    @property
    def passed(self) -> bool:
        return self.status in ("passed", "unchanged")

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "status": self.status,
            "engine": self.engine,
            "iterations": self.iterations,
            "sizes": [dict(sizes) for sizes in self.sizes],
            "outputs": [output.to_dict() for output in self.outputs],
            "unexercised": list(self.unexercised),
            "expected": None if self.expected is None else self.expected.to_dict(),
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
                     "empty" if o.empty else "ok" if o.passed else "FAIL"]
                    for o in self.outputs
                ],
            ))
        lines.extend(f"note: {note}" for note in self.notes)
        if self.expected is not None:
            lines.append("the candidate against the expected outputs given with the inputs:")
            lines.extend("  " + line for line in self.expected.render().splitlines())
        lines.append(f"{self.status.upper()}: {self._summary()}")
        return "\n".join(lines)

    def _summary(self) -> str:
        runs = f"{self.iterations} iteration{'s' if self.iterations != 1 else ''} under {self.engine}"
        if self.sizes and any(self.sizes):
            runs += " at " + "; ".join(
                ", ".join(f"{name} {'x'.join(map(str, shape))}" for name, shape in sizes.items())
                for sizes in self.sizes)
        failed = [o.name for o in self.outputs if not o.passed and not o.empty]
        empty = [o.name for o in self.outputs if o.empty]
        if self.problem is not None:
            return f"{self.problem}, {runs}"
        if not failed and self.expected is not None and self.expected.status == "failed":
            return f"the candidate differs from the expected outputs given with the inputs, {runs}"
        if failed:
            return (f"{len(failed)} of {len(self.outputs)} outputs differ beyond tolerance "
                    f"({', '.join(failed)}), {runs}")
        if self.unchanged:
            return "the folded model is the original; nothing to run"
        if self.unexercised:
            return (f"{len(self.unexercised)} folded site(s) never ran on these inputs "
                    f"({', '.join(self.unexercised[:5])}{', ...' if len(self.unexercised) > 5 else ''}); "
                    f"pass inputs that reach them (--inputs), {runs}")
        if empty or not self.outputs:
            return (f"output(s) {', '.join(empty)} had no element to compare; pass inputs under which "
                    f"they are not empty (--inputs, --input-shape), {runs}") if empty else f"no output, {runs}"
        return f"all {len(self.outputs)} outputs within tolerance, {runs}"


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
    accumulator = OutputAccumulator(name, rtol, atol, notes)
    for reference, candidate in zip(references, candidates, strict=True):
        accumulator.add(reference, candidate)
    return accumulator.result()


class OutputAccumulator:
    """The rule applied to one output run by run, keeping figures, not arrays: memory does not grow with
    the number of runs."""

    def __init__(self, name: str, rtol: float | None = None, atol: float | None = None,
                 notes: list[str] | None = None) -> None:
        self.name, self.rtol, self.atol, self.notes = name, rtol, atol, notes
        self.dtype: np.dtype | None = None
        self.shape: list[int] = []
        self.total = 0
        self.mismatched = 0
        self.whole_failure = False
        self.statistics: _Statistics | None = None

    def add(self, reference: np.ndarray, candidate: np.ndarray) -> None:
        reference, candidate = np.asarray(reference), np.asarray(candidate)
        if self.dtype is None:
            self.dtype = reference.dtype
        self.shape = [int(size) for size in reference.shape]
        self.total += reference.size
        if self.whole_failure or candidate.dtype != reference.dtype or candidate.shape != reference.shape:
            if not self.whole_failure and self.notes is not None:
                self.notes.append(f"output '{self.name}': the candidate returns {candidate.dtype.name} "
                                  f"{list(candidate.shape)}, the original {reference.dtype.name} "
                                  f"{list(reference.shape)}")
            self.whole_failure = True
            return
        with np.errstate(all="ignore"):  # the figures handle 0/0 and overflow; no warning reaches the user
            if not is_float(reference.dtype):
                self._add_exact(reference, candidate)
            else:
                self._add_float(reference, candidate)

    def _add_exact(self, reference: np.ndarray, candidate: np.ndarray) -> None:
        # Integers and bools must match exactly; comparing natively keeps int64 beyond 2**53 exact.
        statistics = _Statistics(rtol=0.0, atol=0.0)
        mismatched = int(np.count_nonzero(candidate != reference))
        self.mismatched += mismatched
        if reference.dtype.kind in "iu":
            for ref, cand in zip(_float64_chunks(reference), _float64_chunks(candidate), strict=True):
                statistics.add(ref, cand)
        elif mismatched:
            statistics.max_abs = statistics.max_rel = statistics.required_atol = math.inf
        self._merge(statistics)

    def _add_float(self, reference: np.ndarray, candidate: np.ndarray) -> None:
        rtol, per_channel, channel_length = self.rtol, np.array([self.atol]), 1
        if rtol is None or self.atol is None:
            default_rtol, atol_factor = default_tolerances(reference.dtype)
            rtol = default_rtol if rtol is None else rtol
            if self.atol is None:
                scales, channel_length = channel_scales(reference)
                per_channel = atol_factor * scales
        atols = _element_atols(per_channel, channel_length)
        statistics = _Statistics(rtol=rtol, atol=float(per_channel.min()))
        start = 0
        for ref, cand in zip(_float64_chunks(reference), _float64_chunks(candidate), strict=True):
            element_atol = atols(start, start + ref.size)
            start += ref.size
            both_finite = np.isfinite(ref) & np.isfinite(cand)
            if both_finite.all():
                statistics.add(ref, cand, element_atol)
                continue
            same_special = (np.isnan(ref) & np.isnan(cand)) | (np.isinf(ref) & (ref == cand))
            self.mismatched += int(np.count_nonzero(~both_finite & ~same_special))
            if isinstance(element_atol, np.ndarray):
                element_atol = element_atol[both_finite]
            statistics.add(ref[both_finite], cand[both_finite], element_atol)
        self.mismatched += statistics.beyond
        self._merge(statistics)

    def _merge(self, run: _Statistics) -> None:
        if self.statistics is None:
            self.statistics = run
        else:
            self.statistics.merge(run)

    def result(self) -> OutputComparison:
        dtype = "unknown" if self.dtype is None else self.dtype.name
        if self.whole_failure:
            return failed_output(self.name, dtype, self.shape, self.total)
        statistics = self.statistics or _Statistics(rtol=self.rtol or 0.0, atol=self.atol or 0.0)
        comparison = statistics.comparison(self.name, dtype, self.shape, self.mismatched, self.total)
        if self.total == 0:
            comparison.passed, comparison.empty = False, True
        return comparison


def is_float(dtype: np.dtype) -> bool:
    """numpy floats and the ml_dtypes ones onnx uses (bfloat16, float8 variants), which numpy calls 'V'."""
    return dtype.kind == "f" or dtype.name.startswith(("bfloat", "float"))


def channel_scales(reference: np.ndarray) -> tuple[np.ndarray, int]:
    """The magnitudes the default atol is relative to, and how many consecutive elements (in C order) share
    each: per channel -- the largest finite ``|ref|`` over batch and positions of each index of axis 1 -- for
    an output of rank 3 or more whose channels hold ``CHANNEL_MIN_ELEMENTS`` or more elements each; else one,
    the whole output's largest finite ``|ref|``. A scale of 0 (a channel of zeros) becomes 1."""
    if reference.ndim >= 3 and reference.size and reference.size // reference.shape[1] >= CHANNEL_MIN_ELEMENTS:
        channels = reference.shape[1]
        by_channel = reference.reshape(reference.shape[0], channels, -1)
        scales = np.array([_largest_finite(by_channel[:, channel]) for channel in range(channels)])
        return np.where(scales > 0, scales, 1.0), by_channel.shape[2]
    largest = _largest_finite(reference)
    return np.array([largest or 1.0]), max(reference.size, 1)


def _largest_finite(values: np.ndarray) -> float:
    largest = 0.0
    with np.errstate(all="ignore"):
        for chunk in _float64_chunks(values):
            largest = max(largest, float(np.max(np.abs(chunk[np.isfinite(chunk)]), initial=0.0)))
    return largest


def _element_atols(per_channel: np.ndarray, channel_length: int) -> Callable[[int, int], np.ndarray | float]:
    """Element ``i`` (in C order) lies in channel ``(i // channel_length) % len(per_channel)``."""
    if per_channel.size == 1:
        return lambda start, stop: float(per_channel[0])
    return lambda start, stop: per_channel[(np.arange(start, stop) // channel_length) % per_channel.size]


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
    """Running error figures over finite element pairs, at the fixed tolerances of one run (merged runs keep
    the strictest atol and express ``required_atol`` at its scale)."""

    rtol: float
    atol: float
    max_abs: float = 0.0
    max_rel: float = 0.0
    sum_abs: float = 0.0
    count: int = 0
    required_atol: float = 0.0
    required_rtol: float = 0.0
    beyond: int = 0

    def add(self, reference: np.ndarray, candidate: np.ndarray, atol: np.ndarray | float | None = None) -> None:
        """Pairs judged at ``atol`` (per element, or one for all; default ``self.atol``, which is the smallest
        of them: ``required_atol`` is expressed at it)."""
        if reference.size == 0:
            return
        atol = self.atol if atol is None else atol
        error = np.abs(candidate - reference)
        magnitude = np.abs(reference)
        allowed_by_rtol = self.rtol * magnitude
        with np.errstate(all="ignore"):  # a subnormal |ref| overflows; 0 / 0 is NaN
            # Relative to |ref|, but never to less than atol: near zero the error is judged against atol,
            # and a relative figure there (0.15, or infinite at an exact zero) would say nothing.
            relative = np.fmax.reduce(error / np.maximum(magnitude, atol), initial=0.0)
            # fmax passes over NaN, which is 0 / 0 here: a zero excess at a zero reference needs no rtol; the
            # initial 0 stands for those and for errors within atol (excess <= 0).
            needed_rtol = np.fmax.reduce((error - atol) / magnitude, initial=0.0)
            excess = error - allowed_by_rtol
            if isinstance(atol, np.ndarray):
                excess = np.where(atol > 0, excess * (self.atol / atol), excess)
        self.max_abs = max(self.max_abs, float(error.max()))
        self.max_rel = max(self.max_rel, float(relative))
        self.sum_abs += float(error.sum())
        self.count += error.size
        self.required_atol = max(self.required_atol, float(excess.max()))
        self.required_rtol = max(self.required_rtol, float(needed_rtol))
        self.beyond += int(np.count_nonzero(error > atol + allowed_by_rtol))

    def merge(self, other: _Statistics) -> None:
        """Fold another run's figures into these; ``required_atol`` is kept relative to the strictest atol,
        so that it passes iff every run does."""
        strict = min(self.atol, other.atol)
        self.required_atol = max(_rescaled(self.required_atol, self.atol, strict),
                                 _rescaled(other.required_atol, other.atol, strict))
        self.atol = strict
        self.max_abs, self.max_rel = max(self.max_abs, other.max_abs), max(self.max_rel, other.max_rel)
        self.sum_abs += other.sum_abs
        self.count += other.count
        self.required_rtol = max(self.required_rtol, other.required_rtol)

    def comparison(self, name: str, dtype: str, shape: list[int], mismatched: int, total: int) -> OutputComparison:
        mean_abs = self.sum_abs / self.count if self.count else 0.0
        return OutputComparison(name, dtype, shape, self.max_abs, self.max_rel, mean_abs, self.required_atol,
                                self.required_rtol, self.atol, self.rtol, mismatched, total, mismatched == 0)


def _rescaled(required: float, atol: float, strict: float) -> float:
    if required <= 0 or atol == strict or not math.isfinite(required):
        return required
    return required * strict / atol if atol > 0 else required


def _fmt(value: float) -> str:
    return f"{value:.3g}" if math.isfinite(value) else "inf"


def _json_number(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value
