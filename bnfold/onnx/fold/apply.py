"""Applying a planned :class:`Rewrite` to the graph: the one place a fold edits it. Which rewrite to apply,
and what to record, the driver (:mod:`bnfold.onnx.fold.driver`) decides."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import NodeProto

from bnfold.core.affine import FoldRefused, ScaledWeight, cast_checked
from bnfold.onnx.fold.patterns.base import Elementwise, Rewrite, TensorUpdate
from bnfold.onnx.fold.patterns.runs import FIRST_NUMPY_BROADCAST_OPSET
from bnfold.onnx.graph.index import GraphIndex
from bnfold.onnx.store.deferred import cast_deferred
from bnfold.onnx.store.held import HeldValue
from bnfold.reasons import Reason


def apply_rewrite(rewrite: Rewrite, index: GraphIndex, label: str) -> None:
    """Edit the graph as ``rewrite`` says; ``label`` names the site in an overflow refusal (``FoldRefused``)."""
    if index.opset < FIRST_NUMPY_BROADCAST_OPSET and any(
            isinstance(op, Elementwise) for op in (*rewrite.replacement, rewrite.bias_after)):
        # Their broadcast/axis form neither onnxruntime (no kernel) nor onnx.reference can run.
        raise FoldRefused(Reason.UNSUPPORTED_OPSET,
                          f"the rewrite adds a Mul or Add, which broadcast by attribute at opset {index.opset}; "
                          f"--standalone conv rewrites a batch norm as a depthwise Conv instead")
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
