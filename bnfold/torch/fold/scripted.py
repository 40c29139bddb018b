"""Fold batch norms in a TorchScript module, at the level of its submodule calls, in place.

Every method graph is read without inlining: ``prim::CallMethod[forward]`` on a BN or a
conv/linear submodule is a call site. Instances of one scripted class share their method graphs,
so a BN call inside a shared graph is removed only if it folds in every instance.
"""

from __future__ import annotations

import itertools
import re
from collections import Counter, defaultdict
from typing import Any

import torch

from bnfold.core.affine import ChannelAffine, FoldRefused
from bnfold.core.report import FoldReport
from bnfold.reasons import Reason
from bnfold.torch.capture.dataflow import BnFacts, Call, Dataflow, LayerGeometry
from bnfold.torch.fold.layers import fold_arrays
from bnfold.torch.fold.plan import Plan, plan_folds
from bnfold.torch.fold.tensors import from_float64, optional_float64, to_float64
from bnfold.torch.fold.traced import (
    LeadingNorm,
    all_nodes,
    asserted_rank,
    batch_norm_params,
    biasless_op,
    give_bias,
    leading_batch_norm,
    remove_batch_norm,
    sole_batch_norm,
    traced_geometry,
)
from bnfold.torch.result import run_folder

_TYPE = re.compile(r"^__torch__\.torch\.nn\.modules\.(\w+)\.(?:___torch_mangle_\d+\.)?(\w+)$")
_BATCH_NORM = re.compile(r"\bbatch_norm\b")
_BN_RANKS = {"BatchNorm1d": frozenset({2, 3}), "BatchNorm2d": frozenset({4}), "BatchNorm3d": frozenset({5})}
_LAYERS = {
    "Conv1d": ("conv", 1), "Conv2d": ("conv", 2), "Conv3d": ("conv", 3),
    "ConvTranspose1d": ("convtranspose", 1), "ConvTranspose2d": ("convtranspose", 2),
    "ConvTranspose3d": ("convtranspose", 3), "Linear": ("linear", 0),
}


def _kind(module: torch.jit.ScriptModule) -> str | None:
    """``bn`` or ``layer`` for torch's classes; ``bn_head`` for any other module whose traced graph begins
    with a batch norm of its input (:func:`leading_batch_norm`); ``None`` for the rest."""
    match = _TYPE.match(module._c._type().qualified_name())
    name = match.group(2) if match is not None else None
    if name in _BN_RANKS:
        return "bn"
    if name in _LAYERS:
        return "layer"
    return "bn_head" if leading_batch_norm(module) is not None else None


def _class_name(module: torch.jit.ScriptModule) -> str:
    return _TYPE.match(module._c._type().qualified_name()).group(2)  # type: ignore[union-attr]


def fold_scripted(root: torch.jit.ScriptModule) -> FoldReport:
    return run_folder(_ScriptFolder(root))


class _ScriptFolder:
    def __init__(self, root: torch.jit.ScriptModule) -> None:
        self.root = root
        self.modules: dict[str, torch.jit.ScriptModule] = dict(root.named_modules())
        self.kinds = {path: _kind(module) for path, module in self.modules.items()}
        self.opaque_norms = {path for path, module in self.modules.items() if self.kinds[path] is None
                             and _calls_batch_norm(module)}
        self.bn_heads: set[str] = set()
        self.given_bias_bytes = 0
        self.ids = itertools.count()
        self.calls: list[Call] = []
        self.referenced: dict[str, str] = {}
        self.nodes: dict[int, Any] = {}
        self.graphs: dict[int, Any] = {}
        for path, module in self.modules.items():
            if self.kinds[path] in (None, "bn_head"):
                for method in module._c._method_names():
                    self._read_graph(path, module, module._c._get_method(method).graph)
        for path, message in _shared_storage(root).items():
            self.referenced[path] = message

    def _read_graph(self, owner: str, module: torch.jit.ScriptModule, graph: Any) -> None:
        self_value = next(iter(graph.inputs()))
        values: dict[Any, str] = {}
        sites: dict[Any, int] = {}
        for node in all_nodes(graph.nodes()):
            if node.kind() == "prim::GetAttr":
                parent = _inputs(node)[0]
                base = "" if parent == self_value else values.get(parent)
                if base is None:
                    continue
                path = _join(base, node.s("name"))
                full: str | None = _join(owner, path)
                if full in self.modules:
                    values[node.output()] = path
        for node in all_nodes(graph.nodes()):
            if node.kind() != "prim::CallMethod" or node.s("name") != "forward":
                continue
            target = values.get(_inputs(node)[0])
            full = _join(owner, target) if target is not None else None
            kind = self.kinds.get(full) if full is not None else None
            if kind is not None:
                call_id = next(self.ids)
                sites[node.output()] = call_id
                self.nodes[call_id] = node
                self.graphs[call_id] = graph
                link: object = (module._c._type().name(), graph, _node_key(node))
                if kind == "bn_head":  # folded by editing its own graph, which its class's instances share
                    self.bn_heads.add(full)  # type: ignore[arg-type]
                    link = ("bn_head", self.modules[full]._c._type().qualified_name())  # type: ignore[index]
                self.calls.append(Call(
                    call_id, full, "layer" if kind == "layer" else "bn", None, link=link,  # type: ignore[arg-type]
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
        for call in (by_id[i] for i in sites.values()):
            # A bn_head module's output is not its batch norm's: nothing folds across it.
            if call.module in self.bn_heads:
                call.consumers = [None] * len(call.consumers)
            if call.source is not None and by_id[call.source].module in self.bn_heads:
                call.source = None
        for value, path in values.items():
            full = _join(owner, path)
            if self.kinds[full] is None:
                continue
            for use in value.uses():
                if not (use.user.kind() == "prim::CallMethod" and use.user.s("name") == "forward" and use.offset == 0):
                    self.referenced[full] = f"{owner or 'the model'} uses it other than by calling it"

    def plan(self) -> Plan:
        bns: dict[str, BnFacts] = {}
        layers: dict[str, LayerGeometry | FoldRefused] = {}
        types = Counter(module._c._type().qualified_name() for module in self.modules.values())
        for path, module in self.modules.items():
            if self.kinds[path] in ("bn", "bn_head"):
                bns[path] = _bn_facts(module, leading_batch_norm(module) if self.kinds[path] == "bn_head" else None)
            elif self.kinds[path] == "layer":
                layers[path] = _geometry(module)
                if not hasattr(module, "bias") and types[module._c._type().qualified_name()] > 1:
                    layers[path] = FoldRefused(Reason.SHARED_CODE, "it was traced without a bias and shares its "
                                               "TorchScript class with another layer, so it cannot get one alone")
        for path in self.opaque_norms:
            bns[path] = BnFacts(None, FoldRefused(
                Reason.UNSUPPORTED_BN, "its TorchScript code calls batch_norm, but not as a batch norm of its input "
                "alone on its own constant statistics at the start of forward (branches, other readers, scripting)",
            ), None)
        self._pin_head_ranks(bns, layers)
        unlinked = _links_spanning_instances(self.calls)
        for call in self.calls:
            if call.link not in unlinked:
                call.link = None
        return plan_folds(Dataflow(self.calls, self.referenced), bns, layers, self._fold_weights)

    def _pin_head_ranks(self, bns: dict[str, BnFacts], layers: dict[str, LayerGeometry | FoldRefused]) -> None:
        """A traced bn_head module's batch norm takes any rank; a trace, like a torch.export program, records one run,
        with the ranks of that run: the rank the layer before it produces for a batch (the class of a traced
        ``BatchNorm2d`` pins its rank on the same grounds)."""
        by_id = {call.id: call for call in self.calls}
        for call in self.calls:
            facts = bns.get(call.module)
            if call.module not in self.bn_heads or facts is None or facts.affine is None or call.source is None:
                continue
            if not leading_batch_norm(self.modules[call.module]).traced:  # type: ignore[union-attr]
                continue
            geometry = layers.get(by_id[call.source].module)
            if isinstance(geometry, LayerGeometry) and facts.ranks in (None, frozenset({geometry.batched_rank})):
                bns[call.module] = BnFacts(facts.affine, None, frozenset({geometry.batched_rank}))

    def _fold_weights(
        self, layer: str, geometry: LayerGeometry, before: ChannelAffine | None, after: ChannelAffine | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        module = self.modules[layer]
        weight, bias = fold_arrays(
            to_float64(module.weight), optional_float64(getattr(module, "bias", None)), geometry, before, after
        )
        return from_float64(weight, module.weight, "weight"), from_float64(bias, module.weight, "bias")

    def apply(self, plan: Plan) -> None:
        for layer, fold in plan.folds.items():
            module = self.modules[layer]
            weight, bias = fold.params
            with torch.no_grad():
                module.weight.copy_(weight)
                if not hasattr(module, "bias"):
                    give_bias(module, bias)
                    self.given_bias_bytes += bias.numel() * bias.element_size()
                elif module.bias is None:
                    module.bias = torch.nn.Parameter(bias, requires_grad=False)
                else:
                    module.bias.copy_(bias)
        removed = set(plan.removed)
        done: set[int] = set()
        edited: dict[int, Any] = {}
        for call in self.calls:
            node = self.nodes[call.id]
            if call.module in removed and id(node) not in done and call.module not in self.bn_heads:
                done.add(id(node))
                node.output().replaceAllUsesWith(_inputs(node)[1])
                node.destroy()
                edited[id(self.graphs[call.id])] = self.graphs[call.id]
        for graph in edited.values():  # the GetAttr of each BN called no more
            torch._C._jit_pass_dce(graph)
        edited_types = set()
        for name in sorted(removed & self.bn_heads):  # instances of one scripted class share its graph
            module = self.modules[name]
            if module._c._type().qualified_name() not in edited_types:
                edited_types.add(module._c._type().qualified_name())
                remove_batch_norm(module, leading_batch_norm(module))  # type: ignore[arg-type]

    def totals(self) -> tuple[int, int, int]:
        """Batch norms: calls of BN modules and the batch norms bn_head modules begin with. Nodes: every node of
        every method graph outside BN modules. Parameters: the state dict and the biases given to layers traced
        without one (tensor attributes, which the state dict does not list)."""
        graphs = [
            module._c._get_method(method).graph for path, module in self.modules.items()
            if self.kinds[path] != "bn" for method in module._c._method_names()
        ]
        nodes = [node for graph in graphs for node in all_nodes(graph.nodes())]
        bn_types = {m._c._type().qualified_name() for p, m in self.modules.items() if self.kinds[p] == "bn"}
        bn_calls = sum(
            1 for node in nodes if node.kind() == "prim::CallMethod" and node.s("name") == "forward"
            and _inputs(node)[0].type().str() in bn_types
        )
        heads = sum(1 for name in self.bn_heads if leading_batch_norm(self.modules[name]) is not None)
        params = sum(t.numel() * t.element_size() for t in self.root.state_dict().values()) + self.given_bias_bytes
        return bn_calls + heads + len(self.opaque_norms), len(nodes), params


def _calls_batch_norm(module: torch.jit.ScriptModule) -> bool:
    """Whether a method's code calls a batch norm, directly or through torch.nn.functional."""
    return any(_BATCH_NORM.search(module._c._get_method(name).code) for name in module._c._method_names())


def _inputs(node: Any) -> list[Any]:
    return list(node.inputs())


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


def _bn_facts(module: torch.jit.ScriptModule, head: LeadingNorm | None) -> BnFacts:
    rank = asserted_rank(module) if head is not None else None
    ranks = (None if rank is None else frozenset({rank})) if head is not None else _BN_RANKS[_class_name(module)]
    try:
        if module.training:
            raise FoldRefused(Reason.TRAINING_MODE, "it is in training mode (normalizes with batch statistics)")
        if head is not None:
            params = batch_norm_params(module, head)
        elif hasattr(module, "eps"):
            if not module.track_running_stats or module.running_mean is None:
                raise FoldRefused(Reason.NO_RUNNING_STATS, "track_running_stats=False: it always uses batch statistics")
            params = (module.weight, module.bias, module.running_mean, module.running_var, module.eps)
        else:
            params = batch_norm_params(module, sole_batch_norm(module))
        weight, bias, mean, var, eps = params
        affine = ChannelAffine.from_batchnorm(
            optional_float64(weight), optional_float64(bias), to_float64(mean), to_float64(var), eps
        )
        return BnFacts(affine, None, ranks)
    except FoldRefused as refusal:
        return BnFacts(None, refusal, ranks)


def _geometry(module: torch.jit.ScriptModule) -> LayerGeometry | FoldRefused:
    kind, spatial = _LAYERS[_class_name(module)]
    if not hasattr(module, "bias") and biasless_op(module) is None:
        return FoldRefused(Reason.UNSUPPORTED_LAYER, "its traced graph is not a single convolution or linear op")
    weight = module.weight
    if kind == "linear":
        return LayerGeometry("linear", 0, 1, int(weight.shape[1]), int(weight.shape[0]), False)
    if not hasattr(module, "padding"):
        return traced_geometry(module, kind, spatial)
    padding = module.padding
    if isinstance(padding, str):
        zero_padded = padding == "same" and any(
            d * (k - 1) > 0 for d, k in zip(module.dilation, module.kernel_size, strict=True)
        )
    else:
        zero_padded = any(p > 0 for p in padding)
    zero_padded = zero_padded and module.padding_mode == "zeros"
    return LayerGeometry(kind, spatial, module.groups, module.in_channels, module.out_channels, zero_padded)  # type: ignore[arg-type]


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
