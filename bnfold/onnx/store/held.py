"""Values a fold wrote into the main graph, kept beside the proto instead of in it.

Each copy of a 200 MB model's weights into and out of protobuf costs a tenth of a second, so a folded
weight stays a numpy array, or a weight scaled from the model's file that is computed only as it is written
(:class:`~bnfold.onnx.store.deferred.RoundedProduct`). Its tensor in the proto keeps its name, dtype and
dims, and no data.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import BinaryIO

import numpy as np
from onnx import TensorProto, helper

from bnfold.onnx.store import limits
from bnfold.onnx.store.deferred import RoundedProduct
from bnfold.onnx.store.external import check_sources_intact, is_external

# Held values by the name of their tensor.
HeldValue = np.ndarray | RoundedProduct
HeldTensors = dict[str, HeldValue]


def held_value(tensor: TensorProto, held: HeldTensors | None) -> HeldValue | None:
    """``tensor``'s value if it is held in ``held``: a tensor of that name without any data of its own."""
    if not held or tensor.name not in held or is_external(tensor) or tensor.HasField("raw_data"):
        return None
    return held[tensor.name]


def clear_value(tensor: TensorProto) -> None:
    """Clear what ``tensor`` holds, keep what describes it (doc_string, metadata_props, fields this onnx does
    not know): a folded weight is the same parameter, scaled."""
    for field in _VALUE_FIELDS:
        tensor.ClearField(field)


def hold(tensor: TensorProto, value: HeldValue, name: str, held: HeldTensors) -> None:
    """Make ``tensor`` a data-less ``name`` of ``value``'s dtype and shape, its value held in ``held``."""
    clear_value(tensor)
    tensor.name = name
    tensor.data_type = helper.np_dtype_to_tensor_dtype(value.dtype)
    tensor.dims.extend(value.shape)
    if isinstance(value, np.ndarray):
        value = np.ascontiguousarray(value, dtype=value.dtype.newbyteorder("<"))
    held[name] = value


def holdable(value: HeldValue, held: HeldTensors | None) -> bool:
    return held is not None and value.nbytes >= limits.HELD_MIN_BYTES and value.dtype in _HOLDABLE_DTYPES


def held_array(value: HeldValue) -> np.ndarray:
    """A held value as one array (a deferred product computed now, once its source is checked)."""
    if isinstance(value, np.ndarray):
        return value
    check_held_sources([value])
    return np.asarray(value)


def write_held(value: HeldValue, out: BinaryIO) -> None:
    """Append a held value's raw bytes to ``out``; a deferred product a block at a time."""
    for block in (value,) if isinstance(value, np.ndarray) else value.blocks():
        out.write(memoryview(block).cast("B"))  # type: ignore[arg-type]  # an ndarray is a buffer


def check_held_sources(values: Iterable[HeldValue]) -> None:
    """Refuse to go on if a file that ``values`` (or the weights a deferred product scales) view through a
    mapping has shrunk since it was mapped (``external.check_sources_intact``)."""
    check_sources_intact(value if isinstance(value, np.ndarray) else value.weight for value in values)


_VALUE_FIELDS = ("dims", "data_type", "segment", "float_data", "int32_data", "string_data", "int64_data",
                 "raw_data", "double_data", "uint64_data", "external_data", "data_location")
_HOLDABLE_DTYPES = {np.dtype(np.float32), np.dtype(np.float64), np.dtype(np.float16)}
