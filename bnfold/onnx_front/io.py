"""Reading and writing ONNX files safely: one-line errors for bad input, atomic writes, and external
data that may only come from the model's own directory."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError
from onnx import ModelProto, TensorProto
from onnx.external_data_helper import (
    convert_model_to_external_data,
    load_external_data_for_model,
)

from bnfold.errors import InputError, OutputError
from bnfold.onnx_front.graph import subgraphs

# Protobuf cannot serialize a message of 2 GiB or more; stay clear of the limit.
PROTOBUF_LIMIT = 2**31 - 2**24


def _all_tensors(model: ModelProto):
    def from_graph(graph):
        yield from graph.initializer
        for node in graph.node:
            for attribute in node.attribute:
                if attribute.type == onnx.AttributeProto.TENSOR:
                    yield attribute.t
            for subgraph in subgraphs(node):
                yield from from_graph(subgraph)

    yield from from_graph(model.graph)
    for function in model.functions:
        for node in function.node:
            for attribute in node.attribute:
                if attribute.type == onnx.AttributeProto.TENSOR:
                    yield attribute.t


def _external_location(tensor: TensorProto) -> str | None:
    if tensor.data_location != TensorProto.EXTERNAL:
        return None
    return next((entry.value for entry in tensor.external_data if entry.key == "location"), "")


def _check_external_data(model: ModelProto, base: Path, source: Path) -> bool:
    """Refuse any external location outside the model's directory before a byte of it is read."""
    found = False
    resolved_base = base.resolve()
    for tensor in _all_tensors(model):
        location = _external_location(tensor)
        if location is None:
            continue
        found = True
        if not location or os.path.isabs(location) or Path(location).drive:
            raise InputError(f"{source}: tensor {tensor.name!r} has external data at an absolute path ({location!r})")
        target = (resolved_base / location).resolve()
        if resolved_base != target.parent and resolved_base not in target.parents:
            raise InputError(f"{source}: tensor {tensor.name!r} points outside the model's directory ({location!r})")
        if not target.is_file():
            raise InputError(f"{source}: external data file {location!r} for tensor {tensor.name!r} is missing")
    return found


def read_model(path: str | os.PathLike[str]) -> ModelProto:
    """Load an ONNX file with its external data; raise ``InputError`` with one line on any problem."""
    source = Path(path)
    if not source.exists():
        raise InputError(f"{source}: no such file")
    if source.is_dir():
        raise InputError(f"{source}: is a directory, not an ONNX file")
    try:
        data = source.read_bytes()
    except OSError as error:
        raise InputError(f"{source}: cannot read ({error.strerror or error})") from None
    if not data:
        raise InputError(f"{source}: file is empty")
    model = ModelProto()
    try:
        model.ParseFromString(data)
    except (DecodeError, ValueError, RuntimeError):
        raise InputError(f"{source}: not an ONNX model (the protobuf does not parse)") from None
    del data
    if not model.HasField("graph") or model.ir_version <= 0:
        raise InputError(f"{source}: not an ONNX model (no graph or IR version)")
    if _check_external_data(model, source.parent, source):
        try:
            load_external_data_for_model(model, str(source.parent))
        except (OSError, ValueError) as error:
            raise InputError(f"{source}: cannot read external data ({error})") from None
        for tensor in _all_tensors(model):
            expected = _expected_bytes(tensor)
            if expected is not None and tensor.HasField("raw_data") and len(tensor.raw_data) != expected:
                raise InputError(f"{source}: external data for tensor {tensor.name!r} is truncated")
    return model


def _expected_bytes(tensor: TensorProto) -> int | None:
    try:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except (KeyError, ValueError, TypeError):
        return None
    if tensor.data_type in (TensorProto.STRING,) or itemsize == 0:
        return None
    count = 1
    for d in tensor.dims:
        count *= d
    if tensor.data_type in (TensorProto.INT4, TensorProto.UINT4):
        return (count + 1) // 2
    return count * itemsize


def write_model(
    model: ModelProto,
    path: str | os.PathLike[str],
    *,
    external_data: str | None = None,
    external_threshold: int = PROTOBUF_LIMIT,
) -> list[Path]:
    """Write ``model`` atomically: a temporary file in the destination directory, fsync, rename.

    Models at or above ``external_threshold`` bytes are written with their tensors in one external
    data file (``external_data``, default ``<name>.data``) next to the output. Returns the paths
    written. On failure nothing at the destination changes and no temporary file remains.
    """
    destination = Path(path)
    directory = destination.parent if str(destination.parent) else Path(".")
    if not directory.is_dir():
        raise OutputError(f"{destination}: directory {directory} does not exist")
    if destination.is_dir():
        raise OutputError(f"{destination}: is a directory")
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", suffix=".tmp", dir=directory))
    except OSError as error:
        raise OutputError(f"{destination}: cannot write to {directory} ({error.strerror or error})") from None
    try:
        staged = staging / destination.name
        moves: list[tuple[Path, Path]] = []
        if model.ByteSize() >= external_threshold:
            location = external_data or f"{destination.name}.data"
            if os.path.basename(location) != location:
                raise OutputError(f"{destination}: external data name {location!r} must be a plain file name")
            convert_model_to_external_data(model, all_tensors_to_one_file=True, location=location, size_threshold=1024)
            onnx.save_model(model, str(staged))
            moves.append((staging / location, directory / location))
        else:
            with open(staged, "wb") as handle:
                handle.write(model.SerializeToString())
        moves.append((staged, destination))
        for source, _ in moves:
            _fsync(source)
        for source, target in moves:
            os.replace(source, target)
        _fsync_directory(directory)
        return [target for _, target in moves]
    except OSError as error:
        raise OutputError(f"{destination}: write failed ({error.strerror or error}); nothing was replaced") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_directory(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
