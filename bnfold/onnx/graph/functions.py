"""Model-local functions, folded like graphs.

A function body has no initializers: its constants are ``Constant`` nodes. It is folded as a temporary
graph, and written back with every tensor a fold created as a ``Constant`` node at the top of the body.
Value types inside come from the call sites, each read in its own scope (a call inside an ``If`` branch
sees that branch's types): shape inference runs on the body with the input types all calls share (a dim on
which calls differ is dynamic, a rank on which they differ unknown), and folds that need a rank or shape
they cannot get refuse.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import onnx
from onnx import FunctionProto, GraphProto, ModelProto, NodeProto, ValueInfoProto, helper

from bnfold.onnx.graph.index import opset_version, subgraphs
from bnfold.onnx.graph.types import ModelTypes, ScopeKey, ValueType, infer_types, nested_graphs


def function_scope(function: FunctionProto) -> str:
    name = f"{function.domain}.{function.name}" if function.domain else function.name
    return f"function:{name}" + (f"[{function.overload}]" if function.overload else "")


def function_opset(model: ModelProto, function: FunctionProto) -> int:
    return opset_version(function) or opset_version(model)


def _all_nodes(nodes: Iterator[NodeProto] | list[NodeProto]) -> Iterator[NodeProto]:
    for node in nodes:
        yield node
        for graph in subgraphs(node):
            yield from _all_nodes(graph.node)


def attribute_references(function: FunctionProto) -> list[str]:
    """Attributes the body takes from its caller. Their values differ per call, and an unset reference
    reads as 0 (a Gemm ``transB``, a BN ``epsilon``), so such a function is never folded."""
    return sorted({
        attribute.ref_attr_name
        for node in _all_nodes(function.node)
        for attribute in node.attribute
        if attribute.ref_attr_name
    })


def body_graph(function: FunctionProto) -> GraphProto:
    graph = GraphProto(name=function.name)
    graph.input.extend(ValueInfoProto(name=name) for name in function.input)
    graph.output.extend(ValueInfoProto(name=name) for name in function.output)
    graph.node.extend(function.node)
    graph.value_info.extend(function.value_info)
    return graph


def write_back(graph: GraphProto, function: FunctionProto) -> None:
    """Put a folded :func:`body_graph` back into ``function``, its new initializers as ``Constant`` nodes."""
    constants = [helper.make_node("Constant", [], [t.name], name=t.name, value=t) for t in graph.initializer]
    del function.node[:]
    function.node.extend(constants)
    function.node.extend(graph.node)
    del function.value_info[:]
    function.value_info.extend(graph.value_info)


def _is_call(node: NodeProto, function: FunctionProto) -> bool:
    return (node.domain, node.op_type, node.overload) == (function.domain, function.name, function.overload)


def _scoped_nodes(graph: GraphProto, key: ScopeKey, types: ModelTypes, visible: Mapping[str, ValueType]
                  ) -> Iterator[tuple[NodeProto, Mapping[str, ValueType]]]:
    """Every node of ``graph`` and its subgraphs, each with the types its scope sees."""
    yield from ((node, visible) for node in graph.node)
    for _holder, inner_key, subgraph in nested_graphs(graph, key):
        yield from _scoped_nodes(subgraph, inner_key, types, types.scope(inner_key, visible))


def _call_sites(model: ModelProto, function: FunctionProto, types: ModelTypes
                ) -> Iterator[tuple[NodeProto, Mapping[str, ValueType]]]:
    """Every call of ``function``, with the types of the scope it is in (none known in another function)."""
    for node, visible in _scoped_nodes(model.graph, (), types, types.main):
        if _is_call(node, function):
            yield node, visible
    for caller in model.functions:
        yield from ((node, {}) for node in _all_nodes(caller.node) if _is_call(node, function))


def _common_type(types: list[ValueType | None]) -> ValueType | None:
    """The type every one of ``types`` has: same dtype; dims kept where all calls agree, else dynamic."""
    known = [t for t in types if t is not None]
    if len(known) < len(types) or len({t.elem_type for t in known}) != 1:
        return None
    shapes = {t.shape for t in known}
    static = [shape for shape in shapes if shape is not None]
    if len(static) < len(shapes) or len({len(shape) for shape in static}) != 1:
        return ValueType(known[0].elem_type, None)
    dims = tuple(column[0] if len(set(column)) == 1 else None for column in zip(*static, strict=True))
    return ValueType(known[0].elem_type, dims)


def function_types(model: ModelProto, function: FunctionProto, types: ModelTypes) -> ModelTypes:
    """Types of the values in ``function``, inferred from the input types all its call sites share, each
    call's read in its own scope (``types`` are the model's; a call from another function has unknown
    types, and so then has the body)."""
    unknown = ModelTypes({}, {})
    calls = list(_call_sites(model, function, types))
    if not calls or any(len(call.input) != len(function.input) for call, _visible in calls):
        return unknown
    signature = [_common_type([visible.get(call.input[position]) for call, visible in calls])
                 for position in range(len(function.input))]
    if any(t is None for t in signature):
        return unknown
    graph = body_graph(function)
    del graph.input[:]
    graph.input.extend(
        helper.make_tensor_value_info(name, value_type.elem_type, value_type.shape)  # type: ignore[union-attr]
        for name, value_type in zip(function.input, signature, strict=True)
    )
    probe = helper.make_model(graph, opset_imports=_opset_imports(model, function), functions=model.functions)
    probe.ir_version = model.ir_version
    return infer_types(probe)


def _opset_imports(model: ModelProto, function: FunctionProto) -> list[onnx.OperatorSetIdProto]:
    own = {entry.domain for entry in function.opset_import}
    return [*function.opset_import, *(entry for entry in model.opset_import if entry.domain not in own)]

