"""bnfold: fold inference-time BatchNormalization into neighbouring linear layers, exactly, and prove it.

ONNX: :func:`fold_onnx`, :func:`inspect_onnx`, :func:`verify_onnx`. PyTorch (needs the ``torch``
extra, imported only when used): :func:`fold_module`, :func:`fold_torch_file`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from bnfold.core.report import BnRecord, FoldReport, Totals
from bnfold.core.result import FoldResult
from bnfold.errors import BnfoldError, InputError, InternalError, MissingDependencyError, OutputError

if TYPE_CHECKING:
    from bnfold.onnx.api import enabled_patterns, fold_onnx, inspect_onnx
    from bnfold.onnx.fold.patterns import PATTERN_NAMES
    from bnfold.onnx.store.io import read_model, write_model
    from bnfold.onnx.verify.verify import VerifyReport, verify_onnx
    from bnfold.torch import fold_module, fold_torch_file

__version__ = "0.1.0"

# Each front is imported on first use, so a PyTorch user never loads onnx and an ONNX user never loads torch;
# verification brings in onnxruntime and onnx's reference evaluator, so it waits until it is asked for too.
_ONNX_API = {
    "enabled_patterns": "bnfold.onnx.api", "fold_onnx": "bnfold.onnx.api", "inspect_onnx": "bnfold.onnx.api",
    "PATTERN_NAMES": "bnfold.onnx.fold.patterns", "read_model": "bnfold.onnx.store.io",
    "write_model": "bnfold.onnx.store.io", "VerifyReport": "bnfold.onnx.verify.verify",
    "verify_onnx": "bnfold.onnx.verify.verify",
}
_TORCH_API = {"fold_module", "fold_torch_file"}


def __getattr__(name: str) -> Any:
    if name in _ONNX_API:
        return getattr(importlib.import_module(_ONNX_API[name]), name)
    if name in _TORCH_API:
        try:
            import torch  # noqa: F401
        except ImportError:
            raise MissingDependencyError(
                f"bnfold.{name} needs PyTorch: pip install 'bnfold[torch]'"
            ) from None
        from bnfold import torch as torch_front

        return getattr(torch_front, name)
    raise AttributeError(f"module 'bnfold' has no attribute {name!r}")


__all__ = [
    "PATTERN_NAMES",
    "BnRecord",
    "BnfoldError",
    "FoldReport",
    "FoldResult",
    "InputError",
    "InternalError",
    "MissingDependencyError",
    "OutputError",
    "Totals",
    "VerifyReport",
    "enabled_patterns",
    "fold_module",
    "fold_onnx",
    "fold_torch_file",
    "inspect_onnx",
    "read_model",
    "verify_onnx",
    "write_model",
]
