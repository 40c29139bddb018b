"""The sizes generated inputs take: static dims as declared, dynamic dims as the caller gives them, else
from a short ladder of sizes models are commonly run at.

A dynamic dim set to 1 hides faults (a 3x3 kernel whose corner taps a 1x1 image never reads) and many models
cannot run at 1 at all (a detector's Resize, a spectrogram's window). So each dynamic dim has a role --
``batch`` (axis 0 of a tensor of rank 2 or more), ``spatial`` (axis 2 and on of a tensor of rank 3 or more)
or ``other`` (a sequence, a sample count) -- and the ladder gives each role a size per rung. Verification
takes the first rung the original model runs at, then one more at a second size (batch 2, the next rung), so
that a fault that shows only at some size has two chances to show.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import NamedTuple

from bnfold.core.compare import is_float
from bnfold.errors import InputError
from bnfold.onnx.store import limits
from bnfold.onnx.verify.inputs import checked_shape
from bnfold.onnx.verify.interface import TensorSpec, type_name

Shapes = dict[str, tuple[int, ...]]


class Plan(NamedTuple):
    """Shapes for every input, at one batch size and one rung of :data:`LADDER`."""

    batch: int
    rung: int
    shapes: Shapes

#: (spatial, other) per rung: image sizes that divide by 32 (detectors downsample 5 times), then lengths for
#: sequences and audio (a window of 400 to 1024 samples needs more than 256); 1 last, as a model may need it.
LADDER: tuple[tuple[int, int], ...] = ((224, 16), (256, 64), (320, 256), (640, 1024), (32, 16000), (1, 1))


def dynamic_dims(spec: TensorSpec) -> list[int]:
    return [] if spec.dims is None else [axis for axis, dim in enumerate(spec.dims) if not isinstance(dim, int)]


def _role(spec: TensorSpec, axis: int) -> str:
    rank = len(spec.dims or ())
    if axis == 0 and rank >= 2:
        return "batch"
    return "spatial" if rank >= 3 and axis >= 2 else "other"


def size_plans(specs: list[TensorSpec], input_shapes: Mapping[str, Sequence[int]]) -> list[Plan]:
    """Candidate shapes for every input, best first: one per rung of :data:`LADDER` at batch 1, then the same
    at batch 2 (:func:`second_size` picks among those). Dims given in ``input_shapes`` are kept in every plan
    (and reused for the same symbol in other inputs); without a dynamic dim there is one plan."""
    by_name = {spec.name: spec for spec in specs}
    unknown = sorted(set(input_shapes) - by_name.keys())
    if unknown:
        raise InputError(f"input_shapes names unknown input(s) {', '.join(unknown)}; "
                         f"model inputs: {', '.join(by_name) or 'none'}")
    for spec in specs:
        if spec.dtype.kind not in "biu" and not is_float(spec.dtype):
            raise InputError(f"cannot generate values for input '{spec.name}' of type "
                             f"{type_name(spec.elem_type)}; pass inputs")
        if spec.dims is None and spec.name not in input_shapes:
            raise InputError(f"input '{spec.name}' has no declared shape; give it with --input-shape "
                             f"(input_shapes) or pass inputs")
    given = {name: checked_shape(by_name[name], shape, "input_shapes gives") for name, shape in input_shapes.items()}
    _check_given(given, by_name)
    symbols: dict[str, int] = {}
    for name, shape in given.items():
        for dim, size in zip(by_name[name].dims or (), shape, strict=False):
            if isinstance(dim, str) and dim:
                symbols.setdefault(dim, size)
    free = any(dynamic_dims(spec) for spec in specs if spec.name not in given)
    plans: list[Plan] = []
    for batch in (1, 2) if free else (1,):
        for rung, sizes in enumerate(LADDER if free else LADDER[:1]):
            shapes = _plan(specs, given, dict(symbols), batch, sizes)
            if all(shapes != plan.shapes for plan in plans) and _fits(shapes, by_name):
                plans.append(Plan(batch, rung, shapes))
    if not plans:
        raise InputError(f"every size tried would need more than {limits.GENERATED_INPUT_LIMIT / 2**30:.3g} GiB of "
                         f"random values; give smaller shapes with --input-shape, or pass inputs")
    return plans


def _plan(specs: list[TensorSpec], given: Shapes, symbols: dict[str, int], batch: int,
          rung: tuple[int, int]) -> Shapes:
    sizes = {"batch": batch, "spatial": rung[0], "other": rung[1]}
    plan = {}
    for spec in specs:
        if spec.name in given:
            plan[spec.name] = given[spec.name]
            continue
        shape = []
        for axis, dim in enumerate(spec.dims or ()):
            if isinstance(dim, int):
                shape.append(dim)
            elif dim and dim in symbols:
                shape.append(symbols[dim])
            else:
                size = sizes[_role(spec, axis)]
                if dim:
                    symbols[dim] = size
                shape.append(size)
        plan[spec.name] = tuple(shape)
    return plan


def _fits(plan: Shapes, by_name: Mapping[str, TensorSpec]) -> bool:
    return all(math.prod(shape) * by_name[name].dtype.itemsize <= limits.GENERATED_INPUT_LIMIT
               for name, shape in plan.items())


def _check_given(given: Shapes, by_name: Mapping[str, TensorSpec]) -> None:
    """Refuse shapes the caller fixed that cannot give a useful run: too large, or without an element."""
    for name, shape in given.items():
        size = math.prod(shape) * by_name[name].dtype.itemsize
        if size > limits.GENERATED_INPUT_LIMIT:
            raise InputError(f"input '{name}' of shape {list(shape)} would need {size / 2**30:.3g} GiB of "
                             f"random values; give a smaller shape with --input-shape, or pass inputs")
        if 0 in shape:
            raise InputError(f"input '{name}' of shape {list(shape)} has no element: a run on it would "
                             f"compare nothing; give a size of at least 1")


def second_sizes(plans: list[Plan], first: Plan) -> list[Plan]:
    """Plans to try, in order, for a second size after ``first``: batch 2 at a later rung, batch 1 at a later
    rung, batch 2 at the same rung."""
    def preference(plan: Plan) -> tuple[int, int]:
        if plan.rung > first.rung:
            return (0 if plan.batch != first.batch else 1, plan.rung)
        return (2, plan.rung)
    return sorted((plan for plan in plans if plan.shapes != first.shapes
                   and (plan.rung > first.rung or plan.batch != first.batch)), key=preference)


def describe(shapes: Shapes, specs: list[TensorSpec]) -> dict[str, list[int]]:
    """The shapes of the inputs with dynamic dims, as a report lists them."""
    return {spec.name: list(shapes[spec.name]) for spec in specs if dynamic_dims(spec)}
