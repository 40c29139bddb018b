"""Recognize conv/linear and batch-norm calls among the aten ops of a torch.export graph."""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from bnfold.torch.capture.dataflow import Call, Dataflow, LayerGeometry

aten = torch.ops.aten

_CONV = {aten.conv1d.default: 1, aten.conv2d.default: 2, aten.conv3d.default: 3}
_CONV_PADDING = {aten.conv1d.padding: 1, aten.conv2d.padding: 2, aten.conv3d.padding: 3}
_CONV_TRANSPOSE = {aten.conv_transpose1d.default: 1, aten.conv_transpose2d.input: 2, aten.conv_transpose3d.input: 3}
_WEIGHT_TRANSPOSES = {aten.permute.default, aten.t.default}


@dataclass
class AtenLayer:
    node: fx.Node
    input: fx.Node
    weight: fx.Node
    bias: fx.Node | None
    geometry: LayerGeometry
    transposed: fx.Node | None = None
    """For ``addmm``/``mm``: the permute/t node that turns the weight into ``[in, out]``."""

    def parameter_nodes(self) -> dict[fx.Node, fx.Node]:
        """Each parameter node and the one node allowed to read it."""
        reader = self.transposed if self.transposed is not None else self.node
        nodes = {self.weight: reader}
        if self.transposed is not None:
            nodes[self.transposed] = self.node
        if self.bias is not None:
            nodes[self.bias] = self.node
        return nodes


@dataclass
class AtenBn:
    node: fx.Node
    input: fx.Node
    output: fx.Node
    weight: fx.Node | None
    bias: fx.Node | None
    mean: fx.Node | None
    var: fx.Node | None
    eps: float
    training: bool

    def parameter_nodes(self) -> dict[fx.Node, fx.Node]:
        return {n: self.node for n in (self.weight, self.bias, self.mean, self.var) if isinstance(n, fx.Node)}


def _value(node: object) -> torch.Tensor | None:
    if isinstance(node, fx.Node):
        value = node.meta.get("val")
        if isinstance(value, torch.Tensor):
            return value
    return None


def _arg(node: fx.Node, position: int, name: str, default: object) -> Any:
    if len(node.args) > position:
        return node.args[position]
    return node.kwargs.get(name, default)


def _ints(value: Any, count: int) -> list[int]:
    if isinstance(value, int):
        return [value] * count
    return [int(v) for v in value]


def parse_layer(node: fx.Node) -> AtenLayer | None:
    if node.op != "call_function" or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    target = node.target
    if target == aten.linear.default:
        weight, bias = node.args[1], _arg(node, 2, "bias", None)
        return _linear(node, node.args[0], weight, bias, None)
    if target in (aten.addmm.default, aten.mm.default):
        if target == aten.addmm.default:
            if len(node.args) < 3 or node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
                return None
            bias, data, transposed = node.args[0], node.args[1], node.args[2]
        else:
            bias, data, transposed = None, node.args[0], node.args[1]
        if not (isinstance(transposed, fx.Node) and transposed.target in _WEIGHT_TRANSPOSES):
            return None
        if transposed.target == aten.permute.default and list(transposed.args[1]) != [1, 0]:  # type: ignore[arg-type]
            return None
        return _linear(node, data, transposed.args[0], bias, transposed)
    if target in _CONV or target in _CONV_PADDING:
        spatial = _CONV.get(target) or _CONV_PADDING[target]
        padding = _arg(node, 4, "padding", 0)
        dilation = _ints(_arg(node, 5, "dilation", 1), spatial)
        groups = int(_arg(node, 6, "groups", 1))
        return _conv(node, "conv", spatial, groups, padding, dilation)
    if target in _CONV_TRANSPOSE:
        spatial = _CONV_TRANSPOSE[target]
        return _conv(node, "convtranspose", spatial, int(_arg(node, 6, "groups", 1)), 0, [1] * spatial)
    if target == aten.convolution.default and len(node.args) == 9:
        weight = _value(node.args[1])
        if weight is None:
            return None
        spatial = weight.dim() - 2
        transposed, groups = bool(node.args[6]), int(node.args[8])  # type: ignore[arg-type]
        kind = "convtranspose" if transposed else "conv"
        return _conv(node, kind, spatial, groups, 0 if transposed else node.args[4], _ints(node.args[5], spatial))
    return None


def _linear(node: fx.Node, data: object, weight: object, bias: object, transposed: fx.Node | None):
    value = _value(weight)
    if not isinstance(data, fx.Node) or not isinstance(weight, fx.Node) or value is None or value.dim() != 2:
        return None
    if bias is not None and not isinstance(bias, fx.Node):
        return None
    geometry = LayerGeometry("linear", 0, 1, int(value.shape[1]), int(value.shape[0]), False)
    return AtenLayer(node, data, weight, bias, geometry, transposed)


def _conv(node: fx.Node, kind: str, spatial: int, groups: int, padding: object, dilation: list[int]):
    weight_node, bias = node.args[1], _arg(node, 2, "bias", None)
    weight = _value(weight_node)
    if weight is None or weight.dim() != spatial + 2 or (bias is not None and not isinstance(bias, fx.Node)):
        return None
    kernel = [int(k) for k in weight.shape[2:]]
    if kind == "conv":
        out_channels, in_channels = int(weight.shape[0]), int(weight.shape[1]) * groups
    else:
        in_channels, out_channels = int(weight.shape[0]), int(weight.shape[1]) * groups
    if padding == "valid":
        zero_padded = False
    elif padding == "same":
        zero_padded = any(d * (k - 1) > 0 for d, k in zip(dilation, kernel, strict=True))
    else:
        zero_padded = any(p > 0 for p in _ints(padding, spatial))
    geometry = LayerGeometry(kind, spatial, groups, in_channels, out_channels, zero_padded)  # type: ignore[arg-type]
    return AtenLayer(node, node.args[0], weight_node, bias, geometry)  # type: ignore[arg-type]


def parse_bn(node: fx.Node) -> AtenBn | None:
    if node.op != "call_function" or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    target = node.target
    args: list[Any] = list(node.args)  # an aten schema's arguments, checked by position and count
    if target == aten.batch_norm.default and len(args) >= 8:
        return AtenBn(node, args[0], node, *args[1:5], eps=float(args[7]), training=bool(args[5]))  # type: ignore[misc]
    if target == aten._native_batch_norm_legit_no_training.default and len(args) >= 7:
        output = _first_item(node)
        return None if output is None else AtenBn(node, args[0], output, *args[1:5], float(args[6]), False)  # type: ignore[call-arg]
    if target in (aten._native_batch_norm_legit.default, aten.native_batch_norm.default) and len(args) >= 8:
        output = _first_item(node)
        return None if output is None else AtenBn(node, args[0], output, *args[1:5], float(args[7]), bool(args[5]))  # type: ignore[call-arg]
    return None


def _first_item(node: fx.Node) -> fx.Node | None:
    """The ``getitem(node, 0)`` holding a multi-output batch norm's result; other items must be unused."""
    if any(u.target != operator.getitem for u in node.users):
        return None
    results = [u for u in node.users if u.args[1] == 0]
    if len(results) != 1 or any(u.users for u in node.users if u.args[1] != 0):
        return None
    return results[0]


Site = AtenLayer | AtenBn


def aten_dataflow(
    graph: fx.Graph,
    owner: Callable[[Site], str | None],
    next_id: Callable[[], int],
) -> tuple[Dataflow, dict[int, Site]]:
    """Calls of ``graph``: every recognized op whose ``owner`` (module name) is known."""
    by_value: dict[fx.Node, tuple[int, str, Site]] = {}
    by_node: dict[fx.Node, tuple[int, str, Site]] = {}
    for node in graph.nodes:
        site = parse_bn(node) or parse_layer(node)
        if site is None:
            continue
        name = owner(site)
        if name is not None:
            entry = (next_id(), name, site)
            by_node[node] = entry
            by_value[site.output if isinstance(site, AtenBn) else node] = entry
    referenced: dict[str, str] = {}
    allowed: dict[fx.Node, set[fx.Node]] = {}
    names_of_param: dict[fx.Node, str] = {}
    for _, name, site in by_node.values():
        for param, reader in site.parameter_nodes().items():
            allowed.setdefault(param, set()).add(reader)
            names_of_param[param] = name
    for param, readers in allowed.items():
        if set(param.users) - readers:
            referenced[names_of_param[param]] = "its parameters are read elsewhere in the graph"
    calls = []
    by_id: dict[int, Site] = {}
    for value, (call_id, name, site) in by_value.items():
        source = by_value.get(site.input)
        calls.append(Call(
            id=call_id,
            module=name,
            kind="bn" if isinstance(site, AtenBn) else "layer",
            source=source[0] if source is not None else None,
            consumers=[
                by_node[user][0] if user in by_node and _reads_only_as_input(by_node[user][2], value) else None
                for user in value.users
            ],
            input_rank=_rank(site.input),
            output_rank=_rank(value),
        ))
        by_id[call_id] = site
    return Dataflow(calls, referenced), by_id


def _reads_only_as_input(site: Site, value: fx.Node) -> bool:
    return site.input is value and value not in site.parameter_nodes()


def _rank(node: object) -> int | None:
    value = _value(node)
    return None if value is None else value.dim()
