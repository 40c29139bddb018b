"""Fold batch norms in a TorchScript module, at the level of its submodule calls, in place.

Every method graph is read without inlining: ``prim::CallMethod[forward]`` on a BN or a
conv/linear submodule is a call site. Instances of one scripted class share their method graphs,
so a BN call inside a shared graph is removed only if it folds in every instance.
"""

from __future__ import annotations

import itertools
import re
from collections import defaultdict
from typing import Any

import torch

from bnfold.core.affine import ChannelAffine, FoldRefused
from bnfold.core.report import FoldReport
from bnfold.reasons import Reason
from bnfold.torch.capture.dataflow import BnFacts, Call, Dataflow, LayerGeometry
from bnfold.torch.fold.layers import fold_arrays
from bnfold.torch.fold.plan import Plan, plan_folds
from bnfold.torch.fold.tensors import from_float64, optional_float64, to_float64
from bnfold.torch.result import run_folder

_TYPE = re.compile(r"^__torch__\.torch\.nn\.modules\.(\w+)\.(?:___torch_mangle_\d+\.)?(\w+)$")
_BN_RANKS = {"BatchNorm1d": frozenset({2, 3}), "BatchNorm2d": frozenset({4}), "BatchNorm3d": frozenset({5})}
_LAYERS = {
    "Conv1d": ("conv", 1), "Conv2d": ("conv", 2), "Conv3d": ("conv", 3),
    "ConvTranspose1d": ("convtranspose", 1), "ConvTranspose2d": ("convtranspose", 2),
    "ConvTranspose3d": ("convtranspose", 3), "Linear": ("linear", 0),
}


def _kind(module: torch.jit.ScriptModule) -> str | None:
    match = _TYPE.match(module._c._type().qualified_name())
    if match is None:
        return None
    name = match.group(2)
    if name in _BN_RANKS:
        return "bn"
    return "layer" if name in _LAYERS else None


def _class_name(module: torch.jit.ScriptModule) -> str:
    return _TYPE.match(module._c._type().qualified_name()).group(2)  # type: ignore[union-attr]


def fold_scripted(root: torch.jit.ScriptModule) -> FoldReport:
    return run_folder(_ScriptFolder(root))


class _ScriptFolder:
    def __init__(self, root: torch.jit.ScriptModule) -> None:
        self.root = root
        self.modules: dict[str, torch.jit.ScriptModule] = dict(root.named_modules())
        self.ids = itertools.count()
        self.calls: list[Call] = []
        self.referenced: dict[str, str] = {}
        self.nodes: dict[int, Any] = {}
        for path, module in self.modules.items():
            if _kind(module) is None:
                for method in module._c._method_names():
                    self._read_graph(path, module, module._c._get_method(method).graph)
        for path, message in _shared_storage(root).items():
            self.referenced[path] = message

    def _read_graph(self, owner: str, module: torch.jit.ScriptModule, graph: Any) -> None:
        self_value = next(iter(graph.inputs()))
        values: dict[Any, str] = {}
        sites: dict[Any, int] = {}
        for node in _all_nodes(graph.nodes()):
            if node.kind() == "prim::GetAttr":
                parent = _inputs(node)[0]
                base = "" if parent == self_value else values.get(parent)
                if base is None:
                    continue
                path = _join(base, node.s("name"))
                full: str | None = _join(owner, path)
                if full in self.modules:
                    values[node.output()] = path
        for node in _all_nodes(graph.nodes()):
            if node.kind() != "prim::CallMethod" or node.s("name") != "forward":
                continue
            target = values.get(_inputs(node)[0])
            full = _join(owner, target) if target is not None else None
            if full is not None and _kind(self.modules[full]) is not None:
                call_id = next(self.ids)
                sites[node.output()] = call_id
                self.nodes[call_id] = node
                self.calls.append(Call(
                    call_id, full, _kind(self.modules[full]), None,  # type: ignore[arg-type]
                    link=(module._c._type().name(), graph, _node_key(node)),
                ))
        by_id = {c.id: c for c in self.calls}
        for value, call_id in sites.items():
            node = self.nodes[call_id]
            data = _inputs(node)[1] if len(_inputs(node)) == 2 else None
            call = by_id[call_id]
            call.source = sites.get(data)
            call.consumers = [
                sites.get(use.user.output()) if _is_data_input(use, self.nodes, sites) else None
                for use in value.uses()
            ]
        for value, path in values.items():
            full = _join(owner, path)
            if _kind(self.modules[full]) is None:
                continue
            for use in value.uses():
                if not (use.user.kind() == "prim::CallMethod" and use.user.s("name") == "forward" and use.offset == 0):
                    self.referenced[full] = f"{owner or 'the model'} uses it other than by calling it"

    def plan(self) -> Plan:
        bns: dict[str, BnFacts] = {}
        layers: dict[str, LayerGeometry | FoldRefused] = {}
        for path, module in self.modules.items():
            if _kind(module) == "bn":
                bns[path] = _bn_facts(module)
            elif _kind(module) == "layer":
                layers[path] = _geometry(module)
        unlinked = _links_spanning_instances(self.calls)
        for call in self.calls:
            if call.link not in unlinked:
                call.link = None
        return plan_folds(Dataflow(self.calls, self.referenced), bns, layers, self._fold_weights)

    def _fold_weights(
        self, layer: str, geometry: LayerGeometry, before: ChannelAffine | None, after: ChannelAffine | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        module = self.modules[layer]
        weight, bias = fold_arrays(
            to_float64(module.weight), optional_float64(module.bias), geometry, before, after
        )
        return from_float64(weight, module.weight, "weight"), from_float64(bias, module.weight, "bias")

    def apply(self, plan: Plan) -> None:
        for layer, fold in plan.folds.items():
            module = self.modules[layer]
            weight, bias = fold.params
            with torch.no_grad():
                module.weight.copy_(weight)
                if module.bias is None:
                    module.bias = torch.nn.Parameter(bias, requires_grad=False)
                else:
                    module.bias.copy_(bias)
        removed = set(plan.removed)
        done: set[int] = set()
        for call in self.calls:
            node = self.nodes[call.id]
            if call.module in removed and id(node) not in done:
                done.add(id(node))
                node.output().replaceAllUsesWith(_inputs(node)[1])
                node.destroy()

    def totals(self) -> tuple[int, int, int]:
        bn_calls = sum(
            1 for path, module in self.modules.items() if _kind(module) is None
            for method in module._c._method_names()
            for node in _all_nodes(module._c._get_method(method).graph.nodes())
            if node.kind() == "prim::CallMethod" and node.s("name") == "forward"
            and _callee_is_bn(node)
        )
        params = sum(t.numel() * t.element_size() for t in self.root.state_dict().values())
        return bn_calls, len(self.modules), params


def _callee_is_bn(node: Any) -> bool:
    match = _TYPE.match(_inputs(node)[0].type().str())
    return match is not None and match.group(2) in _BN_RANKS


def _inputs(node: Any) -> list[Any]:
    return list(node.inputs())


def _all_nodes(nodes: Any):
    for node in nodes:
        yield node
        for block in node.blocks():
            yield from _all_nodes(block.nodes())


def _node_key(node: Any) -> str:
    return f"{node.kind()}@{id(node)}"


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _is_data_input(use: Any, nodes: dict[int, Any], sites: dict[Any, int]) -> bool:
    user = use.user
    return user.kind() == "prim::CallMethod" and use.offset == 1 and user.outputsSize() == 1 and (
        user.output() in sites
    )


def _links_spanning_instances(calls: list[Call]) -> set[object]:
    """Links (shared graph nodes) reached from more than one instance: these must fold together."""
    instances: dict[object, set[str]] = defaultdict(set)
    for call in calls:
        instances[call.link].add(call.module)
    return {link for link, modules in instances.items() if len(modules) > 1}


def _bn_facts(module: torch.jit.ScriptModule) -> BnFacts:
    ranks = _BN_RANKS[_class_name(module)]
    try:
        if module.training:
            raise FoldRefused(Reason.TRAINING_MODE, "it is in training mode (normalizes with batch statistics)")
        if hasattr(module, "eps"):
            if not module.track_running_stats or module.running_mean is None:
                raise FoldRefused(Reason.NO_RUNNING_STATS, "track_running_stats=False: it always uses batch statistics")
            params = (module.weight, module.bias, module.running_mean, module.running_var, module.eps)
        else:
            params = _traced_bn_params(module)
        weight, bias, mean, var, eps = params
        affine = ChannelAffine.from_batchnorm(
            optional_float64(weight), optional_float64(bias), to_float64(mean), to_float64(var), eps
        )
        return BnFacts(affine, None, ranks)
    except FoldRefused as refusal:
        return BnFacts(None, refusal, ranks)


def _traced_bn_params(module: torch.jit.ScriptModule) -> tuple[Any, Any, Any, Any, float]:
    """A traced BN keeps only tensors: its training flag and eps are constants of its one aten::batch_norm."""
    graph = module._c._get_method("forward").graph
    norms = [n for n in _all_nodes(graph.nodes()) if n.kind() == "aten::batch_norm"]
    if len(norms) != 1 or norms[0].output() != graph.return_node().inputsAt(0):
        raise FoldRefused(Reason.UNSUPPORTED_BN, "its traced graph is not a single batch_norm")
    node = norms[0]
    if node.inputsAt(5).toIValue() is not False:
        raise FoldRefused(Reason.TRAINING_MODE, "it was traced in training mode (batch statistics)")
    eps = node.inputsAt(7).toIValue()
    tensors = []
    for position in (1, 2, 3, 4):
        source = node.inputsAt(position).node()
        if source.kind() == "prim::GetAttr":
            tensors.append(getattr(module, source.s("name")))
        elif node.inputsAt(position).toIValue() is None and position in (1, 2):
            tensors.append(None)
        else:
            raise FoldRefused(Reason.NO_RUNNING_STATS, "its statistics are not attributes of the module")
    if not isinstance(eps, float):
        raise FoldRefused(Reason.NON_CONSTANT_PARAMS, "its epsilon is not a constant")
    return (*tensors, eps)


def _geometry(module: torch.jit.ScriptModule) -> LayerGeometry | FoldRefused:
    kind, spatial = _LAYERS[_class_name(module)]
    if not hasattr(module, "bias"):
        return FoldRefused(
            Reason.UNSUPPORTED_LAYER, "it was traced without a bias, so it has no slot for the folded bias"
        )
    weight = module.weight
    if kind == "linear":
        return LayerGeometry("linear", 0, 1, int(weight.shape[1]), int(weight.shape[0]), False)
    if not hasattr(module, "padding"):
        return _traced_geometry(module, kind, spatial)
    padding = module.padding
    if isinstance(padding, str):
        zero_padded = padding == "same" and any(
            d * (k - 1) > 0 for d, k in zip(module.dilation, module.kernel_size, strict=True)
        )
    else:
        zero_padded = any(p > 0 for p in padding)
    zero_padded = zero_padded and module.padding_mode == "zeros"
    return LayerGeometry(kind, spatial, module.groups, module.in_channels, module.out_channels, zero_padded)  # type: ignore[arg-type]


def _traced_geometry(module: torch.jit.ScriptModule, kind: str, spatial: int) -> LayerGeometry | FoldRefused:
    """A traced conv keeps no attributes: read stride/padding/groups from its one aten::_convolution."""
    graph = module._c._get_method("forward").graph
    convolutions = [n for n in _all_nodes(graph.nodes()) if n.kind() == "aten::_convolution"]
    if len(convolutions) != 1 or convolutions[0].output() != graph.return_node().inputsAt(0):
        return FoldRefused(Reason.UNSUPPORTED_LAYER, "its traced graph is not a single convolution")
    node = convolutions[0]
    padding, transposed, groups = _constant(node.inputsAt(4)), node.inputsAt(6).toIValue(), node.inputsAt(8).toIValue()
    if padding is None or transposed != (kind == "convtranspose") or not isinstance(groups, int):
        return FoldRefused(Reason.UNSUPPORTED_LAYER, "its traced convolution has non-constant arguments")
    weight = module.weight
    if kind == "conv":
        out_channels, in_channels = int(weight.shape[0]), int(weight.shape[1]) * groups
    else:
        in_channels, out_channels = int(weight.shape[0]), int(weight.shape[1]) * groups
    zero_padded = kind == "conv" and any(p > 0 for p in padding)
    return LayerGeometry(kind, spatial, groups, in_channels, out_channels, zero_padded)  # type: ignore[arg-type]


def _constant(value: Any) -> list[int] | None:
    node = value.node()
    if node.kind() == "prim::ListConstruct":
        items = [v.toIValue() for v in node.inputs()]
        return items if all(isinstance(i, int) for i in items) else None
    constant = value.toIValue()
    return list(constant) if isinstance(constant, (list, tuple)) else None


def _shared_storage(root: torch.jit.ScriptModule) -> dict[str, str]:
    """Modules whose parameters share storage with another module's (tied or shared modules)."""
    owners: dict[int, set[str]] = defaultdict(set)
    for name, tensor in root.named_parameters():
        owners[tensor.data_ptr()].add(name.rpartition(".")[0])
    shared = {}
    for names in owners.values():
        if len(names) > 1:
            for name in names:
                shared[name] = f"it shares a parameter with {', '.join(sorted(names - {name}))}"
    return shared
