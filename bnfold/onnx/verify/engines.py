"""Which engine runs both models, and the runners it gives them.

onnxruntime's CPU provider with every graph optimisation off (:mod:`bnfold.core.runtime`), unless it has no
kernel for an operator of either model (float64 Conv, most bfloat16 operators) or a model takes or returns
bfloat16 tensors (which onnxruntime's Python API cannot exchange): both models then run under
``onnx.reference.ReferenceEvaluator``, with the fixes of :mod:`bnfold.onnx.verify.reference_fixes`."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import onnx
import onnxruntime as ort
from onnx import ModelProto, TensorProto

from bnfold.core.runtime import unoptimized_options, unoptimized_session
from bnfold.errors import InputError, first_line
from bnfold.onnx.store.model_store import ModelStore
from bnfold.onnx.verify.coverage import Coverage
from bnfold.onnx.verify.inputs import Feeds
from bnfold.onnx.verify.interface import ModelSource
from bnfold.onnx.verify.reference_fixes import reference_evaluator
from bnfold.onnx.verify.unwritten import loaded_unwritten, unwritten_session

ENGINE_ORT = "onnxruntime"
ENGINE_REFERENCE = "onnx.reference"

Runner = Callable[[list[str], Feeds], Sequence[Any]]


def open_runners(
    sources: Mapping[str, ModelSource], protos: Mapping[str, ModelProto], notes: list[str],
    staged_files: contextlib.ExitStack, coverage: Coverage,
) -> tuple[str, dict[str, Runner]]:
    """The engine and a runner per role of ``sources``; why onnx.reference was chosen goes to ``notes``.
    Files staged for onnxruntime live as long as ``staged_files``. The candidate runs with ``coverage``'s
    probes where its engine can be given an instrumented copy."""
    edits = {role: coverage.instrument if role == "candidate" and coverage.needed else None for role in sources}
    bfloat16_tensor = next((
        value.name for proto in protos.values() for value in (*proto.graph.input, *proto.graph.output)
        if value.type.tensor_type.elem_type == TensorProto.BFLOAT16), None)
    if bfloat16_tensor is not None:
        notes.append(f"'{bfloat16_tensor}' is bfloat16, which onnxruntime's Python API cannot feed or fetch; "
                     f"both models ran under {ENGINE_REFERENCE}")
        return ENGINE_REFERENCE, {role: _reference_runner(role, sources[role], edits[role]) for role in sources}
    sessions = {}
    for role in sources:
        try:
            sessions[role] = _ort_session(sources[role], staged_files, edits[role])
        except Exception as error:  # noqa: BLE001 - sorted below into "no kernel" and "unusable model"
            message = first_line(error)
            if "NOT_IMPLEMENTED" not in message and "Could not find an implementation" not in message:
                raise InputError(f"onnxruntime cannot load the {role} model: {message}") from None
            notes.append(f"onnxruntime lacks a kernel the {role} model needs ({message}); "
                         f"both models ran under {ENGINE_REFERENCE}")
            return ENGINE_REFERENCE, {role: _reference_runner(role, sources[role], edits[role]) for role in sources}
    return ENGINE_ORT, {role: _runner(role, ENGINE_ORT, session.run) for role, session in sessions.items()}


def _ort_session(source: ModelSource, staged_files: contextlib.ExitStack,
                 edit: Callable[[ModelProto], None] | None) -> ort.InferenceSession:
    """A session on ``source``; ``edit`` (coverage probes) is applied to a copy of its proto (a path is read
    as the fold reads it, large tensors left in the file); a model too large to open in place is staged to
    disk and runs as it is."""
    if edit is not None and not isinstance(source, ModelProto):
        source = source if isinstance(source, ModelStore) else ModelStore.read(source)
    if isinstance(source, ModelStore):
        return unwritten_session(source, unoptimized_options(), staged_files, edit)
    if isinstance(source, ModelProto):
        return unoptimized_session(_edited(source, edit).SerializeToString())
    # A path goes to onnxruntime as is, so external data (models over 2 GB) resolves next to the file.
    return unoptimized_session(source)


def _edited(proto: ModelProto, edit: Callable[[ModelProto], None] | None) -> ModelProto:
    if edit is None:
        return proto
    copy = ModelProto()
    copy.CopyFrom(proto)
    edit(copy)
    return copy


def _loaded(source: ModelSource, edit: Callable[[ModelProto], None] | None) -> ModelProto:
    """``source`` with every tensor in memory, as onnx.reference needs it, ``edit`` applied."""
    if isinstance(source, ModelProto):
        return _edited(source, edit)
    # A model read here is this function's own copy.
    loaded = loaded_unwritten(source) if isinstance(source, ModelStore) else onnx.load(os.fspath(source))
    if edit is not None:
        edit(loaded)
    return loaded


def _reference_runner(role: str, source: ModelSource, edit: Callable[[ModelProto], None] | None) -> Runner:
    try:
        evaluator = reference_evaluator(_loaded(source, edit))
    except Exception as error:  # noqa: BLE001 - unsupported operator or unreadable data
        raise InputError(f"{ENGINE_REFERENCE} cannot load the {role} model: {first_line(error)}") from None
    return _runner(role, ENGINE_REFERENCE, evaluator.run)  # type: ignore[arg-type]  # a list, given names


def _runner(role: str, engine: str, run_model: Callable[[list[str], dict[str, Any]], Sequence[Any]]) -> Runner:
    def run(names: list[str], feeds: Feeds) -> Sequence[Any]:
        try:
            return run_model(names, dict(feeds))
        except Exception as error:  # noqa: BLE001 - a model that cannot run on these inputs
            raise InputError(f"{engine} failed to run the {role} model: {first_line(error)}") from None
    return run
