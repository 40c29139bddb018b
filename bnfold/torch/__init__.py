"""PyTorch front: fold batch norms in nn.Module, TorchScript and torch.export programs.

Importing this package does not import torch; each entry point does, and raises
:class:`bnfold.errors.MissingDependencyError` when torch is missing.
"""

from __future__ import annotations

from os import PathLike
from typing import TYPE_CHECKING, Any

from bnfold.core.result import FoldResult
from bnfold.torch.deps import quiet_torch_warnings, require_torch

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence

    import torch
    from torch import nn

__all__ = ["FoldResult", "fold_module", "fold_torch_file"]


def fold_module(
    module: nn.Module | torch.export.ExportedProgram | torch.jit.ScriptModule,
    example_inputs: Any = None,
    *,
    inplace: bool = False,
    **options: Any,
) -> FoldResult:
    """Fold the batch norms of a model in memory into neighbouring conv/linear layers, exactly.

    ``module`` is any in-memory form, and the result keeps it:

    - an ``nn.Module``: a model of the same class with layer weights/biases updated and folded BNs replaced by
      ``nn.Identity`` — or, where a BN's module does more than the batch norm (timm's ``BatchNormAct2d``), kept
      with its batch-norm part made the identity, so its activation still runs;
    - a ``torch.export.ExportedProgram``: a folded ``ExportedProgram`` (verified with ``example_inputs``, else
      ``input_shapes``, else the example inputs it was exported with);
    - a TorchScript ``ScriptModule`` (scripted or traced): a folded ``ScriptModule``.

    ``example_inputs`` is a tensor, a tuple of positional inputs or a dict of keyword inputs (a list is taken
    as positional inputs, and the report notes it). With ``inplace=False`` the original is left untouched.
    ``result.write(path)`` saves the folded model in its form's format (``torch.save``, ``.pt2``, TorchScript).
    Options: ``allow_train_mode`` (fold a train-mode model as its eval-mode behaviour), ``input_shapes``
    (generate example inputs), ``verify`` (compare outputs, default True when inputs exist; without inputs the
    report notes that verification was skipped), ``export_onnx`` (path: export the folded model and check it
    under onnxruntime), ``rtol``/``atol`` (the verification's tolerances, as :func:`bnfold.fold_onnx` takes
    them), ``progress``.
    """
    require_torch()
    import torch

    if isinstance(module, (torch.export.ExportedProgram, torch.jit.ScriptModule)):
        from bnfold.torch.forms import Options, fold_in_memory

        known = {"input_shapes", "export_onnx", "verify", "allow_train_mode", "rtol", "atol", "progress"}
        if set(options) - known:
            raise TypeError(f"fold_module() got unexpected keyword arguments {sorted(set(options) - known)}")
        with quiet_torch_warnings():
            folded, report = fold_in_memory(module, example_inputs, inplace=inplace, options=Options(
                options.get("input_shapes"), options.get("export_onnx"), options.get("verify", True),
                options.get("allow_train_mode", False), {"rtol": options.get("rtol"), "atol": options.get("atol")},
                options.get("progress") or (lambda _message: None),
            ))
        return FoldResult(folded, report)
    if any(base.__name__ == "_StatefulGraphModule" for base in type(module).__mro__):
        from bnfold.errors import InputError

        raise InputError("this module is an ExportedProgram's .module(): pass the ExportedProgram itself "
                         "(fold_module(program, ...)), whose batch norms are aten ops it can fold")
    from bnfold.torch.fold.module import fold_module as fold
    from bnfold.torch.forms import skipped_notice

    with quiet_torch_warnings():
        result = fold(module, example_inputs, inplace=inplace, **options)
    if options.get("verify", True) and result.report.verification is None:
        result.report.notes.append(skipped_notice("no example inputs were given"))
    return result


def fold_torch_file(
    input_path: str | PathLike[str],
    *,
    trust_pickle: bool = False,
    input_shapes: Mapping[str, Sequence[int]] | Sequence[Sequence[int]] | None = None,
    export_onnx: str | PathLike[str] | None = None,
    verify: bool = True,
    allow_train_mode: bool = False,
    rtol: float | None = None,
    atol: float | None = None,
    progress: Callable[[str], None] | None = None,
) -> FoldResult:
    """Fold a ``.pt2`` program, a TorchScript file or (with ``trust_pickle``) a pickled module.

    The format is detected from the content. Nothing is written: ``result.write(path)`` writes the folded
    model atomically in the input's format (``overwrite_input=True`` lets it replace the input). A failed
    verification is a verdict in ``result.report.verification``, as with :func:`bnfold.fold_onnx`.
    """
    require_torch()
    from bnfold.torch.files import fold_file

    with quiet_torch_warnings():
        return fold_file(
            input_path, trust_pickle=trust_pickle, input_shapes=input_shapes,
            export_onnx=export_onnx, verify=verify, allow_train_mode=allow_train_mode, rtol=rtol, atol=atol,
            progress=progress,
        )
