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
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from onnx import AttributeProto, FunctionProto, GraphProto, ModelProto, NodeProto

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
from bnfold.onnx.graph.types import ValueType
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


def graphs_to_fold(
    store: ModelStore, *, allow_overridable: bool, types: Mapping[str, ValueType],
) -> Iterator[GraphFold]:
    """Every graph of ``store``'s model, each when it is its turn to fold; a graph is committed to the model
    once the next one is asked for (the last one, when the iteration ends). ``types`` are
    ``types.infer_types(model)``."""
    model = store.proto
    types = dict(types)  # a copy: the fold records renames in it, and the caller may fold the model again
    order = itertools.count()
    index = GraphIndex(model.graph, types, NameAllocator([model.graph]), opset=opset_version(model),
                       allow_overridable=allow_overridable, store=store, main_graph=True,
                       listed_initializers=lists_initializers(model))
    yield from _tree(index, order)
    index.commit()
    for function in model.functions:
        yield from _function(store, function, types, order)


def lists_initializers(model: ModelProto) -> bool:
    """Whether ``model``'s IR version (3 or older) requires every initializer to be listed as a graph input."""
    return model.ir_version < _FIRST_IR_WITH_UNLISTED_INITIALIZERS


_FIRST_IR_WITH_UNLISTED_INITIALIZERS = 4


def _named_subgraphs(node: NodeProto) -> Iterator[tuple[str, GraphProto]]:
    for attribute in node.attribute:
        if attribute.type == AttributeProto.GRAPH:
            yield attribute.name, attribute.g
        elif attribute.type == AttributeProto.GRAPHS:
            for position, graph in enumerate(attribute.graphs):
                yield f"{attribute.name}[{position}]", graph


def _tree(index: GraphIndex, order: Iterator[int], left_because: FoldRefused | None = None) -> Iterator[GraphFold]:
    """The subgraphs of ``index``'s nodes (committing each), then ``index`` itself (left uncommitted)."""
    own = next(order)  # numbered on the way down: a graph reports before its subgraphs
    for node in list(index.nodes):
        named = list(_named_subgraphs(node))
        for attribute, graph in named:
            prefix = f"{index.scope}/" if index.scope else ""
            inner = GraphIndex(graph, index.types, index.names, opset=index.opset,
                               allow_overridable=index.allow_overridable, outer=index, store=index.store,
                               listed_initializers=index.listed_initializers,
                               scope=f"{prefix}{index.node_label(node)}/{attribute}")
            yield from _tree(inner, order, left_because)
            inner.commit()
        if named:
            index.refresh_reads(node)
    yield GraphFold(index, own, left_because)


def _function(
    store: ModelStore, function: FunctionProto, types: dict[str, ValueType], order: Iterator[int],
) -> Iterator[GraphFold]:
    model = store.proto
    graph = body_graph(function)
    references = attribute_references(function)
    index = GraphIndex(graph, {} if references else function_types(model, function, types), NameAllocator([graph]),
                       opset=function_opset(model, function), scope=function_scope(function), store=store)
    if references:
        yield from _tree(index, order, FoldRefused(
            Reason.FUNCTION_ATTRIBUTE_REFERENCE,
            f"its function takes attribute(s) {', '.join(references)} from each caller, so the values a fold "
            f"would depend on are not known"))
        return
    folds = []
    for fold in _tree(index, order):
        yield fold
        folds.append(fold)
    index.commit()
    if any(record.status == "folded" for fold in folds for record in fold.records):
        write_back(graph, function)
