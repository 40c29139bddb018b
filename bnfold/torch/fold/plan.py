"""Decide which BN call sites fold into which layer, on a capture-independent :class:`Dataflow`.

A BN module is folded only when *every* one of its call sites folds (it is removed as a whole);
a layer only when it has exactly one call site and nothing else reads its parameters. Forward
folds (layer -> BN) win over backward folds (BN -> layer), as AIMET does.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bnfold.core.affine import ChannelAffine, FoldRefused
from bnfold.core.report import BnRecord
from bnfold.reasons import Reason
from bnfold.torch.capture.dataflow import BnFacts, Call, Dataflow, LayerGeometry

FoldWeights = Callable[[str, LayerGeometry, "ChannelAffine | None", "ChannelAffine | None"], Any]
"""``(layer, geometry, input_affine, output_affine) -> new parameters``; raises :class:`FoldRefused`."""


@dataclass
class LayerFold:
    layer: str
    geometry: LayerGeometry
    before: list[Call] = field(default_factory=list)
    after: list[Call] = field(default_factory=list)
    params: Any = None

    def bn_modules(self) -> set[str]:
        return {c.module for c in self.before + self.after}


@dataclass
class Plan:
    records: list[BnRecord]
    folds: dict[str, LayerFold]
    removed: list[str]
    """BN modules whose every call site is folded away."""


def plan_folds(
    flow: Dataflow,
    bns: dict[str, BnFacts],
    layers: dict[str, LayerGeometry | FoldRefused],
    fold_weights: FoldWeights,
) -> Plan:
    planner = _Planner(flow, bns, layers, fold_weights)
    return planner.run()


class _Planner:
    def __init__(self, flow: Dataflow, bns: dict[str, BnFacts], layers, fold_weights: FoldWeights) -> None:
        self.flow = flow
        self.bns = bns
        self.layers = layers
        self.fold_weights = fold_weights
        self.calls = {c.id: c for c in flow.calls}
        self.sites: dict[str, list[Call]] = defaultdict(list)
        for call in flow.calls:
            self.sites[call.module].append(call)
        self.left: dict[str, FoldRefused] = {}
        for name, facts in bns.items():
            if facts.refusal is not None:
                self.left[name] = facts.refusal
            elif name in flow.referenced:
                self.left[name] = FoldRefused(Reason.MODULE_REUSED, flow.referenced[name])
            elif not self.sites.get(name):
                self.left[name] = FoldRefused(Reason.NOT_CALLED, "the forward pass never calls it")
        self.direction: dict[int, tuple[str, int]] = {}
        self.site_refusal: dict[int, FoldRefused] = {}

    def run(self) -> Plan:
        while True:
            self._decide_sites()
            if self._drop_partial_modules() or self._drop_partial_links():
                continue
            folds = self._collect_folds()
            if not self._compute(folds):
                break
        return Plan(self._records(folds), folds, [m for m in self.bns if m not in self.left])

    def _bn_calls(self) -> list[Call]:
        return [c for c in self.flow.calls if c.kind == "bn" and c.module in self.bns and c.module not in self.left]

    def _decide_sites(self) -> None:
        self.direction = {}
        self.site_refusal = {}
        forward_refusal: dict[int, FoldRefused] = {}
        for call in self._bn_calls():
            outcome = self._forward(call)
            if isinstance(outcome, FoldRefused):
                forward_refusal[call.id] = outcome
            else:
                self.direction[call.id] = ("after", outcome)
        for call in reversed(self._bn_calls()):
            if call.id in self.direction:
                continue
            outcome = self._backward(call)
            if isinstance(outcome, FoldRefused):
                first = forward_refusal[call.id]
                self.site_refusal[call.id] = outcome if first.code == Reason.NO_LINEAR_NEIGHBOUR else first
            else:
                self.direction[call.id] = ("before", outcome)

    def _forward(self, call: Call) -> int | FoldRefused:
        if call.source is None:
            return FoldRefused(Reason.NO_LINEAR_NEIGHBOUR, "its input is not the output of a conv or linear layer")
        source = self.calls[call.source]
        if len(source.consumers) != 1:
            return FoldRefused(
                Reason.INPUT_FAN_OUT, f"its input (output of {source.module}) has {len(source.consumers)} users"
            )
        if source.kind == "bn" and not call.flattened:
            decided = self.direction.get(source.id)
            if decided is None or decided[0] != "after":
                return FoldRefused(Reason.NO_LINEAR_NEIGHBOUR, f"it follows {source.module}, which is not folded")
            return decided[1]
        if call.flattened:
            geometry = self.layers.get(source.module)
            if not isinstance(geometry, LayerGeometry) or geometry.kind != "linear":
                return FoldRefused(
                    Reason.RESHAPE_MIXES_CHANNELS, f"its input flattens {source.module}, whose channels are not last"
                )
            return self._layer_ready(source, call, geometry.batched_rank, "output")
        return self._layer_ready(source, call, source.output_rank, "output")

    def _backward(self, call: Call) -> int | FoldRefused:
        if len(call.consumers) != 1 or call.consumers[0] is None:
            if len(call.consumers) > 1:
                return FoldRefused(Reason.OUTPUT_FAN_OUT, f"its output has {len(call.consumers)} users")
            return FoldRefused(Reason.NO_LINEAR_NEIGHBOUR, "no conv or linear layer next to it")
        if not self.bns[call.module].output_is_bn:
            return FoldRefused(
                Reason.WORK_AFTER_BN, f"{call.module} returns more than its batch norm's output (e.g. an activation)"
            )
        target = self.calls[call.consumers[0]]
        if target.kind == "bn":
            decided = self.direction.get(target.id)
            if decided is None or decided[0] != "before":
                return FoldRefused(Reason.NO_LINEAR_NEIGHBOUR, f"it feeds {target.module}, which is not folded")
            return decided[1]
        return self._layer_ready(target, call, target.input_rank, "input")

    def _layer_ready(self, layer: Call, bn: Call, rank: int | None, side: str) -> int | FoldRefused:
        geometry = self.layers.get(layer.module)
        if geometry is None:
            return FoldRefused(Reason.NO_LINEAR_NEIGHBOUR, f"{layer.module} is not a foldable layer")
        if isinstance(geometry, FoldRefused):
            return geometry
        count = len(self.sites[layer.module])
        if count != 1:
            return FoldRefused(Reason.MODULE_REUSED, f"{layer.module} is called at {count} sites")
        if layer.module in self.flow.referenced:
            return FoldRefused(Reason.MODULE_REUSED, self.flow.referenced[layer.module])
        expected = geometry.batched_rank
        pinned = self.bns[bn.module].ranks
        if pinned is not None and expected not in pinned:
            return FoldRefused(
                Reason.CHANNEL_AXIS, f"{bn.module} takes rank {sorted(pinned)}, {layer.module} gives rank {expected}"
            )
        if rank is not None and rank != expected:
            return FoldRefused(
                Reason.CHANNEL_AXIS,
                f"the {side} of {layer.module} has rank {rank}: its channel axis is not the BN's axis 1",
            )
        if rank is None and pinned != frozenset({expected}):
            return FoldRefused(
                Reason.UNKNOWN_SHAPE,
                f"cannot prove the {side} of {layer.module} has rank {expected} (pass example inputs)",
            )
        return layer.id

    def _drop_partial_modules(self) -> bool:
        changed = False
        for call in self._bn_calls():
            if call.id not in self.direction and call.module not in self.left:
                self.left[call.module] = self.site_refusal[call.id]
                changed = True
        return changed

    def _drop_partial_links(self) -> bool:
        groups: dict[object, list[Call]] = defaultdict(list)
        for call in self.flow.calls:
            if call.kind == "bn" and call.link is not None:
                groups[call.link].append(call)
        changed = False
        for calls in groups.values():
            blocked = [c.module for c in calls if c.module in self.left]
            if not blocked:
                continue
            for call in calls:
                if call.module not in self.left:
                    self.left[call.module] = FoldRefused(
                        Reason.SHARED_CODE, f"its call site is shared with {blocked[0]}, which is not folded"
                    )
                    changed = True
        return changed

    def _collect_folds(self) -> dict[str, LayerFold]:
        folds: dict[str, LayerFold] = {}
        for call in self._bn_calls():
            side, layer_id = self.direction[call.id]
            layer = self.calls[layer_id].module
            fold = folds.setdefault(layer, LayerFold(layer, self.layers[layer]))
            (fold.after if side == "after" else fold.before).append(call)
        return folds

    def _compose(self, calls: list[Call]) -> ChannelAffine | None:
        affine = None
        for call in sorted(calls, key=lambda c: c.id):
            step = self.bns[call.module].affine
            affine = step if affine is None else affine.then(step)  # type: ignore[arg-type]  # a folded BN has one
        return affine

    def _compute(self, folds: dict[str, LayerFold]) -> bool:
        """Compute every layer's new parameters; on a refusal drop its BNs and ask for a re-plan."""
        changed = False
        for fold in folds.values():
            try:
                before = self._compose(fold.before)
                after = self._compose(fold.after)
                if before is not None:
                    _check_shift_is_exact(fold, before)
                fold.params = self.fold_weights(fold.layer, fold.geometry, before, after)
            except FoldRefused as refusal:
                for module in fold.bn_modules():
                    self.left[module] = refusal
                changed = True
        return changed

    def _records(self, folds: dict[str, LayerFold]) -> list[BnRecord]:
        into: dict[str, list[tuple[str, str]]] = defaultdict(list)
        for fold in folds.values():
            kind = fold.geometry.pattern_name
            for call in fold.after:
                into[call.module].append((f"{kind}-bn", fold.layer))
            for call in fold.before:
                into[call.module].append((f"bn-{kind}", fold.layer))
        records = []
        for name in self.bns:
            refusal = self.left.get(name)
            if refusal is not None:
                records.append(BnRecord(name, "left", refusal.message, reason=refusal.code))
                continue
            targets = list(dict.fromkeys(layer for _, layer in into[name]))
            patterns = list(dict.fromkeys(pattern for pattern, _ in into[name]))
            records.append(BnRecord(
                name, "folded", f"folded into {', '.join(targets)}",
                pattern="+".join(patterns), into=", ".join(targets),
            ))
        return records


def _check_shift_is_exact(fold: LayerFold, before: ChannelAffine) -> None:
    if not np.any(before.shift != 0):
        return
    if fold.geometry.kind == "convtranspose":
        raise FoldRefused(
            Reason.UNEVEN_TAPS, f"{fold.layer} is transposed: a BN shift before it reaches border outputs unevenly"
        )
    if fold.geometry.zero_padded:
        raise FoldRefused(
            Reason.PADDING, f"{fold.layer} zero-pads its input: a BN shift before it would not reach the padding"
        )
