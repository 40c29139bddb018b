"""Element types and static shapes of every value in a model, from onnx's own shape inference.

Inference runs on a skeleton of the model: large initializers and ``Constant`` tensors, of the main graph
and of every subgraph, are replaced by main-graph inputs of the same type and shape, so the weights are never
copied or serialized just to learn ranks and dtypes. A model with little tensor data in its proto (one read
lazily, whose weights are still in the file, or a small one) is inferred as it is: serializing it costs less
than building the skeleton. Subgraph values (``If`` branches, ``Loop``/``Scan`` bodies) get their types from
the same run.
"""

from __future__ import annotations

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


def _skeleton_graph(source: GraphProto, target: GraphProto, lifted: list[ValueInfoProto]) -> None:
    """Copy ``source`` without its large tensors: each becomes a stand-in input of the main graph
    (names are unique model-wide, so a subgraph sees it as an outer-scope value of the same type)."""
    target.name = source.name
    target.input.extend(source.input)
    target.output.extend(source.output)
    target.value_info.extend(source.value_info)
    declared = {i.name for i in source.input}
    for tensor in source.initializer:
        if not _is_large(tensor):
            target.initializer.append(tensor)
        elif tensor.name not in declared:
            lifted.append(_stand_in(tensor, tensor.name))
    for node in source.node:
        constant = _large_constant(node)
        if constant is not None:
            lifted.append(_stand_in(constant, node.output[0]))
            continue
        if any(_has_graph(a) for a in node.attribute):
            _skeleton_node(node, target.node.add(), lifted)
        else:
            target.node.append(node)


def _has_graph(attribute: onnx.AttributeProto) -> bool:
    return attribute.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)


def _skeleton_node(node: NodeProto, copy: NodeProto, lifted: list[ValueInfoProto]) -> None:
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
            _skeleton_graph(attribute.g, skeleton.g, lifted)
        for graph in attribute.graphs:
            _skeleton_graph(graph, skeleton.graphs.add(), lifted)


def _skeleton(model: ModelProto) -> ModelProto:
    skeleton = ModelProto()
    skeleton.ir_version = model.ir_version
    skeleton.opset_import.extend(model.opset_import)
    skeleton.functions.extend(model.functions)
    lifted: list[ValueInfoProto] = []
    _skeleton_graph(model.graph, skeleton.graph, lifted)
    skeleton.graph.input.extend(lifted)
    return skeleton


def _collect(graph: GraphProto, types: dict[str, ValueType]) -> None:
    for tensor in graph.initializer:
        types[tensor.name] = ValueType(tensor.data_type, tuple(tensor.dims))
    for info in (*graph.input, *graph.output, *graph.value_info):
        value_type = _from_value_info(info)
        if value_type is not None and (info.name not in types or value_type.shape is not None):
            types[info.name] = value_type
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                _collect(attribute.g, types)
            elif attribute.type == onnx.AttributeProto.GRAPHS:
                for subgraph in attribute.graphs:
                    _collect(subgraph, types)


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


def infer_types(model: ModelProto) -> dict[str, ValueType]:
    """Map every value name (all graphs, including subgraphs) to its element type and static shape."""
    source = _skeleton(model) if _needs_skeleton(model) else model
    try:
        inferred = onnx.shape_inference.infer_shapes(source, strict_mode=False, data_prop=True)
    except Exception:  # noqa: BLE001 - inference is advisory; what the model declares still counts
        inferred = source
    types: dict[str, ValueType] = {}
    _collect(inferred.graph, types)
    # Real initializer dims win over anything inferred for the stand-in inputs.
    for tensor in model.graph.initializer:
        types[tensor.name] = ValueType(tensor.data_type, tuple(tensor.dims))
    return types
