"""Which values of a graph are constants, and their values.

A value is constant when it is a (non-overridable) initializer, the output of a ``Constant`` node, or
the output of a small pure op whose inputs are constant or are only looked at for their static shape
or dtype (``Shape(x)``, ``Size(x)``, ``CastLike(c, x)``). That covers the bias the PyTorch dynamo
exporter gives a bias-less conv, ``Expand(CastLike(0, x), Shape(W)[0:1])``: a zero vector whatever
``x`` holds.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

import numpy as np
import onnx
from onnx import AttributeProto, NodeProto, TensorProto, numpy_helper

from bnfold.core.affine import FoldRefused
from bnfold.onnx.graph.types import ValueType
from bnfold.reasons import Reason


class GraphValues(Protocol):
    """What the resolver reads of one graph (``index.GraphIndex`` provides it; this module does not import
    that one, which builds a resolver)."""

    @property
    def initializers(self) -> Mapping[str, TensorProto]: ...

    @property
    def graph_inputs(self) -> set[str]: ...

    @property
    def allow_overridable(self) -> bool: ...

    @property
    def producers(self) -> Mapping[str, NodeProto]: ...

    @property
    def types(self) -> Mapping[str, ValueType]: ...

    def tensor_value(self, name: str) -> np.ndarray: ...

    def tensor_array(self, tensor: TensorProto) -> np.ndarray: ...


# Only an op's listed inputs may be non-constant: for them, only the static shape or dtype is used.
_SHAPE_ONLY_INPUTS = {"Shape": {0}, "Size": {0}, "CastLike": {1}}
_MAX_DEPTH = 64


def _attributes(node: NodeProto) -> dict[str, Any]:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _np_dtype(elem_type: int) -> np.dtype:
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type))


def _constant_node_value(node: NodeProto, index: GraphValues) -> np.ndarray:
    attribute = node.attribute[0] if len(node.attribute) == 1 else None
    if attribute is None or attribute.ref_attr_name:
        raise FoldRefused(Reason.NON_CONSTANT_PARAMS, f"Constant node {node.name!r} is malformed or set by its caller")
    if attribute.name == "value":
        return index.tensor_array(attribute.t)
    scalars: dict[str, Callable[[AttributeProto], np.ndarray]] = {
        "value_float": lambda a: np.array(a.f, dtype=np.float32),
        "value_floats": lambda a: np.array(list(a.floats), dtype=np.float32),
        "value_int": lambda a: np.array(a.i, dtype=np.int64),
        "value_ints": lambda a: np.array(list(a.ints), dtype=np.int64),
    }
    if attribute.name not in scalars:
        raise FoldRefused(Reason.NON_CONSTANT_PARAMS, f"Constant node {node.name!r} holds {attribute.name}")
    return scalars[attribute.name](attribute)


def _slice(data: np.ndarray, starts, ends, axes, steps) -> np.ndarray:
    axes = list(range(len(starts))) if axes is None else [int(a) % data.ndim for a in axes]
    steps = [1] * len(starts) if steps is None else steps
    index = [slice(None)] * data.ndim
    for start, end, axis, step in zip(starts, ends, axes, steps, strict=True):
        index[axis] = slice(int(start), int(end), int(step))
    return data[tuple(index)]


def _reshape(data: np.ndarray, shape: np.ndarray, allowzero: int) -> np.ndarray:
    target = [int(d) for d in shape]
    if not allowzero:
        target = [data.shape[i] if d == 0 else d for i, d in enumerate(target)]
    return data.reshape(target)


def _divide(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    if np.issubdtype(a.dtype, np.integer):
        return np.trunc(a / b).astype(a.dtype)  # ONNX integer Div truncates toward zero
    return (a / b).astype(a.dtype)


def _axes(node: NodeProto, inputs: list[np.ndarray], attrs: Mapping[str, Any]) -> list[int] | None:
    if len(inputs) > 1:
        return [int(a) for a in inputs[1]]
    axes = attrs.get("axes")
    return None if axes is None else [int(a) for a in axes]


def _unsqueeze(data: np.ndarray, axes: list[int]) -> np.ndarray:
    rank = data.ndim + len(axes)
    for axis in sorted(a % rank for a in axes):
        data = np.expand_dims(data, axis)
    return data


_Evaluator = Callable[[NodeProto, list[np.ndarray], dict[str, Any]], np.ndarray]

_EVALUATORS: dict[str, _Evaluator] = {
    "Identity": lambda n, x, a: x[0],
    "Cast": lambda n, x, a: x[0].astype(_np_dtype(int(a["to"]))),
    "Expand": lambda n, x, a: x[0] * np.ones([int(d) for d in x[1]], dtype=x[0].dtype),
    "Slice": lambda n, x, a: (
        _slice(x[0], x[1], x[2], x[3] if len(x) > 3 else None, x[4] if len(x) > 4 else None)
        if len(x) > 1
        else _slice(x[0], a["starts"], a["ends"], a.get("axes"), None)
    ),
    "Gather": lambda n, x, a: np.take(x[0], x[1], axis=int(a.get("axis", 0))),
    "Concat": lambda n, x, a: np.concatenate(x, axis=int(a["axis"])),
    "Unsqueeze": lambda n, x, a: _unsqueeze(x[0], _axes(n, x, a) or []),
    "Squeeze": lambda n, x, a: np.squeeze(x[0], axis=None if (axes := _axes(n, x, a)) is None else tuple(axes)),
    "Reshape": lambda n, x, a: _reshape(x[0], x[1], int(a.get("allowzero", 0))),
    "ConstantOfShape": lambda n, x, a: np.full(
        [int(d) for d in x[0]],
        numpy_helper.to_array(a["value"]).reshape(()) if "value" in a else np.float32(0),
    ),
    "Add": lambda n, x, a: (x[0] + x[1]).astype(x[0].dtype),
    "Sub": lambda n, x, a: (x[0] - x[1]).astype(x[0].dtype),
    "Mul": lambda n, x, a: (x[0] * x[1]).astype(x[0].dtype),
    "Div": lambda n, x, a: _divide(x[0], x[1]),
    "Neg": lambda n, x, a: -x[0],
    "Sqrt": lambda n, x, a: np.sqrt(x[0]),
    "Reciprocal": lambda n, x, a: (1 / x[0]).astype(x[0].dtype),
}


class ConstantResolver:
    """Resolves values of one graph to numpy arrays, falling back to the enclosing graph's resolver."""

    def __init__(self, index: GraphValues, outer: ConstantResolver | None = None) -> None:
        self._index = index
        self._outer = outer
        self._cache: dict[str, np.ndarray] = {}

    def value(self, name: str, depth: int = 0) -> np.ndarray:
        """The constant value of ``name``; raises ``FoldRefused`` when it is not provably constant."""
        if name in self._cache:
            return self._cache[name]
        if depth > _MAX_DEPTH:
            raise FoldRefused(Reason.NON_CONSTANT_PARAMS, f"{name!r} is computed by too deep a subgraph")
        value = self._resolve(name, depth)
        self._cache[name] = value
        return value

    def is_constant(self, name: str) -> bool:
        try:
            self.value(name)
        except FoldRefused:
            return False
        return True

    def forget(self, name: str) -> None:
        self._cache.pop(name, None)

    def forget_all(self) -> None:
        self._cache.clear()

    def _resolve(self, name: str, depth: int) -> np.ndarray:
        index = self._index
        if name in index.initializers:
            if name in index.graph_inputs and not index.allow_overridable:
                raise FoldRefused(
                    Reason.OVERRIDABLE_PARAMS,
                    f"initializer {name!r} is also a graph input, so a caller may override it",
                )
            return index.tensor_value(name)
        producer = index.producers.get(name)
        if producer is None:
            if name in index.graph_inputs or self._outer is None:
                raise FoldRefused(Reason.NON_CONSTANT_PARAMS, f"{name!r} is a graph input, not a constant")
            return self._outer.value(name, depth + 1)
        if producer.domain not in ("", "ai.onnx"):
            raise FoldRefused(Reason.NON_CONSTANT_PARAMS, f"{name!r} comes from custom op {producer.op_type}")
        if producer.op_type == "Constant":
            return _constant_node_value(producer, index)
        return self._evaluate(producer, depth)

    def _evaluate(self, node: NodeProto, depth: int) -> np.ndarray:
        op = node.op_type
        if op not in _EVALUATORS and op not in _SHAPE_ONLY_INPUTS:
            raise FoldRefused(Reason.NON_CONSTANT_PARAMS, f"value comes from a {op} node that is not constant")
        if any(a.type in (AttributeProto.GRAPH, AttributeProto.GRAPHS) for a in node.attribute):
            raise FoldRefused(Reason.NON_CONSTANT_PARAMS, f"{op} node {node.name!r} has a subgraph")
        shape_only = _SHAPE_ONLY_INPUTS.get(op, set())
        if op == "Shape":
            return self._shape_of(node)
        if op == "Size":
            return np.array(int(np.prod(self._static_shape(node.input[0]))), dtype=np.int64)
        if op == "CastLike":
            return self.value(node.input[0], depth + 1).astype(_np_dtype(self._elem_type(node.input[1])))
        inputs = [self.value(i, depth + 1) for k, i in enumerate(node.input) if i and k not in shape_only]
        try:
            with np.errstate(all="ignore"):
                return np.asarray(_EVALUATORS[op](node, inputs, _attributes(node)))
        except (ValueError, IndexError, KeyError, TypeError) as error:
            raise FoldRefused(Reason.NON_CONSTANT_PARAMS, f"cannot evaluate {op} node {node.name!r}: {error}") from None

    def _shape_of(self, node: NodeProto) -> np.ndarray:
        shape = self._static_shape(node.input[0])
        attrs = _attributes(node)
        rank = len(shape)
        start = int(attrs.get("start", 0))
        end = int(attrs.get("end", rank))
        return np.array(shape[slice(start, end)], dtype=np.int64)

    def _static_shape(self, name: str) -> tuple[int, ...]:
        if name in self._index.initializers:
            return tuple(self._index.initializers[name].dims)
        value_type = self._index.types.get(name)
        if value_type is None or value_type.shape is None or any(d is None for d in value_type.shape):
            raise FoldRefused(Reason.NON_CONSTANT_PARAMS, f"the shape of {name!r} is not static")
        return tuple(int(d) for d in value_type.shape)  # type: ignore[arg-type]  # no None, checked above

    def _elem_type(self, name: str) -> int:
        value_type = self._index.types.get(name)
        if value_type is None:
            raise FoldRefused(Reason.NON_CONSTANT_PARAMS, f"the dtype of {name!r} is unknown")
        return value_type.elem_type
