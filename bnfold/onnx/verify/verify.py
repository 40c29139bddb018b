"""Check that two ONNX models compute the same function: ``original`` (the reference) and ``candidate``.

Both run on the same inputs (:mod:`~bnfold.onnx.verify.inputs`) under one engine
(:mod:`~bnfold.onnx.verify.engines`: onnxruntime with every graph optimisation off, else onnx.reference), once
their interfaces agree (:mod:`~bnfold.onnx.verify.interface`); every output is then judged by the rule of
:mod:`bnfold.core.compare`, which docs/verification.md describes with its calibration and limits.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Mapping, Sequence

import numpy as np
from onnx import ModelProto

from bnfold.core.compare import VerifyReport, check_tolerances, compare_output
from bnfold.errors import InputError
from bnfold.onnx.store.model_store import ModelStore
from bnfold.onnx.verify.engines import open_runners
from bnfold.onnx.verify.inputs import InputsArg, generate, generated_shapes, user_feeds
from bnfold.onnx.verify.interface import ModelSource, check_interfaces, load_interface
from bnfold.onnx.verify.unwritten import opens_in_place

Progress = Callable[[str, int, int], None]


def verify_onnx(
    original: ModelSource,
    candidate: ModelSource,
    *,
    inputs: InputsArg = None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    iterations: int = 3,
    seed: int = 0,
    rtol: float | None = None,
    atol: float | None = None,
    progress: Progress | None = None,
) -> VerifyReport:
    """Run ``original`` and ``candidate`` on the same inputs and compare every output by bnfold's one rule
    (docs/verification.md).

    Each model is a path, an ``onnx.ModelProto`` or a folded model's ``ModelStore``, which must stay unchanged
    (held arrays included) until this returns.
    ``inputs``: None (random inputs, ``iterations`` draws from ``numpy.random.default_rng(seed)``), a
    ``.npz`` path, a mapping name -> array, or a sequence of those (one per iteration). ``input_shapes``
    fixes dynamic dims of generated inputs (others become 1, with a note). ``rtol``/``atol`` override the
    dtype defaults; ``atol`` is then absolute. ``progress(stage, done, total)`` is called per iteration.
    Raises :class:`InputError` for unusable models, mismatched interfaces or bad inputs.
    """
    check_tolerances(rtol, atol)
    notes: list[str] = []
    sources = {"original": original, "candidate": candidate}
    protos = {role: load_interface(role, source) for role, source in sources.items()}
    model_inputs = check_interfaces(protos["original"], protos["candidate"])
    output_names = [output.name for output in protos["original"].graph.output]

    if inputs is None:
        if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
            raise InputError(f"iterations must be an integer >= 1, got {iterations!r}")
        shapes = generated_shapes(model_inputs, input_shapes or {}, notes)
        feed_sets: Iterator[dict[str, np.ndarray]] = generate(model_inputs, shapes, iterations, seed)
        total = iterations
    else:
        if input_shapes:
            raise InputError("input_shapes applies to generated inputs only; the given inputs have their shapes")
        given = user_feeds(inputs, model_inputs)
        feed_sets, total = iter(given), len(given)

    with contextlib.ExitStack() as staged_files:
        engine, references, candidates, seconds = _run_models(
            sources, protos, output_names, feed_sets, total, notes, staged_files, progress)
    outputs = [compare_output(name, references[name], candidates[name], rtol, atol, notes) for name in output_names]
    return VerifyReport(outputs, total, engine, seconds, notes)


def _run_models(
    sources: Mapping[str, ModelSource], protos: Mapping[str, ModelProto], output_names: list[str],
    feed_sets: Iterator[dict[str, np.ndarray]], total: int, notes: list[str], staged_files: contextlib.ExitStack,
    progress: Progress | None,
) -> tuple[str, dict[str, list[np.ndarray]], dict[str, list[np.ndarray]], dict[str, float]]:
    """The engine, both models' outputs by name over all iterations, and the seconds spent computing deferred
    weights, opening the models and running them. The sessions end with this call, before the files staged
    for them are removed."""
    started = time.perf_counter()
    # Folded weights the fold deferred are computed here, once, for onnxruntime to use in place; the fold's
    # result then writes these arrays. Timed apart: that is the fold's work done earlier, not verification.
    for source in sources.values():
        if isinstance(source, ModelStore) and opens_in_place(source):
            source.compute_deferred()
    computed = time.perf_counter()
    engine, runners = open_runners(sources, protos, notes, staged_files)
    opened = time.perf_counter()
    references: dict[str, list[np.ndarray]] = {name: [] for name in output_names}
    candidates: dict[str, list[np.ndarray]] = {name: [] for name in output_names}
    for done, feeds in enumerate(feed_sets, start=1):
        for results, role in ((references, "original"), (candidates, "candidate")):
            for name, value in zip(output_names, runners[role](output_names, feeds), strict=True):
                results[name].append(np.asarray(value))
        if progress is not None:
            progress("run", done, total)
    finished = time.perf_counter()
    return engine, references, candidates, {"weights": computed - started, "session": opened - computed,
                                            "run": finished - opened}


__all__ = ["VerifyReport", "verify_onnx"]
