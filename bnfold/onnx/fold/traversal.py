"""Every graph of a model, folded by one per-graph step: the main graph, the subgraphs of ``If``, ``Loop``,
``Scan`` (any graph attribute, nested), and the model-local functions.

A subgraph folds, and is committed, before the graph holding it: the fold can stop the subgraph reading an
outer value, and the outer graph must see that before it decides what is exclusively read, or a second run
would fold more than the first. Records list each graph's batch norms before those of its subgraphs; a
subgraph's ``scope`` is the path to it, e.g. ``If_0/then_branch`` or ``Loop_1/body/If_2/else_branch``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from onnx import AttributeProto, FunctionProto, GraphProto, NodeProto

from bnfold.core.report import BnRecord
from bnfold.onnx.fold.apply import is_batchnorm
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

FoldOne = Callable[[GraphIndex], list[BnRecord]]


def fold_all_graphs(
    store: ModelStore, fold_one: FoldOne, *, allow_overridable: bool, types: Mapping[str, ValueType],
) -> list[BnRecord]:
    """Apply ``fold_one`` to every graph of ``store``'s model (in place) and commit; the records of all of
    them. ``types`` are ``types.infer_types(model)``."""
    model = store.proto
    types = dict(types)  # a copy: the fold records renames in it, and the caller may fold the model again
    index = GraphIndex(model.graph, types, NameAllocator([model.graph]), opset=opset_version(model),
                       allow_overridable=allow_overridable, store=store, main_graph=True)
    records = fold_tree(index, fold_one)
    index.commit()
    for function in model.functions:
        records.extend(_fold_function(store, function, types, fold_one))
    return records


def _named_subgraphs(node: NodeProto) -> Iterator[tuple[str, GraphProto]]:
    for attribute in node.attribute:
        if attribute.type == AttributeProto.GRAPH:
            yield attribute.name, attribute.g
        elif attribute.type == AttributeProto.GRAPHS:
            for position, graph in enumerate(attribute.graphs):
                yield f"{attribute.name}[{position}]", graph


def fold_tree(index: GraphIndex, fold_one: FoldOne) -> list[BnRecord]:
    """Fold the subgraphs of ``index``'s nodes (committing each), then ``index`` itself (left uncommitted)."""
    inner_records: list[BnRecord] = []
    for node in list(index.nodes):
        named = list(_named_subgraphs(node))
        for attribute, graph in named:
            prefix = f"{index.scope}/" if index.scope else ""
            inner = GraphIndex(graph, index.types, index.names, opset=index.opset,
                               allow_overridable=index.allow_overridable, outer=index, store=index.store,
                               scope=f"{prefix}{index.node_label(node)}/{attribute}")
            inner_records.extend(fold_tree(inner, fold_one))
            inner.commit()
        if named:
            index.refresh_reads(node)
    return fold_one(index) + inner_records


def _fold_function(
    store: ModelStore, function: FunctionProto, types: dict[str, ValueType], fold_one: FoldOne,
) -> list[BnRecord]:
    model = store.proto
    graph = body_graph(function)
    references = attribute_references(function)
    index = GraphIndex(graph, {} if references else function_types(model, function, types), NameAllocator([graph]),
                       opset=function_opset(model, function), scope=function_scope(function), store=store)
    if references:
        return fold_tree(index, lambda inner: _left_for_references(inner, references))
    records = fold_tree(index, fold_one)
    index.commit()
    if any(record.status == "folded" for record in records):
        write_back(graph, function)
    return records


def _left_for_references(index: GraphIndex, references: list[str]) -> list[BnRecord]:
    message = (f"its function takes attribute(s) {', '.join(references)} from each caller, so the values a fold "
               f"would depend on are not known")
    return [BnRecord(index.node_label(node), "left", message, reason="function_attribute_reference",
                     scope=index.scope)
            for node in index.nodes if is_batchnorm(node)]
