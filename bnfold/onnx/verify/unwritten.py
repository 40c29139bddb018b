"""How the engines open a folded model that is not written to any file: its store (see
:mod:`bnfold.onnx.store.model_store`) says where each weight is, and onnxruntime takes every weight there,
so verifying such a model neither writes nor copies one."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable

import onnx
import onnxruntime as ort
from onnx import ModelProto

from bnfold.core.runtime import unoptimized_session
from bnfold.onnx.store import limits
from bnfold.onnx.store.model_store import ModelStore

# onnxruntime honours this option, which tells a model given as bytes where its external data is, from 1.21.
EXTERNAL_DATA_FOLDER = "session.model_external_initializers_file_folder_path"
EXTERNAL_DATA_FOLDER_SINCE = (1, 21)
# onnxruntime puts an array given to it in place of an initializer only if the model declares that initializer
# external. It never opens the location then; this one names no file, should that ever change.
_IN_MEMORY_LOCATION = "bnfold-held-in-memory"


def ort_version() -> tuple[int, ...]:
    return tuple(int(part) for part in ort.__version__.split(".")[:2] if part.isdigit())


def opens_in_place(model: ModelStore) -> bool:
    """Whether onnxruntime can take ``model`` as it is: what remains in its proto fits in one protobuf
    message, and if some tensors are on disk, onnxruntime can be told where."""
    if model.bytes_in_proto() >= limits.PROTOBUF_LIMIT:
        return False
    return model.base_dir is None or ort_version() >= EXTERNAL_DATA_FOLDER_SINCE


def unwritten_session(model: ModelStore, options: ort.SessionOptions, staged_files: contextlib.ExitStack,
                      edit: Callable[[ModelProto], None] | None = None) -> ort.InferenceSession:
    """A session on ``model``: in place if it :func:`opens_in_place` (with ``edit`` applied to the copy of
    its proto the session takes), else on a staged copy, unedited, that lives as long as ``staged_files``."""
    if opens_in_place(model):
        return _in_place_session(model, options, edit)
    # Every weight in the staged file's aligned data file, which onnxruntime maps instead of copying.
    path = staged_files.enter_context(model.staged(external_threshold=0))
    return unoptimized_session(path, options)


def _in_place_session(model: ModelStore, options: ort.SessionOptions,
                      edit: Callable[[ModelProto], None] | None) -> ort.InferenceSession:
    """A session on ``model`` that uses its held arrays in place, and reads its tensors on disk where they
    are."""
    proto, held = model.held_as_external(_IN_MEMORY_LOCATION)
    if edit is not None:
        edit(proto)
    if held:
        # onnxruntime computes with these arrays, not copies: they live in ``model``, which outlives the session.
        options.add_external_initializers(list(held), [ort.OrtValue.ortvalue_from_numpy(v) for v in held.values()])
    if model.base_dir is not None:
        options.add_session_config_entry(EXTERNAL_DATA_FOLDER, os.fspath(model.base_dir))
    return unoptimized_session(proto.SerializeToString(), options)


def loaded_unwritten(model: ModelStore) -> ModelProto:
    """``model`` with every tensor in memory, as onnx.reference needs it."""
    with model.staged() as path:
        return onnx.load(os.fspath(path))
