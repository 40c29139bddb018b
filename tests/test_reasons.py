"""The reason catalogue: every refusal in the package names a member, and the README's table is its rendering."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

from bnfold.reasons import Reason, markdown_table

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "bnfold"
# Where a reason code is given: FoldRefused's first argument or ``code=``, and every ``reason=`` keyword.
_CODE_KEYWORDS = {"code", "reason"}


def _given_codes(tree: ast.AST) -> list[ast.expr]:
    codes: list[ast.expr] = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        callee = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", "")
        if callee == "FoldRefused" and node.args:
            codes.append(node.args[0])
        codes += [keyword.value for keyword in node.keywords if keyword.arg in _CODE_KEYWORDS]
    return codes


def _is_text(expression: ast.expr) -> bool:
    """A string literal, an f-string, or strings joined: a code written out instead of a member."""
    return any(isinstance(part, ast.JoinedStr) or (isinstance(part, ast.Constant) and isinstance(part.value, str))
               for part in ast.walk(expression))


def test_every_reason_code_in_the_package_is_a_member_not_a_string():
    written_out = [
        f"{path.relative_to(ROOT)}:{code.lineno}: {ast.unparse(code)}"
        for path in sorted(PACKAGE.rglob("*.py"))
        for code in _given_codes(ast.parse(path.read_text(), str(path)))
        if _is_text(code)
    ]
    assert written_out == []


def test_the_check_sees_codes_written_out():
    tree = ast.parse('FoldRefused("x", "m")\nFoldRefused(f"{side}_y", "m")\nBnRecord("b", "left", "m", reason="z")')
    assert [_is_text(code) for code in _given_codes(tree)] == [True, True, True]
    assert not any(_is_text(code) for code in _given_codes(ast.parse('FoldRefused(Reason.PADDING, f"{x}")')))


def test_every_member_has_a_distinct_code_and_a_one_line_meaning():
    assert len({reason.value for reason in Reason}) == len(Reason)
    for reason in Reason:
        assert re.fullmatch(r"[a-z0-9_]+", reason.value), reason
        assert reason.meaning and "\n" not in reason.meaning and "|" not in reason.meaning, reason


def test_a_member_is_its_code_wherever_it_is_printed():
    reason = Reason.NO_LINEAR_NEIGHBOUR
    assert reason == "no_linear_neighbour" and str(reason) == f"{reason}" == "no_linear_neighbour"
    assert Reason("no_linear_neighbour") is reason


def test_the_readme_table_is_the_catalogue():
    readme = (ROOT / "README.md").read_text()
    found = re.search(r"<!-- reasons:start -->\n(.*?)\n<!-- reasons:end -->", readme, re.DOTALL)
    assert found, "README.md has no <!-- reasons:start --> ... <!-- reasons:end --> block"
    assert found.group(1) == markdown_table(), "README's table differs: paste `python -m bnfold.reasons`"


def test_the_module_prints_the_table():
    printed = subprocess.run([sys.executable, "-m", "bnfold.reasons"], capture_output=True, text=True, check=True)
    assert printed.stdout == markdown_table() + "\n"
