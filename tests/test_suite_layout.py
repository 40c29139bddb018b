"""The test suite's own layout: every test file has a name of its own, so a name in a report or a
``--durations`` line says which file it is; and a test that reaches into private names of the package (or
of the benchmark) says in its module docstring that it is a white-box test, and of which module."""

from __future__ import annotations

import ast
from collections import Counter
from pathlib import Path

TESTS = Path(__file__).resolve().parent
TEST_FILES = sorted(TESTS.rglob("test_*.py"))
OWN_PACKAGES = ("bnfold", "bench")


def test_no_two_test_files_share_a_name():
    names = Counter(path.name for path in TEST_FILES)
    assert sorted(name for name, count in names.items() if count > 1) == []


def _is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def private_names_used(tree: ast.Module) -> set[str]:
    """Private names of our packages the module touches: ``x._name`` where ``x`` was imported from them, and
    ``setattr``-style calls naming ``"_name"`` on such an ``x``."""
    own: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            own.update((alias.asname or alias.name).split(".")[0] for alias in node.names
                       if alias.name.split(".")[0] in OWN_PACKAGES)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in OWN_PACKAGES:
            own.update(alias.asname or alias.name for alias in node.names)
    used: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _is_private(node.attr):
            root = node.value
            while isinstance(root, ast.Attribute):
                root = root.value
            if isinstance(root, ast.Name) and root.id in own:
                used.add(node.attr)
        elif isinstance(node, ast.Call) and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant):
            target, name = node.args[0], node.args[1].value
            root = target
            while isinstance(root, ast.Attribute):
                root = root.value
            if isinstance(name, str) and _is_private(name) and isinstance(root, ast.Name) and root.id in own:
                used.add(name)
    return used


def test_tests_that_use_private_names_say_they_are_white_box():
    unmarked = {}
    for path in TEST_FILES:
        tree = ast.parse(path.read_text(), filename=str(path))
        used = private_names_used(tree)
        if used and "White-box" not in (ast.get_docstring(tree) or ""):
            unmarked[str(path.relative_to(TESTS))] = sorted(used)
    assert unmarked == {}


def test_the_private_name_check_sees_attributes_and_setattr():
    tree = ast.parse(
        "import bnfold.onnx.guard\nfrom bnfold.onnx.graph import types\nfrom other import thing\n"
        "types._needs_skeleton(1)\nmonkeypatch.setattr(bnfold.onnx.guard, '_ort_load_failure', f)\n"
        "thing._ignored\nresult.__dict__\n"
    )
    assert private_names_used(tree) == {"_needs_skeleton", "_ort_load_failure"}
