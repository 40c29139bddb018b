"""Tensor data kept in external files: where each tensor's bytes are, checked before a byte is read.

A ``location`` is honoured only if it is relative, stays inside the model's directory once symlinks are
followed, names a regular file, and the tensor's byte range lies within that file and matches its dtype
and dims. Anything else raises :class:`InputError` with one line. The checks run again on every read, so a
model edited after loading cannot send a read elsewhere.
"""

from __future__ import annotations

import errno
import functools
import io
import math
import mmap
import os
import stat
import weakref
from collections.abc import Iterable, Iterator
from pathlib import Path, PureWindowsPath
from typing import BinaryIO, NamedTuple

import numpy as np
from onnx import AttributeProto, GraphProto, ModelProto, TensorProto, helper, numpy_helper

from bnfold.errors import InputError
from bnfold.onnx.store import limits

_SUB_BYTE_BITS = {
    getattr(TensorProto, name): bits
    for name, bits in (("INT4", 4), ("UINT4", 4), ("FLOAT4E2M1", 4), ("INT2", 2), ("UINT2", 2),
                       ("FLOAT6E2M3", 6), ("FLOAT6E3M2", 6))
    if hasattr(TensorProto, name)
}


def payload_bytes(tensor: TensorProto) -> int | None:
    """How many bytes ``tensor``'s raw data has; None for strings and unknown types."""
    if tensor.data_type == TensorProto.STRING:
        return None
    bits = _element_bits(tensor.data_type)
    if bits is None:
        return None
    count = 1
    for dim in tensor.dims:
        count *= dim
    return (count * bits + 7) // 8


@functools.cache
def _element_bits(data_type: int) -> int | None:
    bits = _SUB_BYTE_BITS.get(data_type)
    if bits is not None:
        return bits
    try:
        return 8 * helper.tensor_dtype_to_np_dtype(data_type).itemsize
    except (KeyError, ValueError, TypeError):
        return None


def is_external(tensor: TensorProto) -> bool:
    return tensor.data_location == TensorProto.EXTERNAL


# Attribute types that hold tensors, directly or in subgraphs (most attributes are numbers, lists or strings).
_TENSOR_ATTRIBUTES = frozenset({AttributeProto.TENSOR, AttributeProto.TENSORS, AttributeProto.SPARSE_TENSOR,
                                AttributeProto.SPARSE_TENSORS, AttributeProto.GRAPH, AttributeProto.GRAPHS})


def _attribute_tensors(attribute: AttributeProto) -> Iterator[TensorProto]:
    if attribute.type == AttributeProto.TENSOR:
        yield attribute.t
    elif attribute.type == AttributeProto.TENSORS:
        yield from attribute.tensors
    elif attribute.type == AttributeProto.SPARSE_TENSOR:
        yield from (attribute.sparse_tensor.values, attribute.sparse_tensor.indices)
    elif attribute.type == AttributeProto.SPARSE_TENSORS:
        for sparse in attribute.sparse_tensors:
            yield from (sparse.values, sparse.indices)
    elif attribute.type == AttributeProto.GRAPH:
        yield from graph_tensors(attribute.g)
    elif attribute.type == AttributeProto.GRAPHS:
        for graph in attribute.graphs:
            yield from graph_tensors(graph)


def graph_tensors(graph: GraphProto) -> Iterator[TensorProto]:
    """Every tensor of ``graph`` and its subgraphs, in a fixed order: initializers, then node attributes."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield from (sparse.values, sparse.indices)
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.type in _TENSOR_ATTRIBUTES:
                yield from _attribute_tensors(attribute)


def model_tensors(model: ModelProto) -> Iterator[TensorProto]:
    """Every tensor of the model: all graphs, then the model-local functions."""
    yield from graph_tensors(model.graph)
    for function in model.functions:
        for node in function.node:
            for attribute in node.attribute:
                if attribute.type in _TENSOR_ATTRIBUTES:
                    yield from _attribute_tensors(attribute)


class ExternalRef(NamedTuple):
    """A checked byte range of an existing file inside the model's directory."""

    path: str  # its real path (a string: a model has hundreds of these, and Path objects cost)
    offset: int
    length: int


def _entry_int(entries: dict[str, str], key: str, tensor: TensorProto) -> int | None:
    if key not in entries:
        return None
    try:
        value = int(entries[key])
    except ValueError:
        raise InputError(f"tensor {tensor.name!r}: external data {key} {entries[key]!r} is not an integer") from None
    if value < 0:
        raise InputError(f"tensor {tensor.name!r}: external data {key} {value} is negative")
    return value


def external_ref(tensor: TensorProto, base_dir: Path) -> ExternalRef:
    """Where ``tensor``'s bytes are, once every rule in the module docstring holds; never reads them."""
    return _checked_ref(tensor, base_dir, {})


def check_external_refs(tensors: Iterable[TensorProto], base_dir: Path) -> None:
    """:func:`external_ref` for many tensors at once, each file located once."""
    located: dict[str, tuple[str, int]] = {}
    for tensor in tensors:
        _checked_ref(tensor, base_dir, located)


def _checked_ref(tensor: TensorProto, base_dir: Path, located: dict[str, tuple[str, int]]) -> ExternalRef:
    entries = {entry.key: entry.value for entry in tensor.external_data}
    location = entries.get("location", "")
    name = tensor.name
    if not location:
        raise InputError(f"tensor {name!r} is marked as external data but names no file")
    if _is_absolute(location):
        raise InputError(f"tensor {name!r} has external data at an absolute path ({location!r})")
    if location not in located:
        located[location] = _locate(location, base_dir, name)
    target, size = located[location]
    expected = payload_bytes(tensor)
    if expected is None:
        raise InputError(f"tensor {name!r} of data type {tensor.data_type} cannot be stored as external data")
    offset = _entry_int(entries, "offset", tensor) or 0
    length = _entry_int(entries, "length", tensor)
    if offset > size:
        raise InputError(f"tensor {name!r}: external data offset {offset} is beyond the end of {location!r}")
    length = size - offset if length is None else length
    if offset + length > size:
        raise InputError(f"tensor {name!r}: external data in {location!r} is truncated "
                         f"({size - offset} of {length} bytes after offset {offset})")
    if length != expected:
        raise InputError(f"tensor {name!r}: external data has {length} bytes, its dtype and dims need {expected}")
    return ExternalRef(target, offset, length)


@functools.lru_cache(maxsize=1024)
def _is_absolute(location: str) -> bool:
    return os.path.isabs(location) or bool(PureWindowsPath(location).drive) or location.startswith("\\")


def _locate(location: str, base_dir: Path, name: str) -> tuple[str, int]:
    """The file ``location`` names, symlinks followed, and its size, if it is a regular file inside
    ``base_dir``. A path found inside before is taken again while it still leads to that same file (one
    ``stat``, not a walk of every component): a model keeps hundreds of tensors in one file."""
    key = (os.fspath(base_dir), location)
    approved = _APPROVED.get(key)
    if approved is not None:
        try:
            status = os.stat(os.path.join(*key))
        except (OSError, ValueError):
            status = None
        if status is not None and stat.S_ISREG(status.st_mode) and (status.st_dev, status.st_ino) == approved[1:]:
            return approved[0], status.st_size
    try:
        # Strings, not Paths: a large model has thousands of tensors.
        base = os.path.realpath(base_dir)
        target = os.path.realpath(os.path.join(base, location))
        if target == base or os.path.commonpath([base, target]) != base:
            raise InputError(f"tensor {name!r} has external data outside the model's directory ({location!r})")
        try:
            status = os.stat(target)
        except FileNotFoundError:
            status = None
        if status is None or not stat.S_ISREG(status.st_mode):
            raise InputError(f"external data file {location!r} of tensor {name!r} is missing or not a regular file")
    except (OSError, ValueError, RuntimeError) as error:  # RuntimeError: a symlink loop
        raise InputError(f"tensor {name!r}: unusable external data location {location!r} ({error})") from None
    if len(_APPROVED) >= limits.MAX_APPROVED_LOCATIONS:
        _APPROVED.clear()
    _APPROVED[key] = (target, status.st_dev, status.st_ino)
    return target, status.st_size


# (base directory, location) -> the file found there, inside the directory: (its real path, device, inode).
_APPROVED: dict[tuple[str, str], tuple[str, int, int]] = {}


def _open(ref: ExternalRef, tensor: TensorProto) -> io.BufferedReader:
    try:
        handle = open(ref.path, "rb")  # noqa: SIM115 - the callers close it
        handle.seek(ref.offset)
    except OSError as error:
        raise InputError(f"tensor {tensor.name!r}: cannot read {os.path.basename(ref.path)!r} "
                         f"({error.strerror or error})") from None
    return handle


def _read(handle: BinaryIO, size: int, tensor: TensorProto) -> bytes:
    try:
        data = handle.read(size)
    except OSError as error:
        raise InputError(f"tensor {tensor.name!r}: cannot read its external data ({error.strerror or error})") from None
    if len(data) != size:
        raise InputError(f"tensor {tensor.name!r}: its external data file shrank while being read")
    return data


def read_external(tensor: TensorProto, base_dir: Path) -> bytes:
    ref = external_ref(tensor, base_dir)
    with _open(ref, tensor) as handle:
        return _read(handle, ref.length, tensor)


def external_array(tensor: TensorProto, base_dir: Path) -> np.ndarray:
    """The value of an external tensor, read through :func:`read_external`'s checks. A large one is a
    read-only view of its file, mapped into memory: the kernel reads it as it is used, and a fold that
    scales it (``deferred.RoundedProduct``) never copies it."""
    dtype = _NATIVE_DTYPES.get(tensor.data_type)
    if dtype is None:  # onnx's own conversion knows the exotic dtypes (bfloat16, float8, int4, ...)
        inline = TensorProto(data_type=tensor.data_type, dims=tensor.dims, raw_data=read_external(tensor, base_dir))
        return numpy_helper.to_array(inline)
    ref = external_ref(tensor, base_dir)
    mapping = _mapped(ref.path) if ref.length >= limits.MAP_MIN_BYTES else None
    if mapping is not None:
        count = ref.length // dtype.itemsize
        return np.frombuffer(mapping, dtype, count, ref.offset).reshape(tuple(tensor.dims))
    value = np.empty(tuple(tensor.dims), dtype=dtype)
    with _open(ref, tensor) as handle:
        try:
            filled = handle.readinto(memoryview(value.reshape(-1).view(np.uint8)))  # type: ignore[arg-type]
        except OSError as error:
            raise InputError(f"tensor {tensor.name!r}: cannot read its external data ({error.strerror or error})"
                             ) from None
    if filled != ref.length:
        raise InputError(f"tensor {tensor.name!r}: its external data file shrank while being read")
    return value


def raw_length_error(name: str, length: int, needed: int) -> InputError:
    """Raw data that does not fit its dims: only an input can be this way (bnfold's own tensors come from
    numpy), and onnx.checker passes it, so it is said here, as bad input."""
    wanted = "its dims overflow int64" if needed >= 2**63 else f"its dims need {needed}"
    return InputError(f"the input model is damaged: tensor {name!r} has {length} bytes of raw data, {wanted}")


def inline_array(tensor: TensorProto) -> np.ndarray:
    """The value of a tensor kept in the proto: onnx's ``to_array``, without its per-call dtype lookups where the
    raw data is a plain little-endian array (a fold reads every batch norm's four parameters)."""
    dtype = _NATIVE_DTYPES.get(tensor.data_type)
    if dtype is None or not tensor.HasField("raw_data") or tensor.HasField("segment"):
        return numpy_helper.to_array(tensor)
    data = tensor.raw_data
    shape = tuple(tensor.dims)
    needed = math.prod(shape) * dtype.itemsize
    if len(data) != needed:  # numpy would fail to reshape
        raise raw_length_error(tensor.name, len(data), needed)
    return np.frombuffer(data, dtype).reshape(shape)  # read-only, as to_array's


# The files mapped now, by (device, inode, size) at mapping time, each to its mapping (weakly: a mapping lives as
# long as some array views it), and each mapping's length (at most ``limits.MAX_MAPPED_FILES``).
_MAPPINGS: dict[tuple[int, int, int], weakref.ref[mmap.mmap]] = {}
_MAPPED_LENGTHS: weakref.WeakKeyDictionary[mmap.mmap, int] = weakref.WeakKeyDictionary()


def _mapped(path: str) -> mmap.mmap | None:
    """The whole file mapped read-only, shared by every tensor in it; None where it cannot be mapped."""
    try:
        status = os.stat(path)
    except OSError:
        return None
    key = (status.st_dev, status.st_ino, status.st_size)
    reference = _MAPPINGS.get(key)
    mapping = reference() if reference is not None else None
    if mapping is not None:
        return mapping
    if len(_MAPPED_LENGTHS) >= limits.MAX_MAPPED_FILES:
        return None
    try:
        with open(path, "rb") as handle:
            mapping = mmap.mmap(handle.fileno(), status.st_size, access=mmap.ACCESS_READ)
    except (OSError, ValueError):
        return None

    def forget(dead: weakref.ref[mmap.mmap]) -> None:
        if _MAPPINGS.get(key) is dead:
            del _MAPPINGS[key]

    _MAPPINGS[key] = weakref.ref(mapping, forget)
    _MAPPED_LENGTHS[mapping] = status.st_size
    return mapping


def check_sources_intact(arrays: Iterable[np.ndarray]) -> None:
    """Refuse to go on if a file that ``arrays`` view through a mapping has shrunk since it was mapped:
    reading the lost pages would kill the process (SIGBUS) instead of raising."""
    for array in arrays:
        mapping = _mapping_of(array)
        if isinstance(mapping, mmap.mmap) and mapping in _MAPPED_LENGTHS and mapping.size() < _MAPPED_LENGTHS[mapping]:
            raise InputError("an input file shrank while the model was being folded; nothing was written")


def _mapping_of(array: np.ndarray) -> object:
    base: object = array
    while isinstance(base, np.ndarray):
        base = base.base
    return base.obj if isinstance(base, memoryview) else base


def copy_external(tensor: TensorProto, base_dir: Path, out: BinaryIO) -> int:
    """Append ``tensor``'s external bytes to ``out``, in the kernel where it can, else in chunks, never
    holding the whole tensor; returns the length. Reading problems are the input's (``InputError``); writing
    ones stay ``OSError``."""
    ref = external_ref(tensor, base_dir)
    with _open(ref, tensor) as handle:
        if _kernel_copy(handle, ref, out, tensor):
            return ref.length
        remaining = ref.length
        while remaining:
            chunk = _read(handle, min(limits.COPY_CHUNK_BYTES, remaining), tensor)
            out.write(chunk)
            remaining -= len(chunk)
    return ref.length


def _kernel_copy(handle: BinaryIO, ref: ExternalRef, out: BinaryIO, tensor: TensorProto) -> bool:
    """``os.copy_file_range`` from the tensor's range to ``out``'s position: no copy through user space (and on
    file systems that share extents, none at all). False, having copied nothing, where it is unavailable."""
    copier = getattr(os, "copy_file_range", None)
    if copier is None or not ref.length:
        return False
    try:
        target = out.fileno()
    except (OSError, ValueError):  # not a file
        return False
    out.flush()
    copied = 0
    try:
        while copied < ref.length:
            step = copier(handle.fileno(), target, ref.length - copied, ref.offset + copied)
            if step == 0:
                raise InputError(f"tensor {tensor.name!r}: its external data file shrank while being read")
            copied += step
    except OSError as error:
        if copied or error.errno not in _NO_KERNEL_COPY:
            raise
        return False
    return True


# copy_file_range refuses some pairs of files (across file systems on older kernels, special files); those
# are copied through user space instead.
_NO_KERNEL_COPY = {errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EBADF, errno.EPERM}
_NATIVE_DTYPES = {
    getattr(TensorProto, name): np.dtype(dtype).newbyteorder("<")
    for name, dtype in (("FLOAT", np.float32), ("DOUBLE", np.float64), ("FLOAT16", np.float16), ("INT8", np.int8),
                        ("UINT8", np.uint8), ("INT16", np.int16), ("UINT16", np.uint16), ("INT32", np.int32),
                        ("UINT32", np.uint32), ("INT64", np.int64), ("UINT64", np.uint64))
}
