"""Every graph of a model in the order it must fold: the main graph, the subgraphs of ``If``, ``Loop``,
``Scan`` (any graph attribute, nested), and the model-local functions. The traversal only walks and
commits; the driver (:mod:`bnfold.onnx.fold.driver`) folds each graph it is handed.

A subgraph folds, and is committed, before the graph holding it: the fold can stop the subgraph reading an
outer value, and the outer graph must see that before it decides what is exclusively read, or a second run
would fold more than the first. Records list each graph's batch norms before those of its subgraphs
(:attr:`GraphFold.order`); a subgraph's ``scope`` is the path to it, e.g. ``If_0/then_branch`` or
``Loop_1/body/If_2/else_branch``.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field

from onnx import FunctionProto, ModelProto, NodeProto

from bnfold.core.affine import FoldRefused
from bnfold.core.report import BnRecord
from bnfold.onnx.graph.functions import (
    attribute_references,
    body_graph,
    function_opset,
    function_scope,
    function_types,
    write_back,
)
from bnfold.onnx.graph.index import GraphIndex, NameAllocator, opset_version
from bnfold.onnx.graph.types import ModelTypes, ScopeKey, nested_graphs
from bnfold.onnx.store.model_store import ModelStore
from bnfold.reasons import Reason


@dataclass
class GraphFold:
    """One graph to fold. ``order`` is its place in the report; ``left_because`` says why its batch norms
    stay whatever the patterns would do (None: fold it). The driver puts the graph's records in ``records``
    before it asks for the next graph: a function's body is written back only if something in it folded."""

    index: GraphIndex
    order: int
    left_because: FoldRefused | None = None
    records: list[BnRecord] = field(default_factory=list)


def graphs_to_fold(store: ModelStore, *, allow_overridable: bool, types: ModelTypes) -> Iterator[GraphFold]:
    """Every graph of ``store``'s model, each when it is its turn to fold; a graph is committed to the model
    once the next one is asked for (the last one, when the iteration ends). ``types`` are
    ``types.infer_types(model)``; each graph folds with the types of its own scope."""
    model = store.proto
    order = itertools.count()
    # A copy: the fold records renames in it, and the caller may fold the model again.
    index = GraphIndex(model.graph, dict(types.main), NameAllocator([model.graph]), opset=opset_version(model),
                       allow_overridable=allow_overridable, store=store, main_graph=True,
                       listed_initializers=lists_initializers(model))
    yield from _tree(index, order, types, ())
    index.commit()
    for function in model.functions:
        yield from _function(store, function, types, order)


def lists_initializers(model: ModelProto) -> bool:
    """Whether ``model``'s IR version (3 or older) requires every initializer to be listed as a graph input."""
    return model.ir_version < _FIRST_IR_WITH_UNLISTED_INITIALIZERS


_FIRST_IR_WITH_UNLISTED_INITIALIZERS = 4


def _tree(index: GraphIndex, order: Iterator[int], types: ModelTypes, key: ScopeKey,
          left_because: FoldRefused | None = None) -> Iterator[GraphFold]:
    """The subgraphs of ``index``'s nodes (committing each), then ``index`` itself (left uncommitted).
    ``key`` is where ``index``'s graph is in ``types``."""
    own = next(order)  # numbered on the way down: a graph reports before its subgraphs
    holders: list[NodeProto] = []
    for node, inner_key, graph in list(nested_graphs(index.graph, key)):
        prefix = f"{index.scope}/" if index.scope else ""
        inner = GraphIndex(graph, types.scope(inner_key, index.types), index.names, opset=index.opset,
                           allow_overridable=index.allow_overridable, outer=index, store=index.store,
                           listed_initializers=index.listed_initializers,
                           scope=f"{prefix}{index.node_label(node)}/{inner_key[-1]}")
        yield from _tree(inner, order, types, inner_key, left_because)
        inner.commit()
        if not any(holder is node for holder in holders):
            holders.append(node)
    for node in holders:
        index.refresh_reads(node)
    yield GraphFold(index, own, left_because)


def _function(store: ModelStore, function: FunctionProto, types: ModelTypes, order: Iterator[int]
              ) -> Iterator[GraphFold]:
    model = store.proto
    graph = body_graph(function)
    references = attribute_references(function)
    # The body's own types, from the types its callers give it, each call site read in its own scope.
    body_types = ModelTypes({}, {}) if references else function_types(model, function, types)
    index = GraphIndex(graph, dict(body_types.main), NameAllocator([graph]),
                       opset=function_opset(model, function), scope=function_scope(function), store=store)
    if references:
        yield from _tree(index, order, body_types, (), FoldRefused(
            Reason.FUNCTION_ATTRIBUTE_REFERENCE,
            f"its function takes attribute(s) {', '.join(references)} from each caller, so the values a fold "
            f"would depend on are not known"))
        return
    folds = []
    for fold in _tree(index, order, body_types, ()):
        yield fold
        folds.append(fold)
    index.commit()
    if any(record.status == "folded" for fold in folds for record in fold.records):
        write_back(graph, function)
