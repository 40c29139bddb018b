"""The inputs both models run on: generated from a seed, or the caller's arrays and .npz files, validated
against the original's interface."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from bnfold.core.compare import is_float
from bnfold.errors import InputError, first_line
from bnfold.onnx.store import limits
from bnfold.onnx.verify.interface import TensorSpec, type_name

Feeds = Mapping[str, np.ndarray]
InputsArg = Feeds | Sequence[Feeds | str | os.PathLike[str]] | str | os.PathLike[str] | None


def generated_shapes(
    specs: list[TensorSpec], input_shapes: Mapping[str, Sequence[int]], notes: list[str]
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
        if spec.dtype.kind not in "biu" and not is_float(spec.dtype):
            raise InputError(f"cannot generate values for input '{spec.name}' of type "
                             f"{type_name(spec.elem_type)}; pass inputs")
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
        sizes = []
        for axis, dim in enumerate(spec.dims):
            if isinstance(dim, int):
                sizes.append(dim)
                continue
            label = f"'{dim}'" if dim else str(axis)
            size, source = symbols.get(dim, (1, "")) if dim else (1, "")
            origin = f" (as given for input '{source}')" if source else ""
            notes.append(f"dynamic dim {label} of input '{spec.name}' set to {size}{origin}")
            sizes.append(size)
        shapes[spec.name] = tuple(sizes)
    for spec in specs:
        size = math.prod(shapes[spec.name]) * spec.dtype.itemsize
        if size > limits.GENERATED_INPUT_LIMIT:
            raise InputError(f"input '{spec.name}' of shape {list(shapes[spec.name])} would need {size / 2**30:.3g} "
                             f"GiB of random values; give a smaller shape in input_shapes, or pass inputs")
    return shapes


def _checked_shape(spec: TensorSpec, shape: Sequence[int], what: str) -> tuple[int, ...]:
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


def generate(
    specs: list[TensorSpec], shapes: Mapping[str, tuple[int, ...]], iterations: int, seed: int
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


def user_feeds(inputs: InputsArg, specs: list[TensorSpec]) -> list[dict[str, np.ndarray]]:
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
        raise InputError(f"cannot read inputs {os.fspath(path)}: {first_line(error)}") from None


def _validated(feeds: dict[str, Any], specs: list[TensorSpec], where: str) -> dict[str, np.ndarray]:
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

