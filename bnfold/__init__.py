"""bnfold: fold inference-time BatchNormalization into neighbouring linear layers, exactly, and prove it.

ONNX: :func:`fold_onnx`, :func:`inspect_onnx`, :func:`verify_onnx`. PyTorch (needs the ``torch``
extra, imported only when used): :func:`fold_module`, :func:`fold_torch_file`.
"""

from __future__ import annotations

from typing import Any

from bnfold.core.report import BnRecord, FoldReport, Totals
from bnfold.errors import BnfoldError, InputError, MissingDependencyError, OutputError
from bnfold.onnx.api import FoldResult, enabled_patterns, fold_onnx, inspect_onnx
from bnfold.onnx.fold.patterns import PATTERN_NAMES
from bnfold.onnx.store.io import read_model, write_model

__version__ = "0.1.0"

_TORCH_API = {"fold_module", "fold_torch_file"}
# Imported on first use: verification brings in onnxruntime and onnx's reference evaluator.
_VERIFY_API = {"VerifyReport", "verify_onnx"}


def __getattr__(name: str) -> Any:
    if name in _VERIFY_API:
        from bnfold.onnx.verify import verify

        return getattr(verify, name)
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
