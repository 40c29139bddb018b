"""Dataflow of an nn.Module from torch.export, mapped back to the module's own submodules."""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Iterator

import torch
from torch import nn

from bnfold.torch.capture.aten import AtenBn, Site, aten_dataflow
from bnfold.torch.capture.dataflow import Dataflow
from bnfold.torch.fold.layers import is_batchnorm, is_layer
from bnfold.torch.modules import ModuleIndex
from bnfold.torch.running import Inputs


def export_dataflow(module: nn.Module, inputs: Inputs, prefix: str, index: ModuleIndex) -> Dataflow:
    """Calls of ``module`` (at ``prefix``), each an op run by a BN/layer submodule's own forward."""
    with quiet_torch_logs():
        program = torch.export.export(module, inputs.args, inputs.kwargs, strict=False)
    signature = program.graph_signature
    fqn = {**signature.inputs_to_parameters, **signature.inputs_to_buffers}

    def owner(site: Site) -> str | None:
        stack = site.node.meta.get("nn_module_stack") or {}
        if not stack:
            return None
        path = list(stack.values())[-1][0]
        try:
            submodule = module.get_submodule(path)
        except AttributeError:
            return None
        key = site.mean if isinstance(site, AtenBn) else site.weight
        expected = f"{path}.running_mean" if isinstance(site, AtenBn) else f"{path}.weight"
        kind_matches = is_batchnorm(submodule) if isinstance(site, AtenBn) else is_layer(submodule)
        if not kind_matches or key is None or fqn.get(key.name) != expected:
            return None
        return index.name_of(submodule)

    flow, _ = aten_dataflow(program.graph, owner, index.next_call_id)
    return flow


@contextlib.contextmanager
def quiet_torch_logs() -> Iterator[None]:
    """torch.export prints whole graphs when it fails; the failure reaches the report instead."""
    logger = logging.getLogger("torch")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        logger.setLevel(level)
