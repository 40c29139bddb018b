"""A folded model not written to any file, and how the engines open one: every storage detail verification
needs is here, so that a change of how a fold holds its weights stays in this module."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import ModelProto, TensorProto

from bnfold.core.runtime import unoptimized_session
from bnfold.onnx.store import limits
from bnfold.onnx.store.external import HeldTensors, held_array, held_value, is_external, model_tensors, payload_bytes
from bnfold.onnx.store.io import staged_file


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


# onnxruntime honours this option, which tells a model given as bytes where its external data is, from 1.21.
EXTERNAL_DATA_FOLDER = "session.model_external_initializers_file_folder_path"
EXTERNAL_DATA_FOLDER_SINCE = (1, 21)
# onnxruntime puts an array given to it in place of an initializer only if the model declares that initializer
# external. It never opens the location then; this one names no file, should that ever change.
_IN_MEMORY_LOCATION = "bnfold-held-in-memory"


def ort_version() -> tuple[int, ...]:
    return tuple(int(part) for part in ort.__version__.split(".")[:2] if part.isdigit())


def opens_in_place(model: UnwrittenModel) -> bool:
    """Whether onnxruntime can take ``model`` as it is: what remains in its proto fits in one protobuf
    message, and if some tensors are on disk, onnxruntime can be told where."""
    in_proto = sum(payload_bytes(tensor) or 0 for tensor in model_tensors(model.proto)
                   if not is_external(tensor) and held_value(tensor, model.held) is None)
    if in_proto >= limits.PROTOBUF_LIMIT:
        return False
    return model.base_dir is None or ort_version() >= EXTERNAL_DATA_FOLDER_SINCE


def unwritten_session(model: UnwrittenModel, options: ort.SessionOptions,
                      staged_files: contextlib.ExitStack) -> ort.InferenceSession:
    """A session on ``model``: in place if it :func:`opens_in_place`, else on a staged copy that lives as long
    as ``staged_files``."""
    if opens_in_place(model):
        return _in_place_session(model, options)
    # Every weight in the staged file's aligned data file, which onnxruntime maps instead of copying.
    path = staged_files.enter_context(staged_file(model.proto, model.base_dir, model.held, external_threshold=0))
    return unoptimized_session(path, options)


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
        options.add_session_config_entry(EXTERNAL_DATA_FOLDER, os.fspath(model.base_dir))
    return unoptimized_session(proto.SerializeToString(), options)


def loaded_unwritten(model: UnwrittenModel) -> ModelProto:
    """``model`` with every tensor in memory, as onnx.reference needs it."""
    with staged_file(model.proto, model.base_dir, model.held) as path:
        return onnx.load(os.fspath(path))
