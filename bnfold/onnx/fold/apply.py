"""Folding at one site: every pattern may plan a rewrite, the first enabled one is applied and recorded;
a batch norm nothing folds is recorded with every reason the patterns gave."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import NodeProto

from bnfold.core.affine import FoldRefused, ScaledWeight, cast_checked
from bnfold.core.report import BnRecord
from bnfold.onnx.fold.batchnorm import batchnorm_affine
from bnfold.onnx.fold.patterns import OPT_IN_PATTERNS
from bnfold.onnx.fold.patterns.base import AFFINE_CHAIN, Elementwise, Pattern, Rewrite, Site, TensorUpdate
from bnfold.onnx.fold.patterns.runs import is_batchnorm
from bnfold.onnx.graph.index import GraphIndex
from bnfold.onnx.store.deferred import cast_deferred
from bnfold.onnx.store.held import HeldValue

__all__ = ["fold_node", "is_batchnorm"]


def fold_node(anchor: NodeProto, index: GraphIndex, patterns: Sequence[Pattern], enabled: set[str]) -> list[BnRecord]:
    """Fold the run at ``anchor`` (a batch norm, or a Mul/Add/Sub/Div by a constant); its records.

    Only batch norms are recorded when they stay: an elementwise node that does not fold is not news."""
    label = index.node_label(anchor)
    # Planning never edits the graph, so a batch norm's map read once holds until a rewrite is applied.
    index.batchnorm_affines.clear()
    if is_batchnorm(anchor):
        try:
            batchnorm_affine(anchor, index)
        except FoldRefused as refusal:
            return [BnRecord(label, "left", refusal.message, reason=refusal.code, scope=index.scope)]
    site = Site(anchor, index, AFFINE_CHAIN in enabled)
    refusals: list[FoldRefused] = []
    for pattern in patterns:
        try:
            rewrite = pattern.plan(site)
            if rewrite is None:
                continue
            if rewrite.run.batchnorms and rewrite.pattern not in enabled:
                raise FoldRefused("pattern_disabled", f"pattern {rewrite.pattern} is disabled by the options")
            records = _records(rewrite, index, refusals)
            index.batchnorm_affines.clear()
            _apply(rewrite, index, label)
        except FoldRefused as refusal:
            refusals.append(refusal)
            continue
        return records
    if not is_batchnorm(anchor):
        return []
    if not refusals:
        refusals.append(_no_neighbour(anchor, index, enabled))
    message = "; ".join(dict.fromkeys(r.message for r in refusals))
    return [BnRecord(label, "left", message, reason=refusals[0].code, scope=index.scope)]


def _no_neighbour(bn: NodeProto, index: GraphIndex, enabled: set[str]) -> FoldRefused:
    producer = index.producers.get(bn.input[0])
    source = "a graph input" if producer is None else f"a {producer.op_type} node"
    readers = sorted({r.op_type for r in index.users(bn.output[0])})
    targets = [f"{'/'.join(readers)} node(s)"] if readers else []
    if index.is_graph_output(bn.output[0]):
        targets.append("the graph output")
    target = " and ".join(targets) or "nothing"
    hint = "" if enabled & set(OPT_IN_PATTERNS) else (
        " (the --standalone option rewrites it: mul-add as Mul + Add, conv as a depthwise Conv)")
    return FoldRefused(
        "no_linear_producer",
        f"its input comes from {source} and its output goes to {target}, none a linear layer it folds into{hint}",
    )


def _records(rewrite: Rewrite, index: GraphIndex, refusals: list[FoldRefused]) -> list[BnRecord]:
    """The records of ``rewrite``, labelled before it renames anything."""
    run = rewrite.run
    if rewrite.target is None:
        into = " + ".join(op.op_type for op in rewrite.replacement)
    else:
        into = index.node_label(rewrite.target)
    absorbed = [index.node_label(n) for n in run.nodes if not is_batchnorm(n)]
    if rewrite.target is None:
        kinds = {"Mul + Add": "one Mul and one Add", "Conv": "one depthwise 1x1 Conv"}
        message = f"rewritten as {kinds.get(into, into)}"
        if refusals:
            message += f" ({refusals[0].message})"
    else:
        message = f"folded into {into}"
    if run.batchnorms and absorbed:
        message += f" together with {', '.join(absorbed)}"
    if rewrite.note:
        message += f"; {rewrite.note}"
    if run.batchnorms:
        return [
            BnRecord(index.node_label(bn), "folded", message, pattern=rewrite.pattern, into=into, scope=index.scope)
            for bn in run.batchnorms
        ]
    return [
        BnRecord(index.node_label(node), "folded", message, pattern=AFFINE_CHAIN, into=into, scope=index.scope,
                 op_type=node.op_type)
        for node in run.nodes
    ]


def _apply(rewrite: Rewrite, index: GraphIndex, label: str) -> None:
    # Every cast happens before the first edit, so an overflow refusal leaves the graph untouched.
    updates = [_cast_update(u, f"{u.role} for {label}") for u in rewrite.updates]
    replacement = [
        [(role, cast_checked(value, op.dtype, f"{role} for {label}")) for role, value in op.constants()]
        for op in rewrite.replacement
    ]
    bias_after = None
    if rewrite.bias_after is not None:
        bias_after = cast_checked(rewrite.bias_after.value, rewrite.bias_after.dtype, f"bias for {label}")
    for update, value in zip(rewrite.updates, updates, strict=True):
        current = update.node.input[update.slot] if update.slot < len(update.node.input) else ""
        base = current or f"{index.node_label(update.node)}.{update.role}"
        index.write_tensor(update.node, update.slot, value, f"{base}_bnfold")
    for node, name, number in rewrite.attributes:
        _set_float_attribute(node, name, number)
    run = rewrite.run
    if rewrite.replacement:
        _replace_run(rewrite, replacement, index)
    else:
        for node in run.nodes:
            index.remove_node(node)
        if rewrite.tail is not None:
            index.set_output(rewrite.tail, 0, run.output)
        else:
            assert rewrite.reader is not None, "a rewrite without replacement has a tail or a reader"
            index.set_input(rewrite.reader, list(rewrite.reader.input).index(run.output), run.input)
    if bias_after is not None:
        assert rewrite.target is not None and rewrite.bias_after is not None
        _add_after(rewrite.target, rewrite.bias_after, bias_after, index)


def _cast_update(update: TensorUpdate, what: str) -> HeldValue:
    """The update's value in its dtype; a scaled weight that cannot change (mapped from the model's file) is
    computed only as the output is written (see ``deferred.RoundedProduct``)."""
    value = update.value
    if isinstance(value, ScaledWeight):
        return cast_deferred(value, update.dtype, what)
    return cast_checked(value, update.dtype, what)


def _replace_run(rewrite: Rewrite, values: list[list[tuple[str, np.ndarray]]], index: GraphIndex) -> None:
    """The replacement nodes take the places of the run's last nodes (extra ones go right after), from its
    input to its output."""
    run, ops = rewrite.run, rewrite.replacement
    places = run.nodes[max(0, len(run.nodes) - len(ops)):]
    for node in run.nodes[: len(run.nodes) - len(places)]:
        index.remove_node(node)
    source, previous = run.input, None
    for position, (op, constants) in enumerate(zip(ops, values, strict=True)):
        output = run.output if position == len(ops) - 1 else index.names.fresh(f"{run.output}_{op.role}")
        inputs = [source] + [""] * len(constants)
        if position < len(places):
            node = places[position]
            label = index.node_label(node)
            new = onnx.helper.make_node(op.op_type, inputs, [output], name=node.name, **op.attributes())
            index.turn_into(node, new)
        else:
            assert previous is not None
            label = index.names.fresh(f"{index.node_label(previous)}_{op.role}")
            new = onnx.helper.make_node(op.op_type, inputs, [output], name=label, **op.attributes())
            node = index.insert_after(previous, new)
        for slot, (role, value) in enumerate(constants, start=1):
            index.write_tensor(node, slot, value, f"{label}.{role}_bnfold")
        source, previous = output, node


def _add_after(layer: NodeProto, op: Elementwise, value: np.ndarray, index: GraphIndex) -> None:
    """``layer`` keeps its output name, now produced by a new ``Add`` of ``value`` to what it computes."""
    output = layer.output[0]
    label = index.node_label(layer)
    index.set_output(layer, 0, index.names.fresh(f"{output}_before_{op.role}"))
    name = index.names.fresh(f"{label}_{op.role}")
    add = index.insert_after(layer, onnx.helper.make_node(op.op_type, [layer.output[0], ""], [output], name=name))
    index.write_tensor(add, 1, value, f"{name}.{op.role}_bnfold")


def _set_float_attribute(node: NodeProto, name: str, value: float) -> None:
    for attribute in node.attribute:
        if attribute.name == name:
            attribute.f = value
            return
    node.attribute.append(onnx.helper.make_attribute(name, value))
