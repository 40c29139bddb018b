"""Find the dataflow of a model: torch.fx on the whole model, else torch.export, else region by region.

A region is a submodule captured on its own when its parent cannot be. Folds inside a region are
exact for every call of the region; what the opaque parent does with the region's modules is
checked against the reference run's call counts when example inputs exist.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from bnfold.errors import first_line
from bnfold.torch.capture.dataflow import Dataflow
from bnfold.torch.capture.fx import fx_dataflow, trace
from bnfold.torch.capture.reach import reaches
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
    for module in root.modules():
        if index.is_norm(module):
            name = index.name_of(module)
            region = _enclosing(name, covered)
            if region is None:
                uncaptured[name] = _failure_above(name, failures)
    strategy = regions[0][2] if whole else f"{len(regions)} regions"
    return Capture(flow, strategy, uncaptured)


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
