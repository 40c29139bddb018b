"""The fold driver: it decides. It folds every graph the traversal hands it, visiting each batch norm (and
affine node) in turn, asks the patterns to plan a rewrite there, has the first enabled one applied
(:mod:`bnfold.onnx.fold.apply`) and records what was folded, what was left and why; model totals."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import onnx
from onnx import ModelProto, NodeProto

from bnfold.core.affine import FoldRefused
from bnfold.core.report import BnRecord, Totals
from bnfold.onnx.fold.apply import apply_rewrite
from bnfold.onnx.fold.batchnorm import batchnorm_affine
from bnfold.onnx.fold.merging import merge_graph
from bnfold.onnx.fold.patterns import OPT_IN_PATTERNS
from bnfold.onnx.fold.patterns.base import AFFINE_CHAIN, Pattern, Rewrite, Site
from bnfold.onnx.fold.patterns.runs import is_batchnorm, is_link
from bnfold.onnx.fold.traversal import GraphFold, graphs_to_fold
from bnfold.onnx.graph.index import GraphIndex, subgraphs
from bnfold.onnx.graph.types import ModelTypes
from bnfold.onnx.guard import Guard
from bnfold.onnx.store.external import payload_bytes
from bnfold.onnx.store.model_store import ModelStore
from bnfold.reasons import Reason

Progress = Callable[[str, int, int], None]


def fold_model(
    store: ModelStore,
    guard: Guard,
    enabled: Iterable[str],
    *,
    allow_overridable: bool = False,
    progress: Progress | None = None,
    types: ModelTypes,
) -> list[BnRecord]:
    """Fold ``store``'s model in place with ``guard``'s patterns: its main graph, every subgraph and every
    model-local function (see :mod:`bnfold.onnx.fold.traversal`). One record per batch norm; those of
    subgraphs and functions carry their ``scope``. ``types`` are ``types.infer_types(model)``."""
    chosen = set(enabled)
    overall = _OverallProgress(progress, model_totals(store.proto)[0]) if progress is not None else None
    graphs: list[GraphFold] = []
    for graph in graphs_to_fold(store, allow_overridable=allow_overridable, types=types):
        if graph.left_because is None:
            graph.records = fold_graph(graph.index, guard, chosen, overall.graph() if overall is not None else None)
        else:
            graph.records = _all_left(graph.index, graph.left_because)
        graphs.append(graph)
    return [record for graph in sorted(graphs, key=lambda graph: graph.order) for record in graph.records]


def _all_left(index: GraphIndex, refusal: FoldRefused) -> list[BnRecord]:
    return [BnRecord(index.node_label(node), "left", refusal.message, reason=refusal.code, scope=index.scope)
            for node in index.nodes if is_batchnorm(node)]


class _OverallProgress:
    """:func:`fold_graph` counts one graph at a time; the user sees one count over the whole model."""

    def __init__(self, report: Progress, total: int) -> None:
        self._report = report
        self._total = total
        self._done = 0

    def graph(self) -> Progress:
        start = self._done

        def report(stage: str, done: int, _graph_total: int) -> None:
            self._done = start + done
            self._report(stage, self._done, self._total)

        return report


def fold_graph(
    index: GraphIndex, guard: Guard, enabled: set[str], progress: Progress | None = None
) -> list[BnRecord]:
    """Fold the affine runs of one graph, visiting batch norms (and, with ``affine-chain``, Mul/Add/Sub/Div
    by constants) in graph order, so a later node of a chain sees the earlier folds, and sweeping again while
    a sweep folds anything. Opt-in patterns take part only when enabled by name."""
    chains = AFFINE_CHAIN in enabled
    active = [p for p in guard.patterns if p.name in enabled or p.name not in OPT_IN_PATTERNS]
    anchors = [node for node in index.nodes if is_link(node, index, chains)]
    total = sum(is_batchnorm(node) for node in anchors)  # progress counts batch norms, as the model totals do
    records = _Records()
    done = 0
    for anchor in anchors:
        counted = is_batchnorm(anchor)
        # Earlier folds may have removed this node, or rewritten it into a node they placed.
        if not index.is_removed(anchor) and id(anchor) not in index.placed:
            records.add(fold_node(anchor, index, guard, active, enabled))
        done += counted
        if progress is not None and counted:
            progress("fold", done, total)
    # A fold can open the way for one the sweep already passed (a shift Add it placed now folds into the next
    # layer; a run it absorbed no longer blocks a reader): sweep again until nothing folds, so that a second
    # run of bnfold finds nothing to do. Folds remove batch norms or nodes; the bound is for a rewrite that
    # would ever trade one node for another.
    # Merges of linear layers (structural re-parameterization) alternate with the sweeps: a merge can leave a
    # run to fold into its result, and a fold can make the branches of the next Add merge.
    # Only the last merge pass's refusals hold for the graph as it ends up.
    refused: list[BnRecord] = []
    for _ in range(_MAX_SWEEPS):
        merged = merge_graph(index, guard, enabled)
        records.add([record for record in merged if record.status == "folded"])
        refused = [record for record in merged if record.status == "left"]
        if not records.folded_since_last_sweep():
            break
        index.placed.clear()
        for node in [n for n in index.nodes if is_link(n, index, chains)]:
            if not index.is_removed(node) and id(node) not in index.placed:
                records.add(fold_node(node, index, guard, active, enabled))
    records.add(refused)
    return records.in_order


_MAX_SWEEPS = 32


def fold_node(anchor: NodeProto, index: GraphIndex, guard: Guard, patterns: Sequence[Pattern], enabled: set[str]
              ) -> list[BnRecord]:
    """Fold the run at ``anchor`` (a batch norm, or a Mul/Add/Sub/Div by a constant); its records.

    Only batch norms are recorded when they stay: an elementwise node that does not fold is not news."""
    label = index.node_label(anchor)
    rejection = guard.rejection((index.scope, label))
    if rejection is not None:
        left = BnRecord(label, "left", rejection, reason=Reason.GUARD_REJECTED, scope=index.scope)
        return [left] if is_batchnorm(anchor) else []
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
                raise FoldRefused(Reason.PATTERN_DISABLED, f"pattern {rewrite.pattern} is disabled by the options")
            records = _records(rewrite, index, refusals)
            index.batchnorm_affines.clear()
            apply_rewrite(rewrite, index, label)
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
        Reason.NO_LINEAR_NEIGHBOUR,
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


class _Records:
    """The records of repeated sweeps, one per batch norm at the place of its first: a batch norm a later sweep
    folds has its folded record, one every sweep leaves has the last sweep's reason."""

    def __init__(self) -> None:
        self.in_order: list[BnRecord] = []
        self._left_at: dict[tuple[str, str], int] = {}
        self._folded = False

    def add(self, records: list[BnRecord]) -> None:
        for record in records:
            earlier = self._left_at.get((record.op_type, record.bn))
            if record.status == "left":
                if earlier is None:
                    self._left_at[(record.op_type, record.bn)] = len(self.in_order)
                    self.in_order.append(record)
                else:  # the latest reason is the one that holds for the graph as it ends up
                    self.in_order[earlier] = record
                continue
            self._folded = True
            if earlier is None:
                self.in_order.append(record)
            else:
                self.in_order[earlier] = record
                del self._left_at[(record.op_type, record.bn)]

    def folded_since_last_sweep(self) -> bool:
        folded, self._folded = self._folded, False
        return folded


def _tensor_bytes(tensor: onnx.TensorProto) -> int:
    size = payload_bytes(tensor)
    return len(tensor.raw_data) if size is None else size


def model_totals(model: ModelProto) -> tuple[int, int, int]:
    """(batch norms, nodes, parameter bytes) over every graph, subgraph and function of ``model``."""
    counts = [0, 0, 0]

    def visit_nodes(nodes: Iterable[onnx.NodeProto]) -> None:
        for node in nodes:
            counts[1] += 1
            counts[0] += is_batchnorm(node)
            if node.op_type == "Constant":
                counts[2] += sum(_tensor_bytes(a.t) for a in node.attribute if a.type == onnx.AttributeProto.TENSOR)
            for subgraph in subgraphs(node):
                visit(subgraph)

    def visit(graph: onnx.GraphProto) -> None:
        counts[2] += sum(_tensor_bytes(t) for t in graph.initializer)
        visit_nodes(graph.node)

    visit(model.graph)
    for function in model.functions:
        visit_nodes(function.node)
    return counts[0], counts[1], counts[2]


def totals(before: tuple[int, int, int], after: tuple[int, int, int]) -> Totals:
    return Totals(before[0], after[0], before[1], after[1], before[2], after[2])
