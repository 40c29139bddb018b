"""Building ONNX test graphs in code, with random weights and random non-trivial BN statistics."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx
import onnxruntime as ort
from hypothesis import strategies as st
from onnx import helper, numpy_helper
from onnx.reference import ReferenceEvaluator

FLOAT = onnx.TensorProto.FLOAT


class GraphBuilder:
    """Collects nodes and initializers; ``bn()`` adds a BatchNormalization with random statistics."""

    def __init__(self, seed: int = 0, dtype: np.dtype = np.float32, opset: int = 17) -> None:
        self.rng = np.random.default_rng(seed)
        self.dtype = np.dtype(dtype)
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self._count = 0

    def fresh(self, base: str) -> str:
        self._count += 1
        return f"{base}{self._count}"

    def const(self, array: np.ndarray, name: str | None = None, dtype: np.dtype | None = None) -> str:
        name = name or self.fresh("c")
        self.initializers.append(numpy_helper.from_array(np.asarray(array).astype(dtype or self.dtype), name))
        return name

    def weight(self, shape: Sequence[int], name: str | None = None, scale: float = 0.5) -> str:
        return self.const(self.rng.normal(scale=scale, size=shape), name)

    def input(self, name: str, shape: Sequence[int | str | None], elem_type: int | None = None) -> str:
        elem_type = elem_type or helper.np_dtype_to_tensor_dtype(self.dtype)
        self.inputs.append(helper.make_tensor_value_info(name, elem_type, shape))
        return name

    def node(self, op_type: str, inputs: Sequence[str], n_outputs: int = 1, name: str | None = None,
             **attributes) -> str | list[str]:
        name = name or self.fresh(op_type.lower())
        outputs = [f"{name}_out{i}" if i else f"{name}_out" for i in range(n_outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outputs, name=name, **attributes))
        return outputs[0] if n_outputs == 1 else outputs

    def bn_params(self, channels: int, param_dtype: np.dtype | None = None) -> list[str]:
        """Random gamma (mixed signs), beta, running mean and running variance: never defaults."""
        rng = self.rng
        gamma = rng.uniform(0.5, 1.5, channels) * rng.choice([-1.0, 1.0], channels)
        return [
            self.const(gamma, dtype=param_dtype),
            self.const(rng.normal(0, 0.5, channels), dtype=param_dtype),
            self.const(rng.normal(0, 0.5, channels), dtype=param_dtype),
            self.const(rng.uniform(0.5, 2.0, channels), dtype=param_dtype),
        ]

    def bn(self, x: str, channels: int, name: str | None = None, param_dtype: np.dtype | None = None,
           **attributes) -> str:
        return self.node("BatchNormalization", [x, *self.bn_params(channels, param_dtype)], name=name, **attributes)

    def model(self, outputs: Sequence[str], output_types: Sequence[int] | None = None,
              output_shapes: Sequence[Sequence[int] | None] | None = None) -> onnx.ModelProto:
        elem = helper.np_dtype_to_tensor_dtype(self.dtype)
        types = output_types or [elem] * len(outputs)
        shapes = output_shapes or [None] * len(outputs)
        graph = helper.make_graph(
            self.nodes, "test", self.inputs,
            [helper.make_tensor_value_info(o, t, s) for o, t, s in zip(outputs, types, shapes, strict=True)],
            self.initializers,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)])
        model.ir_version = min(model.ir_version, 10)
        # Let onnx infer the output shapes the checker wants declared.
        model = onnx.shape_inference.infer_shapes(model)
        del model.graph.value_info[:]
        onnx.checker.check_model(model, full_check=True)
        return model


def count_ops(model: onnx.ModelProto, op_type: str = "BatchNormalization") -> int:
    return sum(node.op_type == op_type for node in model.graph.node)


def node_kinds(model: onnx.ModelProto) -> list[str]:
    """Op types in graph order, with a depthwise 1x...x1 Conv of unit weights (how a backward fold keeps a
    shift before a padded layer) named ``"Shift"``."""
    initializers = {t.name: t for t in model.graph.initializer}

    def is_shift(node: onnx.NodeProto) -> bool:
        if node.op_type != "Conv" or node.input[1] not in initializers:
            return False
        weight = numpy_helper.to_array(initializers[node.input[1]])
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        return group == weight.shape[0] and weight.shape[1:] == (1,) * (weight.ndim - 1) and bool(np.all(weight == 1))

    return ["Shift" if is_shift(node) else node.op_type for node in model.graph.node]


def random_feeds(model: onnx.ModelProto, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {}
    initializers = {t.name for t in model.graph.initializer}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tensor_type = value.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else 1 for d in tensor_type.shape.dim]
        dtype = helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)
        feeds[value.name] = rng.normal(size=shape).astype(dtype)
    return feeds


def run(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray], reference: bool = False) -> list[np.ndarray]:
    """Outputs under onnxruntime with every graph optimization off (or onnx's reference evaluator)."""
    if reference:
        return [np.asarray(o) for o in ReferenceEvaluator(model).run(None, dict(feeds))]
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, dict(feeds))


def rtol_for(dtype: np.dtype) -> float:
    """The relative tolerance of a comparison in ``dtype``: a float16 merge rounds once where the original
    rounded each branch."""
    return 2e-2 if np.dtype(dtype) == np.float16 else 1e-4


def assert_equivalent(original: onnx.ModelProto, folded: onnx.ModelProto, *, rtol: float = 1e-4,
                      reference: bool = False, seed: int = 1) -> None:
    feeds = random_feeds(original, seed)
    expected = run(original, feeds, reference)
    actual = run(folded, feeds, reference)
    for want, got in zip(expected, actual, strict=True):
        want64 = np.asarray(want, dtype=np.float64)
        got64 = np.asarray(got, dtype=np.float64)
        scale = max(float(np.max(np.abs(want64))), 1e-30)
        np.testing.assert_allclose(got64, want64, rtol=rtol, atol=rtol * scale)


@st.composite
def conv_forms(draw) -> dict[str, int | bool]:
    """Random convolution attributes, as keyword arguments of the pattern tests' model builders: 1-3 spatial
    axes, 1-3 groups of 1-3 channels in and out, kernel, stride, dilation, with or without a bias."""
    groups = draw(st.integers(1, 3))
    return {
        "spatial": draw(st.integers(1, 3)),
        "groups": groups,
        "c_in": groups * draw(st.integers(1, 3)),
        "c_out": groups * draw(st.integers(1, 3)),
        "kernel": draw(st.integers(1, 3)),
        "stride": draw(st.integers(1, 2)),
        "dilation": draw(st.integers(1, 2)),
        "bias": draw(st.booleans()),
        "seed": draw(st.integers(0, 2**16)),
    }
