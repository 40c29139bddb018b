"""The per-pattern guard: one bad rewrite never costs the whole model, and is never written.

Every pattern runs wrapped in :class:`GuardedPattern`: an exception escaping its plan (a bnfold bug) leaves
that site unfolded instead of aborting the fold. When the folded model as a whole fails ``onnx.checker`` or
onnxruntime cannot load it (while it can load the original), :func:`repair` finds the folds responsible by
refolding with some of them rejected, and returns the model with only those left unfolded. Every site the
guard leaves is recorded with reason ``guard_rejected`` and a message naming the pattern.

How the culprits are found, in at most one refold per fold plus two:

* by name: the checker and onnxruntime name the node at fault ("node name: conv2"); while a complaint names
  the layer or batch norm of exactly one fold not yet rejected, that fold is rejected and the model refolded;
* else one fold at a time: the folds are applied in the order they were made, each kept only if the model
  with it and every fold kept before it is valid. A fold that breaks the model only together with earlier
  ones is the one rejected.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import onnx
from onnx import GraphProto, ModelProto

from bnfold.core.affine import FoldRefused
from bnfold.core.report import BnRecord
from bnfold.errors import BnfoldError, InternalError, first_line
from bnfold.onnx.fold.patterns.base import Pattern, Rewrite, Site
from bnfold.onnx.graph.index import subgraphs
from bnfold.onnx.graph.types import ValueType
from bnfold.onnx.store.model_store import ModelStore, weightless
from bnfold.reasons import Reason

# Domain, operator, input and output element types: what onnxruntime chooses a kernel by.
Signature = tuple[str, str, frozenset[int], frozenset[int]]

# A fold site: (scope, node label), as BnRecord has them.
SiteKey = tuple[str, str]
# The sites a fold must leave, each with the message its record gets.
Rejections = Mapping[SiteKey, str]


class Folded(NamedTuple):
    """A folded model and its records."""

    store: ModelStore
    records: list[BnRecord]


# Folds the model again, with the given sites left.
Attempt = Callable[[Rejections], Folded]
# Why a folded model must not be written (first line of the checker's or onnxruntime's complaint), or None.
Problem = Callable[[ModelStore], str | None]


class FoldedModelCheck:
    """Whether a folded model may be written: it passes ``onnx.checker`` (full check), and onnxruntime can
    load it if it can load ``original``.

    Both look at the model's structure, not its weights: large initializers of the main graph are declared
    as graph inputs of their type and shape instead (``ModelStore.weightless``), so a check costs milliseconds
    whatever the model's size, and tensors still on disk are not read. onnxruntime is asked only when the
    fold made a node onnxruntime may have no kernel for: one whose operator and input and output types
    (:func:`kernel_signatures`) appear nowhere in the original. A model with tensors on disk outside the main
    graph's initializers is staged in a file for the checker, without the onnxruntime load (verification
    loads it anyway)."""

    def __init__(self, original: ModelProto, original_types: Mapping[str, ValueType],
                 reread_original: Callable[[], ModelProto]) -> None:
        """``original`` is the model before folding, as read (some of its tensors may still be on disk),
        ``original_types`` the types of its values (``types.infer_types``, which the fold runs anyway), and
        ``reread_original`` reads it again: the first fold edits ``original`` itself, and onnxruntime needs
        the original only in the rare case a candidate it cannot load has a new kind of node."""
        elem_types = {name: value_type.elem_type for name, value_type in original_types.items()}
        self._original_signatures = kernel_signatures(original.graph, elem_types)
        self._reread_original = reread_original
        self._original_loads: bool | None = None

    def __call__(self, candidate: ModelStore) -> str | None:
        """Why ``candidate`` must not be written, as a phrase ("fails onnx.checker (...)"), or None."""
        skeleton = candidate.weightless()
        if skeleton is None:
            return self._check_staged(candidate)
        serialized = skeleton.SerializeToString()
        try:
            # The checker's full check is these two steps; run apart, the inferred types serve below too.
            onnx.checker.check_model(serialized)
            inferred = onnx.shape_inference.infer_shapes(serialized, check_type=True, strict_mode=True)
        except Exception as error:  # noqa: BLE001 - besides ValidationError, the checker raises ValueError on bad data
            return f"fails onnx.checker ({first_line(error)})"
        if kernel_signatures(inferred.graph, inferred_elem_types(inferred)) <= self._original_signatures:
            return None
        failure = _ort_load_failure(serialized)
        if failure is None:
            return None
        if self._original_loads is None:
            original = weightless(self._reread_original())
            # An original that cannot be loaded without its data files proves nothing against the fold.
            self._original_loads = original is not None and _ort_load_failure(original.SerializeToString()) is None
        return f"onnxruntime cannot load ({failure})" if self._original_loads else None

    def _check_staged(self, candidate: ModelStore) -> str | None:
        with candidate.staged(external_threshold=0) as path:
            try:
                onnx.checker.check_model(os.fspath(path), full_check=True)
            except Exception as error:  # noqa: BLE001 - as above
                return f"fails onnx.checker ({first_line(error)})"
        return None


def kernel_signatures(graph: GraphProto, elem_types: Mapping[str, int]) -> set[Signature]:
    """What onnxruntime picks a kernel by, for every node of ``graph`` and its subgraphs: domain, operator,
    and the element types of its inputs and outputs (``elem_types``; 0 where inference could not tell)."""
    signatures: set[Signature] = set()

    def visit(graph: GraphProto) -> None:
        for node in graph.node:
            inputs = frozenset(elem_types.get(name, 0) for name in node.input if name)
            signatures.add((node.domain, node.op_type, inputs,
                            frozenset(elem_types.get(name, 0) for name in node.output if name)))
            for subgraph in subgraphs(node):
                visit(subgraph)

    visit(graph)
    return signatures


def inferred_elem_types(inferred: ModelProto) -> dict[str, int]:
    """The element type of every value a model shape inference has run on declares, in any of its graphs
    (value names are unique model-wide)."""
    elem_types: dict[str, int] = {}

    def visit(graph: GraphProto) -> None:
        for value in (*graph.input, *graph.output, *graph.value_info):
            elem_types[value.name] = value.type.tensor_type.elem_type
        elem_types.update((tensor.name, tensor.data_type) for tensor in graph.initializer)
        for node in graph.node:
            for subgraph in subgraphs(node):
                visit(subgraph)

    visit(inferred.graph)
    return elem_types


def _ort_load_failure(model: bytes) -> str | None:
    # Only when a fold needs it: importing onnxruntime alone costs a tenth of a second.
    from bnfold.core.runtime import unoptimized_session

    try:
        unoptimized_session(model)
    except Exception as error:  # noqa: BLE001 - whatever the reason, it cannot be loaded
        return first_line(error)
    return None


def record_key(record: BnRecord) -> SiteKey:
    return record.scope, record.bn


class GuardedPattern:
    """``pattern`` with two guarantees: its plan never raises anything but :class:`FoldRefused` or a
    :class:`BnfoldError` about the input, and it plans nothing that touches a rejected site."""

    def __init__(self, pattern: Pattern, rejected: Rejections, events: dict[SiteKey, str]) -> None:
        self.name = pattern.name
        self._pattern = pattern
        self._rejected = rejected
        self._events = events

    def plan(self, site: Site) -> Rewrite | None:
        index = site.index
        anchor = (index.scope, index.node_label(site.anchor))
        try:
            rewrite = self._pattern.plan(site)
        except (FoldRefused, BnfoldError):
            raise
        except Exception as error:  # noqa: BLE001 - a crashing pattern costs its site, not the model
            message = (f"internal error in pattern {self.name} ({type(error).__name__}: "
                       f"{first_line(error)}); left unfolded, please report it")
            self._events[anchor] = message
            raise FoldRefused(Reason.GUARD_REJECTED, message) from None
        if rewrite is None:
            return None
        for node in rewrite.run.nodes:
            key = (index.scope, index.node_label(node))
            if key in self._rejected:
                self._events[anchor] = self._events[key] = self._rejected[key]
                raise FoldRefused(Reason.GUARD_REJECTED, self._rejected[key])
        return rewrite


class Guard:
    """The guard of one fold: every pattern guarded, and the sites the fold must leave."""

    def __init__(self, patterns: Sequence[Pattern], rejected: Rejections) -> None:
        self._rejected = rejected
        self._events: dict[SiteKey, str] = {}
        self.patterns = [GuardedPattern(pattern, rejected, self._events) for pattern in patterns]

    def rejection(self, site: SiteKey) -> str | None:
        """Why ``site`` must stay, or None; the driver does not even plan a rejected site."""
        return self._rejected.get(site)

    def marked(self, records: list[BnRecord]) -> list[BnRecord]:
        """The records, with every site the guard refused that stayed unfolded given reason ``guard_rejected``
        (the driver reports the first pattern's reason, which may be another pattern's refusal)."""
        return [
            record._replace(reason=Reason.GUARD_REJECTED, message=self._events[record_key(record)])
            if record.status == "left" and record_key(record) in self._events else record
            for record in records
        ]


def repair(attempt: Attempt, problem: Problem, first: Folded, first_problem: str) -> Folded:
    """The model folded with the folds that make it invalid rejected (see the module docstring).

    ``first`` is the invalid fold, whose problem was ``first_problem``. Raises :class:`InternalError` if the
    model is invalid with every fold rejected."""
    folds = {record_key(record): record for record in first.records if record.status == "folded"}
    rejected: dict[SiteKey, str] = {}
    latest = first
    why: str | None = first_problem
    while why is not None:
        named = [key for key in _named(why, folds) if key not in rejected]
        if len(named) != 1:
            break
        rejected[named[0]] = _message(folds[named[0]], why)
        latest = attempt(rejected)
        why = problem(latest.store)
    if why is None:
        return latest
    return _one_at_a_time(attempt, problem, folds)


def _one_at_a_time(attempt: Attempt, problem: Problem, folds: Mapping[SiteKey, BnRecord]) -> Folded:
    def applying(kept: list[SiteKey]) -> str | None:
        trial = attempt({key: "" for key in folds if key not in kept})
        return problem(trial.store)

    unfolded_problem = applying([])
    if unfolded_problem is not None:
        raise InternalError(f"internal error: the folded model {unfolded_problem} with every fold left")
    kept: list[SiteKey] = []
    rejected: dict[SiteKey, str] = {}
    for key, record in folds.items():
        why = applying([*kept, key])
        if why is None:
            kept.append(key)
        else:
            rejected[key] = _message(record, why)
    repaired = attempt(rejected)
    why = problem(repaired.store)
    if why is not None:
        raise InternalError(f"internal error: the folded model {why}")
    return repaired


def _named(complaint: str, folds: Mapping[SiteKey, BnRecord]) -> list[SiteKey]:
    """The folds whose batch norm or layer ``complaint`` names."""
    return [key for key, record in folds.items()
            if any(_mentions(complaint, label) for label in (record.bn, record.into) if label)]


def _mentions(text: str, label: str) -> bool:
    # A label ends where a name could not go on: "conv1" is not named in "conv10", but it is in "conv1.bias".
    return re.search(rf"(?<![\w/-]){re.escape(label)}(?![\w/-])", text) is not None


def _message(record: BnRecord, why: str) -> str:
    return (f"internal error: the rewrite of pattern {record.pattern or '?'} gave a model that {why}; "
            f"left unfolded, please report it")
