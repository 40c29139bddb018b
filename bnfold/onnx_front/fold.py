"""The fold driver: visit every BatchNormalization, let the first matching pattern plan a rewrite,
apply it, and record what happened (or why nothing did)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import numpy as np
import onnx
from onnx import ModelProto, NodeProto

from bnfold.affine import FoldRefused, cast_checked
from bnfold.onnx_front.batchnorm import batchnorm_affine
from bnfold.onnx_front.graph import GraphIndex, NameAllocator, opset_version, subgraphs
from bnfold.onnx_front.types import infer_types
from bnfold.patterns.base import Pattern, Rewrite
from bnfold.report import BnRecord, Totals

Progress = Callable[[str, int, int], None]


def is_batchnorm(node: NodeProto) -> bool:
    return node.op_type == "BatchNormalization" and node.domain in ("", "ai.onnx")


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
    enabled = set(enabled)
    batchnorms = [node for node in index.nodes if is_batchnorm(node)]
    records = []
    for done, bn in enumerate(batchnorms, start=1):
        records.append(_fold_one(bn, index, patterns, enabled))
        if progress is not None:
            progress("fold", done, len(batchnorms))
    index.commit()
    return records


def _fold_one(bn: NodeProto, index: GraphIndex, patterns: Sequence[Pattern], enabled: set[str]) -> BnRecord:
    label = index.node_label(bn)
    try:
        affine = batchnorm_affine(bn, index)
        rewrite = None
        for pattern in patterns:
            rewrite = pattern.plan(bn, affine, index)
            if rewrite is not None:
                break
        if rewrite is None:
            producer = index.producers.get(bn.input[0])
            source = "a graph input" if producer is None else f"a {producer.op_type} node"
            raise FoldRefused("no_linear_producer", f"its input comes from {source}, which nothing folds into")
        if rewrite.pattern not in enabled:
            raise FoldRefused("pattern_disabled", f"pattern {rewrite.pattern} is disabled by the options")
        _apply(rewrite, bn, index, label)
    except FoldRefused as refusal:
        return BnRecord(label, "left", refusal.message, reason=refusal.code, scope=index.scope)
    target = index.node_label(rewrite.target)
    return BnRecord(label, "folded", f"folded into {target}", pattern=rewrite.pattern, into=target, scope=index.scope)


def _apply(rewrite: Rewrite, bn: NodeProto, index: GraphIndex, label: str) -> None:
    # Every cast happens before the first edit, so an overflow refusal leaves the graph untouched.
    casts = [cast_checked(u.value, u.dtype, f"{u.role} for {label}") for u in rewrite.updates]
    appended = None
    if rewrite.appended_bias is not None:
        shift, dtype = rewrite.appended_bias
        appended = cast_checked(shift, dtype, f"bias for {label}")
    for update, value in zip(rewrite.updates, casts, strict=True):
        current = update.node.input[update.slot] if update.slot < len(update.node.input) else ""
        base = current or f"{index.node_label(update.node)}.{update.role}"
        index.write_tensor(update.node, update.slot, value, f"{base}_bnfold")
    for node, name, value in rewrite.attributes:
        _set_float_attribute(node, name, value)
    output = bn.output[0]
    if appended is None:
        assert rewrite.tail is not None
        index.remove_node(bn)
        index.set_output(rewrite.tail, 0, output)
    else:
        add = onnx.helper.make_node("Add", [bn.input[0], ""], [output], name=bn.name)
        index.turn_into(bn, add)
        index.write_tensor(bn, 1, appended, f"{label}.shift_bnfold")


def _set_float_attribute(node: NodeProto, name: str, value: float) -> None:
    for attribute in node.attribute:
        if attribute.name == name:
            attribute.f = value
            return
    node.attribute.append(onnx.helper.make_attribute(name, value))


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
