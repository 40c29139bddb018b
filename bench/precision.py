"""Precision: how far each tool's folded model is from the exact function of the original.

Ground truth: the ORIGINAL model evaluated in float64. Every floating-point initializer, Constant, Cast target
and graph type of the original (float32 or float16) is converted to float64, exactly (every float32 and
float16 value is a float64 value), and the graph runs under ``onnx.reference`` (onnxruntime has no float64
Conv on CPU) on the same inputs as the candidates, the inputs first rounded to the model's dtype. So the
truth is the original's parameters with exact arithmetic, up to float64 rounding.

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
    truth_evaluator = ReferenceEvaluator(truth_model)
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
