"""The package's layering and the absence of import cycles, read from the source (no module is imported).

Layers, lowest first; a module may import its own layer and the ones below it:

    bnfold.errors, bnfold.reasons       leaves: nothing else of bnfold
    bnfold.core                         the math, the report, interrupts
    bnfold.onnx | bnfold.torch          the two fronts, never each other
    bnfold (the package's __init__)     the public API
    bnfold.cli, bnfold.__main__         the command

Every import statement counts, those inside functions too, since a function-level import can close a cycle
that only shows at run time; imports under ``if TYPE_CHECKING:`` do not, since they never run.

An own AST walk rather than import-linter: it is a screenful, needs no dependency, and checks the whole
module graph for cycles, which import-linter's layer and independence contracts do not.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parent.parent / "bnfold"

# Layer of each top-level part of the package; a module may import only layers <= its own, and one front
# never the other.
LAYERS = {
    "bnfold.errors": 0,
    "bnfold.reasons": 0,
    "bnfold.core": 1,
    "bnfold.onnx": 2,
    "bnfold.torch": 2,
    "bnfold": 3,
    "bnfold.cli": 4,
    "bnfold.__main__": 4,
}
FRONTS = {"bnfold.onnx", "bnfold.torch"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE_ROOT.rglob("*.py"))}


def is_type_checking_block(node: ast.AST) -> bool:
    if not isinstance(node, ast.If):
        return False
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def import_nodes(node: ast.AST):
    """Every import statement under ``node``, skipping the bodies of ``if TYPE_CHECKING:`` (not their else)."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.Import | ast.ImportFrom):
            yield child
        elif is_type_checking_block(child):
            for other in child.orelse:
                yield from import_nodes(ast.Module(body=[other], type_ignores=[]))
        else:
            yield from import_nodes(child)


def imported_modules(name: str) -> set[str]:
    """The bnfold modules ``name`` imports: for ``from a.b import c`` that is ``a.b.c`` when it is a module,
    else ``a.b``. Parent packages run implicitly are not counted, as the interpreter imports them first."""
    is_package = MODULES[name].name == "__init__.py"
    found: set[str] = set()
    for node in import_nodes(ast.parse(MODULES[name].read_text(), filename=str(MODULES[name]))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            base = node.module or ""
            if node.level:
                anchor = name.split(".")[: len(name.split(".")) - node.level + is_package]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        found.update(target for target in targets if target in MODULES and target != name)
    return found


GRAPH = {name: imported_modules(name) for name in MODULES}


def part_of(name: str) -> str:
    """The LAYERS key a module belongs to: the longest one that is the module or a package containing it."""
    return max((part for part in LAYERS if name == part or name.startswith(part + ".")), key=len)


def test_every_module_has_a_layer():
    assert all(part_of(name) in LAYERS for name in MODULES)
    assert {"bnfold", "bnfold.errors", "bnfold.core", "bnfold.onnx", "bnfold.torch", "bnfold.cli"} <= set(MODULES)


def test_imports_go_down_the_layers():
    violations = []
    for name, targets in GRAPH.items():
        own = part_of(name)
        for target in sorted(targets):
            other = part_of(target)
            if LAYERS[other] > LAYERS[own] or (own in FRONTS and other in FRONTS and other != own):
                violations.append(f"{name} ({own}) imports {target} ({other})")
    assert violations == []


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted, plus self-imports."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(components)


def test_no_import_cycles():
    assert find_cycles(GRAPH) == []


def test_the_checker_sees_cycles_function_level_imports_and_type_checking():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    source = ast.parse(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    import hidden\nelse:\n    import shown_else\n"
        "def f():\n    import shown_inner\n"
    )
    names = {alias.name for node in import_nodes(source) for alias in node.names}
    assert names == {"TYPE_CHECKING", "shown_else", "shown_inner"}
