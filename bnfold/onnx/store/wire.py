"""The protobuf wire format of an ONNX file, for reading and writing large tensors without protobuf holding them.

Parsing a 200 MB model into protobuf and serializing it again costs more than folding its batch norms. So
:func:`read_skeleton` scans the file's bytes, parses everything but the payloads of the main graph's large
initializers, and turns those into references to their byte range in the file itself -- the same
``EXTERNAL`` form external data has, so every reader goes through :mod:`bnfold.onnx.store.external`'s checks.
:func:`write_inline` writes a model back as one message, streaming each payload from wherever it is (memory,
the input file, an external data file) with the bytes ``SerializeToString`` would give.
"""

from __future__ import annotations

import math
import mmap
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from google.protobuf import unknown_fields
from google.protobuf.message import DecodeError, Message
from onnx import ModelProto, TensorProto

from bnfold.onnx.store import limits
from bnfold.onnx.store.external import copy_external, external_ref, is_external, payload_bytes, raw_length_error
from bnfold.onnx.store.held import HeldTensors, held_value, write_held

# Field numbers from onnx.proto.
_MODEL_GRAPH = 7
_GRAPH_INITIALIZER = 5
_TENSOR_RAW_DATA = 9
_LENGTH_DELIMITED = 2


class WireError(ValueError):
    """The bytes are not a protobuf this scanner follows; the caller parses them the ordinary way."""


def _varint(data: mmap.mmap | bytes, position: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if position >= end or shift > 63:
            raise WireError("truncated or overlong varint")
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, position
        shift += 7


def _fields(data: mmap.mmap | bytes, start: int, end: int) -> Iterator[tuple[int, int, int, int, int]]:
    """``(number, wire_type, field_start, payload_start, payload_end)`` for each field in ``data[start:end]``;
    a length-delimited field's payload is its content, without the length."""
    position = start
    while position < end:
        field_start = position
        key, position = _varint(data, position, end)
        number, wire_type = key >> 3, key & 7
        if number == 0:
            raise WireError("field number 0")
        if wire_type == 0:
            _, position = _varint(data, position, end)
            payload_start = field_start
        elif wire_type == 1:
            payload_start, position = position, position + 8
        elif wire_type == _LENGTH_DELIMITED:
            length, payload_start = _varint(data, position, end)
            position = payload_start + length
        elif wire_type == 5:
            payload_start, position = position, position + 4
        else:  # groups: not in onnx.proto
            raise WireError(f"wire type {wire_type}")
        if position > end:
            raise WireError("field runs past its message")
        yield number, wire_type, field_start, payload_start, position


def read_skeleton(path: Path, min_bytes: int) -> ModelProto:
    """The model in ``path`` with every main-graph initializer whose raw data has ``min_bytes`` or more (and
    whose value shape inference never needs: more than ``limits.KEPT_ELEMENTS`` elements) left in the file, as an
    external reference to ``path``'s own name (relative to its directory).

    Raises :class:`WireError` if the bytes are not laid out as this scanner expects (the caller then parses
    them whole, and reports what is wrong), ``DecodeError`` if a piece does not parse."""
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
        model_parts: list[bytes] = []
        graph_span: tuple[int, int] | None = None
        for number, wire_type, field_start, payload_start, end in _fields(data, 0, len(data)):
            if number == _MODEL_GRAPH and wire_type == _LENGTH_DELIMITED:
                if graph_span is not None:
                    raise WireError("two graph fields")  # protobuf would merge them
                graph_span = (payload_start, end)
            else:
                model_parts.append(data[field_start:end])
        if graph_span is None:
            raise WireError("no graph")
        model = ModelProto()
        model.ParseFromString(b"".join(model_parts))
        # The graph is parsed in one piece, in order; an initializer large enough to hold ``min_bytes`` of raw
        # data is re-encoded first, its raw data replaced by a reference to where it lies in the file.
        graph_parts: list[bytes] = []
        for number, wire_type, field_start, payload_start, end in _fields(data, *graph_span):
            if number == _GRAPH_INITIALIZER and wire_type == _LENGTH_DELIMITED and end - payload_start >= min_bytes:
                encoded = _read_initializer(data, payload_start, end, path.name, min_bytes).SerializeToString()
                graph_parts.append(_header(_GRAPH_INITIALIZER, len(encoded)) + encoded)
            else:
                graph_parts.append(data[field_start:end])
        model.graph.MergeFromString(b"".join(graph_parts))
    return model


def _read_initializer(data: mmap.mmap, start: int, end: int, location: str, min_bytes: int) -> TensorProto:
    metadata: list[bytes] = []
    raw: tuple[int, int] | None = None
    for number, wire_type, field_start, payload_start, field_end in _fields(data, start, end):
        if number == _TENSOR_RAW_DATA and wire_type == _LENGTH_DELIMITED:
            if raw is not None:
                raise WireError("two raw_data fields")
            raw = (payload_start, field_end)
        else:
            metadata.append(data[field_start:field_end])
    tensor = TensorProto()
    tensor.MergeFromString(b"".join(metadata))
    if raw is None:
        return tensor
    offset, length = raw[0], raw[1] - raw[0]
    # Left in the file only when it is unambiguous what the bytes are; anything odd stays inline, for the
    # checker to judge as it would have.
    if (length < min_bytes or length != payload_bytes(tensor) or is_external(tensor) or tensor.external_data
            or tensor.HasField("data_location") or math.prod(tensor.dims) <= limits.KEPT_ELEMENTS):
        tensor.raw_data = data[offset:offset + length]
        return tensor
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor


# --- writing ----------------------------------------------------------------------------------------------


def copy_fields(source: Message, target: Message, skip: set[str], *, unknown: bool = True) -> None:
    """Copy every set field of ``source`` but those named in ``skip`` into ``target``, and unless ``unknown`` is
    False the fields this onnx does not know (a newer onnx's, another producer's): protobuf keeps those through
    a parse and a serialization, and so must every copy bnfold makes."""
    for field, value in source.ListFields():
        if field.name in skip:
            continue
        if isinstance(value, Message):
            getattr(target, field.name).CopyFrom(value)
        elif isinstance(value, str | bytes | int | float):
            setattr(target, field.name, value)
        else:
            getattr(target, field.name).extend(value)
    if unknown:
        encoded = _encode_unknown(unknown_fields.UnknownFieldSet(source))
        if encoded:
            target.MergeFromString(encoded)


def without_initializers(model: ModelProto) -> ModelProto:
    """``model`` without its main graph's initializers; everything else copied whole, by protobuf itself."""
    shell = ModelProto()
    copy_fields(model, shell, skip={"graph"})
    copy_fields(model.graph, shell.graph, skip={"initializer"})
    return shell


def _encode_unknown(fields: unknown_fields.UnknownFieldSet) -> bytes:
    out = bytearray()
    for field in fields:
        number, wire_type, data = field.field_number, field.wire_type, field.data
        out += _encode_varint(number << 3 | wire_type)
        if wire_type == 0:
            out += _encode_varint(data)
        elif wire_type == 1:
            out += data.to_bytes(8, "little")
        elif wire_type == _LENGTH_DELIMITED:
            out += _encode_varint(len(data)) + data
        elif wire_type == 5:
            out += data.to_bytes(4, "little")
        else:  # a group: its fields, then its end tag
            out += _encode_unknown(data) + _encode_varint(number << 3 | 4)
    return bytes(out)


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _header(number: int, length: int) -> bytes:
    return _encode_varint(number << 3 | _LENGTH_DELIMITED) + _encode_varint(length)


def _split(message: Message, number: int) -> tuple[bytes, bytes]:
    """``message`` serialized as the fields numbered below ``number`` and those above it, the two halves of
    its canonical encoding around field ``number``."""
    below, above = type(message)(), type(message)()
    names = {field.name for field in message.DESCRIPTOR.fields}
    low = {field.name for field in message.DESCRIPTOR.fields if field.number < number}
    copy_fields(message, below, names - low, unknown=False)  # protobuf writes unknown fields last
    copy_fields(message, above, low | {message.DESCRIPTOR.fields_by_number[number].name})
    return below.SerializeToString(), above.SerializeToString()




class _Payload:
    """One initializer as it will be written: encoded metadata around its raw data, wherever that is."""

    def __init__(self, tensor: TensorProto, base_dir: Path, held: HeldTensors | None) -> None:
        self.tensor = tensor
        self.base_dir = base_dir
        self.value = held_value(tensor, held)
        if self.value is not None:
            self.raw_length = self.value.nbytes
            metadata = tensor
            self.inline = True
        elif is_external(tensor):
            self.raw_length = external_ref(tensor, base_dir).length
            metadata = TensorProto()
            copy_fields(tensor, metadata, {"raw_data", "external_data", "data_location"})
            self.inline = False
        elif tensor.HasField("raw_data") and (raw_length := payload_bytes(tensor)) is not None:
            self.raw_length = raw_length
            if raw_length < limits.SPLIT_FROM_BYTES:
                self._check_raw_length(tensor.raw_data)
                self._encode_whole(tensor)
                return
            metadata = TensorProto()
            copy_fields(tensor, metadata, {"raw_data"})
            self.inline = True
        else:  # typed fields (float_data, ...): small, encoded as they are
            self._encode_whole(tensor)
            return
        self.below, self.above = _split(metadata, _TENSOR_RAW_DATA)
        self.raw_header = _header(_TENSOR_RAW_DATA, self.raw_length)
        self.length = len(self.below) + len(self.raw_header) + self.raw_length + len(self.above)

    def _encode_whole(self, tensor: TensorProto) -> None:
        self.raw_length = None
        self.whole = tensor.SerializeToString()
        self.length = len(self.whole)

    def _check_raw_length(self, raw: bytes) -> None:
        if len(raw) != self.raw_length:
            raise raw_length_error(self.tensor.name, len(raw), self.raw_length or 0)

    def write(self, out: BinaryIO) -> None:
        if self.raw_length is None:
            out.write(self.whole)
            return
        out.write(self.below)
        out.write(self.raw_header)
        if self.value is not None:
            write_held(self.value, out)
        elif self.inline:
            raw = self.tensor.raw_data
            self._check_raw_length(raw)
            out.write(raw)
        else:
            copy_external(self.tensor, self.base_dir, out)
        out.write(self.above)


def write_inline(model: ModelProto, rest: ModelProto, out: BinaryIO, base_dir: Path, held: HeldTensors | None,
                 limit: int) -> bool:
    """Write ``model`` to ``out`` as one protobuf message, each main-graph initializer streamed from memory
    or from disk (external tensors are read from ``base_dir``, held ones from ``held``). ``rest`` is the model
    without main-graph
    initializers and with every other external tensor inlined. False, having written nothing, if the
    message would have ``limit`` bytes or more."""
    payloads = [_Payload(tensor, base_dir, held) for tensor in model.graph.initializer]
    graph_below, graph_above = _split(rest.graph, _GRAPH_INITIALIZER)
    initializer_headers = [_header(_GRAPH_INITIALIZER, payload.length) for payload in payloads]
    graph_length = len(graph_below) + len(graph_above) + sum(
        len(header) + payload.length for header, payload in zip(initializer_headers, payloads, strict=True))
    model_below, model_above = _split(rest, _MODEL_GRAPH)
    graph_header = _header(_MODEL_GRAPH, graph_length)
    if len(model_below) + len(graph_header) + graph_length + len(model_above) >= limit:
        return False
    out.write(model_below)
    out.write(graph_header)
    out.write(graph_below)
    for header, payload in zip(initializer_headers, payloads, strict=True):
        out.write(header)
        payload.write(out)
    out.write(graph_above)
    out.write(model_above)
    return True


__all__ = ["DecodeError", "WireError", "copy_fields", "read_skeleton", "without_initializers", "write_inline"]
