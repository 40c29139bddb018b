"""Check that two ONNX models compute the same function: ``original`` (the reference) and ``candidate``.

Both run on the same inputs (:mod:`~bnfold.onnx.verify.inputs`; generated ones at the sizes
:mod:`~bnfold.onnx.verify.sizes` finds the original runs at) under one engine
(:mod:`~bnfold.onnx.verify.engines`: onnxruntime with every graph optimisation off, else onnx.reference), once
their interfaces agree (:mod:`~bnfold.onnx.verify.interface`); every output is judged, run by run, by the rule
of :mod:`bnfold.core.compare`, and folded sites no run reached are named (:mod:`~bnfold.onnx.verify.coverage`).
docs/verification.md describes the rule, its calibration and its limits.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Collection, Mapping, Sequence

import numpy as np
from onnx import ModelProto

from bnfold.core.compare import OutputAccumulator, VerifyReport, check_tolerances
from bnfold.errors import InputError, first_line
from bnfold.onnx.store.model_store import ModelStore
from bnfold.onnx.verify.coverage import Coverage, Site, changed_subgraphs
from bnfold.onnx.verify.engines import Runner, open_runners
from bnfold.onnx.verify.input_files import Sample
from bnfold.onnx.verify.inputs import InputsArg, generate, user_feeds
from bnfold.onnx.verify.interface import ModelSource, TensorSpec, check_interfaces, load_interface
from bnfold.onnx.verify.sizes import LADDER, Plan, describe, second_sizes, size_plans
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
    folded_sites: Collection[Site] | None = None,
) -> VerifyReport:
    """Run ``original`` and ``candidate`` on the same inputs and compare every output by bnfold's one rule
    (docs/verification.md).

    Each model is a path, an ``onnx.ModelProto`` or a folded model's ``ModelStore``, which must stay unchanged
    (held arrays included) until this returns.
    ``inputs``: None (random inputs, ``iterations`` draws from ``numpy.random.default_rng(seed)`` at the first
    size the original runs at, and one draw at a second size where dims are dynamic), a path (``.npz``,
    ONNX test-data ``.pb``, a ``test_data_set_N`` directory or a directory of them: expected outputs found
    there are compared too), a mapping name -> array, or a sequence of those (one sample each).
    ``input_shapes`` fixes dynamic dims of generated inputs. ``rtol``/``atol`` override the dtype defaults;
    ``atol`` is then absolute. ``folded_sites`` (scope, label) are the candidate's changed sites: one that no
    run reaches makes the verdict ``unverified``; None: every subgraph and function that differs from the
    original's. ``progress(stage, done, total)`` is called per run.
    Raises :class:`InputError` for unusable models, mismatched interfaces or bad inputs.
    """
    check_tolerances(rtol, atol)
    notes: list[str] = []
    sources = {"original": original, "candidate": candidate}
    protos = {role: load_interface(role, source) for role, source in sources.items()}
    specs = check_interfaces(protos["original"], protos["candidate"])
    output_names = [output.name for output in protos["original"].graph.output]
    samples: list[Sample] = []
    if inputs is None:
        if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
            raise InputError(f"iterations must be an integer >= 1, got {iterations!r}")
        plans = size_plans(specs, input_shapes or {})
    else:
        if input_shapes:
            raise InputError("input_shapes applies to generated inputs only; the given inputs have their shapes")
        samples = user_feeds(inputs, specs, output_names)
    if folded_sites is None:
        folded_sites = changed_subgraphs(protos["original"], protos["candidate"])
    coverage = Coverage(protos["candidate"], folded_sites)
    run = _Runs(output_names, rtol, atol, notes, progress)
    with contextlib.ExitStack() as staged_files:
        run.open(sources, protos, coverage, staged_files)
        if samples:
            run.total = len(samples)
            for sample in samples:
                run.compare(sample.feeds, sample.expected)
        else:
            _run_generated(run, plans, specs, iterations, seed)
    untracked = coverage.untracked_note()
    if untracked is not None and coverage.unexercised():
        notes.append(untracked)
    report = VerifyReport([accumulator.result() for accumulator in run.outputs.values()], run.done, run.engine,
                          run.seconds, notes, unexercised=coverage.unexercised(),
                          sizes=[describe(shapes, specs) for shapes in run.sizes if describe(shapes, specs)])
    if run.expected:
        report.expected = run.expected_report()
    return report


def check_unchanged(original: ModelSource) -> VerifyReport:
    """The verdict on a fold that changed nothing: no run is needed, as the model written is the input. The
    engine still opens it, so the report can say what runs it; a model the engine cannot open (a training op,
    a locale it lacks) is still written unchanged, with a note, because writing the input back changes nothing
    a run could catch."""
    started = time.perf_counter()
    proto = load_interface("original", original)
    notes: list[str] = []
    with contextlib.ExitStack() as staged_files:
        try:
            engine, _ = open_runners({"original": original}, {"original": proto}, notes, staged_files,
                                     Coverage(proto, ()))
        except InputError as error:
            engine = "none"
            notes.append(f"{first_line(error)}; nothing was folded, so nothing needed a run")
    return VerifyReport([], 0, engine, {"session": time.perf_counter() - started}, notes, unchanged=True)


def _run_generated(run: _Runs, plans: list[Plan], specs: list[TensorSpec], iterations: int, seed: int) -> None:
    """``iterations`` draws at the first plan the original runs at, then one draw at a second size."""
    dynamic = len(plans) > 1
    run.total = iterations + (1 if dynamic else 0)
    first, failures = None, []
    for stream, plan in enumerate(plans):
        draws = generate(specs, plan.shapes, iterations, seed, stream)
        error = run.compare(next(draws), None, probing=dynamic)
        if error is None:
            first = plan
            break
        failures.append(error)
    if first is None:
        raise InputError(_cannot_run(plans, specs, failures))
    run.sizes.append(first.shapes)
    for feeds in draws:
        run.compare(feeds, None)
    if not dynamic:
        return
    for plan in second_sizes(plans, first):
        if run.compare(next(generate(specs, plan.shapes, 1, seed, len(plans))), None, probing=True) is None:
            run.sizes.append(plan.shapes)
            return
    run.total -= 1
    run.notes.append("the original runs at one size only of those tried; verified at that size")


def _cannot_run(plans: list[Plan], specs: list[TensorSpec], failures: list[str]) -> str:
    tried = ", ".join(
        "; ".join(f"{name} {'x'.join(map(str, shape))}" for name, shape in describe(plan.shapes, specs).items())
        for plan in plans[:len(LADDER)])
    dynamic = [spec.name for spec in specs if spec.dims is None or any(not isinstance(d, int) for d in spec.dims)]
    integers = [spec.name for spec in specs if spec.dtype.kind in "iub"]
    hint = (f"give sizes the model runs at with --input-shape ({', '.join(f'{n}:...' for n in dynamic)}) "
            if dynamic else "")
    drawn = (f"; integer input(s) {', '.join(integers)} were drawn from [0, 2): give their values with --inputs"
             if integers else "")
    return (f"the original model does not run on generated inputs{f' at any size tried ({tried})' if tried else ''}:"
            f" {failures[0]}; {hint}or inputs it runs on with --inputs{drawn}")


def _as_array(name: str, value: object) -> np.ndarray:
    """An output as one array. A sequence output (SequenceConstruct, SplitToSequence) comes back as a list:
    tensors of one shape are compared as their stack; tensors of different shapes, and maps, are refused
    (exit 2), since no one array holds them."""
    if isinstance(value, dict) or (isinstance(value, list | tuple) and any(isinstance(v, dict) for v in value)):
        raise InputError(f"output {name!r} is a map, which bnfold cannot compare (fold --no-verify folds "
                         f"without comparing)")
    if isinstance(value, list | tuple) and len({np.shape(item) for item in value}) > 1:
        raise InputError(f"output {name!r} is a sequence of tensors of different shapes, which bnfold cannot "
                         f"compare (fold --no-verify folds without comparing)")
    return np.asarray(value)


class _Runs:
    """Both models run side by side, each output judged as it comes (nothing is kept between runs)."""

    def __init__(self, output_names: list[str], rtol: float | None, atol: float | None, notes: list[str],
                 progress: Progress | None) -> None:
        self.output_names, self.rtol, self.atol, self.notes, self.progress = output_names, rtol, atol, notes, progress
        self.outputs = {name: OutputAccumulator(name, rtol, atol, notes) for name in output_names}
        self.expected: dict[str, tuple[OutputAccumulator, OutputAccumulator]] = {}
        self.expected_notes: list[str] = []
        self.sizes: list[dict[str, tuple[int, ...]]] = []
        self.done = self.total = 0
        self.engine = ""
        self.seconds = {"weights": 0.0, "session": 0.0, "run": 0.0}
        self.runners: dict[str, Runner] = {}
        self.coverage: Coverage | None = None

    def open(self, sources: Mapping[str, ModelSource], protos: Mapping[str, ModelProto], coverage: Coverage,
             staged_files: contextlib.ExitStack) -> None:
        started = time.perf_counter()
        # Folded weights the fold deferred are computed here, once, for onnxruntime to use in place; the fold's
        # result then writes these arrays. Timed apart: that is the fold's work done earlier, not verification.
        for source in sources.values():
            if isinstance(source, ModelStore) and opens_in_place(source):
                source.compute_deferred()
        computed = time.perf_counter()
        self.engine, self.runners = open_runners(sources, protos, self.notes, staged_files, coverage)
        self.coverage = coverage
        self.seconds["weights"], self.seconds["session"] = computed - started, time.perf_counter() - computed

    def compare(self, feeds: Mapping[str, np.ndarray], expected: Mapping[str, np.ndarray] | None,
                probing: bool = False) -> str | None:
        """Run both models on ``feeds`` and judge the outputs. ``probing``: if the original cannot run on
        them, return why instead of raising (nothing is counted)."""
        started = time.perf_counter()
        try:
            references = self.runners["original"](self.output_names, feeds)
        except InputError as error:
            if probing:
                return str(error)
            raise
        assert self.coverage is not None
        fetched = self.runners["candidate"](self.output_names + self.coverage.probe_names, feeds)
        candidates = fetched[:len(self.output_names)]
        self.coverage.record(fetched[len(self.output_names):])
        for name, reference, candidate in zip(self.output_names, references, candidates, strict=True):
            reference, candidate = _as_array(name, reference), _as_array(name, candidate)
            self.outputs[name].add(reference, candidate)
            if expected is not None and name in expected:
                against_candidate, against_original = self.expected.setdefault(name, (
                    OutputAccumulator(name, self.rtol, self.atol, self.expected_notes),
                    OutputAccumulator(name, self.rtol, self.atol)))
                against_candidate.add(expected[name], candidate)
                against_original.add(expected[name], reference)
        self.done += 1
        self.seconds["run"] += time.perf_counter() - started
        if self.progress is not None:
            self.progress("run", self.done, max(self.total, self.done))
        return None

    def expected_report(self) -> VerifyReport:
        """The candidate against the expected outputs that came with the inputs; where the original itself
        misses them under the rule, that output is noted and judged against the original only."""
        outputs = []
        for name, (against_candidate, against_original) in self.expected.items():
            result, original = against_candidate.result(), against_original.result()
            if not original.passed and not original.empty:
                self.expected_notes.append(
                    f"output '{name}': the original itself differs from the expected output (max abs error "
                    f"{original.max_abs_error:.3g}; the candidate {result.max_abs_error:.3g}); not counted")
                continue
            outputs.append(result)
        return VerifyReport(outputs, self.done, f"{self.engine} vs expected outputs", notes=self.expected_notes)


__all__ = ["VerifyReport", "check_unchanged", "verify_onnx"]
