"""``bnfold inspect --check``, a lint for exported models, and the pre-commit hook that runs it: exit 1 while a
model holds a batch norm bnfold would fold, 0 once none does, 2 on bad input."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
import yaml

from tests.support.graphs import GraphBuilder

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = sorted((ROOT / "models").glob("*.onnx"))
HOOKS = ROOT / ".pre-commit-hooks.yaml"


def bnfold(*args: object, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bnfold", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=600, check=False)


@pytest.fixture(scope="module")
def folded(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """The shipped models folded: nothing left that bnfold would fold."""
    out = tmp_path_factory.mktemp("folded")
    completed = bnfold("fold", *SHIPPED, "--output-dir", out, "--no-verify", "-j", "2", cwd=out)
    assert completed.returncode == 0, completed.stderr
    return sorted(out.glob("*.onnx"))


def test_exported_models_fail_the_check_and_folded_ones_pass(tmp_path: Path, folded: list[Path]):
    failing = bnfold("inspect", "--check", *SHIPPED, cwd=tmp_path)
    assert failing.returncode == 1, failing.stderr
    assert failing.stdout.count("would fold") >= len(SHIPPED)
    passing = bnfold("inspect", "--check", *folded, cwd=tmp_path)
    assert passing.returncode == 0, passing.stdout + passing.stderr
    assert passing.stdout.splitlines()[-1] == f"bnfold inspect --check: {len(folded)} models: {len(folded)} clean"
    one = bnfold("inspect", "--check", SHIPPED[0], cwd=tmp_path)
    assert one.returncode == 1, "one model is checked too"


def test_batch_norms_that_cannot_fold_pass_the_check(tmp_path: Path):
    """A batch norm with no layer beside it (after a Relu) stays whatever bnfold does: not a failure."""
    g = GraphBuilder()
    x = g.input("x", [1, 3, 8, 8])
    conv = g.bn(g.node("Conv", [x, g.weight([4, 3, 3, 3])], pads=[1, 1, 1, 1]), 4)
    path = tmp_path / "model.onnx"
    onnx.save(g.model([g.bn(g.node("Relu", [conv]), 4)]), path)
    assert bnfold("inspect", "--check", path, cwd=tmp_path).returncode == 1
    assert bnfold("fold", path, "-o", tmp_path / "out.onnx", cwd=tmp_path).returncode == 0
    left = json.loads(bnfold("inspect", "--json", tmp_path / "out.onnx", cwd=tmp_path).stdout)
    assert left["totals"]["bn_after"] == 1 and left["batchnorms"][0]["reason"] == "no_linear_neighbour"
    checked = bnfold("inspect", "--check", tmp_path / "out.onnx", cwd=tmp_path)
    assert checked.returncode == 0, checked.stdout


def test_the_check_says_which_batch_norms_would_fold_in_json(tmp_path: Path, folded: list[Path]):
    completed = bnfold("inspect", "--check", "--json", SHIPPED[0], folded[0], cwd=tmp_path)
    assert completed.returncode == 1
    payload = json.loads(completed.stdout)
    assert payload["command"] == "inspect --check" and payload["exit_code"] == 1
    first, second = payload["models"]
    assert first["exit_code"] == 1 and first["result"] == "would fold" and "would fold" in first["message"]
    assert second["exit_code"] == 0 and second["result"] == "clean"


@pytest.mark.parametrize(("content", "says"), [(b"", "empty"), (b"\x89PNG\r\n\x1a\n", "not an ONNX model")])
def test_bad_input_fails_the_check_with_exit_2(tmp_path: Path, folded: list[Path], content: bytes, says: str):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(content)
    completed = bnfold("inspect", "--check", folded[0], bad, cwd=tmp_path)
    assert completed.returncode == 2
    assert says in completed.stdout and "bad input" in completed.stdout


# --- the pre-commit hook ----------------------------------------------------------------------------------

# pre-commit's manifest schema (pre_commit/clientlib.py, MANIFEST_HOOK_DICT): required keys, and the types of
# the optional ones used here.
REQUIRED = {"id": str, "name": str, "entry": str, "language": str}
OPTIONAL = {"description": str, "files": str, "exclude": str, "types": list, "types_or": list,
            "pass_filenames": bool, "require_serial": bool, "args": list}


def hooks() -> list[dict]:
    loaded = yaml.safe_load(HOOKS.read_text())
    assert isinstance(loaded, list) and loaded
    return loaded


def test_the_hooks_file_is_a_valid_pre_commit_manifest():
    for hook in hooks():
        for key, kind in REQUIRED.items():
            assert isinstance(hook.get(key), kind), key
        unknown = set(hook) - set(REQUIRED) - set(OPTIONAL)
        assert not unknown, f"keys pre-commit does not know: {unknown}"
        for key, kind in OPTIONAL.items():
            if key in hook:
                assert isinstance(hook[key], kind), key
        assert hook["language"] == "python", "installed from this repository's package, with its dependencies"
        for pattern in ("files", "exclude"):
            re.compile(hook.get(pattern, ""))


def test_the_hook_selects_onnx_models_but_not_bnfold_outputs():
    hook = next(h for h in hooks() if h["id"] == "bnfold-check")
    files, exclude = re.compile(hook["files"]), re.compile(hook["exclude"])

    def selected(name: str) -> bool:
        return bool(files.search(name)) and not exclude.search(name)

    assert selected("models/resnet.onnx") and selected("a/b/c.onnx")
    assert not selected("models/resnet.folded.onnx") and not selected("README.md") and not selected("x.onnx.data")


def test_the_hook_entry_runs_through_the_command_as_pre_commit_calls_it(tmp_path: Path, folded: list[Path]):
    """pre-commit runs ``entry`` with the selected file names appended, in the repository's root."""
    hook = next(h for h in hooks() if h["id"] == "bnfold-check")
    entry = shlex.split(hook["entry"])
    assert entry[0] == "bnfold"
    command = [sys.executable, "-m", "bnfold", *entry[1:], *hook.get("args", [])]
    repo = tmp_path / "repo"
    (repo / "models").mkdir(parents=True)
    for path in folded:
        shutil.copy(path, repo / "models" / path.name)
    clean = subprocess.run([*command, *(f"models/{p.name}" for p in folded)], cwd=repo, capture_output=True,
                           text=True, timeout=600, check=False)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    shutil.copy(SHIPPED[0], repo / "models" / "exported.onnx")
    dirty = subprocess.run([*command, "models/exported.onnx", f"models/{folded[0].name}"], cwd=repo,
                           capture_output=True, text=True, timeout=600, check=False)
    assert dirty.returncode == 1 and "models/exported.onnx" in dirty.stdout
