"""Element types and static shapes of every value in a model, from onnx's own shape inference.

Inference runs on a skeleton of the model: large initializers and ``Constant`` tensors, of the main graph
and of every subgraph, are replaced by main-graph inputs of the same type and shape, so the weights are never
copied or serialized just to learn ranks and dtypes. A model with little tensor data in its proto (one read
lazily, whose weights are still in the file, or a small one) is inferred as it is: serializing it costs less
than building the skeleton. Subgraph values (``If`` branches, ``Loop``/``Scan`` bodies) get their types from
the same run.

Types are kept per scope (:class:`ModelTypes`): the main graph's, and each subgraph's own values apart, keyed
by the path to the subgraph. ONNX lets sibling scopes (two ``If`` branches, two bodies) reuse a value name
with another type, so a fold in one branch must never read a type from another: a subgraph sees its own
values, then those of the graphs enclosing it, nothing else.
"""

from __future__ import annotations

from collections import ChainMap
from collections.abc import Iterator, Mapping, MutableMapping
from typing import NamedTuple

import onnx
from onnx import GraphProto, ModelProto, NodeProto, TensorProto, ValueInfoProto

from bnfold.onnx.store import limits
from bnfold.onnx.store.external import is_external, model_tensors, payload_bytes


class ValueType(NamedTuple):  # a tuple, not a dataclass: a model has thousands of values, made on every fold
    elem_type: int
    shape: tuple[int | None, ...] | None  # None: rank unknown; None entries: dynamic dims

    @property
    def rank(self) -> int | None:
        return None if self.shape is None else len(self.shape)


def _from_value_info(info: ValueInfoProto) -> ValueType | None:
    if not info.type.HasField("tensor_type"):
        return None
    tensor_type = info.type.tensor_type
    if not tensor_type.HasField("shape"):
        return ValueType(tensor_type.elem_type, None)
    # A negative dim_value (Paddle's exports declare [-1, 3, -1, -1]) means "dynamic", as an unset one does.
    dims = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value >= 0 else None for d in tensor_type.shape.dim)
    return ValueType(tensor_type.elem_type, dims)


def _element_count(tensor: TensorProto) -> int:
    count = 1
    for d in tensor.dims:
        count *= d
    return count


def _is_large(tensor: TensorProto) -> bool:
    return _element_count(tensor) > limits.KEPT_ELEMENTS or tensor.data_location == TensorProto.EXTERNAL


def _stand_in(tensor: TensorProto, name: str) -> ValueInfoProto:
    return onnx.helper.make_tensor_value_info(name, tensor.data_type, tensor.dims)


def _large_constant(node: NodeProto) -> TensorProto | None:
    if node.op_type != "Constant" or node.domain not in ("", "ai.onnx") or len(node.attribute) != 1:
        return None
    attribute = node.attribute[0]
    if attribute.name != "value" or attribute.ref_attr_name or not _is_large(attribute.t):
        return None
    return attribute.t


class _Lifted:
    """Large tensors the skeleton declares as main-graph inputs instead, and the scope each came from. A name
    that several scopes define stays where it is: as an outer input it would clash with the others."""

    def __init__(self, model: ModelProto | None = None) -> None:
        self.inputs: list[ValueInfoProto] = []
        self.scopes: dict[str, ScopeKey] = {}
        self._shared: set[str] = set()
        if model is not None:
            seen: set[str] = set()
            for graph in _all_graphs(model.graph):
                names = {t.name for t in graph.initializer}
                names |= {n.output[0] for n in graph.node if _large_constant(n) is not None}
                self._shared |= names & seen
                seen |= names

    def lift(self, tensor: TensorProto, name: str, key: ScopeKey) -> bool:
        """Declare ``tensor`` as input ``name``, unless another scope defines that name too."""
        if name in self._shared:
            return False
        self.inputs.append(_stand_in(tensor, name))
        self.scopes[name] = key
        return True


def _all_graphs(graph: GraphProto) -> Iterator[GraphProto]:
    yield graph
    for node in graph.node:
        for _attribute, subgraph in graph_attributes(node):
            yield from _all_graphs(subgraph)


def _skeleton_graph(source: GraphProto, target: GraphProto, lifted: _Lifted, key: ScopeKey) -> None:
    """Copy ``source`` without its large tensors: each becomes a stand-in input of the main graph, which a
    subgraph sees as an outer-scope value of the same type (a name two sibling scopes share stays in place)."""
    target.name = source.name
    target.input.extend(source.input)
    target.output.extend(source.output)
    target.value_info.extend(source.value_info)
    declared = {i.name for i in source.input}
    for tensor in source.initializer:
        if not _is_large(tensor) or (tensor.name not in declared and not lifted.lift(tensor, tensor.name, key)):
            target.initializer.append(tensor)
    ordinal = 0
    for node in source.node:
        constant = _large_constant(node)
        if constant is not None and lifted.lift(constant, node.output[0], key):
            continue
        if any(_has_graph(a) for a in node.attribute):
            _skeleton_node(node, target.node.add(), lifted, key + (ordinal,))
            ordinal += 1
        else:
            target.node.append(node)


def _has_graph(attribute: onnx.AttributeProto) -> bool:
    return attribute.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)


def _skeleton_node(node: NodeProto, copy: NodeProto, lifted: _Lifted, holder: tuple[int | str, ...]) -> None:
    copy.name, copy.op_type, copy.domain, copy.overload = node.name, node.op_type, node.domain, node.overload
    copy.input.extend(node.input)
    copy.output.extend(node.output)
    for attribute in node.attribute:
        if not _has_graph(attribute):
            copy.attribute.append(attribute)
            continue
        skeleton = copy.attribute.add()
        skeleton.name, skeleton.type = attribute.name, attribute.type
        if attribute.type == onnx.AttributeProto.GRAPH:
            _skeleton_graph(attribute.g, skeleton.g, lifted, (*holder, attribute.name))
        for position, graph in enumerate(attribute.graphs):
            _skeleton_graph(graph, skeleton.graphs.add(), lifted, (*holder, f"{attribute.name}[{position}]"))


def _skeleton(model: ModelProto) -> tuple[ModelProto, _Lifted]:
    skeleton = ModelProto()
    skeleton.ir_version = model.ir_version
    skeleton.opset_import.extend(model.opset_import)
    skeleton.functions.extend(model.functions)
    lifted = _Lifted(model)
    _skeleton_graph(model.graph, skeleton.graph, lifted, ())
    skeleton.graph.input.extend(lifted.inputs)
    return skeleton, lifted


# The path from the main graph to a subgraph: per level, the ordinal of the node holding it among the nodes
# of its graph that hold graphs, and the attribute (``then_branch``, ``body``, ``branches[1]``).
ScopeKey = tuple[int | str, ...]


def graph_attributes(node: NodeProto) -> Iterator[tuple[str, GraphProto]]:
    """The graphs ``node`` holds, each with its attribute's name (``name[i]`` in a list of graphs)."""
    for attribute in node.attribute:
        if attribute.type == onnx.AttributeProto.GRAPH:
            yield attribute.name, attribute.g
        elif attribute.type == onnx.AttributeProto.GRAPHS:
            for position, graph in enumerate(attribute.graphs):
                yield f"{attribute.name}[{position}]", graph


def nested_graphs(graph: GraphProto, key: ScopeKey) -> Iterator[tuple[NodeProto, ScopeKey, GraphProto]]:
    """The graphs ``graph``'s nodes hold (not deeper), each with its holder and its :data:`ScopeKey`, given
    ``graph``'s own ``key``."""
    ordinal = 0
    for node in graph.node:
        held = list(graph_attributes(node))
        for attribute, subgraph in held:
            yield node, (*key, ordinal, attribute), subgraph
        ordinal += bool(held)


class ModelTypes(NamedTuple):
    """The types of a model's values, scope by scope: ``main`` for the main graph, ``scopes`` for the values
    each subgraph defines itself (keyed by :data:`ScopeKey`)."""

    main: dict[str, ValueType]
    scopes: dict[ScopeKey, dict[str, ValueType]]

    def scope(self, key: ScopeKey, outer: Mapping[str, ValueType]) -> MutableMapping[str, ValueType]:
        """What the subgraph at ``key`` sees: its own values (a copy, which a fold may add renames to), then
        ``outer``, the view of the graph that holds it."""
        return ChainMap(dict(self.scopes.get(key, {})), outer)  # type: ignore[arg-type]  # read-only below

    def flat(self) -> dict[str, ValueType]:
        """Every value of every scope by name (a name two sibling scopes share: one of them), for what
        judges a model as a whole, never for a fold."""
        merged: dict[str, ValueType] = {}
        for table in self.scopes.values():
            merged.update(table)
        merged.update(self.main)
        return merged


def _collect(graph: GraphProto, key: ScopeKey, types: ModelTypes) -> None:
    table = types.main if not key else types.scopes.setdefault(key, {})
    for tensor in graph.initializer:
        table[tensor.name] = ValueType(tensor.data_type, tuple(tensor.dims))
    for info in (*graph.input, *graph.output, *graph.value_info):
        value_type = _from_value_info(info)
        if value_type is not None and (info.name not in table or value_type.shape is not None):
            table[info.name] = value_type
    for _node, inner, subgraph in nested_graphs(graph, key):
        _collect(subgraph, inner, types)


def _needs_skeleton(model: ModelProto) -> bool:
    """Whether inference should run on a skeleton: the model holds much tensor data, or a small tensor on disk
    (the skeleton declares those as inputs; onnx's inference would fail on its missing value instead)."""
    inline_bytes = 0
    for tensor in model_tensors(model):
        size = payload_bytes(tensor)
        if size is None or (is_external(tensor) and _element_count(tensor) <= limits.KEPT_ELEMENTS):
            return True
        inline_bytes += 0 if is_external(tensor) else size
    return inline_bytes >= limits.SKELETON_FROM_BYTES


def infer_types(model: ModelProto) -> ModelTypes:
    """The element type and static shape of every value of ``model``, scope by scope."""
    source, lifted = _skeleton(model) if _needs_skeleton(model) else (model, _Lifted())
    try:
        inferred = onnx.shape_inference.infer_shapes(source, strict_mode=False, data_prop=True)
    except Exception:  # noqa: BLE001 - inference is advisory; what the model declares still counts
        inferred = source
    types = ModelTypes({}, {})
    _collect(inferred.graph, (), types)
    # A stand-in input belongs to the scope its tensor came from, not to the main graph.
    for name, key in lifted.scopes.items():
        stand_in = types.main.pop(name, None)
        if stand_in is not None:
            (types.scopes.setdefault(key, {}) if key else types.main)[name] = stand_in
    # Real initializer dims win over anything inferred for the stand-in inputs.
    for tensor in model.graph.initializer:
        types.main[tensor.name] = ValueType(tensor.data_type, tuple(tensor.dims))
    return types
