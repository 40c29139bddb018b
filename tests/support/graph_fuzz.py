"""Random ONNX graphs for property-based testing of the whole fold, and the properties every one must keep.

:func:`fuzz_cases` is a hypothesis strategy of :class:`FuzzCase`: chains and DAGs of Conv, ConvTranspose,
Gemm, MatMul, BatchNormalization, Relu, Add/Mul/Sub/Div (by constants or of two values), Reshape and Flatten,
with random attributes (groups, strides, dilations, pads, auto_pad, output_padding, transA/transB, alpha,
beta), ranks 2 to 5, float32/float16/float64, shared weights, fan-out, graph outputs in the middle, and
``If`` subgraphs that read outer values, ``If`` branches that reuse value names at other ranks, model-local
functions called at one or two ranks (their bodies reusing main-graph names), and ``If`` conditions fed as
inputs, computed from data or from a shape. Some batch norms are made unsafe on purpose (NaN or infinite
statistics, variance <= 0, var + epsilon = 0, training mode, a parameter fed as a graph input or
overridable); the case lists them in ``must_stay``.

:func:`check` runs :func:`bnfold.fold_onnx` on a case and returns every property it breaks: no crash, a
model ``onnx.checker`` accepts, the same outputs as the original under onnxruntime with optimizations off
(``onnx.reference`` where onnxruntime has no kernel), every unsafe batch norm still there and recorded as
left, every batch norm left with a :class:`bnfold.reasons.Reason`, and idempotence (folding the result again
folds nothing and changes no byte).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from hypothesis import strategies as st
from onnx import GraphProto, ModelProto, TensorProto, helper, numpy_helper

from bnfold.core.compare import default_tolerances
from bnfold.core.report import BnRecord
from bnfold.onnx.fold.patterns import PATTERN_NAMES, STANDALONE_MODES
from bnfold.onnx.verify.reference_fixes import reference_evaluator
from bnfold.reasons import Reason

DTYPES = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16, "float64": TensorProto.DOUBLE}
OPSETS = (13, 15, 17, 21)
UNSAFE_BN = ("nan", "inf", "negative_var", "zero_denominator", "training_mode", "param_input", "overridable")
MAX_CHANNELS = 8


@dataclass(frozen=True)
class Value:
    name: str
    shape: tuple[int, ...]

    @property
    def rank(self) -> int:
        return len(self.shape)


@dataclass
class FuzzCase:
    """A random model, the inputs to run it on (one mapping per iteration), and the batch norms that must
    stay (node name -> why folding it would be wrong)."""

    model: ModelProto
    feeds: list[dict[str, np.ndarray]]
    must_stay: dict[str, str]
    ops: list[str] = field(default_factory=list)
    # Options for fold_onnx: some cases skip a pattern or rewrite standalone batch norms (either mode).
    options: dict[str, Any] = field(default_factory=dict)
    # The least precise float in the model: float32 batch-norm statistics make a float64 model's batch norm
    # as precise as float32 (the runtime adds epsilon to the variance in float32).
    precision: np.dtype = field(default_factory=lambda: np.dtype(np.float32))

    def describe(self) -> str:
        counts = Counter(self.ops)
        dtype = TensorProto.DataType.Name(self.model.graph.input[0].type.tensor_type.elem_type).lower()
        options = "".join(f", {key}={value}" for key, value in self.options.items())
        return (f"{dtype} opset {self.model.opset_import[0].version}{options}: "
                + ", ".join(f"{op} x{n}" if n > 1 else op for op, n in sorted(counts.items())))


class _Graph:
    """One graph under construction (the main graph or an ``If`` branch); names are unique model-wide."""

    def __init__(self, draw: Any, rng: np.random.Generator, dtype: np.dtype, opset: int,
                 root: _Graph | None = None) -> None:
        self.draw = draw
        self.rng = rng
        self.dtype = dtype
        self.opset = opset
        self.root = root or self
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self.values: list[Value] = []
        self.uses: Counter[str] = Counter()
        if root is None:
            self.counter = 0
            self.inputs: list[onnx.ValueInfoProto] = []
            self.feed_specs: dict[str, tuple[np.dtype, tuple[int, ...], str]] = {}
            self.must_stay: dict[str, str] = {}
            self.ops: list[str] = []
            self.shared_weights: dict[tuple[Any, ...], str] = {}
            self.precision = dtype
            self.functions: list[onnx.FunctionProto] = []

    # -- drawing ----------------------------------------------------------------------------------
    def integer(self, low: int, high: int) -> int:
        return self.draw(st.integers(low, high))

    def choice(self, options: Any) -> Any:
        return self.draw(st.sampled_from(list(options)))

    def chance(self, percent: int) -> bool:
        return self.draw(st.integers(0, 99)) < percent

    # -- building ---------------------------------------------------------------------------------
    def fresh(self, base: str) -> str:
        self.root.counter += 1
        return f"{base}{self.root.counter}"

    def const(self, array: np.ndarray, base: str = "c", dtype: np.dtype | None = None, outer: bool = False) -> str:
        name = self.fresh(base)
        tensor = numpy_helper.from_array(np.asarray(array).astype(dtype or self.dtype), name)
        (self.root.initializers if outer else self.initializers).append(tensor)
        return name

    def weight(self, shape: tuple[int, ...], fan_in: int, kind: str) -> str:
        """A random weight; sometimes one an earlier layer of the same shape already uses (shared)."""
        key = (kind, shape)
        shared = self.root.shared_weights.get(key)
        if shared is not None and self is self.root and self.chance(30):
            return shared
        scale = 1.0 / math.sqrt(max(fan_in, 1))
        name = self.const(self.rng.normal(scale=scale, size=shape), "w")
        if self is self.root:
            self.root.shared_weights[key] = name
        return name

    def node(self, op_type: str, inputs: list[str], shape: tuple[int, ...], *, outputs: int = 1,
             name: str | None = None, **attributes: Any) -> Value:
        name = name or self.fresh(op_type.lower())
        names = [f"{name}_out"] + [f"{name}_out{k}" for k in range(1, outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, names, name=name, **attributes))
        self.uses.update(i for i in inputs if i)
        self.root.ops.append(op_type)
        value = Value(names[0], shape)
        self.values.append(value)
        return value

    def graph_input(self, base: str, shape: tuple[int, ...], dtype: np.dtype, kind: str) -> str:
        name = self.fresh(base)
        root = self.root
        root.inputs.append(helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(dtype), shape))
        root.feed_specs[name] = (dtype, shape, kind)
        return name

    # -- ops --------------------------------------------------------------------------------------
    def conv(self, v: Value) -> Value | None:
        if not 3 <= v.rank <= 5:
            return None
        channels, spatial = v.shape[1], v.shape[2:]
        group = self.choice(d for d in range(1, channels + 1) if channels % d == 0)
        out = group * self.integer(1, max(1, MAX_CHANNELS // group))
        auto_pad = self.choice(["NOTSET"] * 6 + ["SAME_UPPER", "SAME_LOWER", "VALID"])
        kernel, strides, dilations, pads, out_spatial = [], [], [], [], []
        for size in spatial:
            k, s, d = self.integer(1, 3), self.integer(1, 2), self.integer(1, 2)
            begin, end = (self.integer(0, 1), self.integer(0, 1)) if auto_pad == "NOTSET" else (0, 0)
            if size + begin + end < d * (k - 1) + 1 or auto_pad.startswith("SAME"):
                d = 1  # onnxruntime has no dilated SAME padding
                k = k if size + begin + end >= k else 1
            extent = -(-size // s) if auto_pad.startswith("SAME") else (size + begin + end - d * (k - 1) - 1) // s + 1
            kernel.append(k), strides.append(s), dilations.append(d), pads.append((begin, end))
            out_spatial.append(extent)
        attributes: dict[str, Any] = {"strides": strides, "dilations": dilations}
        if auto_pad == "NOTSET":
            attributes["pads"] = [p[0] for p in pads] + [p[1] for p in pads]
        else:
            attributes["auto_pad"] = auto_pad
        if group > 1 or self.chance(20):
            attributes["group"] = group
        if self.chance(50):
            attributes["kernel_shape"] = kernel
        inputs = [v.name, self.weight((out, channels // group, *kernel), channels // group * math.prod(kernel), "conv")]
        if self.chance(50):
            inputs.append(self.const(self.rng.normal(size=out), "bias"))
        return self.node("Conv", inputs, (v.shape[0], out, *out_spatial), **attributes)

    def conv_transpose(self, v: Value) -> Value | None:
        if not 3 <= v.rank <= 5 or max(v.shape[2:]) > 4:
            return None
        channels, spatial = v.shape[1], v.shape[2:]
        group = self.choice(d for d in range(1, channels + 1) if channels % d == 0)
        per_group = self.integer(1, max(1, MAX_CHANNELS // group))
        same = self.chance(10)
        kernel, strides, dilations, pads, output_padding, out_spatial = [], [], [], [], [], []
        for size in spatial:
            k, s, d = self.integer(1, 3), self.integer(1, 2), self.integer(1, 2)
            extra = self.integer(0, s - 1)
            if same:  # onnx's shape inference and onnxruntime disagree on SAME with these, or negative padding
                d, extra, k = 1, 0, max(k, s)
            full = s * (size - 1) + extra + d * (k - 1) + 1
            begin, end = (self.integer(0, 1), self.integer(0, 1)) if not same else (0, 0)
            if full - begin - end < 1:
                begin = end = 0
            kernel.append(k), strides.append(s), dilations.append(d), output_padding.append(extra)
            pads.append((begin, end))
            out_spatial.append(size * s if same else full - begin - end)
        attributes: dict[str, Any] = {"strides": strides, "dilations": dilations, "output_padding": output_padding}
        if same:
            attributes["auto_pad"] = self.choice(["SAME_UPPER", "SAME_LOWER"])
        else:
            attributes["pads"] = [p[0] for p in pads] + [p[1] for p in pads]
        if group > 1 or self.chance(20):
            attributes["group"] = group
        inputs = [v.name, self.weight((channels, per_group, *kernel), channels // group * math.prod(kernel),
                                      "convtranspose")]
        if self.chance(50):
            inputs.append(self.const(self.rng.normal(size=group * per_group), "bias"))
        return self.node("ConvTranspose", inputs, (v.shape[0], group * per_group, *out_spatial), **attributes)

    def gemm(self, v: Value) -> Value | None:
        if v.rank != 2:
            return None
        trans_a, trans_b = self.chance(25), self.chance(50)
        m, k = (v.shape[1], v.shape[0]) if trans_a else v.shape
        n = self.integer(1, MAX_CHANNELS)
        inputs = [v.name, self.weight((n, k) if trans_b else (k, n), k, "gemm")]
        c_shape = self.choice([None, (n,), (1, n), (m, n), (1,), ()])
        if c_shape is not None:
            inputs.append(self.const(self.rng.normal(size=c_shape), "c"))
        attributes: dict[str, Any] = {}
        if trans_a:
            attributes["transA"] = 1
        if trans_b:
            attributes["transB"] = 1
        if self.chance(40):
            attributes["alpha"] = self.choice([0.5, -1.5, 2.0])
        if self.chance(40):
            attributes["beta"] = self.choice([0.0, 0.5, -2.0])
        return self.node("Gemm", inputs, (m, n), **attributes)

    def matmul(self, v: Value) -> Value | None:
        if v.rank < 2:
            return None
        if self.chance(25):  # constant @ x: contracts x's second-to-last axis
            rows = self.integer(1, MAX_CHANNELS)
            weight = self.weight((rows, v.shape[-2]), v.shape[-2], "matmul-left")
            return self.node("MatMul", [weight, v.name], (*v.shape[:-2], rows, v.shape[-1]))
        n = self.integer(1, MAX_CHANNELS)
        weight = self.weight((v.shape[-1], n), v.shape[-1], "matmul")
        return self.node("MatMul", [v.name, weight], (*v.shape[:-1], n))

    def batchnorm(self, v: Value) -> Value | None:
        if v.rank < 2:
            return None
        channels = v.shape[1]
        rng = self.rng
        params = [rng.uniform(0.5, 1.5, channels) * rng.choice([-1.0, 1.0], channels),
                  rng.normal(0, 0.5, channels), rng.normal(0, 0.5, channels), rng.uniform(0.5, 2.0, channels)]
        epsilon = self.choice([1e-5, 1e-3, 0.1])
        unsafe = self.choice(UNSAFE_BN) if self.chance(15) else None
        if unsafe == "training_mode" and self.opset < 14:
            unsafe = None
        channel = self.integer(0, channels - 1)
        if unsafe == "nan":
            params[self.integer(0, 3)][channel] = np.nan
        elif unsafe == "inf":
            params[self.integer(0, 2)][channel] = self.choice([np.inf, -np.inf])
        elif unsafe == "negative_var":
            params[3][channel] = -self.choice([0.5, 2.0])
        elif unsafe == "zero_denominator":
            params[3][channel], epsilon = 0.0, 0.0
        param_dtypes = [self.dtype] * 4
        if self.opset >= 15 and self.dtype != np.float32 and self.chance(15):
            param_dtypes = [np.dtype(np.float32)] * 4 if self.chance(50) else [self.dtype] * 2 + [np.float32] * 2
            if self.dtype == np.float64:
                self.root.precision = np.dtype(np.float32)
        names = []
        for position, (values, dtype) in enumerate(zip(params, param_dtypes, strict=True)):
            if unsafe == "param_input" and position == channel % 4:
                kind = "variance" if position == 3 else "normal"
                names.append(self.graph_input("p", (channels,), np.dtype(dtype), kind))
            elif unsafe == "overridable" and position == channel % 4:
                name = self.const(values, "p", dtype, outer=True)
                self.root.inputs.append(helper.make_tensor_value_info(
                    name, helper.np_dtype_to_tensor_dtype(np.dtype(dtype)), (channels,)))
                names.append(name)
            else:
                names.append(self.const(values, "p", dtype))
        attributes: dict[str, Any] = {"epsilon": epsilon}
        if self.chance(20):
            attributes["momentum"] = 0.9
        name = self.fresh("bn")
        if unsafe is not None:
            self.root.must_stay[name] = unsafe
        if unsafe == "training_mode":
            return self.node("BatchNormalization", [v.name, *names], v.shape, outputs=3, name=name,
                             training_mode=1, **attributes)
        return self.node("BatchNormalization", [v.name, *names], v.shape, name=name, **attributes)

    def relu(self, v: Value) -> Value:
        return self.node("Relu", [v.name], v.shape)

    def affine(self, v: Value) -> Value | None:
        op = self.choice(["Mul", "Add", "Sub", "Div"])
        rank, channels = v.rank, v.shape[1] if v.rank > 1 else v.shape[0]
        options = [(channels,) + (1,) * (rank - 2), (1, channels) + (1,) * (rank - 2), (channels,), (), (1,),
                   v.shape[1:], (1,) * (rank - 1) + (v.shape[-1],)]
        shape = self.choice([s for s in options if _broadcasts(v.shape, s)])
        values = self.rng.uniform(0.5, 1.5, shape) * self.rng.choice([-1.0, 1.0], shape)
        if op in ("Add", "Sub"):
            values = self.rng.normal(size=shape)
        elif op == "Div" and self.chance(5) and np.size(values):
            values.flat[0] = 0.0  # a zero divisor: inf in the output, and never folded
        constant = self.const(values, "k")
        first = self.chance(25)
        return self.node(op, [constant, v.name] if first else [v.name, constant], np.broadcast_shapes(v.shape, shape))

    def binary(self, v: Value) -> Value:
        op = self.choice(["Add", "Mul"])
        partners = [w for w in self.values if w.shape == v.shape and w.name != v.name]
        other = self.choice(partners) if partners and self.chance(80) else v
        return self.node(op, [v.name, other.name], v.shape)

    def reshape(self, v: Value) -> Value | None:
        if v.rank < 2:
            return None
        batch, rest = v.shape[0], math.prod(v.shape[1:])
        targets = [(0, -1)]
        if v.rank >= 3:
            targets.append((0, v.shape[1], -1))
        if v.rank == 2:
            targets.append((0, v.shape[1], 1, 1))
        target = self.choice(targets)
        shape = tuple(batch if d == 0 else d for d in target)
        if -1 in shape:
            known = math.prod(d for d in shape if d != -1)
            shape = tuple(rest * batch // known if d == -1 else d for d in shape)
        spec = self.const(np.array(target, np.int64), "shape", np.dtype(np.int64))
        return self.node("Reshape", [v.name, spec], shape)

    def flatten(self, v: Value) -> Value | None:
        if v.rank < 2:
            return None
        axis = self.integer(0, v.rank)
        return self.node("Flatten", [v.name], (math.prod(v.shape[:axis]), math.prod(v.shape[axis:])), axis=axis)

    def branch(self, v: Value) -> Value | None:
        """``If(cond)``: both branches map ``v`` to the same shape through a linear layer and a batch norm;
        the then-branch's weight may be an initializer of the main graph (an outer value)."""
        if self is not self.root or v.rank < 2:
            return None
        outputs = []
        shape = None
        branches = []
        for position in range(2):
            inner = _Graph(self.draw, self.rng, self.dtype, self.opset, root=self.root)
            value = inner.relu(v) if position == 1 and self.chance(50) else v
            if value.rank >= 3:
                out = shape[1] if shape else self.integer(1, MAX_CHANNELS)
                weight = inner.const(self.rng.normal(scale=0.5, size=(out, v.shape[1]) + (1,) * (v.rank - 2)),
                                     "w", outer=position == 0 and self.chance(50))
                value = inner.node("Conv", [value.name, weight], (v.shape[0], out, *v.shape[2:]))
            else:
                out = shape[1] if shape else self.integer(1, MAX_CHANNELS)
                weight = inner.const(self.rng.normal(scale=0.5, size=(v.shape[1], out)), "w",
                                     outer=position == 0 and self.chance(50))
                value = inner.node("MatMul", [value.name, weight], (v.shape[0], out))
            value = inner.batchnorm(value) or value
            shape = value.shape
            outputs.append(value)
            branches.append(inner.subgraph(value))
        cond = self.root.condition(v)
        assert shape is not None
        return self.node("If", [cond], shape, then_branch=branches[0], else_branch=branches[1])

    def scoped_branch(self, v: Value) -> Value | None:
        """``If`` whose branches name their values alike at different ranks: each computes
        ``BN(MatMul(a, W))`` into the same names ``a`` and ``p``, one on ``v`` as it is, the other on ``v``
        reshaped to another rank (and back). A fold resting on the other branch's type changes the numbers."""
        if self is not self.root or v.rank < 2:
            return None
        a, p, width = self.fresh("a"), self.fresh("p"), v.shape[-1]
        other = (math.prod(v.shape[:-1]), width) if v.rank > 2 else (1, *v.shape)
        branches = []
        for shape in self.choice([(v.shape, other), (other, v.shape)]):
            inner = _Graph(self.draw, self.rng, self.dtype, self.opset, root=self.root)
            inner.reshaped(v.name, v.shape, shape, a)
            weight = inner.const(self.rng.normal(scale=1 / math.sqrt(width), size=(width, width)), "w")
            inner.nodes.append(helper.make_node("MatMul", [a, weight], [p], name=self.fresh("matmul")))
            self.root.ops.append("MatMul")
            value = inner.batchnorm(Value(p, shape)) or Value(p, shape)
            out = self.fresh("back")
            inner.reshaped(value.name, shape, v.shape, out)
            branches.append(inner.subgraph(Value(out, v.shape)))
        self.uses.update([v.name])
        return self.node("If", [self.condition(v)], v.shape, then_branch=branches[0], else_branch=branches[1])

    def reshaped(self, source: str, shape: tuple[int, ...], target: tuple[int, ...], name: str) -> None:
        """``name`` = ``source`` (of ``shape``) as ``target``: an Identity where they agree, else a Reshape."""
        if shape == target:
            self.nodes.append(helper.make_node("Identity", [source], [name]))
            return
        self.nodes.append(helper.make_node("Reshape", [source, self.int64s(target)], [name]))

    def call(self, v: Value) -> Value | None:
        """A model-local function ``BN(MatMul(x, W))``, its body naming a value as the main graph does, called
        on a 2-D ``v`` and sometimes also on a 3-D ``(N, K, K)`` expansion of it: there the batch norm scales
        axis 1 while the MatMul's columns are axis 2, so the calls disagree on the rank and the body must stay."""
        if self is not self.root or v.rank != 2 or self.opset < 15:
            return None
        width, rng = v.shape[-1], self.rng
        product = self.values[0].name  # the main graph's input has this name too, at its own rank
        tensors = {"w": rng.normal(scale=1 / math.sqrt(width), size=(width, width)),
                   "gamma": rng.uniform(0.5, 1.5, width) * rng.choice([-1.0, 1.0], width),
                   "beta": rng.normal(0, 0.5, width), "mean": rng.normal(0, 0.5, width),
                   "var": rng.uniform(0.5, 2.0, width)}
        body = [helper.make_node("Constant", [], [name], value=numpy_helper.from_array(value.astype(self.dtype), name))
                for name, value in tensors.items()]
        body += [helper.make_node("MatMul", ["x", "w"], [product]),
                 helper.make_node("BatchNormalization", [product, "gamma", "beta", "mean", "var"], ["y"])]
        name = f"Block{len(self.functions)}"
        self.functions.append(helper.make_function(FUNCTION_DOMAIN, name, ["x"], ["y"], body,
                                                   [helper.make_opsetid("", self.opset)]))
        sources = [v]
        if self.chance(50):
            rows = v.shape[0]
            column = self.node("Reshape", [v.name, self.int64s((rows, 1, width))], (rows, 1, width))
            sources.append(self.node("Expand", [column.name, self.int64s((rows, width, width))], (rows, width, width)))
        result = None
        for source in sources:
            result = self.node(name, [source.name], source.shape, domain=FUNCTION_DOMAIN)
        return result

    def int64s(self, values: tuple[int, ...]) -> str:
        return self.const(np.array(values, np.int64), "shape", np.dtype(np.int64))

    def condition(self, v: Value | None = None) -> str:
        """An ``If`` condition: the boolean input ``cond``, whether ``v``'s mean is positive (data: the
        iterations' random inputs take both branches), or whether ``v``'s first dim exceeds 1 (a shape)."""
        root = self.root
        kind = "input" if v is None else self.choice(["input", "data", "shape"])
        if kind == "input":
            if "cond" not in root.feed_specs:
                root.inputs.append(helper.make_tensor_value_info("cond", TensorProto.BOOL, ()))
                root.feed_specs["cond"] = (np.dtype(bool), (), "condition")
            return "cond"
        assert v is not None
        cond, measured = root.fresh("cond"), root.fresh("measured")
        if kind == "data":  # mean > mean - mean: no float constant, so a model widened to float64 still runs
            as_float, zero = root.fresh("as_float"), root.fresh("zero")
            root.nodes += [helper.make_node("Cast", [v.name], [as_float], to=TensorProto.FLOAT),
                           helper.make_node("ReduceMean", [as_float], [measured], keepdims=0),
                           helper.make_node("Sub", [measured, measured], [zero]),
                           helper.make_node("Greater", [measured, zero], [cond])]
        else:
            shape = root.fresh("shape")
            root.nodes += [helper.make_node("Shape", [v.name], [shape]),
                           helper.make_node("Gather", [shape, root.const(np.int64(0), "first", np.dtype(np.int64))],
                                            [measured], axis=0),
                           helper.make_node("Greater", [measured, root.const(np.int64(1), "one", np.dtype(np.int64))],
                                            [cond])]
        root.uses.update([v.name])
        return cond

    def subgraph(self, output: Value) -> GraphProto:
        info = helper.make_tensor_value_info(output.name, helper.np_dtype_to_tensor_dtype(self.dtype), output.shape)
        return helper.make_graph(self.nodes, self.fresh("branch"), [], [info], self.initializers)


def _broadcasts(shape: tuple[int, ...], constant: tuple[int, ...]) -> bool:
    """``constant`` broadcasts against ``shape`` without changing it."""
    try:
        return np.broadcast_shapes(shape, constant) == shape
    except ValueError:
        return False


_OPS = {"conv": 5, "conv_transpose": 2, "gemm": 3, "matmul": 3, "batchnorm": 8, "relu": 2, "affine": 4,
        "binary": 2, "reshape": 2, "flatten": 1, "branch": 1, "scoped_branch": 2, "call": 2}
FUNCTION_DOMAIN = "fuzz"
_LINEAR = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@st.composite
def fuzz_cases(draw: Any, max_ops: int = 10) -> FuzzCase:
    """A random :class:`FuzzCase` (see the module docstring)."""
    dtype_name = draw(st.sampled_from(["float32"] * 6 + ["float16"] * 2 + ["float64"] * 2))
    dtype = np.dtype(dtype_name)
    opset = draw(st.sampled_from(OPSETS))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    graph = _Graph(draw, rng, dtype, opset)
    rank = draw(st.sampled_from([2, 3, 4, 4, 4, 5]))
    spatial_max = 4 if rank == 5 else 6
    shape = (draw(st.integers(1, 2)), draw(st.integers(1, 6)), *(draw(st.integers(1, spatial_max))
                                                                  for _ in range(rank - 2)))
    x = Value(graph.graph_input("x", shape, dtype, "data"), shape)
    graph.values.append(x)
    kinds, weights = list(_OPS), list(_OPS.values())
    for _ in range(draw(st.integers(1, max_ops))):
        last = graph.values[-1]
        producer = graph.nodes[-1].op_type if graph.nodes else ""
        v = last if draw(st.integers(0, 99)) < 70 else draw(st.sampled_from(graph.values))
        if producer in _LINEAR and v is last and draw(st.integers(0, 99)) < 60:
            kind = "batchnorm"
        else:
            kind = draw(st.sampled_from([k for k, w in zip(kinds, weights, strict=True) for _ in range(w)]))
        getattr(graph, kind)(v)
    outputs = [v for v in graph.values[1:] if graph.uses[v.name] == 0 or draw(st.integers(0, 99)) < 15]
    if not outputs:
        outputs = [graph.relu(x)]
    elem = helper.np_dtype_to_tensor_dtype(dtype)
    model = helper.make_model(
        helper.make_graph(graph.nodes, "fuzz", graph.inputs,
                          [helper.make_tensor_value_info(v.name, elem, v.shape) for v in outputs],
                          graph.initializers),
        opset_imports=[helper.make_opsetid("", opset)]
        + ([helper.make_opsetid(FUNCTION_DOMAIN, 1)] if graph.functions else []),
        functions=graph.functions)
    model.ir_version = 10
    feeds = [_feeds(graph.feed_specs, np.random.default_rng(iteration), iteration) for iteration in range(2)]
    options: dict[str, Any] = {}
    if draw(st.integers(0, 99)) < 30:
        options["standalone"] = draw(st.sampled_from(STANDALONE_MODES))
    if draw(st.integers(0, 99)) < 10:
        options["skip"] = [draw(st.sampled_from(PATTERN_NAMES))]
    return FuzzCase(model, feeds, dict(graph.must_stay), list(graph.ops), options, graph.precision)


def _feeds(specs: dict[str, tuple[np.dtype, tuple[int, ...], str]], rng: np.random.Generator, iteration: int
           ) -> dict[str, np.ndarray]:
    feeds = {}
    for name, (dtype, shape, kind) in specs.items():
        if kind == "condition":
            feeds[name] = np.array(iteration % 2 == 0)
        elif kind == "variance":
            feeds[name] = rng.uniform(0.5, 2.0, shape).astype(dtype)
        else:
            feeds[name] = rng.standard_normal(shape).astype(dtype)
    return feeds


# --- the properties --------------------------------------------------------------------------------

class Unrunnable(Exception):
    """onnxruntime has no kernel for the model, and onnx.reference cannot run it either."""


def run(model: ModelProto, feeds: list[dict[str, np.ndarray]]) -> tuple[str, list[list[np.ndarray]]]:
    """Outputs per iteration, under onnxruntime with every optimization off, or under onnx.reference where
    onnxruntime has no kernel; and which engine ran."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception as error:  # noqa: BLE001 - only a missing kernel sends us to the reference evaluator
        if "NOT_IMPLEMENTED" not in str(error):
            raise
        try:
            evaluator = reference_evaluator(model)
            with np.errstate(all="ignore"):  # NaN statistics are part of the game
                return "onnx.reference", [[np.asarray(o) for o in evaluator.run(None, dict(f))] for f in feeds]
        except Exception as reference_error:  # noqa: BLE001 - the caller tells this apart from a bad model
            raise Unrunnable(f"onnx.reference: {_first_line(reference_error)}") from reference_error
    return "onnxruntime", [session.run(None, dict(f)) for f in feeds]


def _compare(name: str, reference: np.ndarray, candidate: np.ndarray, precision: np.dtype) -> str | None:
    if reference.dtype != candidate.dtype or reference.shape != candidate.shape:
        return (f"output {name}: {candidate.dtype}{list(candidate.shape)} instead of "
                f"{reference.dtype}{list(reference.shape)}")
    ref, cand = reference.astype(np.float64), candidate.astype(np.float64)
    special = ~np.isfinite(ref) | ~np.isfinite(cand)
    if not np.array_equal(ref[special], cand[special], equal_nan=True):
        return f"output {name}: NaN or infinity at different places"
    rtol, atol_factor = max(default_tolerances(reference.dtype), default_tolerances(precision))
    finite = ref[~special]
    scale = float(np.max(np.abs(finite), initial=0.0)) or 1.0
    error = np.abs(cand[~special] - finite)
    bound = atol_factor * scale + rtol * np.abs(finite)
    if np.any(error > bound):
        worst = int(np.argmax(error - bound))
        return (f"output {name}: max abs error {float(error.max()):.3g} at scale {scale:.3g} "
                f"(element {worst}: {cand[~special][worst]!r} vs {finite[worst]!r})")
    return None


# A generated graph can be ill-conditioned (a constant divided by a value near zero): rounding the folded
# weights to the model's dtype, which an exact fold must do, then moves outputs past any fixed tolerance.
# Such a fold is judged in float64 instead, where it must reproduce the original to these tolerances. So is
# every float16 case, whose own tolerances let a wrong scale of a few percent through.
_FLOAT64_RTOL = 1e-7
_NARROW_FLOATS = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16)


def _exact_in_float64(case: FuzzCase) -> bool | None:
    """Whether folding the model widened to float64 (every tensor converted exactly) gives a model that
    computes, in float64, what the widened original computes; None when no engine here runs it."""
    from bnfold import fold_onnx

    twin = ModelProto()
    twin.CopyFrom(case.model)
    _widen(twin.graph)
    for function in twin.functions:
        _widen_constants(function.node)
    feeds = [{name: value.astype(np.float64) if value.dtype.kind == "f" else value for name, value in f.items()}
             for f in case.feeds]
    try:
        folded = fold_onnx(twin, verify=False, **case.options).model
    except Exception:  # noqa: BLE001 - a crash is the plain check's to report
        return None
    try:
        expected, actual = run(twin, feeds)[1], run(folded, feeds)[1]
    except Unrunnable:
        return None
    except Exception:  # noqa: BLE001 - the folded twin does not run: not exact
        return False
    for reference_outputs, candidate_outputs in zip(expected, actual, strict=True):
        for reference, candidate in zip(reference_outputs, candidate_outputs, strict=True):
            ref, cand = np.asarray(reference, np.float64), np.asarray(candidate, np.float64)
            if ref.shape != cand.shape or not np.array_equal(np.isfinite(ref), np.isfinite(cand)):
                return False
            finite = np.isfinite(ref)
            scale = float(np.max(np.abs(ref[finite]), initial=0.0)) or 1.0
            if np.any(np.abs(cand[finite] - ref[finite]) > _FLOAT64_RTOL * (scale + np.abs(ref[finite]))):
                return False
    return True


def _widen(graph: GraphProto) -> None:
    for tensor in graph.initializer:
        if tensor.data_type in _NARROW_FLOATS:
            tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float64), tensor.name))
    for value in (*graph.input, *graph.output, *graph.value_info):
        if value.type.tensor_type.elem_type in _NARROW_FLOATS:
            value.type.tensor_type.elem_type = TensorProto.DOUBLE
    _widen_constants(graph.node)
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                _widen(attribute.g)


def _widen_constants(nodes: Any) -> None:
    for node in nodes:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.TENSOR and attribute.t.data_type in _NARROW_FLOATS:
                attribute.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(attribute.t).astype(np.float64),
                                                             attribute.t.name))


def _batchnorms(graph: GraphProto) -> set[str]:
    names = set()
    for node in graph.node:
        if node.op_type == "BatchNormalization":
            names.add(node.name)
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                names |= _batchnorms(attribute.g)
    return names


@dataclass
class Verdict:
    """What :func:`check` found: the broken properties (empty if none) and what the fold did."""

    problems: list[str]
    records: list[BnRecord] = field(default_factory=list)
    engine: str = ""


def check(case: FuzzCase) -> Verdict:
    """Fold ``case`` and test every property of the module docstring."""
    from bnfold import fold_onnx

    try:
        result = fold_onnx(case.model, verify=False, **case.options)
    except Exception as error:  # noqa: BLE001 - the property under test: nothing escapes for a valid model
        return Verdict([f"fold raised {type(error).__name__}: {error}"])
    verdict = Verdict([], result.report.records)
    problems = verdict.problems
    try:
        onnx.checker.check_model(result.model, full_check=True)
    except Exception as error:  # noqa: BLE001 - reported as the broken property
        problems.append(f"invalid folded model: {_first_line(error)}")
    verdict.engine, expected = run(case.model, case.feeds)
    try:
        _, actual = run(result.model, case.feeds)
    except Exception as error:  # noqa: BLE001 - reported as the broken property
        problems.append(f"the folded model does not run: {_first_line(error)}")
        return verdict
    names = [o.name for o in case.model.graph.output]
    mismatches = [
        mismatch
        for reference_outputs, candidate_outputs in zip(expected, actual, strict=True)
        for name, reference, candidate in zip(names, reference_outputs, candidate_outputs, strict=True)
        if (mismatch := _compare(name, np.asarray(reference), np.asarray(candidate), case.precision))
    ]
    if mismatches or case.precision == np.float16:
        exact = _exact_in_float64(case)
        if mismatches and not exact:
            problems.append(f"not equivalent: {mismatches[0]}")
        elif exact is False:
            problems.append("not equivalent: the fold of the float64 twin computes something else")
    problems += _coverage_problems(case, result)
    remaining = _batchnorms(result.model.graph)
    left = {r.bn for r in result.report.records if r.status == "left"}
    problems += [f"{r.bn} left with reason {r.reason!r}, not a Reason" for r in result.report.records
                 if r.status == "left" and not isinstance(r.reason, Reason)]
    for name, why in sorted(case.must_stay.items()):
        if name not in remaining or name not in left:
            problems.append(f"unsafe batch norm {name} ({why}) was folded")
    try:
        again = fold_onnx(result.model, verify=False, **case.options)
    except Exception as error:  # noqa: BLE001 - reported as the broken property
        problems.append(f"folding the folded model raised {type(error).__name__}: {error}")
        return verdict
    if again.report.folded or again.model.SerializeToString() != result.model.SerializeToString():
        problems.append(f"not idempotent: a second fold folded {len(again.report.folded)} more")
    return verdict


def _coverage_problems(case: FuzzCase, result: Any) -> list[str]:
    """Verification on the case's first input must name exactly the folded sites in If branches that input
    did not take, among the sites every enclosing If of which is conditioned on the ``cond`` input (which
    says the branch it takes); sites under Ifs conditioned on data are not judged."""
    sites = [(record.scope, record.bn) for record in result.report.folded]
    if not any(scope for scope, _ in sites) or "cond" not in case.feeds[0]:
        return []
    from bnfold.onnx.verify.verify import verify_onnx

    feeds = case.feeds[:1]
    conditions = _if_conditions(result.model.graph)
    ran: dict[str, bool] = {}
    for scope, _ in sites:
        steps = scope.split("/")
        pairs = list(zip(steps[::2], steps[1::2], strict=False))
        if scope and len(steps) % 2 == 0 and all(conditions.get(label) == "cond" for label, _ in pairs):
            ran[scope] = all((branch == "then_branch") == bool(feeds[0]["cond"]) for _, branch in pairs)
    expected = sorted(f"{scope}/{bn}" for scope, bn in sites if scope in ran and not ran[scope])
    try:
        report = verify_onnx(case.model, result.model, inputs=feeds, folded_sites=sites, rtol=1.0, atol=1e30)
    except Exception as error:  # noqa: BLE001 - reported as the broken property
        return [f"verification raised {type(error).__name__}: {_first_line(error)}"]
    judged = sorted(site for site in report.unexercised if site.rsplit("/", 1)[0] in ran)
    if judged != expected:
        return [f"coverage: sites reported not run {judged}, expected {expected}"]
    return []


def _if_conditions(graph: GraphProto) -> dict[str, str]:
    """The condition input of every If node, nested ones too, by the label scopes use."""
    conditions = {}
    for node in graph.node:
        if node.op_type == "If":
            conditions[node.name or f"If({node.output[0]})"] = node.input[0]
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                conditions.update(_if_conditions(attribute.g))
    return conditions


def generator_problem(case: FuzzCase) -> tuple[str, str] | None:
    """``("unrunnable", why)`` if no engine here can run the generated model (onnx.reference fails on some
    models onnxruntime has no kernel for), ``("invalid", why)`` if the model is wrong (a generator bug);
    None for a good case."""
    try:
        onnx.checker.check_model(case.model, full_check=True)
    except Exception as error:  # noqa: BLE001 - any reason is the generator's
        return "invalid", _first_line(error)
    try:
        run(case.model, case.feeds)
    except Unrunnable as error:
        return "unrunnable", str(error)
    except Exception as error:  # noqa: BLE001 - onnxruntime refuses a model the checker passed
        return "invalid", _first_line(error)
    return None


def _first_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0]}"
