"""Element types and static shapes of every value in a model, from onnx's own shape inference.

Inference runs on a skeleton of the model: large initializers are replaced by graph inputs of the same
type and shape, so the weights are never copied or serialized just to learn ranks and dtypes.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx
from onnx import GraphProto, ModelProto, TensorProto, ValueInfoProto

# Initializers at most this many elements stay in the skeleton: shape inference needs the values of
# small integer tensors such as Reshape targets, never those of weights.
_KEPT_ELEMENTS = 64


@dataclass(frozen=True)
class ValueType:
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
    dims = tuple(d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim)
    return ValueType(tensor_type.elem_type, dims)


def _element_count(tensor: TensorProto) -> int:
    count = 1
    for d in tensor.dims:
        count *= d
    return count


def _skeleton(model: ModelProto) -> ModelProto:
    skeleton = ModelProto()
    skeleton.ir_version = model.ir_version
    skeleton.opset_import.extend(model.opset_import)
    skeleton.functions.extend(model.functions)
    graph = skeleton.graph
    source = model.graph
    graph.name = source.name
    graph.node.extend(source.node)
    graph.input.extend(source.input)
    graph.output.extend(source.output)
    graph.value_info.extend(source.value_info)
    declared = {i.name for i in source.input}
    for tensor in source.initializer:
        if _element_count(tensor) <= _KEPT_ELEMENTS and tensor.data_location != TensorProto.EXTERNAL:
            graph.initializer.append(tensor)
        elif tensor.name not in declared:
            graph.input.append(onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, tensor.dims))
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


def infer_types(model: ModelProto) -> dict[str, ValueType]:
    """Map every value name (all graphs, including subgraphs) to its element type and static shape."""
    skeleton = _skeleton(model)
    try:
        inferred = onnx.shape_inference.infer_shapes(skeleton, strict_mode=False, data_prop=True)
    except Exception:  # noqa: BLE001 - inference is advisory; what the model declares still counts
        inferred = skeleton
    types: dict[str, ValueType] = {}
    _collect(inferred.graph, types)
    # Real initializer dims win over anything inferred for the stand-in inputs.
    for tensor in model.graph.initializer:
        types[tensor.name] = ValueType(tensor.data_type, tuple(tensor.dims))
    return types
