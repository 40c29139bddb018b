"""What an uncapturable module's own source proves about its children.

A region captured under a module whose forward could not be captured is folded as a unit: that is exact only
if the opaque code around it calls the region's root and never reaches inside it (``self.block.conv(x)`` in a
branch the example inputs did not take would run a folded conv without its batch norm). The reference run sees
only the branches taken, so this is read from the class's source instead: every ``self.<child>`` must be
called (``self.child(x)``), or iterated with each item only called (``for block in self.blocks: x = block(x)``).

The source also proves dataflow between two children that no capture saw, when each is used once in all the
class's methods and one's output is the other's only input: ``self.bn(self.conv(x))``, or ``x = self.conv(x)``
directly followed by ``x = self.bn(x)`` (or ``return self.bn(x)``). Whatever branch runs, every call of the
first feeds the second and nothing else, as a single graph would show.
"""

from __future__ import annotations

import ast
import inspect
import textwrap

from torch import nn

_ALL = "*"
"""In :meth:`OwnSource.reached`: any child may be reached (the source is unavailable or uses ``self``
dynamically)."""
_DYNAMIC = {"_modules", "children", "named_children", "modules", "named_modules", "get_submodule"}
Method = ast.FunctionDef | ast.AsyncFunctionDef


class OwnSource:
    """The methods of a module's own classes (not torch's, not ``__init__``), and each use of a child in them."""

    def __init__(self, module: nn.Module) -> None:
        self.children = set(module._modules)
        self.parents: dict[ast.AST, ast.AST] = {}
        self.uses: dict[str, list[ast.Attribute]] = {name: [] for name in self.children}
        self.dynamic = False
        for cls in type(module).__mro__:
            if cls.__module__.startswith("torch.") or cls is object:
                continue
            try:
                tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
            except (OSError, TypeError, SyntaxError):
                self.dynamic = True
                return
            self.parents.update({child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)})
            for method in _methods(tree):
                self._read(method)

    def _read(self, method: Method) -> None:
        own = method.args.args[0].arg  # "self", by whatever name the method gives it
        for node in ast.walk(method):
            if not (isinstance(node, ast.Name) and node.id == own):
                continue
            attribute = self.parents.get(node)
            if not isinstance(attribute, ast.Attribute) or attribute.attr in _DYNAMIC:
                self.dynamic = True  # the module passed on, indexed or walked: anything may be reached
            elif attribute.attr in self.children and not isinstance(attribute.ctx, ast.Store):
                self.uses[attribute.attr].append(attribute)

    def reached(self) -> set[str]:
        """Children used other than by calling them (``{"*"}``: any may be)."""
        if self.dynamic:
            return {_ALL}
        return {name for name, uses in self.uses.items() if not all(self._called_or_iterated(u) for u in uses)}

    def _called_or_iterated(self, node: ast.Attribute) -> bool:
        parent = self.parents.get(node)
        if isinstance(parent, ast.Call) and parent.func is node:
            return True
        if isinstance(parent, ast.For) and parent.iter is node and isinstance(parent.target, ast.Name):
            item = parent.target.id
            uses = [n for body in parent.body for n in ast.walk(body) if isinstance(n, ast.Name) and n.id == item]
            return all(_calls(self.parents.get(use), use) for use in uses)
        return False

    def pairs(self) -> list[tuple[str, str]]:
        """``(first, second)`` children where every output of ``first`` is the only input of ``second``."""
        if self.dynamic:
            return []
        once = {name: self.parents[uses[0]] for name, uses in self.uses.items() if len(uses) == 1}
        calls = {name: call for name, call in once.items() if _single_argument_call(call, self.uses[name][0])}
        by_call = {id(call): name for name, call in calls.items()}
        found = []
        for second, call in calls.items():
            argument = call.args[0]  # type: ignore[attr-defined]  # a call with one positional argument
            first = by_call.get(id(argument))
            if first is None and isinstance(argument, ast.Name):
                first = self._assigned_just_before(call, argument.id, by_call)
            if first is not None and first != second:
                found.append((first, second))
        return found

    def _assigned_just_before(self, call: ast.AST, variable: str, by_call: dict[int, str]) -> str | None:
        """The child whose call is assigned to ``variable`` by the statement right before the one holding
        ``call``, when that statement is ``variable = self.second(variable)`` or ``return self.second(variable)``."""
        statement = self.parents.get(call)
        if isinstance(statement, ast.Assign):
            if [_name(t) for t in statement.targets] != [variable]:
                return None
        elif not isinstance(statement, ast.Return):
            return None
        previous = _previous_statement(statement, self.parents.get(statement))
        if not (isinstance(previous, ast.Assign) and [_name(t) for t in previous.targets] == [variable]):
            return None
        return by_call.get(id(previous.value))


def _methods(tree: ast.AST) -> list[Method]:
    return [
        node for cls in ast.walk(tree) if isinstance(cls, ast.ClassDef)
        for node in cls.body
        if isinstance(node, Method) and node.name != "__init__" and node.args.args
        and not any(isinstance(d, ast.Name) and d.id in ("staticmethod", "classmethod") for d in node.decorator_list)
    ]


def _calls(parent: ast.AST | None, node: ast.AST) -> bool:
    return isinstance(parent, ast.Call) and parent.func is node


def _single_argument_call(call: ast.AST, function: ast.AST) -> bool:
    return (
        _calls(call, function) and len(call.args) == 1 and not call.keywords  # type: ignore[attr-defined]
        and not isinstance(call.args[0], ast.Starred)  # type: ignore[attr-defined]
    )


def _name(target: ast.expr) -> str | None:
    return target.id if isinstance(target, ast.Name) else None


def _previous_statement(statement: ast.stmt, block_owner: ast.AST | None) -> ast.stmt | None:
    if block_owner is None:
        return None
    for _, value in ast.iter_fields(block_owner):
        if isinstance(value, list) and any(item is statement for item in value):
            position = next(i for i, item in enumerate(value) if item is statement)
            return value[position - 1] if position > 0 else None
    return None


def reaches(module: nn.Module, child: str, cache: dict[int, set[str]]) -> bool:
    """Whether ``module``'s own code may reach inside its child ``child``."""
    if id(module) not in cache:
        cache[id(module)] = OwnSource(module).reached()
    found = cache[id(module)]
    return _ALL in found or child in found
