"""Which children an uncapturable module's own code may use other than by calling them whole.

A region captured under a module whose forward could not be captured is folded as a unit: that is exact only
if the opaque code around it calls the region's root and never reaches inside it (``self.block.conv(x)`` in a
branch the example inputs did not take would run a folded conv without its batch norm). The reference run sees
only the branches taken, so this is read from the class's source instead: every ``self.<child>`` must be
called (``self.child(x)``), or iterated with each item only called (``for block in self.blocks: x = block(x)``).
"""

from __future__ import annotations

import ast
import inspect
import textwrap

from torch import nn

_ALL = "*"
"""Returned when any child may be reached: the source is unavailable or uses ``self`` dynamically."""


def reached_children(module: nn.Module) -> set[str]:
    """Names of ``module``'s children its own methods use other than by calling them (``{"*"}``: any)."""
    reached: set[str] = set()
    for cls in type(module).__mro__:
        if cls.__module__.startswith("torch.") or cls is object:
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
        except (OSError, TypeError, SyntaxError):
            return {_ALL}
        reached |= _reached_in(tree, set(module._modules))
    return reached


def _reached_in(tree: ast.AST, children: set[str]) -> set[str]:
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    reached: set[str] = set()
    methods = [
        node for cls in ast.walk(tree) if isinstance(cls, ast.ClassDef)
        for node in cls.body if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
    ]
    for function in methods:
        if function.name == "__init__" or any(_is_static(d) for d in function.decorator_list):
            continue
        if not function.args.args:
            continue
        own = function.args.args[0].arg  # "self", by whatever name the method gives it
        for node in ast.walk(function):
            if not (isinstance(node, ast.Name) and node.id == own):
                continue
            attribute = parents.get(node)
            if not isinstance(attribute, ast.Attribute):
                return {_ALL}  # the module passed on or indexed: anything may be reached
            name = attribute.attr
            if isinstance(attribute.ctx, ast.Store):
                continue
            if name in ("_modules", "children", "named_children", "modules", "named_modules", "get_submodule"):
                return {_ALL}
            if name in children and not _called_or_iterated(attribute, parents):
                reached.add(name)
    return reached


def _called_or_iterated(node: ast.Attribute, parents: dict[ast.AST, ast.AST]) -> bool:
    parent = parents.get(node)
    if isinstance(parent, ast.Call) and parent.func is node:
        return True
    if isinstance(parent, ast.For) and parent.iter is node and isinstance(parent.target, ast.Name):
        item = parent.target.id
        uses = [n for body in parent.body for n in ast.walk(body) if isinstance(n, ast.Name) and n.id == item]
        return all(isinstance(parents.get(use), ast.Call) and parents[use].func is use for use in uses)  # type: ignore[attr-defined]
    return False


def _is_static(decorator: ast.expr) -> bool:
    return isinstance(decorator, ast.Name) and decorator.id in ("staticmethod", "classmethod")


def reaches(module: nn.Module, child: str, cache: dict[int, set[str]]) -> bool:
    """Whether ``module``'s own code may reach inside its child ``child``."""
    if id(module) not in cache:
        cache[id(module)] = reached_children(module)
    found = cache[id(module)]
    return _ALL in found or child in found
