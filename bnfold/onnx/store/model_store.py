"""One ONNX model and where each of its tensors' bytes are.

A tensor's bytes can be in the proto; in an external data file under ``base_dir``; in the model's own file
(``source``), left there by the lazy reader as an external reference to that file (see
:mod:`bnfold.onnx.store.wire`); or, for a value a fold wrote into the main graph, beside the proto in
``held``: a numpy array, or a weight scaled from the input file and computed only as it is written
(:class:`~bnfold.onnx.store.deferred.RoundedProduct`), its tensor in the proto keeping name, dtype and dims
and no data. Everything that reads, replaces or hands over tensors goes through a :class:`ModelStore`, so
no caller needs to know which of these a tensor is.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
from onnx import ModelProto, TensorProto, numpy_helper

from bnfold.core.atomic import same_file
from bnfold.errors import InputError
from bnfold.onnx.store import limits
from bnfold.onnx.store.external import (
    external_array,
    inline_array,
    is_external,
    model_tensors,
    payload_bytes,
    read_external,
)
from bnfold.onnx.store.held import HeldTensors, HeldValue, clear_value, held_array, held_value, hold, holdable
from bnfold.onnx.store.io import (
    check_supported,
    has_external_tensors,
    input_files,
    read_model_lazy,
    set_inline,
    staged_file,
    write_model,
)
from bnfold.onnx.store.wire import without_initializers


class ModelStore:
    """``proto`` and the places its tensors' bytes are (see the module docstring). ``held`` starts empty;
    only a fold fills it, through :meth:`replace`."""

    def __init__(self, proto: ModelProto, base_dir: Path | None = None, source: Path | None = None) -> None:
        self.proto = proto
        # Where external locations are relative to; None when no tensor is on disk.
        self.base_dir = base_dir
        # The file a lazily read model's large inline tensors are still in.
        self.source = source
        self.held: HeldTensors = {}
        # The files the model was read from (model file and external data files): no write may replace them.
        self.input_files: list[Path] = []

    @classmethod
    def read(cls, path: str | os.PathLike[str]) -> ModelStore:
        """The model in ``path``, its large tensors left on disk until they are read (``io.read_model_lazy``)."""
        proto = read_model_lazy(path)
        source = Path(path)
        store = cls(proto, source.parent if has_external_tensors(proto) else None, source)
        store.input_files = input_files(proto, source)
        return store

    @classmethod
    def copy_of(cls, proto: ModelProto) -> ModelStore:
        """A store of a copy of ``proto``, which must have every tensor in memory."""
        check_supported(proto)
        if has_external_tensors(proto):
            raise InputError("the model keeps tensors in external files that are not loaded; pass its path, "
                             "so bnfold reads them from the model's own directory")
        copy = ModelProto()
        copy.CopyFrom(proto)
        return cls(copy)

    # -- reading ---------------------------------------------------------------------------------------
    def array(self, tensor: TensorProto, *, main_graph: bool) -> np.ndarray:
        """The value of ``tensor`` wherever its bytes are; one on disk is read after its location's checks.
        Only main-graph tensors (``main_graph``) can be held."""
        value = held_value(tensor, self.held) if main_graph else None
        if value is not None:
            return held_array(value)
        if not is_external(tensor):
            return inline_array(tensor)
        if self.base_dir is None:
            raise InputError(f"tensor {tensor.name!r} keeps its data in an external file, but the model's "
                             f"directory is unknown; load the model from its path")
        return external_array(tensor, self.base_dir)

    def is_held(self, tensor: TensorProto) -> bool:
        return held_value(tensor, self.held) is not None

    def bytes_in_proto(self) -> int:
        """Bytes of tensor data the proto itself holds (neither on disk nor held)."""
        return sum(payload_bytes(tensor) or 0 for tensor in model_tensors(self.proto)
                   if not is_external(tensor) and not self.is_held(tensor))

    # -- editing ---------------------------------------------------------------------------------------
    def replace(self, tensor: TensorProto, value: HeldValue, name: str, *, main_graph: bool) -> None:
        """Give ``tensor`` (renamed ``name``) the value ``value``: held beside the proto where it may be (a
        main-graph value large enough, of a dtype onnxruntime takes in place), else in the proto."""
        held = self.held if main_graph else None
        if holdable(value, held):
            hold(tensor, value, name, self.held)
        else:
            clear_value(tensor)
            tensor.MergeFrom(numpy_helper.from_array(held_array(value), name))

    # -- handing over ----------------------------------------------------------------------------------
    def held_array(self, name: str) -> np.ndarray:
        """A held value as an array for onnxruntime to compute with in place. A deferred product is computed
        once and replaces itself in ``held``: the array must live as long as the model (which outlives its
        sessions), and a later write then takes it without computing it again."""
        value = self.held[name]
        if not isinstance(value, np.ndarray):
            value = self.held[name] = held_array(value)
        return value

    def held_as_external(self, location: str) -> tuple[ModelProto, dict[str, np.ndarray]]:
        """A copy of the proto whose held tensors are declared external at ``location``, and their arrays by
        name: what a runtime that takes initializers from memory (onnxruntime) needs to run the model as it
        is, without writing it."""
        proto = ModelProto()
        proto.CopyFrom(self.proto)
        arrays: dict[str, np.ndarray] = {}
        for tensor in proto.graph.initializer:
            if self.is_held(tensor):
                value = arrays[tensor.name] = self.held_array(tensor.name)
                tensor.data_location = TensorProto.EXTERNAL
                for key, text in (("location", location), ("offset", "0"), ("length", str(value.nbytes))):
                    entry = tensor.external_data.add()
                    entry.key, entry.value = key, text
        return proto, arrays

    def compute_deferred(self) -> None:
        """Every deferred product computed now (see :meth:`held_array`)."""
        for name in list(self.held):
            self.held_array(name)

    def write(self, path: str | os.PathLike[str], *, external_data: str | None = None,
              external_threshold: int = limits.PROTOBUF_LIMIT, overwrite_input: bool = False) -> list[Path]:
        """The model written atomically with every tensor streamed from where it is (``io.write_model``).
        No file the input consists of is replaced, unless ``overwrite_input`` and ``path`` is the input's
        model file: then the whole input may be replaced."""
        replacing = overwrite_input and bool(self.input_files) and same_file(self.input_files[0], Path(path))
        return write_model(self.proto, path, external_data=external_data, external_threshold=external_threshold,
                           base_dir=self.base_dir, held=self.held, protected=[] if replacing else self.input_files)

    @contextlib.contextmanager
    def staged(self, *, external_threshold: int = limits.PROTOBUF_LIMIT) -> Iterator[Path]:
        """The model written to a temporary file, for the checker or onnxruntime to read; removed on exit."""
        with staged_file(self.proto, self.base_dir, self.held, external_threshold=external_threshold) as path:
            yield path

    def weightless(self) -> ModelProto | None:
        """The model's structure without its weights, for checks that need only types and shapes: each
        main-graph initializer of ``limits.HELD_MIN_BYTES`` or more (held ones included) or kept on disk is
        declared a graph input of its type and shape instead. None if tensors on disk remain elsewhere."""
        return weightless(self.proto)

    def inline(self) -> ModelProto:
        """The proto with every main-graph tensor in memory: those left in ``source`` read, the held ones
        put back in. External data files stay external."""
        for tensor in self.proto.graph.initializer:
            value = held_value(tensor, self.held)
            if value is not None:
                tensor.raw_data = held_array(value).tobytes()
            elif self.source is not None and is_external(tensor) and _location(tensor) == self.source.name:
                set_inline(tensor, read_external(tensor, self.source.parent))
        self.source, self.held = None, {}
        return self.proto


def weightless(model: ModelProto) -> ModelProto | None:
    """:meth:`ModelStore.weightless` of any model, held tensors or not (theirs have no data in the proto)."""
    skeleton = without_initializers(model)
    declared = {value.name for value in model.graph.input}
    for tensor in model.graph.initializer:
        if not is_external(tensor) and (payload_bytes(tensor) or 0) < limits.HELD_MIN_BYTES:
            skeleton.graph.initializer.append(tensor)
        elif tensor.name not in declared:
            skeleton.graph.input.append(onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type,
                                                                           list(tensor.dims)))
    if any(is_external(tensor) for tensor in model_tensors(skeleton)):
        return None
    return skeleton


def _location(tensor: TensorProto) -> str | None:
    return next((entry.value for entry in tensor.external_data if entry.key == "location"), None)
