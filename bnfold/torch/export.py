"""Export a folded model to ONNX and check it under onnxruntime against the original PyTorch outputs."""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils._pytree import tree_flatten

from bnfold.core.atomic import atomic_destination
from bnfold.core.compare import VerifyReport
from bnfold.errors import OutputError
from bnfold.torch.checks import compare_tensor
from bnfold.torch.running import Inputs


def export_and_check(model: Any, inputs: Inputs, reference: Any, path: str | os.PathLike[str],
                     rtol: float | None = None, atol: float | None = None) -> VerifyReport:
    """Write ``model`` as ONNX to ``path`` (atomically) and compare onnxruntime's outputs to ``reference``."""
    from bnfold.core.runtime import unoptimized_session

    destination = Path(path)
    result = VerifyReport([], 1, "onnxruntime (optimizations disabled)")
    with atomic_destination(destination) as temporary:
        try:
            _export(model, inputs, temporary)
        except Exception as error:
            raise OutputError(f"ONNX export failed: {type(error).__name__}: {str(error)[:200]}") from error
        session = unoptimized_session(temporary)
        feeds = _feeds(session, inputs)
        outputs = session.run(None, feeds)
    expected, _ = tree_flatten(reference)
    tensors = [t for t in expected if isinstance(t, torch.Tensor)]
    if len(tensors) != len(outputs):
        result.problem = f"the ONNX model has {len(outputs)} outputs, PyTorch {len(tensors)}"
        return result
    for position, (want, got) in enumerate(zip(tensors, outputs, strict=True)):
        result.outputs.append(compare_tensor(f"output {position}", want, np.asarray(got), result.notes, rtol, atol))
    return result


def _export(model: Any, inputs: Inputs, path: Path) -> None:
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        if isinstance(model, torch.jit.ScriptModule):
            torch.onnx.export(model, inputs.args, str(path), dynamo=False)
            return
        program = model if isinstance(model, torch.export.ExportedProgram) else None
        onnx_program = torch.onnx.export(
            program if program is not None else model, inputs.args, kwargs=inputs.kwargs or None,
            dynamo=True, optimize=False, verbose=False,
        )
        onnx_program.save(str(path))  # type: ignore[union-attr]  # None only without dynamo


def _feeds(session: Any, inputs: Inputs) -> dict[str, np.ndarray]:
    values = [t for t in list(inputs.args) + list(inputs.kwargs.values()) if isinstance(t, torch.Tensor)]
    names = [i.name for i in session.get_inputs()]
    return {name: value.detach().cpu().numpy() for name, value in zip(names, values, strict=False)}
