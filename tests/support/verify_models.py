"""Small ONNX models for the verification tests, built in code: unary ops, scalings, and a Conv -> BN with
its exact fold."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def make_model(
    nodes: Sequence[onnx.NodeProto],
    inputs: Sequence[tuple[str, int, Sequence[int | str] | None]],
    outputs: Sequence[tuple[str, int]],
    initializers: Sequence[tuple[str, np.ndarray]] = (),
    opset: int = 17,
) -> onnx.ModelProto:
    """``initializers`` are ``(name, array)`` pairs; outputs have no declared shape."""
    graph = helper.make_graph(
        list(nodes), "g",
        [helper.make_tensor_value_info(name, elem_type, shape) for name, elem_type, shape in inputs],
        [helper.make_tensor_value_info(name, elem_type, None) for name, elem_type in outputs],
        [numpy_helper.from_array(array, name) for name, array in initializers],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def unary(op_type: str, elem_type: int = TensorProto.FLOAT, shape: Sequence[int | str] = (2, 3),
          out_type: int | None = None, **attributes) -> onnx.ModelProto:
    """``y = op_type(x)``."""
    return make_model([helper.make_node(op_type, ["x"], ["y"], **attributes)],
                      [("x", elem_type, shape)], [("y", out_type or elem_type)])


def scaled(factor: float, dtype: type = np.float32, shape: Sequence[int | str] = (2, 3)) -> onnx.ModelProto:
    """``y = x * factor``."""
    elem_type = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    return make_model([helper.make_node("Mul", ["x", "k"], ["y"])], [("x", elem_type, shape)],
                      [("y", elem_type)], [("k", np.array(factor, dtype=dtype))])


def random_bn_statistics(rng: np.random.Generator, channels: int) -> dict[str, np.ndarray]:
    return {
        "gamma": rng.uniform(0.5, 1.5, channels),
        "beta": rng.normal(0.0, 0.5, channels),
        "mean": rng.normal(0.0, 0.5, channels),
        "var": rng.uniform(0.5, 2.0, channels),
    }


def conv_bn_and_folded(
    dtype: type, *, training_mode: bool = False, batch: int = 1, seed: int = 0, opset: int = 17
) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """Conv -> BatchNormalization, and the Conv with the BN's running statistics folded in float64."""
    rng = np.random.default_rng(seed)
    elem_type = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    weight = rng.normal(0.0, 0.5, (4, 3, 3, 3))
    stats = random_bn_statistics(rng, 4)
    epsilon = float(np.float32(1e-5))  # the attribute is stored as float32
    bn_outputs = ["y", "running_mean", "running_var"] if training_mode else ["y"]
    original = make_model(
        [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
         helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], bn_outputs,
                          epsilon=epsilon, **({"training_mode": 1} if training_mode else {}))],
        [("x", elem_type, [batch, 3, 8, 8])], [("y", elem_type)],
        [("w", weight.astype(dtype)), *((name, value.astype(dtype)) for name, value in stats.items())],
        opset=opset,
    )
    scale = stats["gamma"] / np.sqrt(stats["var"] + epsilon)
    folded = make_model(
        [helper.make_node("Conv", ["x", "w", "b"], ["y"], pads=[1, 1, 1, 1])],
        [("x", elem_type, [batch, 3, 8, 8])], [("y", elem_type)],
        [("w", (weight * scale[:, None, None, None]).astype(dtype)),
         ("b", (stats["beta"] - scale * stats["mean"]).astype(dtype))],
        opset=opset,
    )
    return original, folded

