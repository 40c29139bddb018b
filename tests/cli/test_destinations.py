"""Where a fold may write: errors that depend only on the arguments come before any work, no output replaces
a file the input consists of (model file, external data files; through symlinks and hard links), special
files are refused, and odd but valid names work."""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
from click.testing import CliRunner

from bnfold import OutputError, fold_onnx
from bnfold.cli import main
from tests.support.bad_inputs import conv_bn


def invoke(*args: object):
    return CliRunner().invoke(main, [os.fspath(a) if isinstance(a, Path) else str(a) for a in args])


def snapshot(directory: Path) -> dict[str, str]:
    """Every file under ``directory`` and a digest of its bytes (symlinks by their target)."""
    found = {}
    for path in sorted(directory.rglob("*")):
        if path.is_symlink():
            found[str(path.relative_to(directory))] = "-> " + os.readlink(path)
        elif path.is_file():
            found[str(path.relative_to(directory))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


@pytest.fixture
def external_model(tmp_path: Path) -> Path:
    """A model whose every tensor is in ``weights.bin`` beside it."""
    directory = tmp_path / "in"
    directory.mkdir()
    path = directory / "model.onnx"
    onnx.save(conv_bn(channels=16), path, save_as_external_data=True, all_tensors_to_one_file=True,
              location="weights.bin", size_threshold=0)
    return path


def one_error_line(result, says: str) -> None:
    assert result.exit_code == 2, result.output
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("bnfold: error: "), result.stderr
    assert says in result.stderr, result.stderr


# --- the input's own files ---------------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["model", "data", "model-through-symlink", "data-through-hard-link",
                                 "data-through-symlink"])
def test_no_output_name_may_replace_the_inputs_external_data(external_model: Path, how: str):
    directory = external_model.parent
    data = directory / "weights.bin"
    if how == "model":  # the output's data file is the input's
        args = ["-o", directory / "out.onnx", "--external-data", "weights.bin", "--external-threshold", "0"]
    elif how == "data":  # the output model is the input's data file
        args = ["-o", data]
    elif how == "model-through-symlink":
        (directory / "alias.onnx").symlink_to("weights.bin")
        args = ["-o", directory / "alias.onnx"]
    elif how == "data-through-hard-link":
        os.link(data, directory / "twin.bin")
        args = ["-o", directory / "out.onnx", "--external-data", "twin.bin", "--external-threshold", "0"]
    else:
        (directory / "alias.bin").symlink_to("weights.bin")
        args = ["-o", directory / "out.onnx", "--external-data", "alias.bin", "--external-threshold", "0"]
    before = snapshot(directory)
    one_error_line(invoke("fold", external_model, *args), "a file of the input model")
    assert snapshot(directory) == before
    for extra in ("twin.bin", "alias.bin", "alias.onnx"):
        (directory / extra).unlink(missing_ok=True)  # onnx refuses data files with two names
    onnx.load(external_model)  # still loads, with its data


def test_the_api_refuses_to_replace_the_inputs_data_too(external_model: Path):
    result = fold_onnx(external_model, verify=False)
    data = external_model.parent / "weights.bin"
    before = data.read_bytes()
    with pytest.raises(OutputError, match="a file of the input model"):
        result.write(external_model.parent / "out.onnx", external_data="weights.bin", external_threshold=0)
    with pytest.raises(OutputError, match="a file of the input model"):
        result.write(data)
    assert data.read_bytes() == before


def test_overwrite_input_replaces_the_whole_input_consistently(external_model: Path):
    result = invoke("fold", external_model, "-o", external_model, "--overwrite-input", "--no-verify")
    assert result.exit_code == 0, result.output
    folded = onnx.load(external_model)
    assert "BatchNormalization" not in {n.op_type for n in folded.graph.node}


def test_the_model_file_is_refused_without_overwrite_input_under_any_name(tmp_path: Path):
    source = tmp_path / "model.onnx"
    onnx.save(conv_bn(), source)
    os.link(source, tmp_path / "hard.onnx")
    (tmp_path / "soft.onnx").symlink_to("model.onnx")
    before = snapshot(tmp_path)
    for name in ("model.onnx", "hard.onnx", "soft.onnx"):
        one_error_line(invoke("fold", source, "-o", tmp_path / name), "refusing to overwrite the input")
    assert snapshot(tmp_path) == before


# --- special files -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["fifo", "char-device", "socket", "fifo-as-data-file"])
def test_special_files_are_refused_and_left_as_they_are(tmp_path: Path, kind: str):
    import socket

    source = tmp_path / "model.onnx"
    onnx.save(conv_bn(), source)
    target = tmp_path / "out.onnx"
    args = ["-o", target]
    if kind == "fifo":
        os.mkfifo(target)
    elif kind == "fifo-as-data-file":
        os.mkfifo(tmp_path / "data.bin")
        args += ["--external-data", "data.bin", "--external-threshold", "0"]
    elif kind == "socket":
        server = socket.socket(socket.AF_UNIX)
        server.bind(os.fspath(target))
    else:
        target = Path("/dev/null")
        args = ["-o", target]
    special = target if kind != "fifo-as-data-file" else tmp_path / "data.bin"
    mode = os.stat(special).st_mode
    one_error_line(invoke("fold", source, *args), "special file")
    assert os.stat(special).st_mode == mode and not stat.S_ISREG(mode)


# --- errors that depend only on the arguments come first ---------------------------------------------------

def never_read(tmp_path: Path) -> Path:
    """A 'model' that would fail as bad input if anything read it: a check that answers first was early."""
    path = tmp_path / "model.onnx"
    path.write_bytes(b"not a model")
    return path


@pytest.mark.parametrize("case", ["missing-dir", "is-directory", "output-is-input", "bad-data-name",
                                  "read-only-dir", "export-missing-dir"])
def test_destination_errors_come_before_the_model_is_read(tmp_path: Path, case: str):
    source = never_read(tmp_path)
    expected = {
        "missing-dir": (["-o", tmp_path / "missing" / "dir" / "o.onnx"], "does not exist"),
        "is-directory": (["-o", tmp_path], "is a directory"),
        "output-is-input": (["-o", source], "refusing to overwrite"),
        "bad-data-name": (["-o", tmp_path / "o.onnx", "--external-data", "../x.bin"], "plain file name"),
        "read-only-dir": (["-o", tmp_path / "locked" / "o.onnx"], "not writable"),
        "export-missing-dir": (["-o", tmp_path / "o.pt2", "--export-onnx", tmp_path / "no" / "x.onnx"],
                               "does not exist"),
    }
    args, says = expected[case]
    if case == "read-only-dir":
        if os.geteuid() == 0:
            pytest.skip("root writes to any directory")
        (tmp_path / "locked").mkdir(mode=0o555)
    if case == "export-missing-dir":
        source = tmp_path / "model.pt2"
        source.write_bytes(b"PK\x03\x04 not really a program")
    one_error_line(invoke("fold", source, *args), says)


# --- odd but valid names -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", [b"C:model.onnx", b"\xff\xfemodel.onnx", b"a" * 250 + b".onnx",
                                  "mod\u00e8le \u6a21\u578b.onnx".encode()])
def test_odd_but_valid_names_fold(tmp_path: Path, name: bytes):
    """Through a real process: file names reach it as bytes (non-UTF-8 ones as surrogates); the longest name
    the file system takes must not fail because of a temporary name built from it."""
    onnx.save(conv_bn(), os.path.join(os.fsencode(tmp_path), name))
    output = b"f" + name[1:]
    completed = subprocess.run([sys.executable, "-m", "bnfold", "fold", name, "-o", output], cwd=tmp_path,
                               capture_output=True, timeout=120, check=False)
    assert completed.returncode == 0, completed.stderr
    assert completed.stderr == b""
    folded = onnx.load(os.path.join(os.fsencode(tmp_path), output))
    assert "BatchNormalization" not in {n.op_type for n in folded.graph.node}
    assert sorted(os.listdir(os.fsencode(tmp_path))) == sorted([name, output]), "nothing else written"


@pytest.mark.parametrize("size", ["small", "large"])
def test_a_model_reached_through_a_symlink_in_another_directory(tmp_path: Path, size: str):
    """The model file may be a symlink anywhere (a large one is read lazily: its tensors stay in the real
    file); external data is looked up beside the path given, as onnx and onnxruntime look for it."""
    real, links = tmp_path / "real", tmp_path / "links"
    real.mkdir()
    links.mkdir()
    onnx.save(conv_bn(channels=64 if size == "large" else 4), real / "model.onnx")
    (links / "model.onnx").symlink_to(real / "model.onnx")
    result = invoke("fold", links / "model.onnx", "-o", links / "out.onnx")
    assert result.exit_code == 0, result.output
    assert "BatchNormalization" not in {n.op_type for n in onnx.load(links / "out.onnx").graph.node}


def test_external_data_is_found_beside_the_symlink_not_the_real_file(external_model: Path, tmp_path: Path):
    links = tmp_path / "links"
    links.mkdir()
    (links / "model.onnx").symlink_to(external_model)
    one_error_line(invoke("fold", links / "model.onnx", "-o", links / "out.onnx"), "weights.bin")
    (links / "weights.bin").symlink_to(external_model.parent / "weights.bin")  # leads outside: refused too
    one_error_line(invoke("fold", links / "model.onnx", "-o", links / "out.onnx"), "outside")
    (links / "weights.bin").unlink()
    os.link(external_model.parent / "weights.bin", links / "weights.bin")
    result = invoke("fold", links / "model.onnx", "-o", links / "out.onnx")
    assert result.exit_code == 0, result.output
