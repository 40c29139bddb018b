"""How many batch norms bnfold folds on real timm/torchvision model code, against torch.jit.freeze.

Run: ``python -m bench.torch_coverage [--all | MODEL...]`` (prints a Markdown table; docs/torch-coverage.md holds
the last one). Each model is built with random weights and random batch-norm statistics (nothing is downloaded)
and folded by ``bnfold.fold_module`` on one 64x64 input. The anchor is
``torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.script(model)))``: the batch norms it removes are
the ``aten::batch_norm`` ops of the frozen, unoptimized graph that are gone after optimization; ``!`` marks an
anchor whose output is more than 1e-4 (relative to the output's largest value) off the model's.
"""

from __future__ import annotations

import sys
import time
import warnings

import torch

from bnfold.torch import fold_module
from tests.support.real_models import MODELS, MORE_MODELS, build


def jit_removed(model: torch.nn.Module, x: torch.Tensor, reference: torch.Tensor) -> str:
    """Batch norms the TorchScript freezer removes (``"-"`` when the model does not script, ``!`` when wrong)."""
    try:
        scripted = torch.jit.script(model)
        plain = torch.jit.freeze(scripted, optimize_numerics=False)
        optimized = torch.jit.optimize_for_inference(torch.jit.freeze(scripted))
    except Exception:
        return "-"
    before = _count_bn(plain.graph)
    removed = before - _count_bn(optimized.graph)
    with torch.no_grad():
        output = optimized(x)
    error = (_first(output) - reference).abs().max() / reference.abs().max().clamp_min(1e-12)
    wrong = bool(error > 1e-4)
    return f"{removed}{'!' if wrong else ''}"


def _count_bn(graph: torch._C.Graph) -> int:
    return sum(1 for node in graph.findAllNodes("aten::batch_norm", recurse=True))


def _first(output: object) -> torch.Tensor:
    while not isinstance(output, torch.Tensor):
        output = next(iter(output.values())) if isinstance(output, dict) else output[0]  # type: ignore[index]
    return output


def main() -> None:
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    rows = [
        "| model | BNs | bnfold folded | left (reasons) | jit removed | verified | fold s |",
        "|---|---|---|---|---|---|---|",
    ]
    names = sys.argv[1:] or list(MODELS)
    if names == ["--all"]:
        names = list(MODELS) + list(MORE_MODELS)
    for name in names:
        model, x = build(name)
        with torch.no_grad():
            reference = _first(model(x))
        started = time.perf_counter()
        result = fold_module(model, x)
        seconds = time.perf_counter() - started
        report = result.report
        reasons: dict[str, int] = {}
        for record in report.left:
            reasons[str(record.reason)] = reasons.get(str(record.reason), 0) + 1
        left = ", ".join(f"{code} {count}" for code, count in sorted(reasons.items())) or "0"
        rows.append(
            f"| {name} | {len(report.records)} | {len(report.folded)} | {left} | {jit_removed(model, x, reference)} "
            f"| {report.verification.passed} | {seconds:.2f} |"
        )
    print("\n".join(rows))


if __name__ == "__main__":
    main()
