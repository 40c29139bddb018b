"""Fold time against model length: ``python -m bench.scaling`` (about three minutes on 2 cores).

Two model families where a per-fold cost that grows with the model made the whole fold quadratic: many Conv
+ BN pairs sharing one weight (every fold clones the weight under one base name, and finding a free name
tried each taken suffix again), and long chains of standalone batch norms rewritten with ``--standalone``
(each rewrite inserts a node, and finding its place scanned the node list). Each family is folded at n and
3n batch norms in one process, best of two, without verification; the ratio of the two times is ~3 for a
linear fold and ~9 for a quadratic one. Writes ``bench/results/scaling.json``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from bench.run import results_json
from bnfold import fold_onnx

CHANNELS = 4
SIZES = (2000, 6000)


def _bn_params(rng: np.random.Generator, prefix: str) -> list[TensorProto]:
    values = [rng.uniform(0.5, 1.5, CHANNELS), rng.normal(size=CHANNELS), rng.normal(size=CHANNELS),
              rng.uniform(0.5, 2.0, CHANNELS)]
    return [numpy_helper.from_array(v.astype(np.float32), f"{prefix}_{role}")
            for v, role in zip(values, ("scale", "bias", "mean", "var"), strict=True)]


def _model(nodes: list[onnx.NodeProto], initializers: list[TensorProto], last: str) -> onnx.ModelProto:
    value = helper.make_tensor_value_info
    graph = helper.make_graph(nodes, "scaling", [value("x", TensorProto.FLOAT, [1, CHANNELS, 4, 4])],
                              [value(last, TensorProto.FLOAT, [1, CHANNELS, 4, 4])], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return model


def shared_weight_chain(count: int) -> onnx.ModelProto:
    """``count`` x (Conv -> BN -> Relu), every Conv reading the one weight ``w``."""
    rng = np.random.default_rng(0)
    initializers = [numpy_helper.from_array(rng.normal(size=(CHANNELS, CHANNELS, 1, 1)).astype(np.float32), "w")]
    nodes, value = [], "x"
    for position in range(count):
        params = _bn_params(rng, f"bn{position}")
        initializers += params
        nodes += [helper.make_node("Conv", [value, "w"], [f"c{position}"], name=f"conv{position}"),
                  helper.make_node("BatchNormalization", [f"c{position}", *(p.name for p in params)],
                                   [f"b{position}"], name=f"bn{position}"),
                  helper.make_node("Relu", [f"b{position}"], [f"r{position}"])]
        value = f"r{position}"
    return _model(nodes, initializers, value)


def standalone_chain(count: int) -> onnx.ModelProto:
    """``count`` x (Relu -> BN): no batch norm has a linear layer to fold into."""
    rng = np.random.default_rng(1)
    initializers: list[TensorProto] = []
    nodes, value = [], "x"
    for position in range(count):
        params = _bn_params(rng, f"bn{position}")
        initializers += params
        nodes += [helper.make_node("Relu", [value], [f"r{position}"]),
                  helper.make_node("BatchNormalization", [f"r{position}", *(p.name for p in params)],
                                   [f"b{position}"], name=f"bn{position}")]
        value = f"b{position}"
    return _model(nodes, initializers, value)


FAMILIES: dict[str, tuple[Callable[[int], onnx.ModelProto], dict[str, str]]] = {
    "shared_weight_conv_bn": (shared_weight_chain, {}),
    "standalone_mul_add": (standalone_chain, {"standalone": "mul-add"}),
    "standalone_conv": (standalone_chain, {"standalone": "conv"}),
}


def fold_seconds(model: onnx.ModelProto, options: dict[str, str], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        result = fold_onnx(model, verify=False, **options)  # type: ignore[arg-type]  # standalone is a str
        best = min(best, time.perf_counter() - started)
        assert not result.report.left, "every batch norm of these models folds"
    return best


def measure(sizes: tuple[int, int], repeats: int, families: list[str]) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    for family in families:
        build, options = FAMILIES[family]
        fold_seconds(build(10), options, 1)  # imports (onnxruntime, for the guard's load check) happen once
        small, large = (fold_seconds(build(size), options, repeats) for size in sizes)
        rows.append({"family": family, "batchnorms": list(sizes), "seconds": [small, large],
                     "ratio": large / small, "size_ratio": sizes[1] / sizes[0]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs=2, default=SIZES)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--families", nargs="+", choices=list(FAMILIES), default=list(FAMILIES))
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "scaling.json")
    args = parser.parse_args()
    rows = measure(tuple(args.sizes), args.repeats, args.families)  # type: ignore[arg-type]  # two ints
    args.out.write_text(results_json(rows))
    print("| family | batch norms | seconds | time ratio (size ratio) |")
    print("|---|---|---|---|")
    for row in rows:
        sizes, seconds = row["batchnorms"], row["seconds"]
        print(f"| {row['family']} | {sizes[0]} -> {sizes[1]} | {seconds[0]:.2f} -> {seconds[1]:.2f} "  # type: ignore[index]
              f"| {row['ratio']:.1f} ({row['size_ratio']:.0f}) |")


if __name__ == "__main__":
    main()
