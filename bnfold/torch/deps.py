"""Import torch only when a PyTorch function is actually called."""

from __future__ import annotations

from types import ModuleType

from bnfold.errors import MissingDependencyError


def require_torch() -> ModuleType:
    try:
        import torch
    except ImportError as error:
        raise MissingDependencyError(
            "the PyTorch side needs torch: pip install 'bnfold[torch]'"
        ) from error
    return torch
