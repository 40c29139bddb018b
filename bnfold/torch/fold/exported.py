"""Fold batch norms inside a torch.export ExportedProgram (the ``.pt2`` format), in place."""

from __future__ import annotations

import itertools

import torch
from torch import fx, nn
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind, TensorArgument

from bnfold.core.affine import ChannelAffine, FoldRefused
from bnfold.core.report import FoldReport
from bnfold.reasons import Reason
from bnfold.torch.capture.aten import AtenBn, AtenLayer, Site, aten, aten_dataflow
from bnfold.torch.capture.dataflow import BnFacts, LayerGeometry
from bnfold.torch.fold.branches import BranchMerger, add_parameter
from bnfold.torch.fold.layers import fold_arrays
from bnfold.torch.fold.plan import Plan, plan_folds
from bnfold.torch.fold.tensors import from_float64, optional_float64, to_float64
from bnfold.torch.result import run_folder


def fold_exported(program: ExportedProgram) -> FoldReport:
    """Fold ``program``'s BNs into its conv/linear ops, then merge the parallel linear branches that leaves
    (:mod:`bnfold.torch.fold.branches`), updating its state dict and graph in place."""
    folder = _ProgramFolder(program)
    report = run_folder(folder)
    merges = BranchMerger(program, folder.tensor, folder.bn_name).run()
    if not merges:
        return report
    absorbed = {r.bn: r for r in merges if r.op_type == "BatchNormalization"}
    records = [absorbed.pop(r.bn, r) if r.status == "left" else r for r in report.records]
    bns, nodes, params = folder.totals()
    totals = report.totals._replace(bn_after=bns, nodes_after=nodes, param_bytes_after=params)  # type: ignore[union-attr]
    others = [r for r in merges if r.op_type != "BatchNormalization"]
    return FoldReport(records=records + list(absorbed.values()) + others, totals=totals)


class _ProgramFolder:
    def __init__(self, program: ExportedProgram) -> None:
        self.program = program
        signature = program.graph_signature
        self.fqn: dict[str, str] = {
            **signature.inputs_to_parameters,
            **signature.inputs_to_buffers,
            **signature.inputs_to_lifted_tensor_constants,
        }
        counter = itertools.count()
        self.flow, self.sites = aten_dataflow(program.graph, self._owner, lambda: next(counter))

    def tensor(self, node: object) -> torch.Tensor | None:
        if not isinstance(node, fx.Node) or node.name not in self.fqn:
            return None
        name = self.fqn[node.name]
        value = self.program.state_dict.get(name)
        return value if value is not None else self.program.constants.get(name)

    def bn_name(self, site: AtenBn) -> str | None:
        """The module name a batch norm's record carries."""
        return self._owner(site)

    def _owner(self, site: Site) -> str | None:
        key, suffix = (site.mean, ".running_mean") if isinstance(site, AtenBn) else (site.weight, ".weight")
        name = self.fqn.get(key.name) if isinstance(key, fx.Node) else None
        if name is None or not name.endswith(suffix) or self.tensor(key) is None:
            return None
        return name[: -len(suffix)]

    def plan(self) -> Plan:
        bns: dict[str, BnFacts] = {}
        layers: dict[str, LayerGeometry | FoldRefused] = {}
        self.layer_sites: dict[str, AtenLayer] = {}
        for call in self.flow.calls:
            site = self.sites[call.id]
            if isinstance(site, AtenBn):
                bns.setdefault(call.module, self._bn_facts(site))
            else:
                layers.setdefault(call.module, self._layer_check(site))
                self.layer_sites.setdefault(call.module, site)
        return plan_folds(self.flow, bns, layers, self._fold_weights)

    def _bn_facts(self, site: AtenBn) -> BnFacts:
        try:
            if site.training:
                raise FoldRefused(Reason.TRAINING_MODE, "it was exported in training mode (batch statistics)")
            tensors = [self.tensor(n) if n is not None else None for n in (site.weight, site.bias)]
            for node, tensor in zip((site.weight, site.bias), tensors, strict=True):
                if node is not None and tensor is None:
                    raise FoldRefused(Reason.NON_CONSTANT_PARAMS, "its parameters are not constants of the program")
            mean, var = self.tensor(site.mean), self.tensor(site.var)
            if mean is None or var is None:
                raise FoldRefused(Reason.NO_RUNNING_STATS, "it has no constant running statistics")
            affine = ChannelAffine.from_batchnorm(
                optional_float64(tensors[0]), optional_float64(tensors[1]), to_float64(mean), to_float64(var),
                site.eps,
            )
            return BnFacts(affine, None, None)
        except FoldRefused as refusal:
            return BnFacts(None, refusal, None)

    def _layer_check(self, site: AtenLayer) -> LayerGeometry | FoldRefused:
        if site.bias is not None and self.tensor(site.bias) is None:
            return FoldRefused(Reason.NON_CONSTANT_WEIGHT, "its bias is not a constant of the program")
        if not self.tensor(site.weight).is_floating_point():  # type: ignore[union-attr]  # a site has its weight
            return FoldRefused(Reason.UNSUPPORTED_DTYPE, "its weight is not floating point")
        return site.geometry

    def _fold_weights(
        self, layer: str, geometry: LayerGeometry, before: ChannelAffine | None, after: ChannelAffine | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        site = self.layer_sites[layer]
        weight = self.tensor(site.weight)
        new_weight, new_bias = fold_arrays(
            to_float64(weight), optional_float64(self.tensor(site.bias)), geometry, before, after  # type: ignore[arg-type]
        )
        return from_float64(new_weight, weight, "weight"), from_float64(new_bias, weight, "bias")  # type: ignore[arg-type]

    def apply(self, plan: Plan) -> None:
        graph = self.program.graph
        for layer, fold in plan.folds.items():
            site = self.layer_sites[layer]
            weight, bias = fold.params
            self._replace(site.weight, weight)
            if site.bias is not None:
                self._replace(site.bias, bias)
            else:
                self._add_bias(site, f"{layer}.bias", bias)
        removed = set(plan.removed)
        for call in self.flow.calls:
            bn_site = self.sites[call.id]
            if isinstance(bn_site, AtenBn) and call.module in removed:
                self._rename_output(bn_site.output.name, bn_site.input.name)
                bn_site.output.replace_all_uses_with(bn_site.input)
                if bn_site.output is not bn_site.node:
                    for item in list(bn_site.node.users):
                        graph.erase_node(item)
                graph.erase_node(bn_site.node)
        self._drop_unused_state(removed)
        graph.lint()
        self.program.graph_module.recompile()

    def _replace(self, node: fx.Node, value: torch.Tensor) -> None:
        """Put a new tensor where the program keeps ``node``'s: writing into the loaded one instead would touch
        every page of the archive's mapping (about a third of the fold's time on resnet18)."""
        name = self.fqn[node.name]
        old = self.program.state_dict.get(name)
        if old is None:
            self.program.constants[name] = value
        else:
            self.program.state_dict[name] = nn.Parameter(value, old.requires_grad) if isinstance(
                old, nn.Parameter) else value

    def _drop_unused_state(self, modules: set[str]) -> None:
        """Remove the inputs (and state) of BNs that are gone, so the saved program shrinks."""
        signature = self.program.graph_signature
        mutated = {spec.target for spec in signature.output_specs if spec.target is not None}
        placeholders = {n.name: n for n in self.program.graph.nodes if n.op == "placeholder"}
        kept = []
        for spec in signature.input_specs:
            node = placeholders.get(spec.arg.name)
            owner = (spec.target or "").rpartition(".")[0]
            removable = spec.kind in (InputKind.PARAMETER, InputKind.BUFFER) and owner in modules
            if removable and node is not None and not node.users and spec.target not in mutated:
                self.program.graph.erase_node(node)
                self.program.state_dict.pop(spec.target, None)
            else:
                kept.append(spec)
        signature.input_specs[:] = kept

    def _rename_output(self, old: str, new: str) -> None:
        for spec in self.program.graph_signature.output_specs:
            if isinstance(spec.arg, TensorArgument) and spec.arg.name == old:
                spec.arg = TensorArgument(new)

    def _add_bias(self, site: AtenLayer, target: str, bias: torch.Tensor) -> None:
        """A new parameter input for a layer that had no bias, wired into its op."""
        node = add_parameter(self.program, target, bias, site.weight, suffix="_bnfold")
        self.fqn[node.name] = target
        layer = site.node
        if layer.target == aten.mm.default:
            layer.target = aten.addmm.default
            layer.args = (node, *layer.args)
        else:
            args = list(layer.args)
            while len(args) < 3:
                args.append(None)
            args[2] = node
            layer.args = tuple(args)
            layer.kwargs = {k: v for k, v in layer.kwargs.items() if k != "bias"}

    def totals(self) -> tuple[int, int, int]:
        graph = self.program.graph
        bns = sum(1 for n in graph.nodes if n.op == "call_function" and "batch_norm" in str(n.target))
        params = sum(t.numel() * t.element_size() for t in self.program.state_dict.values())
        return bns, len(graph.nodes), params

