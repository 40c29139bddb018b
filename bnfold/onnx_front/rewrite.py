"""Folding one node: let the first matching pattern plan a rewrite, apply it, record the outcome."""

from __future__ import annotations

from collections.abc import Sequence

import onnx
from onnx import NodeProto

from bnfold.affine import FoldRefused, cast_checked
from bnfold.onnx_front.batchnorm import batchnorm_affine
from bnfold.onnx_front.graph import GraphIndex
from bnfold.patterns.base import Pattern, Rewrite
from bnfold.report import BnRecord


def is_batchnorm(node: NodeProto) -> bool:
    return node.op_type == "BatchNormalization" and node.domain in ("", "ai.onnx")


def fold_node(bn: NodeProto, index: GraphIndex, patterns: Sequence[Pattern], enabled: set[str]) -> BnRecord:
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


