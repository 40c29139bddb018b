"""Numeric verification: the folded model against the original, output by output."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch.utils._pytree import tree_flatten

from bnfold.core.report import render_table

# Relative to the output's largest magnitude. A fold only reorders roundings, so errors stay a few
# ulps per layer; a wrong fold (wrong axis, lost shift) is off by the order of the output itself.
_TOLERANCE = {
    torch.float64: (1e-9, 1e-12),
    torch.float32: (1e-4, 1e-6),
    torch.float16: (2e-2, 1e-3),
    torch.bfloat16: (1e-1, 1e-2),
}


@dataclass(frozen=True)
class OutputCheck:
    name: str
    dtype: str
    max_abs: float
    max_rel: float
    tolerance: float
    passed: bool


@dataclass
class Verification:
    """Per-output comparison of two models on the same inputs; ``passed`` only if every output passes."""

    target: str
    outputs: list[OutputCheck] = field(default_factory=list)
    problem: str | None = None

    @property
    def passed(self) -> bool:
        return self.problem is None and all(o.passed for o in self.outputs)

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "passed": self.passed,
            "problem": self.problem,
            "outputs": [asdict(o) for o in self.outputs],
        }

    def render(self) -> str:
        verdict = "PASSED" if self.passed else "FAILED"
        lines = [f"verification ({self.target}): {verdict}"]
        if self.problem:
            lines.append(f"  {self.problem}")
        if self.outputs:
            lines.append(render_table(
                ["output", "dtype", "max abs err", "max rel err", "tolerance", "ok"],
                [[o.name, o.dtype, f"{o.max_abs:.3g}", f"{o.max_rel:.3g}", f"{o.tolerance:.3g}",
                  "yes" if o.passed else "NO"] for o in self.outputs],
            ))
        return "\n".join(lines)


@dataclass
class VerificationSet:
    """Several verifications (e.g. PyTorch and onnxruntime) reported as one."""

    parts: list[Verification]

    @property
    def passed(self) -> bool:
        return all(p.passed for p in self.parts)

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "checks": [p.to_dict() for p in self.parts]}

    def render(self) -> str:
        return "\n".join(p.render() for p in self.parts)


def compare(reference: Any, candidate: Any, target: str) -> Verification:
    expected, expected_spec = tree_flatten(reference)
    actual, actual_spec = tree_flatten(candidate)
    result = Verification(target)
    if expected_spec != actual_spec or len(expected) != len(actual):
        result.problem = "the outputs have a different structure"
        return result
    for position, (want, got) in enumerate(zip(expected, actual, strict=True)):
        if isinstance(want, torch.Tensor):
            result.outputs.append(compare_tensor(f"output {position}", want, got))
        elif want != got:
            result.problem = f"output {position} differs: {want!r} != {got!r}"
    return result


def compare_tensor(name: str, want: torch.Tensor, got: Any) -> OutputCheck:
    dtype = str(want.dtype).replace("torch.", "")
    if not isinstance(got, torch.Tensor) or got.shape != want.shape:
        shape = getattr(got, "shape", type(got).__name__)
        return OutputCheck(f"{name} shape {tuple(want.shape)} vs {shape}", dtype, math.inf, math.inf, 0, False)
    if not want.is_floating_point():
        same = bool(torch.equal(want, got.to(want.dtype)))
        return OutputCheck(name, dtype, 0.0 if same else math.inf, 0.0 if same else math.inf, 0.0, same)
    want64 = want.detach().to("cpu", torch.float64)
    got64 = got.detach().to("cpu", torch.float64)
    finite = torch.isfinite(want64)
    same_specials = torch.equal(torch.isnan(want64), torch.isnan(got64)) and torch.equal(
        want64[torch.isinf(want64)], got64[torch.isinf(want64)]
    )
    if not torch.equal(finite, torch.isfinite(got64)) or not same_specials:
        return OutputCheck(name, dtype, math.inf, math.inf, 0.0, False)
    diff = (want64[finite] - got64[finite]).abs()
    scale = want64[finite].abs().max().item() if diff.numel() else 0.0
    max_abs = diff.max().item() if diff.numel() else 0.0
    relative, absolute = _TOLERANCE.get(want.dtype, _TOLERANCE[torch.float32])
    tolerance = relative * scale + absolute
    return OutputCheck(name, dtype, max_abs, max_abs / scale if scale else max_abs, tolerance, max_abs <= tolerance)


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
