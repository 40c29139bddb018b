"""One fold of one ONNX model: read it, infer its types, fold it, check the result, and fold again with
the sites the guard finds left when the result must not be written (see :mod:`bnfold.onnx.guard`)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator

import onnx
from onnx import ModelProto

from bnfold.core.report import Totals
from bnfold.errors import BnfoldError, InputError, InternalError, first_line
from bnfold.onnx.fold.driver import fold_model, model_totals
from bnfold.onnx.fold.patterns import ALL_PATTERNS
from bnfold.onnx.fold.traversal import lists_initializers
from bnfold.onnx.graph.types import ModelTypes, infer_types
from bnfold.onnx.guard import Folded, FoldedModelCheck, Guard, Rejections, repair
from bnfold.onnx.store import limits
from bnfold.onnx.store.io import tensor_bytes
from bnfold.onnx.store.model_store import ModelStore

ModelLike = ModelProto | str | os.PathLike[str]
Progress = Callable[[str, int, int], None]


def editable(model: ModelLike) -> ModelStore:
    """A store of the model that bnfold may edit; the caller's proto or file is never modified. Read from a
    path, large tensors stay on disk until a fold needs them (see :meth:`ModelStore.read`), so at most one
    copy of what is folded is ever in memory."""
    if isinstance(model, ModelProto):
        return ModelStore.copy_of(model)
    if isinstance(model, str | os.PathLike):
        return ModelStore.read(model)
    raise InputError(f"expected an onnx.ModelProto or a path, got {type(model).__name__}")


def check_input(model: ModelLike, what: str) -> None:
    """onnx's full check; from the file for a path, so external data and models over 2 GB are covered."""
    if isinstance(model, ModelProto) and tensor_bytes(model) >= limits.PROTOBUF_LIMIT:
        return  # a caller's proto this large cannot be serialized for the checker; folded ones are staged
    try:
        onnx.checker.check_model(model if isinstance(model, ModelProto) else os.fspath(model), full_check=True)
    except Exception as error:  # noqa: BLE001 - besides ValidationError, the checker raises ValueError on bad data
        raise InputError(f"{what} fails onnx.checker: {first_line(error)}") from None


@contextlib.contextmanager
def blaming(original: ModelLike) -> Iterator[None]:
    """Blame the input when it is invalid itself; anything else is bnfold's bug, and nothing is written."""
    try:
        yield
    except BnfoldError:
        raise
    except Exception as error:
        check_input(original, "the input model")
        raise InternalError(f"internal error while folding ({type(error).__name__}: {error})") from error


def fold_notes(folded: ModelProto, totals: Totals) -> list[str]:
    """What a user should know about how the model was read and what the fold made of it."""
    notes = []
    initializers = {tensor.name for tensor in folded.graph.initializer}
    if lists_initializers(folded) and any(value.name in initializers for value in folded.graph.input):
        notes.append(f"IR version {folded.ir_version} lists every initializer as a graph input too; they were "
                     f"taken as constants, as onnxruntime takes them (and new ones listed in turn)")
    grown = totals.param_bytes_after - totals.param_bytes_before
    if grown > limits.NOTED_GROWTH_BYTES and totals.param_bytes_after > 2 * totals.param_bytes_before:
        notes.append(f"parameters grew by {grown / 2**20:.1f} MiB: weights the model computes at run time "
                     f"(such as ConstantOfShape outputs) are stored once a batch norm is folded into them")
    return notes


class FoldSession:
    """The fold of ``model`` (the caller's proto or path, never modified, and what the result is verified
    against) with the ``enabled`` patterns; :meth:`fold` runs it once. ``before`` are the model's totals
    (batch norms, nodes, parameter bytes)."""

    def __init__(self, model: ModelLike, enabled: list[str], *, allow_overridable: bool,
                 progress: Progress | None) -> None:
        self.original = model
        self._enabled = enabled
        self._allow_overridable = allow_overridable
        self._progress = progress
        # The model just read serves the first attempt; the guard's refolds read it again.
        self._unfolded: ModelStore | None = editable(model)
        self.before = model_totals(self._unfolded.proto)
        self._types = ModelTypes({}, {})

    def fold(self) -> Folded:
        """The folded model, checked: any fold that would make it invalid left, with reason ``guard_rejected``.
        Raises :class:`InternalError` if leaving folds cannot make it valid."""
        unfolded = self._unfolded
        assert unfolded is not None, "a session folds once"
        with blaming(self.original):
            # Every attempt folds the same model: one inference serves them and the check.
            self._types = infer_types(unfolded.proto)
        check = FoldedModelCheck(unfolded.proto, self._types.flat(), self._reread)
        folded = self._attempt({})
        problem = check(folded.store)
        if problem is None:
            return folded
        check_input(self.original, "the input model")
        return repair(self._attempt, check, folded, problem)

    def _reread(self) -> ModelProto:
        return editable(self.original).proto

    def _attempt(self, rejected: Rejections) -> Folded:
        working = self._unfolded if self._unfolded is not None else editable(self.original)
        self._unfolded = None
        guard = Guard(ALL_PATTERNS, rejected)
        with blaming(self.original):
            records = fold_model(working, guard, self._enabled, allow_overridable=self._allow_overridable,
                                 progress=self._progress, types=self._types)
        return Folded(working, guard.marked(records))
