"""Find the dataflow of a model: torch.fx on the whole model, else torch.export, else region by region.

A region is a submodule captured on its own when its parent cannot be. Folds inside a region are
exact for every call of the region; what the opaque parent does with the region's modules is
checked against the reference run's call counts when example inputs exist.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from bnfold.errors import first_line
from bnfold.torch.capture.dataflow import Call, Dataflow
from bnfold.torch.capture.fx import fx_dataflow, trace
from bnfold.torch.capture.reach import OwnSource, reaches
from bnfold.torch.fold.layers import is_layer
from bnfold.torch.modules import ModuleIndex
from bnfold.torch.running import Observation


@dataclass
class Capture:
    flow: Dataflow
    strategy: str
    uncaptured: dict[str, str] = field(default_factory=dict)
    """BN modules outside every captured region, with why their region failed."""


def capture(root: nn.Module, index: ModuleIndex, observation: Observation | None) -> Capture:
    regions: list[tuple[str, Dataflow, str]] = []
    failures: dict[str, str] = {}
    ranks = observation.ranks if observation is not None else {}

    def visit(module: nn.Module, name: str) -> None:
        try:
            regions.append((name, fx_dataflow(trace(module, index), module, name, index, ranks), "fx"))
            return
        except Exception as error:  # any tracing failure means: look deeper
            failures[name] = f"torch.fx: {type(error).__name__}: {first_line(error, 120)}"
        if observation is not None and name in observation.inputs:
            from bnfold.torch.capture.export import export_dataflow

            try:
                flow = export_dataflow(module, observation.inputs[name], name, index)
                regions.append((name, flow, "export"))
                return
            except Exception as error:
                failures[name] += f"; torch.export: {type(error).__name__}: {first_line(error, 120)}"
        for child in module.children():
            if not (index.is_norm(child) or is_layer(child)):
                visit(child, index.name_of(child))
        regions.extend(_source_pairs(module, index, ranks))

    visit(root, "")
    flow = Dataflow([], {})
    for _, region_flow, _ in regions:
        flow.calls.extend(region_flow.calls)
        flow.referenced.update(region_flow.referenced)
    covered = {name for name, _, _ in regions}
    whole = "" in covered
    if not whole:
        flow.referenced.update(index.aliased())
        if observation is not None:
            flow.referenced.update(_called_outside(regions, observation))
        flow.referenced.update(_reached_from_opaque_code(regions, failures, index))
    flow.referenced.update(index.shared_parameters())
    uncaptured: dict[str, str] = {}
    in_regions = {call.module for call in flow.calls}
    for module in root.modules():
        if index.is_norm(module):
            name = index.name_of(module)
            region = _enclosing(name, covered)
            if region is None and name not in in_regions:
                uncaptured[name] = _failure_above(name, failures)
    strategy = regions[0][2] if whole else f"{len(regions)} regions"
    return Capture(flow, strategy, uncaptured)


def _source_pairs(
    module: nn.Module, index: ModuleIndex, ranks: dict[str, list[tuple[int | None, int | None]]]
) -> list[tuple[str, Dataflow, str]]:
    """A region per layer/BN pair of ``module``'s children whose dataflow its own source proves (see
    :mod:`bnfold.torch.capture.reach`), each named after its first child."""
    found = []
    for first_name, second_name in OwnSource(module).pairs():
        first, second = module._modules[first_name], module._modules[second_name]
        if first is None or second is None:
            continue
        if is_layer(first) and index.is_norm(second):
            layer, rank = first, 1  # the BN reads the layer's output
        elif index.is_norm(first) and is_layer(second):
            layer, rank = second, 0  # the layer reads the BN's output
        else:
            continue
        seen = ranks.get(index.name_of(layer), [])
        shared_rank = seen[0][rank] if len(seen) == 1 else None
        ids = (index.next_call_id(), index.next_call_id())
        kinds = ["layer" if is_layer(m) else "bn" for m in (first, second)]
        calls = [
            Call(ids[0], index.name_of(first), kinds[0], None, [ids[1]], output_rank=shared_rank),  # type: ignore[arg-type]
            Call(ids[1], index.name_of(second), kinds[1], ids[0], [None], input_rank=shared_rank),  # type: ignore[arg-type]
        ]
        if is_layer(first):
            calls[0].input_rank = seen[0][0] if len(seen) == 1 else None
        else:
            calls[1].output_rank = seen[0][1] if len(seen) == 1 else None
        found.append((index.name_of(first), Dataflow(calls, {}), "source"))
    return found


def _called_outside(regions: list[tuple[str, Dataflow, str]], observation: Observation) -> dict[str, str]:
    found = {}
    for name, region, _ in regions:
        sites: dict[str, int] = {}
        for call in region.calls:
            sites[call.module] = sites.get(call.module, 0) + 1
        runs = observation.calls.get(name, 0)
        for module, count in sites.items():
            if observation.calls.get(module, 0) != count * runs:
                found[module] = f"it runs {observation.calls.get(module, 0)} times, not only inside {name}"
    return found


def _reached_from_opaque_code(
    regions: list[tuple[str, Dataflow, str]], failures: dict[str, str], index: ModuleIndex
) -> dict[str, str]:
    """Modules of a region whose uncaptured ancestors' code may use them other than by calling the region."""
    found: dict[str, str] = {}
    cache: dict[int, set[str]] = {}
    for name, region, _ in regions:
        parts = name.split(".")
        for cut in range(len(parts)):
            ancestor = ".".join(parts[:cut])
            if ancestor in failures and reaches(index.module(ancestor), parts[cut], cache):
                for call in region.calls:
                    found[call.module] = (
                        f"the uncaptured forward of {ancestor or 'the model'} may use {'.'.join(parts[:cut + 1])} "
                        "other than by calling it"
                    )
                break
    return found


def _enclosing(name: str, covered: set[str]) -> str | None:
    parts = name.split(".")
    for cut in range(len(parts) - 1, -1, -1):
        prefix = ".".join(parts[:cut])
        if prefix in covered:
            return prefix
    return None


def _failure_above(name: str, failures: dict[str, str]) -> str:
    parts = name.split(".")
    for cut in range(len(parts) - 1, -1, -1):
        prefix = ".".join(parts[:cut])
        if prefix in failures:
            return f"capture of {prefix or 'the model'} failed ({failures[prefix]})"
    return "no captured graph contains it"
