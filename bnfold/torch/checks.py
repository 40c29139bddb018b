"""Numeric verification of the PyTorch front: its outputs, as numpy arrays, judged by bnfold's one rule
(:mod:`bnfold.core.compare`, docs/verification.md)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import ml_dtypes
import numpy as np
import torch
from torch.utils._pytree import tree_flatten

from bnfold.core.compare import OutputComparison, VerifyReport, compare_output, default_tolerances, failed_output


def compare(reference: Any, candidate: Any, engine: str, rtol: float | None = None,
            atol: float | Sequence[float | None] | None = None) -> VerifyReport:
    """``candidate``'s outputs (any nesting of tensors and plain values) against ``reference``'s, from one run
    under ``engine``: tensors by the rule (``rtol``/``atol`` as :func:`compare_output` takes them, or ``atol``
    one per flattened output), anything else by equality."""
    expected, expected_spec = tree_flatten(reference)
    actual, actual_spec = tree_flatten(candidate)
    if expected_spec != actual_spec or len(expected) != len(actual):
        return VerifyReport([], 1, engine, problem="the outputs have a different structure")
    report = VerifyReport([], 1, engine)
    for position, (want, got) in enumerate(zip(expected, actual, strict=True)):
        if isinstance(want, torch.Tensor):
            own_atol = atol[position] if isinstance(atol, Sequence) else atol
            report.outputs.append(compare_tensor(f"output {position}", want, got, report.notes, rtol, own_atol))
        elif want != got:
            report.problem = f"output {position} differs: {want!r} != {got!r}"
    return report


# A fold is judged again against the original's own float32 rounding only when that rounding is small beside
# the outputs: past this share of an output's largest value, float32 cannot tell a fold from its own noise.
ROUNDING_NOISE_MULTIPLE = 4.0
ROUNDING_NOISE_CEILING = 1e-2


def judge_against_rounding(report: VerifyReport, reference: Any, candidate: Any,
                           run_in_float64: Callable[[], Any], rtol: float | None) -> VerifyReport:
    """A failed check judged again by what the original itself gets wrong in float32. Some models amplify a
    rounding of the input or the weights by ~1e5 (random-init mixnet: its float32 output is 0.028 away from its
    own float64 output on values up to 276), so the fold's one rounding per weight moves the output as much as
    float32 already does, and the fixed rule fails an exact fold. Each output's atol becomes
    ``ROUNDING_NOISE_MULTIPLE`` times the original's float32-vs-float64 error, where that is under
    ``ROUNDING_NOISE_CEILING`` of the output's scale; the note says so. A wrong fold moves outputs by their own
    scale, far beyond that. (The widened atol is absolute, one per output, as a user's ``atol`` is.)"""
    try:
        exact, _ = tree_flatten(run_in_float64())
    except Exception:  # noqa: BLE001 - a model that cannot run in float64 keeps its verdict

        return report
    observed, _ = tree_flatten(reference)
    if len(exact) != len(observed):
        return report
    widened: list[float | None] = []
    for want, truth in zip(observed, exact, strict=True):
        if not (isinstance(want, torch.Tensor) and want.is_floating_point() and isinstance(truth, torch.Tensor)
                and want.numel() and want.dtype != torch.float64):
            widened.append(None)
            continue
        scale = float(want.detach().abs().max())
        noise = float((want.detach().double() - truth.detach().double()).abs().max())
        if not (scale > 0 and noise < ROUNDING_NOISE_CEILING * scale):
            return report
        atol_factor = default_tolerances(as_numpy(want).dtype)[1]
        widened.append(max(atol_factor * scale, ROUNDING_NOISE_MULTIPLE * noise))
    rejudged = compare(reference, candidate, report.engine, rtol, widened)
    if not rejudged.passed:
        return report
    rejudged.notes.append(
        "the fixed tolerance failed, but every output is within "
        f"{ROUNDING_NOISE_MULTIPLE:g}x the original's own float32 rounding error (measured against the original "
        "run in float64); the tolerance was widened to that")
    return rejudged


def compare_tensor(name: str, want: torch.Tensor, got: Any, notes: list[str], rtol: float | None = None,
                   atol: float | None = None) -> OutputComparison:
    """One output: ``got`` (a tensor or an array) against ``want``; why it fails whole goes to ``notes``."""
    reference = as_numpy(want)
    if isinstance(got, torch.Tensor):
        got = as_numpy(got)
    if not isinstance(got, np.ndarray):
        notes.append(f"output '{name}': the candidate returns {type(got).__name__}, not a tensor")
        return failed_output(name, reference.dtype.name, list(reference.shape), reference.size)
    return compare_output(name, [reference], [got], rtol=rtol, atol=atol, notes=notes)


def as_numpy(tensor: torch.Tensor) -> np.ndarray:
    """``tensor``'s values on the CPU in its own dtype (bfloat16 as ml_dtypes', which numpy lacks)."""
    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


@contextlib.contextmanager
def exact_math() -> Iterator[None]:
    """TF32 off while comparing, so the check measures the fold and not the matmul precision."""
    cuda_matmul = torch.backends.cuda.matmul.allow_tf32
    cudnn = torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = cuda_matmul
        torch.backends.cudnn.allow_tf32 = cudnn
