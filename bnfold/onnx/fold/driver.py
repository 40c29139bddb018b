"""The fold driver: walk the model's graphs and hand every batch norm to :func:`fold_node`; model totals."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import onnx
from onnx import ModelProto

from bnfold.core.report import BnRecord, Totals
from bnfold.onnx.fold.apply import fold_node, is_batchnorm
from bnfold.onnx.fold.patterns import OPT_IN_PATTERNS
from bnfold.onnx.fold.patterns.base import AFFINE_CHAIN, Pattern
from bnfold.onnx.fold.patterns.runs import is_link
from bnfold.onnx.fold.traversal import fold_all_graphs
from bnfold.onnx.graph.index import GraphIndex, subgraphs
from bnfold.onnx.graph.types import ValueType
from bnfold.onnx.store.external import payload_bytes
from bnfold.onnx.store.model_store import ModelStore

Progress = Callable[[str, int, int], None]


def fold_model(
    store: ModelStore,
    patterns: Sequence[Pattern],
    enabled: Iterable[str],
    *,
    allow_overridable: bool = False,
    progress: Progress | None = None,
    types: Mapping[str, ValueType],
) -> list[BnRecord]:
    """Fold ``store``'s model in place: its main graph, every subgraph and every model-local function (see
    :mod:`bnfold.onnx.fold.traversal`). One record per batch norm; those of subgraphs and functions carry
    their ``scope``. ``types`` are ``types.infer_types(model)``."""
    chosen = set(enabled)
    overall = _OverallProgress(progress, model_totals(store.proto)[0]) if progress is not None else None

    def fold_one(index: GraphIndex) -> list[BnRecord]:
        return fold_graph(index, patterns, chosen, overall.graph() if overall is not None else None)

    return fold_all_graphs(store, fold_one, allow_overridable=allow_overridable, types=types)


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
    index: GraphIndex, patterns: Sequence[Pattern], enabled: set[str], progress: Progress | None = None
) -> list[BnRecord]:
    """Fold the affine runs of one graph, visiting batch norms (and, with ``affine-chain``, Mul/Add/Sub/Div
    by constants) in graph order, so a later node of a chain sees the earlier folds, and sweeping again while
    a sweep folds anything. Opt-in patterns take part only when enabled by name."""
    chains = AFFINE_CHAIN in enabled
    active = [p for p in patterns if p.name in enabled or p.name not in OPT_IN_PATTERNS]
    anchors = [node for node in index.nodes if is_link(node, index, chains)]
    total = sum(is_batchnorm(node) for node in anchors)  # progress counts batch norms, as the model totals do
    records = _Records()
    done = 0
    for anchor in anchors:
        counted = is_batchnorm(anchor)
        # Earlier folds may have removed this node, or rewritten it into a node they placed.
        if not index.is_removed(anchor) and id(anchor) not in index.placed:
            records.add(fold_node(anchor, index, active, enabled))
        done += counted
        if progress is not None and counted:
            progress("fold", done, total)
    # A fold can open the way for one the sweep already passed (a shift Add it placed now folds into the next
    # layer; a run it absorbed no longer blocks a reader): sweep again until nothing folds, so that a second
    # run of bnfold finds nothing to do. Folds remove batch norms or nodes; the bound is for a rewrite that
    # would ever trade one node for another.
    for _ in range(_MAX_SWEEPS):
        if not records.folded_since_last_sweep():
            break
        index.placed.clear()
        for node in [n for n in index.nodes if is_link(n, index, chains)]:
            if not index.is_removed(node) and id(node) not in index.placed:
                records.add(fold_node(node, index, active, enabled))
    return records.in_order


_MAX_SWEEPS = 32


class _Records:
    """The records of repeated sweeps, one per batch norm at the place of its first: a batch norm a later sweep
    folds has its folded record, one every sweep leaves has the last sweep's reason."""

    def __init__(self) -> None:
        self.in_order: list[BnRecord] = []
        self._left_at: dict[str, int] = {}
        self._folded = False

    def add(self, records: list[BnRecord]) -> None:
        for record in records:
            earlier = self._left_at.get(record.bn) if record.op_type == "BatchNormalization" else None
            if record.status == "left":
                if earlier is None:
                    self._left_at[record.bn] = len(self.in_order)
                    self.in_order.append(record)
                else:  # the latest reason is the one that holds for the graph as it ends up
                    self.in_order[earlier] = record
                continue
            self._folded = True
            if earlier is None:
                self.in_order.append(record)
            else:
                self.in_order[earlier] = record
                del self._left_at[record.bn]

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
