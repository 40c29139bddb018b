"""The inputs both models run on: generated from a seed (at the sizes :mod:`~bnfold.onnx.verify.sizes`
chooses), or the caller's arrays and files, validated against the original's interface."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from bnfold.errors import InputError
from bnfold.onnx.verify.input_files import Sample, check_array_header, check_input_names, read_samples
from bnfold.onnx.verify.interface import TensorSpec

Feeds = Mapping[str, np.ndarray]
InputsArg = Feeds | Sequence[Feeds | str | os.PathLike[str]] | str | os.PathLike[str] | None


def checked_shape(spec: TensorSpec, shape: Sequence[int], what: str) -> tuple[int, ...]:
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
    specs: list[TensorSpec], shapes: Mapping[str, tuple[int, ...]], iterations: int, seed: int, stream: int = 0,
) -> Iterator[dict[str, np.ndarray]]:
    """A fresh draw per iteration from ``seed`` (any integer, negative ones too) and ``stream`` (one per
    size tried): floats standard normal, integers in [0, 2) as they are often indices, bools fair coin
    flips. Each array is drawn in its own dtype (floats other than float32 and float64 through float32
    chunks), never through a float64 array the size of the input or larger."""
    rng = np.random.default_rng([seed % 2**64, stream])
    for _ in range(iterations):
        feeds = {}
        for spec in specs:
            shape = shapes[spec.name]
            if spec.dtype.kind == "b":
                feeds[spec.name] = rng.integers(0, 2, size=shape, dtype=np.uint8).view(np.bool_)
            elif spec.dtype.kind in "iu":
                feeds[spec.name] = rng.integers(0, 2, size=shape, dtype=spec.dtype)
            else:
                feeds[spec.name] = _standard_normal(rng, shape, spec.dtype)
        yield feeds


_DRAW_CHUNK = 1 << 20


def _standard_normal(rng: np.random.Generator, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    if dtype in (np.float32, np.float64):
        return rng.standard_normal(shape, dtype=dtype)
    values = np.empty(shape, dtype)
    flat = values.reshape(-1)
    for start in range(0, flat.size, _DRAW_CHUNK):
        stop = min(start + _DRAW_CHUNK, flat.size)
        flat[start:stop] = rng.standard_normal(stop - start, dtype=np.float32).astype(dtype)
    return values


def user_feeds(inputs: InputsArg, specs: list[TensorSpec], output_names: Sequence[str] = ()) -> list[Sample]:
    """The caller's inputs as one validated sample per run: each item a mapping name -> array, or a path
    (:func:`~bnfold.onnx.verify.input_files.read_samples`: .npz, .pb, test_data_set directories)."""
    if isinstance(inputs, (str, os.PathLike, Mapping)):
        items: Sequence[Any] = [inputs]
    elif isinstance(inputs, Sequence):
        items = inputs
    else:
        raise InputError(f"inputs must be a path (.npz, .pb, test_data_set directory), a mapping of arrays "
                         f"or a sequence of those, got {type(inputs).__name__}")
    if not items:
        raise InputError("inputs is an empty sequence; give at least one mapping of arrays")
    samples = []
    for index, item in enumerate(items, start=1):
        if isinstance(item, (str, os.PathLike)):
            samples.extend(read_samples(item, specs, list(output_names)))
        elif isinstance(item, Mapping):
            samples.append(Sample(dict(item), f"inputs for iteration {index}" if len(items) > 1 else "inputs"))
        else:
            raise InputError(f"inputs for iteration {index} must be a mapping name -> array or a path, "
                             f"got {type(item).__name__}")
    for sample in samples:
        sample.feeds = _validated(sample.feeds, specs, sample.source)
    return samples


def _validated(feeds: dict[str, Any], specs: list[TensorSpec], where: str) -> dict[str, np.ndarray]:
    check_input_names(feeds, specs, where)
    expected = {spec.name: spec for spec in specs}
    validated = {}
    for name, spec in expected.items():
        array = np.asarray(feeds[name])
        check_array_header(spec, array.shape, array.dtype, where)
        if not array.dtype.isnative:  # a big-endian array (saved on another machine): the engines need native
            array = array.astype(array.dtype.newbyteorder("="))
        # np.savez stores ml_dtypes arrays (bfloat16, float8) as raw bytes; read them back as such.
        if array.dtype.kind == "V" and spec.dtype.kind == "V":
            array = array.view(spec.dtype)
        if array.size == 0:
            raise InputError(f"{where}: input '{name}' has no element (shape {list(array.shape)}); "
                             f"a run on it would compare nothing")
        validated[name] = array
    return validated
