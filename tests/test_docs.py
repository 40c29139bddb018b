"""The documents a newcomer reads point at things that exist: every relative link, every repository path and
every ``bnfold.…`` name in README.md, BENCHMARKS.md and docs/*.md. A move or rename that forgets a document
fails here instead of misleading the next reader."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", ROOT / "BENCHMARKS.md", *sorted((ROOT / "docs").glob("*.md"))]
REPOSITORY_PATH = re.compile(r"`((?:bnfold|tests|bench|docs|models|\.ci)/[A-Za-z0-9_.\-/]*)`")
MARKDOWN_LINK = re.compile(r"\]\(([^)\s]+)\)")
DOTTED_NAME = re.compile(r"`(bnfold(?:\.[A-Za-z_][A-Za-z0-9_]*)+)")


def _ids(paths: list[Path]) -> list[str]:
    return [str(path.relative_to(ROOT)) for path in paths]


@pytest.mark.parametrize("document", DOCUMENTS, ids=_ids(DOCUMENTS))
def test_links_and_paths_exist(document: Path) -> None:
    text = document.read_text(encoding="utf-8")
    missing = []
    for target in MARKDOWN_LINK.findall(text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue
        if not (document.parent / target.split("#", 1)[0]).exists():
            missing.append(target)
    missing += [path for path in REPOSITORY_PATH.findall(text) if not (ROOT / path).exists()]
    assert not missing, f"{document.name} points at what does not exist: {missing}"


def _resolves(dotted: str) -> bool:
    parts = dotted.split(".")
    for split in range(len(parts), 0, -1):
        try:
            target: object = importlib.import_module(".".join(parts[:split]))
        except ModuleNotFoundError as error:
            if error.name and not error.name.startswith("bnfold"):
                return True  # an optional dependency (torch) is absent here: nothing to check against
            continue
        try:
            for attribute in parts[split:]:
                target = getattr(target, attribute)
        except AttributeError:
            return False
        return True
    return False


@pytest.mark.parametrize("document", DOCUMENTS, ids=_ids(DOCUMENTS))
def test_named_code_exists(document: Path) -> None:
    names = sorted(set(DOTTED_NAME.findall(document.read_text(encoding="utf-8"))))
    assert not [name for name in names if not _resolves(name)], f"{document.name} names code that is gone"


def test_a_removed_path_would_be_caught() -> None:
    assert REPOSITORY_PATH.findall("see `bnfold/no_such_module.py`") == ["bnfold/no_such_module.py"]
    assert not _resolves("bnfold.no_such_name")
