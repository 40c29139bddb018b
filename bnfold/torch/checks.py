"""Numeric verification of the PyTorch front: its outputs, as numpy arrays, judged by bnfold's one rule
(:mod:`bnfold.core.compare`, docs/verification.md)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import ml_dtypes
import numpy as np
import torch
from torch.utils._pytree import tree_flatten

from bnfold.core.compare import OutputComparison, VerifyReport, compare_output, failed_output


def compare(reference: Any, candidate: Any, engine: str, rtol: float | None = None,
            atol: float | None = None) -> VerifyReport:
    """``candidate``'s outputs (any nesting of tensors and plain values) against ``reference``'s, from one run
    under ``engine``: tensors by the rule (``rtol``/``atol`` as :func:`compare_output` takes them), anything
    else by equality."""
    expected, expected_spec = tree_flatten(reference)
    actual, actual_spec = tree_flatten(candidate)
    if expected_spec != actual_spec or len(expected) != len(actual):
        return VerifyReport([], 1, engine, problem="the outputs have a different structure")
    report = VerifyReport([], 1, engine)
    for position, (want, got) in enumerate(zip(expected, actual, strict=True)):
        if isinstance(want, torch.Tensor):
            report.outputs.append(compare_tensor(f"output {position}", want, got, report.notes, rtol, atol))
        elif want != got:
            report.problem = f"output {position} differs: {want!r} != {got!r}"
    return report


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
