"""Check that two ONNX models compute the same function: ``original`` (the reference) and ``candidate``.

Both models run on the same inputs under onnxruntime's CPU provider with every graph optimisation
disabled (``ORT_DISABLE_ALL``), so onnxruntime's own fusions -- which fold batch norms too -- can neither
hide a difference nor cause one. When onnxruntime has no kernel for an operator of either model (float64
Conv, most bfloat16 operators), or a model takes or returns bfloat16 tensors (which onnxruntime's Python
API cannot exchange), both models run under ``onnx.reference.ReferenceEvaluator`` instead.

Comparison rule
---------------
Every output is compared over all iterations, in float64, against the ORIGINAL model's output ``ref``:

* Outputs that are not floating point (integers, bool) must be exactly equal.
* NaN must appear at exactly the same positions in both; an infinity must appear at the same position
  with the same sign. A mismatch there fails the output. Such positions are left out of the error
  statistics.
* Float element ``i`` passes iff ``|cand[i] - ref[i]| <= atol + rtol * |ref[i]|``.
* ``atol`` is scale-aware: by default ``atol = atol_factor[dtype] * scale``, where ``scale`` is the
  largest finite ``|ref|`` of that output over all iterations (1 if that is 0). A user-given ``atol`` is
  absolute and used as is; a user-given ``rtol`` replaces the default ``rtol``.
* An output passes iff no element fails; the models are equivalent iff every output passes.

Reported per output: max/mean absolute error and max relative error ``|cand - ref| / |ref|`` (0 where both
are 0, infinite where only ``ref`` is 0), the tolerances applied, and the smallest ``atol`` (at the
``rtol`` in use) and smallest ``rtol`` (at the ``atol`` in use) that would have passed, up to rounding.

Default tolerances (``DEFAULT_TOLERANCES``: dtype -> (rtol, atol_factor))
-------------------------------------------------------------------------
===========  ======  ===========
dtype        rtol    atol_factor
===========  ======  ===========
float64      1e-9    1e-10
float32      1e-4    1e-4
float16      1e-2    2e-2
bfloat16     5e-2    1.5e-1
===========  ======  ===========

How they were chosen. An exact fold still changes the computation: the folded weights are rounded to
the model's dtype once, and a convolution followed by a batch norm rounds differently from the one
folded convolution. The defaults must accept that noise on deep networks and reject more. The noise
was measured as ``max |cand - ref| / scale`` with this module, on ResNet-shaped CNNs (bottleneck
blocks, 64x64 input, 3 iterations, 2-3 seeds) folded exactly (in float64, cast once), for three kinds
of batch-norm statistics:

* random (running mean N(0, 0.5), running var U(0.5, 2), gamma U(0.5, 1.5), beta N(0, 0.5); He
  initialised convolutions), the case ``tests/test_verify.py`` runs: float32 ResNet-50 1.2e-6 (max
  abs error 8.5e-4 at an output scale of 707);
* trained-like (running statistics measured on data, random gamma/beta, small gamma on each block's
  last batch norm, as trained ResNets have), ResNet-50 / ResNet-152 sized: float64 2e-15 / 2e-14
  (onnx.reference), float32 1.7e-6 / 5.7e-6 (onnxruntime), float16 1.5e-3 / 4.1e-3 (onnxruntime;
  torch's CPU float16 arithmetic gives 3e-3 / 8e-3), bfloat16 2.3e-2 / 6.6e-2 (onnx.reference;
  torch's arithmetic gives 2.5e-2 / 5.5e-2);
* ill-conditioned stress (data-measured statistics with gamma ~ 1 everywhere, so every weight
  perturbation is strongly amplified): float32 ResNet-50 2e-5, ResNet-101 8e-5, ResNet-152 1.7e-4;
  float16 ResNet-50 2e-2. Here the float32 original itself is off from float64 arithmetic by as much
  (1.3e-4 for ResNet-152), so no output comparison can tell the fold from rounding.

float32 ``rtol = atol_factor = 1e-4``: the trained-like ResNet-152 needs 3% of the default atol, the
stress ResNet-50 14% and ResNet-101 75%; the stress ResNet-152 fails (it needs 1.5x). Looser would
let real errors through: a 1% error in one channel's scale of one folded layer of a small ResNet
(tests) moves the output by 7x (last block) and 34x (a middle block) the default atol. float16 and
bfloat16 noise is dominated by rounding the folded weights (steps of 2**-11 and 2**-8), so their
factors are set to about 5x and 2.3x the trained-like ResNet-152 noise (it needs 18% and 41% of the
default atol); deeper or ill-conditioned float16/bfloat16 models may need an explicit ``atol``, and
these dtypes can only catch gross errors. float64 keeps 1e-9 / 1e-10: four orders of magnitude above
its noise, far below any real error. A limit of any output comparison: an error confined to one
channel of a late layer of a wide network can be as small as the noise (in the stress ResNet-50, 1% on
one of the last block's 2048 channels moved the output by 4e-5 of its scale).
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import ModelProto, TensorProto, helper
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun
from onnx.reference.ops.op_batch_normalization import BatchNormalization_9
from onnx.reference.ops.op_conv_transpose import ConvTranspose as ReferenceConvTranspose

from bnfold.core.report import render_table
from bnfold.errors import InputError
from bnfold.onnx.store.external import (
    HeldTensors,
    held_array,
    held_value,
    is_external,
    model_tensors,
    payload_bytes,
)
from bnfold.onnx.store.io import PROTOBUF_LIMIT, check_supported, read_model_lazy, staged_file


@dataclass(frozen=True, eq=False)  # arrays have no truth value to compare by
class UnwrittenModel:
    """A model as a fold leaves it, not written to any file: its external tensors are in the files it was read
    from, under ``base_dir``, and the values in ``held`` are beside ``proto``: arrays, or deferred products
    computed when a session needs them (see :data:`~bnfold.onnx.store.external.HeldTensors`). onnxruntime takes
    every weight where it is, so verifying such a model neither writes nor copies one."""

    proto: ModelProto
    base_dir: Path | None = None
    held: HeldTensors = field(default_factory=dict)

    def held_array(self, name: str) -> np.ndarray:
        """A held value as an array for onnxruntime to compute with in place. A deferred product is computed
        once and replaces itself in ``held``: the array must live as long as the model (which outlives its
        sessions), and the fold's result then writes it without computing it again."""
        value = self.held[name]
        if not isinstance(value, np.ndarray):
            value = self.held[name] = held_array(value)
        return value

    def compute_deferred(self) -> None:
        """Every deferred product computed now (see :meth:`held_array`)."""
        for name in list(self.held):
            self.held_array(name)


ModelSource = ModelProto | UnwrittenModel | str | os.PathLike[str]
Feeds = Mapping[str, np.ndarray]
InputsArg = Feeds | Sequence[Feeds | str | os.PathLike[str]] | str | os.PathLike[str] | None
Progress = Callable[[str, int, int], None]

#: dtype name -> (rtol, atol_factor); see the module docstring for how they were measured.
DEFAULT_TOLERANCES: dict[str, tuple[float, float]] = {
    "float64": (1e-9, 1e-10),
    "float32": (1e-4, 1e-4),
    "float16": (1e-2, 2e-2),
    "bfloat16": (5e-2, 1.5e-1),
}

#: The most bytes one generated input may take: a model that declares more is refused, not allocated.
GENERATED_INPUT_LIMIT = 4 << 30

ENGINE_ORT = "onnxruntime"
ENGINE_REFERENCE = "onnx.reference"


def default_tolerances(dtype: Any) -> tuple[float, float]:
    """``(rtol, atol_factor)`` for outputs of ``dtype`` (a numpy dtype, type or name such as "bfloat16")."""
    name = dtype if isinstance(dtype, str) else np.dtype(dtype).name
    if name not in DEFAULT_TOLERANCES:
        raise InputError(f"no default tolerance for dtype {name}; give both rtol and atol")
    return DEFAULT_TOLERANCES[name]


@dataclass
class OutputComparison:
    """How one output of the candidate compares with the original's, over all iterations."""

    name: str
    dtype: str
    shape: list[int]
    max_abs_error: float
    max_rel_error: float
    mean_abs_error: float
    required_atol: float
    required_rtol: float
    atol: float
    rtol: float
    mismatched: int
    total: int
    passed: bool

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe: an infinite figure (e.g. ``required_rtol`` when a zero reference is missed) is null."""
        return {key: _json_number(value) for key, value in asdict(self).items()}


@dataclass
class VerifyReport:
    """The verdict of :func:`verify_onnx`: one :class:`OutputComparison` per output of the models."""

    outputs: list[OutputComparison]
    iterations: int
    engine: str
    seconds: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(output.passed for output in self.outputs)

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "engine": self.engine,
            "iterations": self.iterations,
            "outputs": [output.to_dict() for output in self.outputs],
            "seconds": {stage: round(value, 6) for stage, value in self.seconds.items()},
            "notes": list(self.notes),
        }

    def render(self) -> str:
        table = render_table(
            ["output", "dtype", "shape", "max abs err", "max rel err", "mean abs err", "atol", "rtol",
             "needs atol", "needs rtol", "mismatched", "result"],
            [
                [o.name, o.dtype, "x".join(map(str, o.shape)) or "scalar", _fmt(o.max_abs_error),
                 _fmt(o.max_rel_error), _fmt(o.mean_abs_error), _fmt(o.atol), _fmt(o.rtol),
                 _fmt(o.required_atol), _fmt(o.required_rtol), f"{o.mismatched}/{o.total}",
                 "ok" if o.passed else "FAIL"]
                for o in self.outputs
            ],
        )
        lines = [table, *(f"note: {note}" for note in self.notes)]
        runs = f"{self.iterations} iteration{'s' if self.iterations != 1 else ''} under {self.engine}"
        failed = [o.name for o in self.outputs if not o.passed]
        if failed:
            lines.append(f"FAILED: {len(failed)} of {len(self.outputs)} outputs differ beyond tolerance "
                         f"({', '.join(failed)}), {runs}")
        else:
            lines.append(f"PASSED: all {len(self.outputs)} outputs within tolerance, {runs}")
        return "\n".join(lines)


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
    """Run ``original`` and ``candidate`` on the same inputs and compare every output (module docstring).

    Each model is a path, an ``onnx.ModelProto`` or an :class:`UnwrittenModel`, which must stay unchanged
    (held arrays included) until this returns.
    ``inputs``: None (random inputs, ``iterations`` draws from ``numpy.random.default_rng(seed)``), a
    ``.npz`` path, a mapping name -> array, or a sequence of those (one per iteration). ``input_shapes``
    fixes dynamic dims of generated inputs (others become 1, with a note). ``rtol``/``atol`` override the
    dtype defaults; ``atol`` is then absolute. ``progress(stage, done, total)`` is called per iteration.
    Raises :class:`InputError` for unusable models, mismatched interfaces or bad inputs.
    """
    for label, value in (("rtol", rtol), ("atol", atol)):
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise InputError(f"{label} must be a finite number >= 0, got {value}")
    notes: list[str] = []
    sources = {"original": original, "candidate": candidate}
    protos = {role: _load_interface(role, source) for role, source in sources.items()}
    model_inputs = _check_interfaces(protos["original"], protos["candidate"])
    output_names = [output.name for output in protos["original"].graph.output]

    if inputs is None:
        if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
            raise InputError(f"iterations must be an integer >= 1, got {iterations!r}")
        shapes = _generated_shapes(model_inputs, input_shapes or {}, notes)
        feed_sets: Iterator[dict[str, np.ndarray]] = _generate(model_inputs, shapes, iterations, seed)
        total = iterations
    else:
        if input_shapes:
            raise InputError("input_shapes applies to generated inputs only; the given inputs have their shapes")
        given = _user_feeds(inputs, model_inputs)
        feed_sets, total = iter(given), len(given)

    with contextlib.ExitStack() as staged_files:
        engine, references, candidates, seconds = _run_models(
            sources, protos, output_names, feed_sets, total, notes, staged_files, progress)
    outputs = [_compare(name, references[name], candidates[name], rtol, atol, notes) for name in output_names]
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
        if isinstance(source, UnwrittenModel) and _opens_in_place(source):
            source.compute_deferred()
    computed = time.perf_counter()
    engine, runners = _open_runners(sources, protos, notes, staged_files)
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


# --- models and their interfaces -------------------------------------------------------------------

@dataclass(frozen=True)
class _TensorSpec:
    name: str
    elem_type: int
    dims: tuple[int | str | None, ...] | None  # int static, str symbolic, None unnamed; None = unknown rank

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(helper.tensor_dtype_to_np_dtype(self.elem_type))

    @property
    def type_name(self) -> str:
        return self.dtype.name

    def describe_shape(self) -> str:
        if self.dims is None:
            return "unknown rank"
        return "[" + ", ".join("?" if d is None else str(d) for d in self.dims) + "]"


def _load_interface(role: str, source: ModelSource) -> ModelProto:
    """The model's proto; from a path without its weights (external data, and inline tensors left in the
    file: see ``read_model_lazy``), which only the engines need, but with every external location checked
    first, so no engine is ever pointed outside the model's directory."""
    if isinstance(source, (ModelProto, UnwrittenModel)):
        proto = source if isinstance(source, ModelProto) else source.proto
        try:
            check_supported(proto)
        except InputError as error:
            raise InputError(f"the {role} model: {error}") from None
        return proto
    if not isinstance(source, (str, os.PathLike)):
        raise InputError(f"the {role} model must be an onnx.ModelProto, an UnwrittenModel or a path, "
                         f"got {type(source).__name__}")
    try:
        return read_model_lazy(source)
    except InputError as error:
        raise InputError(f"the {role} model {error}") from None


def _graph_inputs(model: ModelProto) -> list[_TensorSpec]:
    """The inputs a caller feeds: graph inputs that are not initializers (old exporters list both)."""
    initializers = {tensor.name for tensor in model.graph.initializer}
    specs = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        if value.type.WhichOneof("value") != "tensor_type":
            raise InputError(f"input '{value.name}' is not a tensor; only tensor inputs are supported")
        specs.append(_spec(value))
    return specs


def _spec(value: onnx.ValueInfoProto) -> _TensorSpec:
    tensor_type = value.type.tensor_type
    dims = None
    if tensor_type.HasField("shape"):
        dims = tuple(
            dim.dim_value if dim.WhichOneof("value") == "dim_value"
            else dim.dim_param if dim.WhichOneof("value") == "dim_param" else None
            for dim in tensor_type.shape.dim
        )
    return _TensorSpec(value.name, tensor_type.elem_type, dims)


def _check_interfaces(original: ModelProto, candidate: ModelProto) -> list[_TensorSpec]:
    """The original's inputs, once both models are known to take and return the same named tensors."""
    original_inputs, candidate_inputs = _graph_inputs(original), _graph_inputs(candidate)
    original_types = {spec.name: spec.elem_type for spec in original_inputs}
    candidate_types = {spec.name: spec.elem_type for spec in candidate_inputs}
    if original_types.keys() != candidate_types.keys():
        raise InputError(f"the models take different inputs: original {_names(original_types)}, "
                         f"candidate {_names(candidate_types)}")
    for name, elem_type in original_types.items():
        if candidate_types[name] != elem_type:
            raise InputError(f"input '{name}' is {_type_name(elem_type)} in the original "
                             f"but {_type_name(candidate_types[name])} in the candidate")
    candidate_specs = {spec.name: spec for spec in candidate_inputs}
    for spec in original_inputs:
        other = candidate_specs[spec.name]
        if _shapes_conflict(spec.dims, other.dims):
            raise InputError(f"input '{spec.name}' has shape {spec.describe_shape()} in the original but "
                             f"{other.describe_shape()} in the candidate; no input fits both")
    original_outputs = [output.name for output in original.graph.output]
    candidate_outputs = [output.name for output in candidate.graph.output]
    if set(original_outputs) != set(candidate_outputs):
        raise InputError(f"the models return different outputs: original {_names(original_outputs)}, "
                         f"candidate {_names(candidate_outputs)}")
    # What the models declare must agree; what they compute is the comparison's to judge.
    declared = {value.name: _spec(value) for value in candidate.graph.output
                if value.type.WhichOneof("value") == "tensor_type"}
    for value in original.graph.output:
        other = declared.get(value.name)
        if other is None or value.type.WhichOneof("value") != "tensor_type":
            continue
        spec = _spec(value)
        if spec.elem_type and other.elem_type and spec.elem_type != other.elem_type:
            raise InputError(f"output '{spec.name}' is {_type_name(spec.elem_type)} in the original "
                             f"but {_type_name(other.elem_type)} in the candidate")
        if _shapes_conflict(spec.dims, other.dims):
            raise InputError(f"output '{spec.name}' has shape {spec.describe_shape()} in the original but "
                             f"{other.describe_shape()} in the candidate")
    return original_inputs


def _shapes_conflict(first: tuple[int | str | None, ...] | None, second: tuple[int | str | None, ...] | None) -> bool:
    if first is None or second is None:
        return False
    return len(first) != len(second) or any(
        isinstance(a, int) and isinstance(b, int) and a != b for a, b in zip(first, second, strict=True))


# --- inputs --------------------------------------------------------------------------------------

def _generated_shapes(
    specs: list[_TensorSpec], input_shapes: Mapping[str, Sequence[int]], notes: list[str]
) -> dict[str, tuple[int, ...]]:
    """Concrete shapes for generated inputs: static dims as declared, dynamic dims from ``input_shapes``,
    else 1 (noted). Inputs of a type no generator covers (strings, complex) are refused.

    A symbolic dim given through one input's shape is reused for the same symbol elsewhere, so that
    inputs sharing e.g. a batch dim ``N`` stay consistent.
    """
    by_name = {spec.name: spec for spec in specs}
    unknown = sorted(set(input_shapes) - by_name.keys())
    if unknown:
        raise InputError(f"input_shapes names unknown input(s) {', '.join(unknown)}; "
                         f"model inputs: {', '.join(by_name) or 'none'}")
    for spec in specs:
        if spec.dtype.kind not in "biu" and not _is_float(spec.dtype):
            raise InputError(f"cannot generate values for input '{spec.name}' of type "
                             f"{_type_name(spec.elem_type)}; pass inputs")
    shapes: dict[str, tuple[int, ...]] = {}
    symbols: dict[str, tuple[int, str]] = {}
    for name, given in input_shapes.items():
        shape = _checked_shape(by_name[name], given, "input_shapes gives")
        shapes[name] = shape
        for dim, size in zip(by_name[name].dims or (), shape, strict=False):
            if isinstance(dim, str):
                symbols.setdefault(dim, (size, name))
    for spec in specs:
        if spec.name in shapes:
            continue
        if spec.dims is None:
            raise InputError(f"input '{spec.name}' has no declared shape; give it in input_shapes")
        shape = []
        for axis, dim in enumerate(spec.dims):
            if isinstance(dim, int):
                shape.append(dim)
                continue
            label = f"'{dim}'" if dim else str(axis)
            size, source = symbols.get(dim, (1, "")) if dim else (1, "")
            origin = f" (as given for input '{source}')" if source else ""
            notes.append(f"dynamic dim {label} of input '{spec.name}' set to {size}{origin}")
            shape.append(size)
        shapes[spec.name] = tuple(shape)
    for spec in specs:
        size = math.prod(shapes[spec.name]) * spec.dtype.itemsize
        if size > GENERATED_INPUT_LIMIT:
            raise InputError(f"input '{spec.name}' of shape {list(shapes[spec.name])} would need {size / 2**30:.3g} "
                             f"GiB of random values; give a smaller shape in input_shapes, or pass inputs")
    return shapes


def _checked_shape(spec: _TensorSpec, shape: Sequence[int], what: str) -> tuple[int, ...]:
    """``shape`` as a tuple, if it fits the declared rank and static dims of ``spec``."""
    try:
        dims = tuple(int(size) for size in shape)
    except (TypeError, ValueError):
        raise InputError(f"{what} a non-integer shape {shape!r} for input '{spec.name}'") from None
    fits = all(size >= 0 for size in dims) and (spec.dims is None or (
        len(dims) == len(spec.dims)
        and all(not isinstance(d, int) or d == size for d, size in zip(spec.dims, dims, strict=True))))
    if not fits:
        raise InputError(f"{what} shape [{', '.join(map(str, dims))}] for input '{spec.name}', "
                         f"which the model declares as {spec.describe_shape()}")
    return dims


def _generate(
    specs: list[_TensorSpec], shapes: Mapping[str, tuple[int, ...]], iterations: int, seed: int
) -> Iterator[dict[str, np.ndarray]]:
    """A fresh draw per iteration: floats standard normal, integers in [0, 2) as they are often
    indices, bools fair coin flips."""
    rng = np.random.default_rng(seed)
    for _ in range(iterations):
        feeds = {}
        for spec in specs:
            shape = shapes[spec.name]
            if spec.dtype.kind == "b":
                feeds[spec.name] = np.asarray(rng.random(shape) < 0.5)  # a 0-d draw is a scalar otherwise
            elif spec.dtype.kind in "iu":
                feeds[spec.name] = rng.integers(0, 2, size=shape).astype(spec.dtype)
            else:
                feeds[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
        yield feeds


def _user_feeds(inputs: InputsArg, specs: list[_TensorSpec]) -> list[dict[str, np.ndarray]]:
    """The caller's inputs as one validated mapping per iteration."""
    if isinstance(inputs, (str, os.PathLike, Mapping)):
        items: Sequence[Any] = [inputs]
    elif isinstance(inputs, Sequence):
        items = inputs
    else:
        raise InputError(f"inputs must be a .npz path, a mapping of arrays or a sequence of those, "
                         f"got {type(inputs).__name__}")
    if not items:
        raise InputError("inputs is an empty sequence; give at least one mapping of arrays")
    feed_sets = []
    for index, item in enumerate(items, start=1):
        where = f"inputs for iteration {index}" if len(items) > 1 else "inputs"
        if isinstance(item, (str, os.PathLike)):
            where = os.fspath(item)
            item = _read_npz(item)
        elif not isinstance(item, Mapping):
            raise InputError(f"{where} must be a mapping name -> array, got {type(item).__name__}")
        feed_sets.append(_validated(dict(item), specs, where))
    return feed_sets


def _read_npz(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    try:
        with open(path, "rb") as handle:
            is_zip = handle.read(2) == b"PK"  # every zip, the empty archive included
    except OSError as error:
        raise InputError(f"cannot read inputs {os.fspath(path)}: {error.strerror or error}") from None
    if not is_zip:  # np.load would try it as a pickle, and refuse it with a message about pickles
        raise InputError(f"{os.fspath(path)}: expected a .npz archive of named arrays (np.savez)")
    try:
        with np.load(path, allow_pickle=False) as archive:
            if not isinstance(archive, np.lib.npyio.NpzFile):
                raise InputError(f"{os.fspath(path)}: expected a .npz archive of named arrays")
            return {name: archive[name] for name in archive.files}
    except InputError:
        raise
    except Exception as error:  # noqa: BLE001 - unreadable or not numpy data: the user's file to fix
        raise InputError(f"cannot read inputs {os.fspath(path)}: {_first_line(error)}") from None


def _validated(feeds: dict[str, Any], specs: list[_TensorSpec], where: str) -> dict[str, np.ndarray]:
    expected = {spec.name: spec for spec in specs}
    missing = [name for name in expected if name not in feeds]
    if missing:
        raise InputError(f"{where} lack model input(s) {', '.join(missing)}")
    extra = sorted(set(feeds) - expected.keys())
    if extra:
        raise InputError(f"{where} have array(s) {', '.join(extra)} that are not model inputs "
                         f"({', '.join(expected)})")
    validated = {}
    for name, spec in expected.items():
        array = np.asarray(feeds[name])
        # np.savez stores ml_dtypes arrays (bfloat16, float8) as raw bytes; read them back as such.
        if array.dtype.kind == "V" and spec.dtype.kind == "V" and array.dtype.itemsize == spec.dtype.itemsize:
            array = array.view(spec.dtype)
        if array.dtype != spec.dtype:
            raise InputError(f"{where}: input '{name}' has dtype {array.dtype.name}, "
                             f"the model expects {spec.type_name}")
        _checked_shape(spec, array.shape, f"{where}: got")
        validated[name] = array
    return validated


# --- engines -------------------------------------------------------------------------------------

Runner = Callable[[list[str], Feeds], Sequence[Any]]


def _open_runners(
    sources: Mapping[str, ModelSource], protos: Mapping[str, ModelProto], notes: list[str],
    staged_files: contextlib.ExitStack,
) -> tuple[str, dict[str, Runner]]:
    bfloat16_tensor = next((
        value.name for proto in protos.values() for value in (*proto.graph.input, *proto.graph.output)
        if value.type.tensor_type.elem_type == TensorProto.BFLOAT16), None)
    if bfloat16_tensor is not None:
        notes.append(f"'{bfloat16_tensor}' is bfloat16, which onnxruntime's Python API cannot feed or fetch; "
                     f"both models ran under {ENGINE_REFERENCE}")
        return ENGINE_REFERENCE, {role: _reference_runner(role, sources[role]) for role in sources}
    sessions = {}
    for role in sources:
        try:
            sessions[role] = _ort_session(sources[role], staged_files)
        except Exception as error:  # noqa: BLE001 - sorted below into "no kernel" and "unusable model"
            message = _first_line(error)
            if "NOT_IMPLEMENTED" not in message and "Could not find an implementation" not in message:
                raise InputError(f"onnxruntime cannot load the {role} model: {message}") from None
            notes.append(f"onnxruntime lacks a kernel the {role} model needs ({message}); "
                         f"both models ran under {ENGINE_REFERENCE}")
            return ENGINE_REFERENCE, {role: _reference_runner(role, sources[role]) for role in sources}
    return ENGINE_ORT, {role: _ort_runner(role, session) for role, session in sessions.items()}


def _ort_session(source: ModelSource, staged_files: contextlib.ExitStack) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    # Errors reach the user once, through bnfold: onnxruntime logging one too would break the one line.
    options.log_severity_level = 4
    # The two sessions take turns: one's idle threads must not spin on the cores the other's run needs.
    options.add_session_config_entry("session.force_spinning_stop", "1")
    if isinstance(source, UnwrittenModel):
        if _opens_in_place(source):
            return _in_place_session(source, options)
        # Every weight in the staged file's aligned data file, which onnxruntime maps instead of copying.
        source = staged_files.enter_context(
            staged_file(source.proto, source.base_dir, source.held, external_threshold=0))
    # A path goes to onnxruntime as is, so external data (models over 2 GB) resolves next to the file.
    model = source.SerializeToString() if isinstance(source, ModelProto) else os.fspath(source)
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


# onnxruntime honours this option, which tells a model given as bytes where its external data is, from 1.21.
_EXTERNAL_DATA_FOLDER = "session.model_external_initializers_file_folder_path"
_EXTERNAL_DATA_FOLDER_SINCE = (1, 21)
# onnxruntime puts an array given to it in place of an initializer only if the model declares that initializer
# external. It never opens the location then; this one names no file, should that ever change.
_IN_MEMORY_LOCATION = "bnfold-held-in-memory"


def _opens_in_place(model: UnwrittenModel) -> bool:
    """Whether onnxruntime can take ``model`` as it is: what remains in its proto fits in one protobuf
    message, and if some tensors are on disk, onnxruntime can be told where."""
    in_proto = sum(payload_bytes(tensor) or 0 for tensor in model_tensors(model.proto)
                   if not is_external(tensor) and held_value(tensor, model.held) is None)
    if in_proto >= PROTOBUF_LIMIT:
        return False
    return model.base_dir is None or _ort_version() >= _EXTERNAL_DATA_FOLDER_SINCE


def _ort_version() -> tuple[int, ...]:
    return tuple(int(part) for part in ort.__version__.split(".")[:2] if part.isdigit())


def _in_place_session(model: UnwrittenModel, options: ort.SessionOptions) -> ort.InferenceSession:
    """A session on ``model`` that uses its held arrays in place, and reads its tensors on disk from
    ``base_dir``."""
    proto = ModelProto()
    proto.CopyFrom(model.proto)
    held: dict[str, np.ndarray] = {}
    for tensor in proto.graph.initializer:
        if held_value(tensor, model.held) is not None:
            value = held[tensor.name] = model.held_array(tensor.name)
            tensor.data_location = TensorProto.EXTERNAL
            for key, text in (("location", _IN_MEMORY_LOCATION), ("offset", "0"), ("length", str(value.nbytes))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, text
    if held:
        # onnxruntime computes with these arrays, not copies: they live in ``model``, which outlives the session.
        options.add_external_initializers(list(held), [ort.OrtValue.ortvalue_from_numpy(v) for v in held.values()])
    if model.base_dir is not None:
        options.add_session_config_entry(_EXTERNAL_DATA_FOLDER, os.fspath(model.base_dir))
    return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _ort_runner(role: str, session: ort.InferenceSession) -> Runner:
    def run(names: list[str], feeds: Feeds) -> Sequence[Any]:
        try:
            return session.run(names, dict(feeds))
        except Exception as error:  # noqa: BLE001 - a model that cannot run on these inputs
            raise InputError(f"onnxruntime failed to run the {role} model: {_first_line(error)}") from None
    return run


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
            return BatchNormalization_9._run(self, x, scale, bias, mean, var, epsilon=epsilon, momentum=momentum)
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
            return ReferenceConvTranspose._run(self, x, w, b, group=1, **attributes)
        inputs, outputs = x.shape[1] // groups, w.shape[1]
        parts = [
            ReferenceConvTranspose._run(
                self, x[:, g * inputs:(g + 1) * inputs], w[g * inputs:(g + 1) * inputs],
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


def _loaded(source: ModelSource) -> ModelProto:
    """``source`` with every tensor in memory, as onnx.reference needs it."""
    if isinstance(source, ModelProto):
        return source
    if isinstance(source, UnwrittenModel):
        with staged_file(source.proto, source.base_dir, source.held) as path:
            return onnx.load(os.fspath(path))
    # onnx.load on the path (not a file object) finds external data next to the model.
    return onnx.load(os.fspath(source))


def _reference_runner(role: str, source: ModelSource) -> Runner:
    try:
        evaluator = reference_evaluator(_loaded(source))
    except Exception as error:  # noqa: BLE001 - unsupported operator or unreadable data
        raise InputError(f"{ENGINE_REFERENCE} cannot load the {role} model: {_first_line(error)}") from None

    def run(names: list[str], feeds: Feeds) -> Sequence[Any]:
        try:
            return evaluator.run(names, dict(feeds))
        except Exception as error:  # noqa: BLE001 - a model that cannot run on these inputs
            raise InputError(f"{ENGINE_REFERENCE} failed to run the {role} model: {_first_line(error)}") from None
    return run


# --- comparison ----------------------------------------------------------------------------------

def _compare(
    name: str, references: list[np.ndarray], candidates: list[np.ndarray],
    rtol: float | None, atol: float | None, notes: list[str],
) -> OutputComparison:
    dtype = references[0].dtype
    shape = [int(size) for size in references[-1].shape]
    total = sum(reference.size for reference in references)
    for reference, candidate in zip(references, candidates, strict=True):
        if candidate.dtype != reference.dtype or candidate.shape != reference.shape:
            notes.append(f"output '{name}': the candidate returns {candidate.dtype.name} "
                         f"{list(candidate.shape)}, the original {reference.dtype.name} {list(reference.shape)}")
            return OutputComparison(name, dtype.name, shape, math.inf, math.inf, math.inf, math.inf, math.inf,
                                    0.0, 0.0, total, total, False)

    if not _is_float(dtype):
        # Integers and bools must match exactly; comparing natively keeps int64 beyond 2**53 exact.
        mismatched = sum(int(np.count_nonzero(c != r)) for r, c in zip(references, candidates, strict=True))
        statistics = _Statistics(rtol=0.0, atol=0.0)
        if dtype.kind in "biu":
            for reference, candidate in zip(references, candidates, strict=True):
                for ref, cand in zip(_float64_chunks(reference), _float64_chunks(candidate), strict=True):
                    statistics.add(ref, cand)
        elif mismatched:
            statistics.max_abs = statistics.max_rel = statistics.required_atol = math.inf
        return statistics.comparison(name, dtype.name, shape, mismatched, total)

    if rtol is None or atol is None:
        default_rtol, atol_factor = default_tolerances(dtype)
        rtol = default_rtol if rtol is None else rtol
        if atol is None:
            atol = atol_factor * _scale(references)
    statistics = _Statistics(rtol=rtol, atol=atol)
    nonfinite_mismatched = 0
    for reference, candidate in zip(references, candidates, strict=True):
        for ref, cand in zip(_float64_chunks(reference), _float64_chunks(candidate), strict=True):
            both_finite = np.isfinite(ref) & np.isfinite(cand)
            if both_finite.all():
                statistics.add(ref, cand)
                continue
            same_special = (np.isnan(ref) & np.isnan(cand)) | (np.isinf(ref) & (ref == cand))
            nonfinite_mismatched += int(np.count_nonzero(~both_finite & ~same_special))
            statistics.add(ref[both_finite], cand[both_finite])
    return statistics.comparison(name, dtype.name, shape, statistics.beyond + nonfinite_mismatched, total)


def _scale(references: list[np.ndarray]) -> float:
    """The largest finite magnitude of the reference output over all iterations, or 1 if that is 0."""
    largest = 0.0
    for reference in references:
        for values in _float64_chunks(reference):
            largest = max(largest, float(np.max(np.abs(values[np.isfinite(values)]), initial=0.0)))
    return largest or 1.0


# Elements compared at a time: their float64 copies stay in the CPU's cache, and no output, however large, is
# ever copied whole.
_COMPARE_CHUNK = 1 << 16


def _float64_chunks(array: np.ndarray) -> Iterator[np.ndarray]:
    """``array``'s elements in order, as float64 slices of at most ``_COMPARE_CHUNK``."""
    flat = array.reshape(-1)
    for start in range(0, flat.size, _COMPARE_CHUNK):
        yield flat[start:start + _COMPARE_CHUNK].astype(np.float64)


@dataclass
class _Statistics:
    """Running error figures over finite element pairs, at fixed tolerances."""

    rtol: float
    atol: float
    max_abs: float = 0.0
    max_rel: float = 0.0
    sum_abs: float = 0.0
    count: int = 0
    required_atol: float = 0.0
    required_rtol: float = 0.0
    beyond: int = 0

    def add(self, reference: np.ndarray, candidate: np.ndarray) -> None:
        if reference.size == 0:
            return
        error = np.abs(candidate - reference)
        magnitude = np.abs(reference)
        allowed_by_rtol = self.rtol * magnitude
        with np.errstate(divide="ignore", invalid="ignore"):
            # fmax passes over NaN, which is 0 / 0 here: a zero error, or a zero excess, at a zero reference
            # needs no tolerance; the initial 0 stands for those and for errors within atol (excess <= 0).
            relative = np.fmax.reduce(error / magnitude, initial=0.0)
            needed_rtol = np.fmax.reduce((error - self.atol) / magnitude, initial=0.0)
        self.max_abs = max(self.max_abs, float(error.max()))
        self.max_rel = max(self.max_rel, float(relative))
        self.sum_abs += float(error.sum())
        self.count += error.size
        self.required_atol = max(self.required_atol, float((error - allowed_by_rtol).max()))
        self.required_rtol = max(self.required_rtol, float(needed_rtol))
        self.beyond += int(np.count_nonzero(error > self.atol + allowed_by_rtol))

    def comparison(self, name: str, dtype: str, shape: list[int], mismatched: int, total: int) -> OutputComparison:
        mean_abs = self.sum_abs / self.count if self.count else 0.0
        return OutputComparison(name, dtype, shape, self.max_abs, self.max_rel, mean_abs, self.required_atol,
                                self.required_rtol, self.atol, self.rtol, mismatched, total, mismatched == 0)


# --- small helpers -------------------------------------------------------------------------------

def _is_float(dtype: np.dtype) -> bool:
    """numpy floats and the ml_dtypes ones onnx uses (bfloat16, float8 variants), which numpy calls 'V'."""
    return dtype.kind == "f" or dtype.name.startswith(("bfloat", "float"))


def _type_name(elem_type: int) -> str:
    return TensorProto.DataType.Name(elem_type).lower()


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]


def _names(names: Any) -> str:
    return "[" + ", ".join(sorted(names)) + "]"


def _fmt(value: float) -> str:
    return f"{value:.3g}" if math.isfinite(value) else "inf"


def _json_number(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


__all__ = ["DEFAULT_TOLERANCES", "OutputComparison", "UnwrittenModel", "VerifyReport", "default_tolerances",
           "verify_onnx"]
