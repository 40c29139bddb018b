"""Merge parallel linear branches inside a torch.export program (``.pt2``): structural re-parameterization.

After the batch norms have folded, an ``add``/``add_``/``sub`` whose operands are convolutions of one input
(with constant weights), the input itself, or per-channel affine maps of it (a batch norm that had nothing to
fold into, a ``mul``/``add``/``div`` by a per-channel constant) is one convolution: RepVGG, MobileOne, FastViT,
RepGhost blocks exported in their train-time structure. The kernel algebra is
:mod:`bnfold.core.kernels`, as for ONNX (``parallel-branches``); merges repeat until none applies, so a
merge's result merges again at the next add. Every value between a branch's input and the add must be read by
that branch only."""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import fx
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind, InputSpec, TensorArgument

from bnfold.core.affine import ChannelAffine, FoldRefused
from bnfold.core.kernels import ConvKernel, merge_parallel, require_cheaper
from bnfold.core.report import BnRecord
from bnfold.reasons import Reason
from bnfold.torch.capture.aten import AtenBn, AtenLayer, aten, parse_bn, parse_layer
from bnfold.torch.fold.tensors import from_float64, optional_float64, to_float64

PATTERN = "parallel-branches"
_JOINS = {aten.add.Tensor: 1.0, aten.add_.Tensor: 1.0, aten.sub.Tensor: -1.0}
_ELEMENTWISE = {aten.mul.Tensor: "Mul", aten.add.Tensor: "Add", aten.sub.Tensor: "Sub", aten.div.Tensor: "Div"}
_PLAIN_CONVS = (aten.conv1d.default, aten.conv2d.default, aten.conv3d.default, aten.convolution.default)
_MAX_PASSES = 32

Tensor = Callable[[object], "torch.Tensor | None"]


class _Branch(NamedTuple):
    source: fx.Node
    head: AtenLayer | None
    chain: tuple[fx.Node, ...]  # affine nodes from the head (or source) to the operand, in order

    @property
    def nodes(self) -> tuple[fx.Node, ...]:
        return self.chain if self.head is None else (self.head.node, *self.chain)


class BranchMerger:
    """Merges in ``program``; ``tensor`` is a node's constant value (None if it has none), ``bn_name`` the
    module name a batch norm's record carries."""

    def __init__(self, program: ExportedProgram, tensor: Tensor, bn_name: Callable[[AtenBn], str | None]) -> None:
        self.program = program
        self.graph = program.graph
        self._program_tensor = tensor
        self.bn_name = bn_name
        self._added: dict[fx.Node, torch.Tensor] = {}  # the merged layers' parameters

    def tensor(self, node: object) -> torch.Tensor | None:
        if isinstance(node, fx.Node) and node in self._added:
            return self._added[node]
        return self._program_tensor(node)

    def run(self) -> list[BnRecord]:
        folded: list[BnRecord] = []
        refused: dict[str, BnRecord] = {}
        for _ in range(_MAX_PASSES):
            merged = False
            refused.clear()  # only the last pass's refusals hold for the program as it ends up
            for node in list(self.graph.nodes):
                if node.graph is not self.graph or node.op != "call_function" or node.target not in _JOINS:
                    continue
                try:
                    records = self._merge(node)
                except FoldRefused as refusal:
                    refused[node.name] = BnRecord(node.name, "left", refusal.message, pattern=PATTERN,
                                                  reason=refusal.code, op_type=str(node.target))
                    continue
                if records:
                    folded += records
                    merged = True
            if not merged:
                break
        if folded:
            drop_unused_state(self.program)
            self.graph.lint()
            self.program.graph_module.recompile()
        return folded + list(refused.values())

    def _merge(self, node: fx.Node) -> list[BnRecord]:
        operands = node.args[:2]
        alpha = node.kwargs.get("alpha", node.args[2] if len(node.args) > 2 else 1)
        if len(operands) != 2 or not all(isinstance(o, fx.Node) for o in operands) or alpha != 1:
            return []
        readings = [self._readings(operand, node) for operand in operands]  # type: ignore[arg-type]
        common = [s for s in readings[0] if s in readings[1]]
        if not common:
            return []
        source = max(common, key=lambda s: sum(r[s].head is not None for r in readings))
        branches = [reading[source] for reading in readings]
        heads = [b.head for b in branches if b.head is not None]
        if not heads or len({n for b in branches for n in b.nodes}) != sum(len(b.nodes) for b in branches):
            return []
        dtype = _value(node).dtype  # type: ignore[union-attr]  # an add with a value, or no readings
        weights = [self.tensor(h.weight) for h in heads]
        if any(w is None or w.dtype != dtype for w in weights):
            raise FoldRefused(Reason.DTYPE_MISMATCH, "a branch's weight is not a constant of the add's dtype")
        kernels = [self._kernel(b).scaled(sign)
                   for b, sign in zip(branches, (1.0, _JOINS[node.target]), strict=True)]  # type: ignore[index]
        merged = merge_parallel(kernels)
        require_cheaper(kernels, merged)
        spatial = merged.spatial
        if merged.pads[:spatial] != merged.pads[spatial:]:
            raise FoldRefused(Reason.BRANCH_GEOMETRY, f"the merged padding {list(merged.pads)} is not symmetric, "
                                                      "as aten's convolution pads")
        like = weights[0]
        conv = self._replace(node, source, merged, from_float64(merged.weight, like, "merged weight"),  # type: ignore[arg-type]
                             from_float64(merged.bias, like, "merged bias"), heads[0])  # type: ignore[arg-type]
        described = ", ".join(" -> ".join(n.name for n in b.nodes) or "identity" for b in branches)
        records = [BnRecord(node.name, "folded", f"branches ({described}) merged into one Conv", pattern=PATTERN,
                            into=conv.name, op_type=str(node.target))]
        for branch in branches:
            for chain_node in branch.chain:
                bn = parse_bn(chain_node)
                name = self.bn_name(bn) if bn is not None else None
                if name is not None:
                    records.append(BnRecord(name, "folded", f"merged into {conv.name} with the branches of "
                                                            f"{node.name}", pattern=PATTERN, into=conv.name))
        self._erase(node, [n for b in branches for n in b.nodes])
        return records

    def _readings(self, operand: fx.Node, reader: fx.Node) -> dict[fx.Node, _Branch]:
        readings: dict[fx.Node, _Branch] = {}
        chain: list[fx.Node] = []
        current = operand
        while True:
            readings.setdefault(current, _Branch(current, None, tuple(chain)))
            if list(current.users) != [reader] or _reads(reader, current) != 1 or current.op != "call_function":
                return readings
            layer = parse_layer(current) if current.target in _PLAIN_CONVS else None
            if layer is not None and layer.geometry.kind == "conv" and self.tensor(layer.weight) is not None:
                readings.setdefault(layer.input, _Branch(layer.input, layer, tuple(chain)))
                return readings
            link = self._link(current)
            if link is None:
                return readings
            chain[:0] = link[1]
            reader, current = link[1][0], link[0]

    def _link(self, node: fx.Node) -> tuple[fx.Node, list[fx.Node]] | None:
        """(input, nodes) of a per-channel affine node producing ``node``."""
        if node.target == operator.getitem and isinstance(node.args[0], fx.Node):
            bn = parse_bn(node.args[0])
            return (bn.input, [bn.node, node]) if bn is not None and bn.output is node else None
        bn = parse_bn(node)
        if bn is not None:
            return (bn.input, [node]) if bn.output is node else None
        if node.target in _ELEMENTWISE and len(node.args) == 2 and node.kwargs.get("alpha", 1) == 1:
            data = [a for a in node.args if isinstance(a, fx.Node) and self.tensor(a) is None]
            if len(data) == 1 and (node.args[0] is data[0] or node.target != aten.div.Tensor):
                return data[0], [node]
        return None

    def _kernel(self, branch: _Branch) -> ConvKernel:
        if branch.head is not None:
            kernel = self._conv_kernel(branch.head)
        else:
            value = _value(branch.source)
            if value is None or value.dim() < 3:
                raise FoldRefused(Reason.UNKNOWN_SHAPE, f"the shape of {branch.source.name} is unknown")
            channels = int(value.shape[1])
            kernel = ConvKernel.diagonal(np.ones(channels), np.zeros(channels), value.dim() - 2)
        affine = ChannelAffine.identity(kernel.out_channels)
        for node in branch.chain:
            affine = affine.then(self._affine(node, kernel))
        return kernel.then_affine(affine.scale, affine.shift)

    def _conv_kernel(self, layer: AtenLayer) -> ConvKernel:
        node, spatial = layer.node, layer.geometry.spatial
        args = list(node.args) + [None] * 9
        if node.target == aten.convolution.default:
            stride, padding, dilation, groups = args[3], args[4], args[5], args[8]
        else:
            stride, padding, dilation, groups = (node.kwargs.get(k, args[i]) for i, k in
                                                 ((3, "stride"), (4, "padding"), (5, "dilation"), (6, "groups")))
        pads = _ints(padding, spatial, 0)
        return ConvKernel(to_float64(self.tensor(layer.weight)), _bias(self.tensor(layer.bias), layer),  # type: ignore[arg-type]
                          tuple(_ints(stride, spatial, 1)), tuple(_ints(dilation, spatial, 1)), tuple(pads + pads),
                          int(groups or 1))  # type: ignore[arg-type]  # an int in every aten schema

    def _affine(self, node: fx.Node, kernel: ConvKernel) -> ChannelAffine:
        bn = parse_bn(node)
        if bn is not None:
            if bn.training:
                raise FoldRefused(Reason.TRAINING_MODE, f"{node.name} normalizes with batch statistics")
            weight, bias, mean, var = (self.tensor(n) if n is not None else None
                                       for n in (bn.weight, bn.bias, bn.mean, bn.var))
            if mean is None or var is None:
                raise FoldRefused(Reason.NO_RUNNING_STATS, f"{node.name} has no constant running statistics")
            return ChannelAffine.from_batchnorm(optional_float64(weight), optional_float64(bias), to_float64(mean),
                                                to_float64(var), bn.eps)
        if node.target == operator.getitem:
            return ChannelAffine.identity(kernel.out_channels)  # the batch norm's result: its map is the BN's
        constant_first = not isinstance(node.args[0], fx.Node) or self.tensor(node.args[0]) is not None
        operand = node.args[0 if constant_first else 1]
        vector = _per_channel(operand, self.tensor, kernel.out_channels, kernel.spatial + 2, node.name)
        return ChannelAffine.from_elementwise(_ELEMENTWISE[node.target], vector, constant_first)  # type: ignore[index]

    def _replace(self, node: fx.Node, source: fx.Node, merged: ConvKernel, weight: torch.Tensor,
                 bias: torch.Tensor, like: AtenLayer) -> fx.Node:
        name = f"{node.name}_merged"
        weight_node = add_parameter(self.program, f"{name}.weight", weight, like.weight)
        bias_node = add_parameter(self.program, f"{name}.bias", bias, like.weight)
        self._added.update({weight_node: self.program.state_dict[f"{name}.weight"],
                            bias_node: self.program.state_dict[f"{name}.bias"]})
        spatial = merged.spatial
        with self.graph.inserting_before(node):
            conv = self.graph.call_function(aten.convolution.default, (
                source, weight_node, bias_node, list(merged.strides), list(merged.pads[:spatial]),
                list(merged.dilations), False, [0] * spatial, merged.groups))
        conv.meta.update(node.meta)
        node.replace_all_uses_with(conv)
        for spec in self.program.graph_signature.output_specs:
            if isinstance(spec.arg, TensorArgument) and spec.arg.name == node.name:
                spec.arg = TensorArgument(conv.name)
        return conv

    def _erase(self, node: fx.Node, branch_nodes: list[fx.Node]) -> None:
        self.graph.erase_node(node)
        pending = sorted(branch_nodes, key=_position(self.graph), reverse=True)
        for item in pending:
            for user in list(item.users):  # a multi-output batch norm's other, unused items
                if user not in pending and not user.users:
                    self.graph.erase_node(user)
            self.graph.erase_node(item)


def _position(graph: fx.Graph) -> Callable[[fx.Node], int]:
    order = {node: index for index, node in enumerate(graph.nodes)}
    return order.__getitem__


def _value(node: object) -> torch.Tensor | None:
    value = node.meta.get("val") if isinstance(node, fx.Node) else None
    return value if isinstance(value, torch.Tensor) else None


def _reads(reader: fx.Node, value: fx.Node) -> int:
    return sum(arg is value for arg in (*reader.args, *reader.kwargs.values()))


def _ints(value: Any, count: int, default: int) -> list[int]:
    if value is None:
        return [default] * count
    if isinstance(value, int):
        return [value] * count
    values = [int(v) for v in value]
    return values * count if len(values) == 1 else values


def _bias(bias: torch.Tensor | None, layer: AtenLayer) -> np.ndarray:
    if layer.bias is not None and bias is None:
        raise FoldRefused(Reason.NON_CONSTANT_WEIGHT, f"the bias of {layer.node.name} is not a constant")
    return np.zeros(layer.geometry.out_channels) if bias is None else to_float64(bias)


def _per_channel(operand: object, tensor: Tensor, channels: int, rank: int, label: str) -> np.ndarray:
    """A per-channel vector from a number or a constant whose shape broadcasts only along axis 1."""
    if isinstance(operand, int | float):
        return np.full(channels, float(operand))
    value = tensor(operand)
    if value is None:
        raise FoldRefused(Reason.NON_CONSTANT_PARAMS, f"{label} has no constant operand")
    shape = tuple(value.shape)
    aligned = (1,) * (rank - len(shape)) + shape
    if len(shape) > rank or any(extent != 1 and (axis != 1 or extent != channels)
                                for axis, extent in enumerate(aligned)):
        raise FoldRefused(Reason.SCALE_NOT_PER_CHANNEL, f"{label}: a constant of shape {list(shape)} is not "
                                                        "per channel")
    return np.broadcast_to(to_float64(value).reshape(-1), (channels,))


def add_parameter(program: ExportedProgram, target: str, value: torch.Tensor, like: fx.Node, suffix: str = ""
                  ) -> fx.Node:
    """A new parameter input of ``program`` holding ``value`` (its meta made by ``like``'s fake mode)."""
    graph = program.graph
    specs = program.graph_signature.input_specs
    position = max((i for i, s in enumerate(specs) if s.kind == InputKind.PARAMETER), default=-1) + 1
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    anchor = placeholders[position] if position < len(placeholders) else None
    context = graph.inserting_before(anchor) if anchor is not None else graph.inserting_after(placeholders[-1])
    with context:
        node = graph.placeholder("p_" + target.replace(".", "_") + suffix)
    node.meta["val"] = fake_like(like, value)
    specs.insert(position, InputSpec(InputKind.PARAMETER, TensorArgument(node.name), target, None))
    program.state_dict[target] = torch.nn.Parameter(value, requires_grad=False)
    return node


def fake_like(like: fx.Node, value: torch.Tensor) -> Any:
    """A meta value for ``value``, made by the same fake mode as ``like``'s."""
    fake = like.meta.get("val")
    mode = getattr(fake, "fake_mode", None)
    if mode is None:
        return value
    with mode:
        return torch.empty(value.shape, dtype=value.dtype, device=fake.device)  # type: ignore[union-attr]


def drop_unused_state(program: ExportedProgram) -> None:
    """Remove parameter, buffer and constant inputs nothing reads any more (and their state)."""
    signature = program.graph_signature
    mutated = {spec.target for spec in signature.output_specs if spec.target is not None}
    placeholders = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    kept = []
    removable = (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR)
    for spec in signature.input_specs:
        node = placeholders.get(spec.arg.name)
        if spec.kind in removable and node is not None and not node.users and spec.target not in mutated:
            program.graph.erase_node(node)
            program.state_dict.pop(spec.target, None)
            program.constants.pop(spec.target, None)
        else:
            kept.append(spec)
    signature.input_specs[:] = kept
