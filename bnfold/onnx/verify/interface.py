"""What two models take and return: their interfaces read (without weights where that can be done) and
checked against each other before anything runs."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import ModelProto, TensorProto, helper

from bnfold.errors import InputError
from bnfold.onnx.store.io import check_supported, read_model_lazy
from bnfold.onnx.store.model_store import ModelStore

ModelSource = ModelProto | ModelStore | str | os.PathLike[str]


@dataclass(frozen=True)
class TensorSpec:
    name: str
    elem_type: int
    dims: tuple[int | str | None, ...] | None  # int static, str symbolic, None unnamed; None = unknown rank

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(helper.tensor_dtype_to_np_dtype(self.elem_type))

    @property
    def type_name(self) -> str:
        return self.dtype.name

    def describe_shape(self) -> str:
        if self.dims is None:
            return "unknown rank"
        return "[" + ", ".join("?" if d is None else str(d) for d in self.dims) + "]"


def load_interface(role: str, source: ModelSource) -> ModelProto:
    """The model's proto; from a path without its weights (external data, and inline tensors left in the
    file: see ``read_model_lazy``), which only the engines need, but with every external location checked
    first, so no engine is ever pointed outside the model's directory."""
    if isinstance(source, (ModelProto, ModelStore)):
        proto = source if isinstance(source, ModelProto) else source.proto
        try:
            check_supported(proto)
        except InputError as error:
            raise InputError(f"the {role} model: {error}") from None
        return proto
    if not isinstance(source, (str, os.PathLike)):
        raise InputError(f"the {role} model must be an onnx.ModelProto, a ModelStore or a path, "
                         f"got {type(source).__name__}")
    try:
        return read_model_lazy(source)
    except InputError as error:
        raise InputError(f"the {role} model {error}") from None


def _graph_inputs(model: ModelProto) -> list[TensorSpec]:
    """The inputs a caller feeds: graph inputs that are not initializers (old exporters list both)."""
    initializers = {tensor.name for tensor in model.graph.initializer}
    specs = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        if value.type.WhichOneof("value") != "tensor_type":
            raise InputError(f"input '{value.name}' is not a tensor; only tensor inputs are supported")
        specs.append(_spec(value))
    return specs


def _spec(value: onnx.ValueInfoProto) -> TensorSpec:
    tensor_type = value.type.tensor_type
    dims = None
    if tensor_type.HasField("shape"):
        dims = tuple(
            # A negative dim_value (Paddle writes -1) is a dynamic dim, as an unset one is.
            (dim.dim_value if dim.dim_value >= 0 else None) if dim.WhichOneof("value") == "dim_value"
            else dim.dim_param if dim.WhichOneof("value") == "dim_param" else None
            for dim in tensor_type.shape.dim
        )
    return TensorSpec(value.name, tensor_type.elem_type, dims)


def check_interfaces(original: ModelProto, candidate: ModelProto) -> list[TensorSpec]:
    """The original's inputs, once both models are known to take and return the same named tensors."""
    original_inputs, candidate_inputs = _graph_inputs(original), _graph_inputs(candidate)
    original_types = {spec.name: spec.elem_type for spec in original_inputs}
    candidate_types = {spec.name: spec.elem_type for spec in candidate_inputs}
    if original_types.keys() != candidate_types.keys():
        raise InputError(f"the models take different inputs: original {_names(original_types)}, "
                         f"candidate {_names(candidate_types)}")
    for name, elem_type in original_types.items():
        if candidate_types[name] != elem_type:
            raise InputError(f"input '{name}' is {type_name(elem_type)} in the original "
                             f"but {type_name(candidate_types[name])} in the candidate")
    candidate_specs = {spec.name: spec for spec in candidate_inputs}
    for spec in original_inputs:
        other = candidate_specs[spec.name]
        if _shapes_conflict(spec.dims, other.dims):
            raise InputError(f"input '{spec.name}' has shape {spec.describe_shape()} in the original but "
                             f"{other.describe_shape()} in the candidate; no input fits both")
    original_outputs = [output.name for output in original.graph.output]
    candidate_outputs = [output.name for output in candidate.graph.output]
    if set(original_outputs) != set(candidate_outputs):
        raise InputError(f"the models return different outputs: original {_names(original_outputs)}, "
                         f"candidate {_names(candidate_outputs)}")
    # What the models declare must agree; what they compute is the comparison's to judge.
    declared = {value.name: _spec(value) for value in candidate.graph.output
                if value.type.WhichOneof("value") == "tensor_type"}
    for value in original.graph.output:
        candidate_spec = declared.get(value.name)
        if candidate_spec is None or value.type.WhichOneof("value") != "tensor_type":
            continue
        spec = _spec(value)
        if spec.elem_type and candidate_spec.elem_type and spec.elem_type != candidate_spec.elem_type:
            raise InputError(f"output '{spec.name}' is {type_name(spec.elem_type)} in the original "
                             f"but {type_name(candidate_spec.elem_type)} in the candidate")
        if _shapes_conflict(spec.dims, candidate_spec.dims):
            raise InputError(f"output '{spec.name}' has shape {spec.describe_shape()} in the original but "
                             f"{candidate_spec.describe_shape()} in the candidate")
    return original_inputs


def _shapes_conflict(first: tuple[int | str | None, ...] | None, second: tuple[int | str | None, ...] | None) -> bool:
    if first is None or second is None:
        return False
    return len(first) != len(second) or any(
        isinstance(a, int) and isinstance(b, int) and a != b for a, b in zip(first, second, strict=True))


def type_name(elem_type: int) -> str:
    return TensorProto.DataType.Name(elem_type).lower()


def _names(names: Any) -> str:
    return "[" + ", ".join(sorted(names)) + "]"
