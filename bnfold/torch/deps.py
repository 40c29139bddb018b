"""Import torch only when a PyTorch function is actually called."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
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


@contextlib.contextmanager
def quiet_torch_warnings() -> Iterator[None]:
    """Keep torch's own FutureWarnings (torch.jit.load/save/script "is deprecated", ...) off the user's stderr.

    They are about bnfold's use of torch, which the user cannot act on; the filter is scoped to the call."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch(\.|$)")
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.jit(\.|$)")
        yield
