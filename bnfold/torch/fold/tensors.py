"""Moving parameters between torch and the float64 numpy core, rounding once on the way back."""

from __future__ import annotations

import numpy as np
import torch

from bnfold.core.affine import FoldRefused, cast_checked
from bnfold.reasons import Reason

_NUMPY_DTYPES = {torch.float16: np.float16, torch.float32: np.float32, torch.float64: np.float64}


def to_float64(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().to(device="cpu", dtype=torch.float64).numpy()


def from_float64(values: np.ndarray, like: torch.Tensor, what: str) -> torch.Tensor:
    """``values`` rounded once to ``like``'s dtype (refusing overflow) on ``like``'s device."""
    dtype = like.dtype
    if dtype in _NUMPY_DTYPES:
        cast = cast_checked(values, np.dtype(_NUMPY_DTYPES[dtype]), what)
        tensor = torch.from_numpy(np.ascontiguousarray(cast))
    elif dtype == torch.bfloat16:
        import ml_dtypes  # shipped with onnx, a core dependency of bnfold

        cast = cast_checked(values, np.dtype(ml_dtypes.bfloat16), what)
        tensor = torch.from_numpy(np.ascontiguousarray(cast).view(np.int16)).view(torch.bfloat16)
    else:
        raise FoldRefused(Reason.UNSUPPORTED_DTYPE, f"{what} has dtype {dtype}")
    return tensor.to(like.device)


def optional_float64(tensor: torch.Tensor | None) -> np.ndarray | None:
    return None if tensor is None else to_float64(tensor)
