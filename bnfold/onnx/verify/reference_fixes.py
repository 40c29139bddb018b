"""Patches for operators onnx.reference computes wrongly (onnx 1.23), so that it can stand in for
onnxruntime where onnxruntime has no kernel."""

from __future__ import annotations

from typing import Any

import numpy as np
from onnx import ModelProto
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun
from onnx.reference.ops.op_batch_normalization import BatchNormalization_9
from onnx.reference.ops.op_conv_transpose import ConvTranspose as ReferenceConvTranspose


class _InferenceBatchNormalization(OpRun):
    """BatchNormalization of opsets 9 to 13 as the spec has it: running statistics, unless the node has the
    optional outputs that mark training. onnx.reference's own takes the momentum attribute's default value
    for training mode and always normalizes with the batch's statistics (onnx 1.23)."""

    op_domain = ""

    def _run(self, x: np.ndarray, scale: np.ndarray, bias: np.ndarray, mean: np.ndarray, var: np.ndarray,
             epsilon: float | None = None, momentum: float | None = None, training_mode: int | None = None,
             ) -> tuple[np.ndarray, ...]:
        # training_mode: onnx.reference hands a custom op the latest schema's attributes; before opset 14 the
        # node cannot set it.
        if any(self.onnx_node.output[1:]):
            return BatchNormalization_9._run(self, x, scale, bias, mean, var, epsilon=epsilon, momentum=momentum)  # type: ignore[arg-type]
        shape = (-1,) + (1,) * (x.ndim - 2)
        eps = 1e-5 if epsilon is None else epsilon
        y = scale.reshape(shape) * (x - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + eps) + bias.reshape(shape)
        return (y.astype(x.dtype),)


_InferenceBatchNormalization.__name__ = "BatchNormalization"  # how ReferenceEvaluator matches an op to a class


class _GroupedConvTranspose(OpRun):
    """ConvTranspose with ``group > 1`` as one ungrouped ConvTranspose per group: onnx.reference's own takes
    the wrong weight rows, adds the whole bias to every group and keeps one output channel per group
    (onnx 1.23)."""

    op_domain = ""

    def _run(self, x: np.ndarray, w: np.ndarray, b: np.ndarray | None = None, group: int | None = None,
             **attributes: Any) -> tuple[np.ndarray]:
        groups = group or 1
        if groups == 1:
            return ReferenceConvTranspose._run(self, x, w, b, group=1, **attributes)  # type: ignore[arg-type]
        inputs, outputs = x.shape[1] // groups, w.shape[1]
        parts = [
            ReferenceConvTranspose._run(
                self, x[:, g * inputs:(g + 1) * inputs], w[g * inputs:(g + 1) * inputs],  # type: ignore[arg-type]
                None if b is None else b[g * outputs:(g + 1) * outputs], group=1, **attributes)[0]
            for g in range(groups)
        ]
        return (np.concatenate(parts, axis=1),)


_GroupedConvTranspose.__name__ = "ConvTranspose"


def reference_evaluator(model: ModelProto) -> ReferenceEvaluator:
    """``onnx.reference.ReferenceEvaluator`` for ``model``, with grouped ConvTranspose fixed (see
    :class:`_GroupedConvTranspose`) and inference-mode BatchNormalization fixed for opsets 9 to 13 (see
    :class:`_InferenceBatchNormalization`)."""
    opset = next((entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx")), 0)
    fixes: list[type[OpRun]] = [_GroupedConvTranspose]
    if 9 <= opset <= 13:
        fixes.append(_InferenceBatchNormalization)
    return ReferenceEvaluator(model, new_ops=fixes)

