"""The merge pass: offers every node of a graph to the enabled merge patterns
(:mod:`~bnfold.onnx.fold.patterns.branches`, :mod:`~bnfold.onnx.fold.patterns.serial`), applies each merge
planned and records it: one record per merge site (``op_type`` the site's), and one per batch norm a merge
absorbed. The driver alternates this pass with its fold sweeps until neither changes the graph."""

from __future__ import annotations

import onnx
from onnx import NodeProto

from bnfold.core.affine import FoldRefused, cast_checked
from bnfold.core.report import BnRecord
from bnfold.errors import BnfoldError, first_line
from bnfold.onnx.fold.patterns import MERGE_PATTERNS
from bnfold.onnx.fold.patterns.base import Site
from bnfold.onnx.fold.patterns.merges import Merge
from bnfold.onnx.graph.index import GraphIndex
from bnfold.onnx.guard import Guard
from bnfold.reasons import Reason


def merge_graph(index: GraphIndex, guard: Guard, enabled: set[str]) -> list[BnRecord]:
    """Merge what the enabled merge patterns merge in one pass over the graph; the records."""
    patterns = [p for p in MERGE_PATTERNS if p.name in enabled]
    records: list[BnRecord] = []
    if not patterns:
        return records
    for node in list(index.nodes):
        if index.is_removed(node):
            continue
        label = index.node_label(node)
        for pattern in patterns:
            try:
                merge = pattern.plan(Site(node, index, True))
                if merge is None:
                    continue
                _check_guard(merge, index, guard)
                name = _merged_name(merge, index)
                merged = _records(merge, index, name)
                _apply(merge, index, label, name)
            except FoldRefused as refusal:
                records.append(BnRecord(label, "left", refusal.message, pattern=pattern.name, reason=refusal.code,
                                        scope=index.scope, op_type=node.op_type))
            except BnfoldError:
                raise
            except Exception as error:  # noqa: BLE001 - a crashing pattern costs its site, not the model
                message = (f"internal error in pattern {pattern.name} ({type(error).__name__}: "
                           f"{first_line(error)}); left unmerged, please report it")
                records.append(BnRecord(label, "left", message, pattern=pattern.name, reason=Reason.GUARD_REJECTED,
                                        scope=index.scope, op_type=node.op_type))
            else:
                records.extend(merged)
            break
    return records


def _check_guard(merge: Merge, index: GraphIndex, guard: Guard) -> None:
    for node in (merge.site, *merge.removed):
        rejection = guard.rejection((index.scope, index.node_label(node)))
        if rejection is not None:
            raise FoldRefused(Reason.GUARD_REJECTED, rejection)


def _records(merge: Merge, index: GraphIndex, into: str) -> list[BnRecord]:
    site = index.node_label(merge.site)
    records = [BnRecord(site, "folded", merge.summary, pattern=merge.pattern, into=into, scope=index.scope,
                        op_type=merge.site.op_type)]
    records += [BnRecord(index.node_label(bn), "folded", f"merged into {into} with the branches meeting at {site}",
                         pattern=merge.pattern, into=into, scope=index.scope) for bn in merge.batchnorms]
    return records


def _merged_name(merge: Merge, index: GraphIndex) -> str:
    # A merge site keeps its name when it already is the layer (a serial merge); an Add that becomes a Conv
    # gets a name saying what it is now.
    if merge.site.op_type == merge.op_type and merge.site.name:
        return merge.site.name
    return index.names.fresh(f"{index.node_label(merge.site)}_merged_{merge.op_type.lower()}")


def _apply(merge: Merge, index: GraphIndex, label: str, name: str) -> None:
    """Edit the graph: every cast before the first edit, so an overflow refusal leaves it untouched."""
    values = [(role, cast_checked(value, merge.dtype, f"merged {role} for {label}"))
              for role, value in merge.constants]
    inputs = [merge.source] + [""] * len(values)
    layer = onnx.helper.make_node(merge.op_type, inputs, [merge.site.output[0]], name=name, **merge.attributes)
    for node in merge.removed:
        index.remove_node(node)
    index.turn_into(merge.site, layer)
    site: NodeProto = merge.site
    for slot, (role, value) in enumerate(values, start=1):
        index.write_tensor(site, slot, value, f"{name}.{role}_bnfold")
