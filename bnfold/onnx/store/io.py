"""Reading and writing ONNX files safely: one-line errors for bad input, atomic writes, and external data
that may only come from the model's own directory (the rules are in :mod:`bnfold.onnx.store.external`).

A model read with ``load_external_data=False`` keeps its external tensors on disk: their ``location``s stay
relative to the directory it was read from, which the caller passes on as ``base_dir``. Reads then fetch one
tensor on demand, and :func:`write_model` copies the tensors nobody touched from their source file in chunks,
so a model over 2 GB never needs to be in memory.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

import onnx
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError, Message
from onnx import AttributeProto, FunctionProto, GraphProto, ModelProto, NodeProto, SparseTensorProto, TensorProto

from bnfold.core.atomic import AtomicFiles, check_destination, replaces_any
from bnfold.errors import InputError, OutputError
from bnfold.onnx.store import limits
from bnfold.onnx.store.external import (
    check_external_refs,
    copy_external,
    external_ref,
    is_external,
    model_tensors,
    payload_bytes,
    read_external,
)
from bnfold.onnx.store.held import HeldTensors, check_held_sources, held_value, write_held
from bnfold.onnx.store.wire import WireError, copy_fields, read_skeleton, without_initializers, write_inline


def read_model(path: str | os.PathLike[str], *, load_external_data: bool = True) -> ModelProto:
    """Load an ONNX file; raise ``InputError`` with one line on any problem.

    Every external tensor's location is checked before anything is read. With ``load_external_data=False``
    the tensors stay on disk (see the module docstring); their base directory is ``Path(path).parent``.
    """
    source = _regular_file(path)
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
    return _checked(model, source, load_external_data)


def read_model_lazy(path: str | os.PathLike[str]) -> ModelProto:
    """:func:`read_model` with ``load_external_data=False``, and the main graph's large inline tensors left
    in the file too: they become external references to the file itself (see :mod:`bnfold.onnx.store.wire`),
    read only when a fold needs them. Their base directory is ``Path(path).parent``."""
    source = _regular_file(path)
    if os.path.dirname(os.path.realpath(source)) != os.path.realpath(source.parent):
        # A symlink into another directory: external data is found beside the path given (as onnx and
        # onnxruntime look for it), where references to the file itself would lead outside; read it whole.
        return read_model(source, load_external_data=False)
    try:
        model = read_skeleton(source, limits.LAZY_MIN_BYTES)
    except (WireError, DecodeError, ValueError, RuntimeError, OSError):
        return read_model(source, load_external_data=False)  # which names the problem, if there is one
    return _checked(model, source, load_external_data=False)


def _regular_file(path: str | os.PathLike[str]) -> Path:
    source = Path(path)
    if not source.exists():
        raise InputError(f"{source}: no such file")
    if source.is_dir():
        raise InputError(f"{source}: is a directory, not an ONNX file")
    if not source.is_file():  # a FIFO or a device would block the read or never end it
        raise InputError(f"{source}: not a regular file")
    return source


def _checked(model: ModelProto, source: Path, load_external_data: bool) -> ModelProto:
    if not model.HasField("graph") or model.ir_version <= 0:
        raise InputError(f"{source}: not an ONNX model (no graph or IR version)")
    try:
        check_supported(model)
    except InputError as error:
        raise InputError(f"{source}: {error}") from None
    external = [tensor for tensor in model_tensors(model) if is_external(tensor)]
    try:
        check_external_refs(external, source.parent)
        if load_external_data:
            for tensor in external:
                set_inline(tensor, read_external(tensor, source.parent))
    except InputError as error:
        raise InputError(f"{source}: {error}") from None
    return model


def check_supported(model: ModelProto) -> None:
    """Refuse what no later step could handle: text that is not UTF-8 (protobuf hands it back as bytes), or
    an IR or opset newer than the installed onnx, whose checker and shape inference cannot vouch for it."""
    field = _non_utf8_text(model)
    if field is not None:
        raise InputError(f"not a valid ONNX model: field {field} holds text that is not UTF-8")
    if model.ir_version > onnx.IR_VERSION:
        raise InputError(f"IR version {model.ir_version} is newer than the installed onnx {onnx.__version__} "
                         f"supports ({onnx.IR_VERSION})")
    latest = onnx.defs.onnx_opset_version()
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx") and entry.version > latest:
            raise InputError(f"opset {entry.version} is newer than the installed onnx {onnx.__version__} "
                             f"supports ({latest})")


def _non_utf8_text(message: Message) -> str | None:
    """The first string field in ``message`` or the messages inside it that is not valid UTF-8, by name."""
    for field, value in message.ListFields():  # set fields only: a model has thousands of messages
        is_text, is_message, repeated = _field_kind(field)
        if is_text:
            if (bytes in map(type, value)) if repeated else type(value) is bytes:
                return field.full_name
        elif is_message:
            for child in value if repeated else (value,):
                found = _non_utf8_text(child)
                if found is not None:
                    return found
    return None


@functools.cache  # the walk asks for every field of every message
def _field_kind(field: FieldDescriptor) -> tuple[bool, bool, bool]:
    """(string, message, repeated)"""
    return field.type == field.TYPE_STRING, field.type == field.TYPE_MESSAGE, field.is_repeated


def has_external_tensors(model: ModelProto) -> bool:
    return any(is_external(tensor) for tensor in model_tensors(model))


def tensor_bytes(model: ModelProto) -> int:
    """Bytes of all tensor data, in memory or in external files, from dims and dtypes. It stands in for
    ``ByteSize()``, which under upb serializes the whole model to count (and fails at 2 GiB)."""
    return sum(payload_bytes(tensor) or 0 for tensor in model_tensors(model))


def write_model(
    model: ModelProto,
    path: str | os.PathLike[str],
    *,
    external_data: str | None = None,
    external_threshold: int = limits.PROTOBUF_LIMIT,
    base_dir: str | os.PathLike[str] | None = None,
    held: HeldTensors | None = None,
    protected: Sequence[Path] = (),
) -> list[Path]:
    """Write ``model`` atomically (:class:`bnfold.core.atomic.AtomicFiles`: unnamed files beside the
    destination, fsync, put in place together).

    Models whose tensors have ``external_threshold`` bytes or more (counting those still on disk, see
    :func:`tensor_bytes`), or that protobuf cannot hold in one message, are written with every
    tensor of ``limits.EXTERNAL_MIN_BYTES`` or more in one external data file next to the output, named
    ``external_data`` (a plain file name; default ``<name>.data``). Smaller models are one file. ``base_dir``
    is where a lazily read model's external tensors are (its source directory); ``held`` has the values of
    tensors a fold kept outside the model (see ``held.HeldTensors``). ``model`` is not modified. Neither the
    model file nor its data file may replace any of ``protected`` (the input's files, see :func:`input_files`),
    under any name. Returns the paths written; on failure nothing at the destination changes and no
    temporary file remains.
    """
    destination = Path(path)
    directory = destination.parent
    location = external_data or f"{destination.name}.data"
    check_output(destination, location, protected)
    on_disk = [tensor for tensor in model_tensors(model) if is_external(tensor)]
    if on_disk and base_dir is None:
        raise OutputError(f"{destination}: the model keeps tensors in external files; pass the directory it was "
                          f"read from as base_dir")
    source_dir = Path(base_dir) if base_dir is not None else directory
    check_external_refs(on_disk, source_dir)
    check_held_sources((held or {}).values())
    try:
        with AtomicFiles(directory) as files:
            if tensor_bytes(model) < external_threshold:
                handle = files.create(destination)
                if _write_one_message(model, handle, source_dir, held):
                    return files.commit()
                files.drop(handle)
            # The data file first: it is put in place first, so a model never names a data file not yet there.
            data_file = files.create(directory / location)
            writer = _DataFileWriter(data_file, location, source_dir, held)
            serialized = _copy_model(model, writer).SerializeToString()
            if not data_file.tell():  # no tensor was large enough: no data file
                files.drop(data_file)
            files.create(destination).write(serialized)
            del serialized
            return files.commit()
    except OSError as error:
        raise OutputError(f"{destination}: write failed ({error.strerror or error}); nothing was replaced") from None


def check_output(destination: Path, data_file: str, protected: Sequence[Path] = ()) -> None:
    """Refuse, before anything is computed, an output that cannot be written or would destroy an input:
    :func:`bnfold.core.atomic.check_destination` for the model file and its data file ``data_file`` (a plain
    name, placed beside it), neither of which may be the same file as one of ``protected``."""
    _check_data_file_name(data_file, destination)
    check_destination(destination)
    targets = [destination]
    if len(os.fsencode(data_file)) < _name_max(destination.parent):  # else it cannot exist (nor be written)
        targets.append(destination.parent / data_file)
        check_destination(targets[-1])
    replaced = replaces_any(targets, list(protected))
    if replaced is not None:
        raise OutputError(f"{destination}: refusing to replace {replaced}, a file of the input model")


def _name_max(directory: Path) -> int:
    try:
        return os.pathconf(directory, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def input_files(model: ModelProto, source: Path) -> list[Path]:
    """The files a model read from ``source`` consists of: ``source`` and each external data file."""
    refs = {external_ref(tensor, source.parent).path for tensor in model_tensors(model) if is_external(tensor)}
    return [source, *(Path(path) for path in sorted(refs))]


@contextlib.contextmanager
def staged_file(model: ModelProto, base_dir: Path | None, held: HeldTensors | None = None, *,
                external_threshold: int = limits.PROTOBUF_LIMIT) -> Iterator[Path]:
    """``model`` written (see :func:`write_model`) to a temporary file, for the checker or onnxruntime to
    read from disk; removed on exit."""
    with tempfile.TemporaryDirectory(prefix="bnfold-") as staging:
        path = Path(staging) / "folded.onnx"
        write_model(model, path, external_threshold=external_threshold, base_dir=base_dir, held=held)
        yield path


def _write_one_message(model: ModelProto, out: BinaryIO, base_dir: Path, held: HeldTensors | None) -> bool:
    """Write the whole model to ``out`` as one protobuf message, streaming the main graph's tensors; False,
    having written nothing, if it would be 2 GiB or more, which protobuf refuses to read (this happens when
    the graph itself weighs more than the margin ``limits.PROTOBUF_LIMIT`` leaves below the tensors)."""
    attached = itertools.islice(model_tensors(model), len(model.graph.initializer), None)
    if any(is_external(tensor) for tensor in attached):  # in subgraphs, attributes, functions: inlined
        rest = _copy_model(model, lambda tensor: _inline_copy(tensor, base_dir), initializers=False)
    else:  # nothing to inline, so protobuf copies the nodes itself, not one by one in Python
        rest = without_initializers(model)
    return write_inline(model, rest, out, base_dir, held, limit=limits.PROTOBUF_MESSAGE_MAX)


def _check_data_file_name(location: str, destination: Path) -> None:
    if (not location or location in (".", "..") or os.path.basename(location) != location or "\\" in location
            or "/" in location):
        raise OutputError(f"{destination}: external data name {location!r} must be a plain file name")
    if location == destination.name:
        raise OutputError(f"{destination}: external data name {location!r} is the model file itself")


def set_inline(tensor: TensorProto, data: bytes) -> None:
    tensor.raw_data = data
    # Cleared, not set to DEFAULT: a tensor the lazy reader left in the file comes back as the file had it.
    tensor.ClearField("data_location")
    del tensor.external_data[:]


def _inline_copy(tensor: TensorProto, base_dir: Path) -> TensorProto | None:
    if not is_external(tensor):
        return None
    copy = _metadata_copy(tensor)
    copy.raw_data = read_external(tensor, base_dir)
    return copy


def _metadata_copy(tensor: TensorProto) -> TensorProto:
    copy = TensorProto()
    copy_fields(tensor, copy, skip={"raw_data", "external_data", "data_location"})
    return copy


class _DataFileWriter:
    """Moves the payload of every tensor of ``limits.EXTERNAL_MIN_BYTES`` or more into one data file, in the order
    the tensors are visited, so equal models give byte-identical files."""

    def __init__(self, handle: BinaryIO, location: str, base_dir: Path, held: HeldTensors | None) -> None:
        self._handle = handle
        self._location = location
        self._base_dir = base_dir
        self._held = held

    def __call__(self, tensor: TensorProto) -> TensorProto | None:
        value = held_value(tensor, self._held)
        if value is not None:
            length = value.nbytes
        elif is_external(tensor):
            length = external_ref(tensor, self._base_dir).length
        elif tensor.HasField("raw_data"):
            length = len(tensor.raw_data)
        else:
            return None  # typed fields (float_data, ...): rare and small, left as they are
        if length < limits.EXTERNAL_MIN_BYTES:
            return _inline_copy(tensor, self._base_dir)
        handle = self._handle
        if length >= limits.ALIGNMENT:
            handle.write(b"\0" * (-handle.tell() % limits.ALIGNMENT))
        offset = handle.tell()
        if value is not None:
            write_held(value, handle)
        elif is_external(tensor):
            copy_external(tensor, self._base_dir, handle)
        else:
            handle.write(tensor.raw_data)
        stored = _metadata_copy(tensor)
        stored.data_location = TensorProto.EXTERNAL
        for key, text in (("location", self._location), ("offset", str(offset)), ("length", str(length))):
            entry = stored.external_data.add()
            entry.key, entry.value = key, text
        return stored


# --- a copy of the model with some tensors replaced ------------------------------------------------------
# Clearing a field does not give memory back (protobuf's arena keeps it until the message dies), so the
# model is never edited and restored: the copy takes everything but the replaced tensors' payloads.

Replace = Callable[[TensorProto], TensorProto | None]


def _copy_tensor(source: TensorProto, target: TensorProto, replace: Replace) -> None:
    target.CopyFrom(replace(source) or source)


def _copy_sparse(source: SparseTensorProto, target: SparseTensorProto, replace: Replace) -> None:
    copy_fields(source, target, skip={"values", "indices"})
    _copy_tensor(source.values, target.values, replace)
    _copy_tensor(source.indices, target.indices, replace)


def _copy_attribute(source: AttributeProto, target: AttributeProto, replace: Replace) -> None:
    copy_fields(source, target, skip={"t", "tensors", "g", "graphs", "sparse_tensor", "sparse_tensors"})
    if source.HasField("t"):
        _copy_tensor(source.t, target.t, replace)
    for tensor in source.tensors:
        _copy_tensor(tensor, target.tensors.add(), replace)
    if source.HasField("sparse_tensor"):
        _copy_sparse(source.sparse_tensor, target.sparse_tensor, replace)
    for sparse in source.sparse_tensors:
        _copy_sparse(sparse, target.sparse_tensors.add(), replace)
    if source.HasField("g"):
        _copy_graph(source.g, target.g, replace)
    for graph in source.graphs:
        _copy_graph(graph, target.graphs.add(), replace)


def _copy_nodes(source: list[NodeProto], target, replace: Replace) -> None:
    for node in source:
        copy = target.add()
        copy_fields(node, copy, skip={"attribute"})
        for attribute in node.attribute:
            _copy_attribute(attribute, copy.attribute.add(), replace)


def _copy_graph(source: GraphProto, target: GraphProto, replace: Replace, initializers: bool = True) -> None:
    copy_fields(source, target, skip={"initializer", "sparse_initializer", "node"})
    for tensor in source.initializer if initializers else ():
        _copy_tensor(tensor, target.initializer.add(), replace)
    for sparse in source.sparse_initializer:
        _copy_sparse(sparse, target.sparse_initializer.add(), replace)
    _copy_nodes(source.node, target.node, replace)


def _copy_function(source: FunctionProto, target: FunctionProto, replace: Replace) -> None:
    copy_fields(source, target, skip={"node"})
    _copy_nodes(source.node, target.node, replace)


def _copy_model(model: ModelProto, replace: Replace, initializers: bool = True) -> ModelProto:
    """``model`` with each tensor ``t`` replaced by ``replace(t)`` unless that is None; in
    :func:`~bnfold.onnx.store.external.model_tensors` order. Without the main graph's initializers unless
    ``initializers``."""
    copy = ModelProto()
    copy_fields(model, copy, skip={"graph", "functions"})
    _copy_graph(model.graph, copy.graph, replace, initializers)
    for function in model.functions:
        _copy_function(function, copy.functions.add(), replace)
    return copy
