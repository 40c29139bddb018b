"""The fold driver: walk the model's graphs and hand every batch norm to :func:`fold_node`; model totals."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import numpy as np
import onnx
from onnx import ModelProto

from bnfold.onnx_front.graph import GraphIndex, NameAllocator, opset_version, subgraphs
from bnfold.onnx_front.rewrite import fold_node, is_batchnorm
from bnfold.onnx_front.types import infer_types
from bnfold.patterns.base import Pattern
from bnfold.report import BnRecord, Totals

Progress = Callable[[str, int, int], None]


def fold_model(
    model: ModelProto,
    patterns: Sequence[Pattern],
    enabled: Iterable[str],
    *,
    allow_overridable: bool = False,
    progress: Progress | None = None,
) -> list[BnRecord]:
    """Fold ``model`` in place and return one record per batch norm of the main graph."""
    index = GraphIndex(
        model.graph,
        infer_types(model),
        NameAllocator([model.graph]),
        opset=opset_version(model),
        allow_overridable=allow_overridable,
    )
    records = fold_graph(index, patterns, set(enabled), progress)
    index.commit()
    return records


def fold_graph(
    index: GraphIndex, patterns: Sequence[Pattern], enabled: set[str], progress: Progress | None = None
) -> list[BnRecord]:
    """Fold the batch norms of one graph, in graph order, so a chain's later BN sees the earlier fold."""
    batchnorms = [node for node in index.nodes if is_batchnorm(node)]
    records = []
    for done, bn in enumerate(batchnorms, start=1):
        records.append(fold_node(bn, index, patterns, enabled))
        if progress is not None:
            progress("fold", done, len(batchnorms))
    return records


def _tensor_bytes(tensor: onnx.TensorProto) -> int:
    count = int(np.prod(tensor.dims, dtype=np.int64)) if tensor.dims else 1
    try:
        return count * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except (KeyError, ValueError, TypeError):
        return len(tensor.raw_data)


def model_totals(model: ModelProto) -> tuple[int, int, int]:
    """(batch norms, nodes, parameter bytes) over every graph, subgraph and function of ``model``."""
    counts = [0, 0, 0]

    def visit(graph: onnx.GraphProto) -> None:
        counts[2] += sum(_tensor_bytes(t) for t in graph.initializer)
        for node in graph.node:
            counts[1] += 1
            counts[0] += is_batchnorm(node)
            if node.op_type == "Constant":
                counts[2] += sum(_tensor_bytes(a.t) for a in node.attribute if a.type == onnx.AttributeProto.TENSOR)
            for subgraph in subgraphs(node):
                visit(subgraph)

    visit(model.graph)
    for function in model.functions:
        counts[1] += len(function.node)
        counts[0] += sum(is_batchnorm(n) for n in function.node)
    return counts[0], counts[1], counts[2]


def totals(before: tuple[int, int, int], after: tuple[int, int, int]) -> Totals:
    return Totals(before[0], after[0], before[1], after[1], before[2], after[2])
