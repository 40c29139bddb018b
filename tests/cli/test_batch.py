"""``bnfold fold`` over many models, through real processes: files, directories and globs, --output-dir,
-j, the summary (text, JSON, Markdown), one exit code for the batch, argument errors before any work, and
stop signals that leave nothing behind."""

from __future__ import annotations

import json
import os
import pty
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import onnx
import pytest

MODELS = Path(__file__).resolve().parents[2] / "models"
SHIPPED = sorted(MODELS.glob("*.onnx"))


def bnfold(*args: object, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bnfold", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=600, check=False)


def batch_norms(path: Path) -> int:
    return sum(node.op_type == "BatchNormalization" for node in onnx.load(path).graph.node)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """The shipped sample models in a tree: two at the top, two in a subdirectory, one output of a previous
    run (``*.folded.onnx``, not an input) and a hidden directory (not searched)."""
    root = tmp_path / "models"
    (root / "sub").mkdir(parents=True)
    (root / ".cache").mkdir()
    for index, path in enumerate(SHIPPED):
        shutil.copy(path, root / ("sub" if index % 2 else ".") / path.name)
    shutil.copy(SHIPPED[0], root / "old.folded.onnx")
    shutil.copy(SHIPPED[0], root / ".cache" / "hidden.onnx")
    return root


def listing(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file())


def test_a_directory_folds_into_an_output_tree_in_parallel(tree: Path, tmp_path: Path):
    out = tmp_path / "out"
    completed = bnfold("fold", tree, "--output-dir", out, "-j", "2", cwd=tmp_path)
    assert completed.returncode == 0, completed.stderr
    expected = sorted(str(p.relative_to(tree)) for p in tree.rglob("*.onnx")
                      if not p.name.endswith(".folded.onnx") and ".cache" not in p.parts)
    assert len(expected) == len(SHIPPED) and listing(out) == expected
    for relative in expected:
        assert batch_norms(tree / relative) > 0 and batch_norms(out / relative) == 0
    assert completed.stderr == "", "no progress bar without a terminal"
    lines = completed.stdout.splitlines()
    assert lines[-1] == f"bnfold fold: {len(SHIPPED)} models: {len(SHIPPED)} ok"
    assert sum(" ok " in line for line in lines) == len(SHIPPED)


def test_without_output_dir_each_output_goes_beside_its_input(tree: Path, tmp_path: Path):
    sub = sorted((tree / "sub").glob("*.onnx"))
    completed = bnfold("fold", *sub, "--no-verify", cwd=tmp_path)
    assert completed.returncode == 0, completed.stderr
    for path in sub:
        assert batch_norms(path.with_name(f"{path.stem}.folded.onnx")) == 0


def test_a_quoted_glob_is_expanded_by_bnfold(tree: Path, tmp_path: Path):
    completed = bnfold("fold", "models/sub/*.onnx", "--output-dir", "out", "--no-verify", cwd=tmp_path)
    assert completed.returncode == 0, completed.stderr
    assert listing(tmp_path / "out") == sorted(p.name for p in (tree / "sub").glob("*.onnx"))


def test_one_bad_model_stops_nothing_and_sets_the_exit_code(tree: Path, tmp_path: Path):
    (tree / "broken.onnx").write_bytes(b"\x08\x07 not a protobuf model")
    (tree / "empty.onnx").write_bytes(b"")
    out = tmp_path / "out"
    completed = bnfold("fold", tree, "--output-dir", out, "--json", cwd=tmp_path)
    assert completed.returncode == 2, completed.stderr
    payload = json.loads(completed.stdout)
    assert payload["schema"] == 2 and payload["command"] == "fold" and payload["exit_code"] == 2
    by_name = {Path(m["input"]).name: m for m in payload["models"]}
    assert by_name["broken.onnx"]["exit_code"] == 2 and "not an ONNX model" in by_name["broken.onnx"]["message"]
    assert by_name["empty.onnx"]["exit_code"] == 2 and "empty" in by_name["empty.onnx"]["message"]
    assert by_name["broken.onnx"]["report"] is None
    good = [m for m in payload["models"] if m["exit_code"] == 0]
    assert len(good) == len(SHIPPED)
    for model in good:
        assert model["report"]["written"] == [model["output"]] and batch_norms(Path(model["output"])) == 0


def test_the_batch_exit_code_is_the_largest_of_the_models(tree: Path, tmp_path: Path):
    """A tolerance of zero fails verification of an exact fp32 fold (it rounds): exit 1, nothing written for
    those; with a bad model too, 2 wins."""
    sub = sorted((tree / "sub").glob("*.onnx"))
    failing = bnfold("fold", *sub, "--output-dir", "strict", "--rtol", "0", "--atol", "0", cwd=tmp_path)
    assert failing.returncode == 1, failing.stdout + failing.stderr
    assert "not equivalent" in failing.stdout and listing(tmp_path / "strict") == []
    (tree / "sub" / "broken.onnx").write_bytes(b"junk")
    mixed = bnfold("fold", *sub, tree / "sub" / "broken.onnx", "--output-dir", "mixed", "--rtol", "0", "--atol",
                   "0", cwd=tmp_path)
    assert mixed.returncode == 2 and "bad input" in mixed.stdout and "not equivalent" in mixed.stdout


@pytest.mark.parametrize("case", ["missing", "glob-matches-nothing", "empty-directory", "two-outputs-one-name",
                                  "output-dir-is-a-file", "output-dir-is-the-input-dir", "o-with-many",
                                  "summary-in-missing-directory"])
def test_argument_errors_come_before_any_model_is_folded(tree: Path, tmp_path: Path, case: str):
    first, second = sorted(tree.glob("*.onnx"))[:2]
    (tmp_path / "empty").mkdir()
    (tmp_path / "a-file").write_text("")
    (tmp_path / "other").mkdir()
    shutil.copy(first, tmp_path / "other" / first.name)
    args = {
        "missing": [first, tmp_path / "nowhere.onnx", "--output-dir", "out"],
        "glob-matches-nothing": [first, "models/*.pt9", "--output-dir", "out"],
        "empty-directory": [first, tmp_path / "empty", "--output-dir", "out"],
        "two-outputs-one-name": [first, tmp_path / "other" / first.name, "--output-dir", "out"],
        "output-dir-is-a-file": [first, second, "--output-dir", "a-file"],
        "output-dir-is-the-input-dir": [first, second, "--output-dir", tree],
        "o-with-many": [first, second, "-o", "x.onnx"],
        "summary-in-missing-directory": [first, second, "--output-dir", "out", "--summary-md", "no/where.md"],
    }[case]
    before = listing(tmp_path)
    completed = bnfold("fold", *args, cwd=tmp_path)
    assert completed.returncode == 2, completed.stdout + completed.stderr
    assert completed.stderr.count("\n") == 1 and completed.stderr.startswith("bnfold: error: ")
    assert completed.stdout == "" and listing(tmp_path) == before


def test_the_markdown_summary_is_appended_for_ci_step_summaries(tree: Path, tmp_path: Path):
    summary = tmp_path / "summary.md"
    summary.write_text("# earlier step\n")
    (tree / "pipe|name.onnx").write_bytes(b"junk")
    completed = bnfold("fold", tree / "sub", tree / "pipe|name.onnx", "--output-dir", "out", "--summary-md",
                       summary, cwd=tmp_path)
    assert completed.returncode == 2
    text = summary.read_text()
    assert text.startswith("# earlier step\n### bnfold fold: ")
    table = [line for line in text.splitlines() if line.startswith("| `")]
    assert len(table) == len(list((tree / "sub").glob("*.onnx"))) + 1
    assert all(line.count(" | ") == 3 for line in table), "a | in a name must not split a cell"
    assert "**bad input**" in text and "pipe\\|name.onnx" in text
    again = bnfold("inspect", "--check", tmp_path / "out", "--summary-md", summary, cwd=tmp_path)
    assert again.returncode == 0
    assert summary.read_text().startswith(text) and "### bnfold inspect --check: " in summary.read_text()


def test_progress_goes_to_a_terminal_only(tree: Path, tmp_path: Path):
    leader, follower = pty.openpty()
    try:
        completed = subprocess.run(
            [sys.executable, "-m", "bnfold", "fold", tree / "sub", "--output-dir", "out", "--no-verify"],
            cwd=tmp_path, stdout=subprocess.PIPE, stderr=follower, text=True, timeout=600, check=False)
        os.close(follower)
        shown = b""
        while True:
            try:
                chunk = os.read(leader, 4096)
            except OSError:
                break
            if not chunk:
                break
            shown += chunk
    finally:
        os.close(leader)
    assert completed.returncode == 0
    assert b"] 2/2 " in shown and b"#" in shown
    assert "[" not in completed.stdout.splitlines()[0], "the table on stdout carries no progress"


@pytest.mark.parametrize("fate", [">&-", "| head -c 1 >/dev/null"])
def test_a_batch_whose_stdout_has_gone_still_says_its_verdict_in_the_exit_code(tree: Path, tmp_path: Path, fate):
    (tree / "broken.onnx").write_bytes(b"junk")
    status = tmp_path / "status"
    command = f"{sys.executable} -m bnfold fold {tree} --output-dir out --no-verify --summary-md s.md"
    script = f"{{ {command}; echo $? > {status}; }} {fate}" if fate.startswith("|") else \
        f"{{ {command} {fate}; echo $? > {status}; }}"
    subprocess.run(["sh", "-c", script], cwd=tmp_path, timeout=600, check=False, capture_output=True)
    assert status.read_text().strip() == "2"
    assert len(listing(tmp_path / "out")) == len(SHIPPED)
    assert "**bad input**" in (tmp_path / "s.md").read_text()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_signal_reaches_every_running_model_and_leaves_nothing(tmp_path: Path, signum: int):
    from tests.reliability.test_faults import conv_chain

    inputs = tmp_path / "in"
    inputs.mkdir()
    for index in range(4):
        onnx.save(conv_chain(channels=256, layers=6, seed=index), inputs / f"m{index}.onnx")
    out = tmp_path / "out"
    process = subprocess.Popen([sys.executable, "-m", "bnfold", "fold", inputs, "--output-dir", out, "-j", "2"],
                               cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(_children(process.pid)) < 2:
        time.sleep(0.01)
    children = _children(process.pid)
    assert children, "the batch started its models"
    time.sleep(0.5)
    process.send_signal(signum)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signum, stderr
    assert stderr.count("\n") == 1 and "interrupted" in stderr
    assert not any(Path(f"/proc/{pid}").exists() and _state(pid) != "Z" for pid in children), "no model runs on"
    assert all(batch_norms(path) == 0 for path in out.rglob("*.onnx")), "whatever was written is complete"
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []


def _children(pid: int) -> list[int]:
    """The processes ``pid`` started, from any of its threads."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(child) for child in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def test_one_model_with_o_can_still_write_a_summary(tmp_path: Path):
    summary = tmp_path / "s.md"
    completed = bnfold("fold", SHIPPED[0], "-o", "one.onnx", "--summary-md", summary, cwd=tmp_path)
    assert completed.returncode == 0, completed.stderr
    assert batch_norms(tmp_path / "one.onnx") == 0
    assert "| ok | " in summary.read_text() and "wrote one.onnx" in summary.read_text()
    directory = bnfold("fold", tmp_path, "-o", "x.onnx", cwd=tmp_path)
    assert directory.returncode == 2 and "is a directory" in directory.stderr
