"""Precision: how far each tool's folded model is from the exact function of the original.

Ground truth: the ORIGINAL model evaluated in float64. Every floating-point initializer, Constant, Cast target
and graph type of the original (float32 or float16) is converted to float64, exactly (every float32 and
float16 value is a float64 value), and the graph runs under ``onnx.reference`` (onnxruntime has no float64
Conv on CPU) on the same inputs as the candidates, the inputs first rounded to the model's dtype. So the
truth is the original's parameters with exact arithmetic, up to float64 rounding. ConvTranspose is computed
by torch in float64 instead: onnx.reference 1.23 fails on grouped ConvTranspose (``W.reshape((group, k, m))``
of a weight it has not split by group).

Candidates (the unfolded original, bnfold's and every anchor's folded model) run under onnxruntime CPU at
``ORT_DISABLE_ALL`` in their own dtype. Reported per candidate: the RMS error relative to the RMS of the truth,
and the largest error relative to the largest truth value, over all outputs and inputs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

ORIGINAL = "original"


def measure(args: list[str]) -> dict[str, Any]:
    """Worker task ``precision ORIGINAL INPUTS NAME=CANDIDATE...``."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto
    from onnx.reference import ReferenceEvaluator

    from bench.models import with_float_type

    original, count, candidates = Path(args[0]), int(args[1]), dict(arg.split("=", 1) for arg in args[2:])
    model = onnx.load(original)
    truth_model = with_float_type(model, TensorProto.DOUBLE)
    del model
    truth_evaluator = ReferenceEvaluator(truth_model, new_ops=[_conv_transpose_op()])
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    original_session = ort.InferenceSession(str(original), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    inputs = []
    for _ in range(count):
        feeds = {}
        for spec in original_session.get_inputs():
            dtype = np.float16 if spec.type == "tensor(float16)" else np.float32
            feeds[spec.name] = rng.standard_normal(spec.shape).astype(dtype)
        inputs.append(feeds)
    truths = [truth_evaluator.run(None, {name: value.astype(np.float64) for name, value in feeds.items()})
              for feeds in inputs]
    del truth_evaluator, truth_model
    results = {ORIGINAL: _errors(original_session, inputs, truths)}
    del original_session
    for name, path in candidates.items():
        try:
            session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
            results[name] = _errors(session, inputs, truths)
        except Exception as error:  # noqa: BLE001 - an invalid or failing candidate is a finding
            results[name] = {"error": (str(error).strip().splitlines() or [type(error).__name__])[0][:300]}
    return {"inputs": count, "errors": results}


def _conv_transpose_op() -> type:
    """ConvTranspose for onnx.reference, computed by torch in the input's dtype (float64 here)."""
    import torch
    from onnx.reference.op_run import OpRun

    class ConvTranspose(OpRun):
        op_domain = ""

        def _run(self, x, w, b=None, auto_pad=None, dilations=None, group=None, kernel_shape=None,
                 output_padding=None, output_shape=None, pads=None, strides=None):
            spatial = x.ndim - 2
            pads = list(pads or [0] * 2 * spatial)
            if (auto_pad not in (None, "NOTSET") or output_shape is not None
                    or pads[:spatial] != pads[spatial:]):
                raise NotImplementedError("this ConvTranspose needs auto_pad, output_shape or asymmetric pads")
            function = (torch.nn.functional.conv_transpose1d, torch.nn.functional.conv_transpose2d,
                        torch.nn.functional.conv_transpose3d)[spatial - 1]
            result = function(torch.tensor(x), torch.tensor(w), None if b is None else torch.tensor(b),
                              stride=tuple(strides or [1] * spatial), padding=tuple(pads[:spatial]),
                              output_padding=tuple(output_padding or [0] * spatial), groups=group or 1,
                              dilation=tuple(dilations or [1] * spatial))
            return (result.numpy(),)

    return ConvTranspose


def _errors(session: Any, inputs: list[dict[str, np.ndarray]], truths: list[list[np.ndarray]]) -> dict[str, float]:
    squared_error = squared_truth = largest_error = largest_truth = 0.0
    for feeds, truth in zip(inputs, truths, strict=True):
        for value, exact in zip(session.run(None, feeds), truth, strict=True):
            error = np.asarray(value, dtype=np.float64) - exact
            squared_error += float(np.sum(error * error))
            squared_truth += float(np.sum(exact * exact))
            largest_error = max(largest_error, float(np.max(np.abs(error))))
            largest_truth = max(largest_truth, float(np.max(np.abs(exact))))
    return {"rms_relative_error": float(np.sqrt(squared_error / squared_truth)),
            "max_error_vs_scale": largest_error / largest_truth}
