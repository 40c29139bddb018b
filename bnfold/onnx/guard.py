"""The per-pattern guard: one bad rewrite never costs the whole model, and is never written.

Every pattern runs wrapped in :class:`GuardedPattern`: an exception escaping its plan (a bnfold bug) leaves
that site unfolded instead of aborting the fold. When the folded model as a whole fails ``onnx.checker`` or
onnxruntime cannot load it (while it can load the original), :func:`repair` finds the folds responsible by
refolding with some of them rejected, and returns the model with only those left unfolded. Every site the
guard leaves is recorded with reason ``guard_rejected`` and a message naming the pattern.

How the culprits are found: first each pattern's folds are applied on their own (the folds of every other
pattern rejected); a pattern whose folds alone give a valid model is innocent. Within a guilty pattern the
folds are bisected, applying half of them at a time, down to the single folds that break the model. That
costs one refold per pattern plus about ``2 k log2(n)`` for ``k`` bad folds among ``n``. Folds that break
the model only together are rejected pattern by pattern.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import onnx
from onnx import GraphProto, ModelProto

from bnfold.core.affine import FoldRefused
from bnfold.core.report import BnRecord
from bnfold.errors import BnfoldError, first_line
from bnfold.onnx.graph.index import subgraphs
from bnfold.onnx.graph.types import ValueType
from bnfold.onnx.store.model_store import ModelStore, weightless

GUARD_REJECTED = "guard_rejected"
# Domain, operator, input and output element types: what onnxruntime chooses a kernel by.
Signature = tuple[str, str, frozenset[int], frozenset[int]]

# A fold site: (scope, node label), as BnRecord has them.
SiteKey = tuple[str, str]
Rejections = Mapping[SiteKey, str]
# Folds the model with the given sites rejected; returns the folded model and its records.
Attempt = Callable[[Rejections], tuple[ModelStore, list[BnRecord]]]
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

    def __init__(self, pattern: Any, rejected: Rejections, events: dict[SiteKey, str]) -> None:
        self._pattern = pattern
        self._rejected = rejected
        self._events = events

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pattern, name)

    def plan(self, site: Any) -> Any:
        index = site.index
        anchor = (index.scope, index.node_label(site.anchor))
        try:
            rewrite = self._pattern.plan(site)
        except (FoldRefused, BnfoldError):
            raise
        except Exception as error:  # noqa: BLE001 - a crashing pattern costs its site, not the model
            message = (f"internal error in pattern {self._pattern.name} ({type(error).__name__}: "
                       f"{first_line(error)}); left unfolded, please report it")
            self._events[anchor] = message
            raise FoldRefused(GUARD_REJECTED, message) from None
        if rewrite is None:
            return None
        for node in rewrite.run.nodes:
            key = (index.scope, index.node_label(node))
            if key in self._rejected:
                self._events[anchor] = self._events[key] = self._rejected[key]
                raise FoldRefused(GUARD_REJECTED, self._rejected[key])
        return rewrite


def guarded(patterns: Any, rejected: Rejections, events: dict[SiteKey, str]) -> list[GuardedPattern]:
    return [GuardedPattern(pattern, rejected, events) for pattern in patterns]


def mark_guarded(records: list[BnRecord], events: Mapping[SiteKey, str]) -> list[BnRecord]:
    """The records, with every site the guard refused that stayed unfolded given reason ``guard_rejected``
    (the driver reports the first pattern's reason, which may be another pattern's refusal)."""
    return [
        record._replace(reason=GUARD_REJECTED, message=events[record_key(record)])
        if record.status == "left" and record_key(record) in events else record
        for record in records
    ]


def repair(attempt: Attempt, problem: Problem, records: list[BnRecord], first_problem: str
           ) -> tuple[ModelStore, list[BnRecord]]:
    """The model folded with the folds that make it invalid rejected (see the module docstring).

    ``records`` are those of the invalid fold, whose problem was ``first_problem``. Raises
    :class:`BnfoldError` (an internal error) if no set of rejections gives a valid model."""
    folds: dict[str, list[SiteKey]] = {}
    for record in records:
        if record.status == "folded":
            folds.setdefault(record.pattern or "?", []).append(record_key(record))
    every_fold = [key for keys in folds.values() for key in keys]

    def trial(applied: list[SiteKey]) -> str | None:
        kept = set(applied)
        model, _ = attempt({key: "" for key in every_fold if key not in kept})
        return problem(model)

    def message(pattern: str, why: str) -> str:
        return (f"internal error: the rewrite of pattern {pattern} gave a model that {why}; "
                f"left unfolded, please report it")

    def culprits(pattern: str, keys: list[SiteKey], why: str) -> dict[SiteKey, str]:
        """The folds among ``keys`` (which together give a model that ``why``) that break the model alone;
        all of ``keys`` if only their combination does."""
        found: dict[SiteKey, str] = {}
        if len(keys) > 1:
            for half in (keys[: len(keys) // 2], keys[len(keys) // 2:]):
                half_problem = trial(half)
                if half_problem is not None:
                    found |= culprits(pattern, half, half_problem)
        return found or {key: message(pattern, why) for key in keys}

    guilty: dict[str, str] = {}
    rejected: dict[SiteKey, str] = {}
    for pattern, keys in folds.items():
        pattern_problem = first_problem if len(folds) == 1 else trial(keys)
        if pattern_problem is not None:
            guilty[pattern] = pattern_problem
            rejected |= culprits(pattern, keys, pattern_problem)
    fallbacks = [
        rejected,
        {key: message(pattern, why) for pattern, why in guilty.items() for key in folds[pattern]},
        {key: message(pattern, first_problem) for pattern, keys in folds.items() for key in keys},
    ]
    last_problem: str | None = first_problem
    for candidate in fallbacks:
        if not candidate:
            continue
        model, refolded = attempt(candidate)
        last_problem = problem(model)
        if last_problem is None:
            return model, refolded
    raise BnfoldError(f"internal error: the folded model {last_problem}")
