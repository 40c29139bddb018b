"""Naming and walking the user's module tree."""

from __future__ import annotations

import itertools
from collections import defaultdict

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from bnfold.torch.capture.dataflow import BnFacts


class ModuleIndex:
    """Canonical (first registered) names of a model's modules, and where each is registered."""

    def __init__(self, root: nn.Module) -> None:
        self.root = root
        self._names: dict[int, str] = {}
        self.slots: dict[int, list[tuple[nn.Module, str]]] = defaultdict(list)
        for parent_name, parent in root.named_modules(remove_duplicate=False):
            for child_name, child in parent._modules.items():
                if child is None:
                    continue
                self._names.setdefault(id(child), f"{parent_name}.{child_name}" if parent_name else child_name)
                self.slots[id(child)].append((parent, child_name))
        self._names.setdefault(id(root), "")
        self._ids = itertools.count()
        self.affine_norms: dict[int, BnFacts] = {}
        """Modules other than batch norms that fold like one (e.g. ``FrozenBatchNorm2d``), with their facts."""

    def is_norm(self, module: nn.Module) -> bool:
        """A batch norm, or a module proven (or reported) to be a per-channel affine map like one."""
        return isinstance(module, _BatchNorm) or id(module) in self.affine_norms

    def name_of(self, module: nn.Module) -> str:
        return self._names[id(module)]

    def module(self, name: str) -> nn.Module:
        return self.root.get_submodule(name)

    def next_call_id(self) -> int:
        return next(self._ids)

    def aliased(self) -> dict[str, str]:
        """Modules registered at more than one place in the tree."""
        return {
            self._names[key]: f"it is registered {len(places)} times in the model"
            for key, places in self.slots.items()
            if len(places) > 1
        }

    def shared_parameters(self) -> dict[str, str]:
        """Modules whose parameters are also registered under another module."""
        owners: dict[int, set[str]] = defaultdict(set)
        for module in self.root.modules():
            for parameter in module._parameters.values():
                if parameter is not None:
                    owners[id(parameter)].add(self._names[id(module)])
        shared = {}
        for names in owners.values():
            if len(names) > 1:
                for name in names:
                    shared[name] = f"it shares a parameter with {', '.join(sorted(names - {name}))}"
        return shared

    def replace(self, module: nn.Module, replacement: nn.Module) -> None:
        """Put ``replacement`` in every slot that holds ``module``."""
        for parent, child_name in self.slots[id(module)]:
            parent._modules[child_name] = replacement
