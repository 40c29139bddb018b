"""Faults while writing: a full disk and SIGINT/SIGTERM leave the destination as it was (or completely
written), never a partial file, and no temporary file behind."""

from __future__ import annotations

import errno
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

import bnfold.onnx.store.io as bnfold_io
from bnfold import OutputError, fold_onnx
from bnfold.cli import main
from bnfold.core.atomic import AtomicFiles
from bnfold.onnx.store import limits
from tests.support.bad_inputs import conv_bn


def conv_chain(channels: int, layers: int, seed: int = 0) -> onnx.ModelProto:
    """x -> (Conv 3x3 -> BN) x layers: about ``36 * channels**2 * layers`` bytes of weights."""
    rng = np.random.default_rng(seed)
    nodes, initializers, value = [], [], "x"
    for layer in range(layers):
        weight = rng.normal(size=(channels, channels if layer else 3, 3, 3)).astype(np.float32)
        initializers.append(numpy_helper.from_array(weight, f"w{layer}"))
        nodes.append(helper.make_node("Conv", [value, f"w{layer}"], [f"c{layer}"], pads=[1, 1, 1, 1]))
        params = [rng.uniform(0.5, 1.5, channels), rng.normal(size=channels), rng.normal(size=channels),
                  rng.uniform(0.5, 2.0, channels)]
        names = [f"bn{layer}_{k}" for k in range(4)]
        initializers += [numpy_helper.from_array(p.astype(np.float32), n) for p, n in zip(params, names, strict=True)]
        nodes.append(helper.make_node("BatchNormalization", [f"c{layer}", *names], [f"b{layer}"]))
        value = f"b{layer}"
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
                              [helper.make_tensor_value_info(value, TensorProto.FLOAT, [1, channels, 4, 4])],
                              initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


# --- disk full ---------------------------------------------------------------------------------------

class _FillingDisk:
    """A file whose writes store half their bytes, then fail as a full disk does."""

    def __init__(self, handle) -> None:
        self._handle = handle

    def write(self, data) -> int:
        self._handle.write(bytes(data)[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._handle.close()

    def __getattr__(self, name):
        return getattr(self._handle, name)


def full_disk_on_write(monkeypatch) -> None:
    """Every file the atomic writer hands out fills the disk on its first write."""
    create = AtomicFiles.create

    def create_filling(self, destination):
        return _FillingDisk(create(self, destination))

    monkeypatch.setattr(AtomicFiles, "create", create_filling)


def full_disk_on_fsync(monkeypatch) -> None:
    """fsync reports the full disk (delayed allocation finds out only then)."""
    def fail(_fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(bnfold_io.os, "fsync", fail)


@pytest.mark.parametrize("inject", [full_disk_on_write, full_disk_on_fsync], ids=["write", "fsync"])
@pytest.mark.parametrize("external", [False, True], ids=["one-file", "external-data"])
def test_full_disk_keeps_the_previous_output_and_leaves_no_temporary_file(tmp_path, monkeypatch, inject, external):
    result = fold_onnx(conv_bn(channels=64), verify=False)
    out = tmp_path / "out.onnx"
    out.write_bytes(b"previous model")
    (tmp_path / "out.onnx.data").write_bytes(b"previous data")
    inject(monkeypatch)
    with pytest.raises(OutputError, match="No space left"):
        result.write(out, external_threshold=0 if external else limits.PROTOBUF_LIMIT)
    assert out.read_bytes() == b"previous model"
    assert (tmp_path / "out.onnx.data").read_bytes() == b"previous data"
    assert leftovers(tmp_path) == []


def test_full_disk_through_the_cli_is_one_line_exit_2(tmp_path, monkeypatch):
    source = tmp_path / "model.onnx"
    onnx.save(conv_bn(), source)
    out = tmp_path / "out.onnx"
    out.write_bytes(b"previous")
    full_disk_on_write(monkeypatch)
    result = CliRunner().invoke(main, ["fold", str(source), "-o", str(out), "--no-verify"])
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and "No space left" in result.stderr
    assert out.read_bytes() == b"previous" and leftovers(tmp_path) == []


# --- interrupts --------------------------------------------------------------------------------------

def command(source: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "bnfold", "fold", str(source), "-o", str(out), "--no-verify", *extra]


def staging_started(pid: int, directory: Path) -> bool:
    """Whether process ``pid`` has begun writing into ``directory``: it holds an unnamed file there (the
    atomic writer's O_TMPFILE, which /proc shows as ``#inode (deleted)``) or a named temporary file exists."""
    if any(entry.startswith(".bnfold-") for entry in os.listdir(directory)):
        return True
    try:
        descriptors = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in descriptors:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith(f"{directory}/#") or (target.startswith(f"{directory}/") and "(deleted)" in target):
            return True
    return False


def interrupt(args: list[str], signum: int, *, at: float | None, directory: Path
              ) -> subprocess.CompletedProcess[str]:
    """Run ``args`` and send ``signum`` ``at`` seconds after the start, or (``at`` None) as soon as the
    write's staging directory appears."""
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    started = time.monotonic()
    while process.poll() is None:
        due = staging_started(process.pid, directory) if at is None else time.monotonic() - started >= at
        if due:
            process.send_signal(signum)
            break
        time.sleep(0.0005)
    stdout, stderr = process.communicate(timeout=120)
    return subprocess.CompletedProcess(args, process.returncode, stdout, stderr)


@pytest.fixture(scope="module")
def big_model(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("interrupt")
    path = directory / "big.onnx"
    onnx.save(conv_chain(channels=320, layers=8), path)  # ~30 MB, so the write takes a while
    return path


@pytest.mark.parametrize("external", [False, True], ids=["one-file", "external-data"])
def test_an_interrupt_mid_write_leaves_the_old_output_or_the_complete_new_one(big_model, tmp_path, external):
    extra = ("--external-threshold", "0") if external else ()
    reference_dir = tmp_path / "reference"
    reference_dir.mkdir()
    started = time.monotonic()
    subprocess.run(command(big_model, reference_dir / "out.onnx", *extra), check=True, capture_output=True)
    duration = time.monotonic() - started
    startup = time.monotonic()
    subprocess.run([sys.executable, "-m", "bnfold", "--help"], check=True, capture_output=True)
    startup = time.monotonic() - startup
    new = {p.name: p.read_bytes() for p in reference_dir.iterdir()}

    out_dir = tmp_path / "out"
    out_dir.mkdir()
    old = {"out.onnx": conv_bn().SerializeToString(), "out.onnx.data": b"old data"} if external else {
        "out.onnx": conv_bn().SerializeToString()}
    rng = random.Random(0)
    moments: list[float | None] = [None, None] + [rng.uniform(startup + 0.2, duration * 1.05) for _ in range(4)]
    outcomes = []
    for run, at in enumerate(moments):
        signum = (signal.SIGINT, signal.SIGTERM)[run % 2]
        for name, content in old.items():
            (out_dir / name).write_bytes(content)
        completed = interrupt(command(big_model, out_dir / "out.onnx", *extra), signum, at=at, directory=out_dir)
        after = {p.name: p.read_bytes() for p in out_dir.iterdir() if not p.name.startswith(".")}
        assert leftovers(out_dir) == [], f"temporary files left after {signal.Signals(signum).name} at {at}"
        # Outside the command's own run (interpreter start-up and shutdown) the signal ends the process the
        # default way, which is as harmless: nothing is being written then.
        assert completed.returncode in ((128 + signum,) if at is None else (0, 128 + signum, -signum)), (
            completed.returncode, completed.stderr)
        if completed.returncode == 128 + signum:
            assert completed.stderr.count("\n") == 1 and "interrupted" in completed.stderr, completed.stderr
        assert after in (old, new), (
            f"{signal.Signals(signum).name} at {at}: the destination is neither the old nor the new model")
        outcomes.append("new" if after.get("out.onnx") == new["out.onnx"] else "old")
    assert outcomes[:2] == ["old", "old"], "a signal during the write stops it"


@pytest.mark.parametrize("existing", [False, True], ids=["new", "replaced"])
@pytest.mark.parametrize("external", [False, True], ids=["one-file", "external-data"])
def test_a_file_system_that_will_not_link_unnamed_files_gets_a_copy(tmp_path, monkeypatch, existing, external):
    """Linking an O_TMPFILE file in place goes through /proc; where that is refused (EPERM), the write falls
    back to a named copy, and still leaves nothing behind."""
    result = fold_onnx(conv_bn(channels=64), verify=False)
    reference = tmp_path / "reference"
    reference.mkdir()
    threshold = 0 if external else limits.PROTOBUF_LIMIT
    expected = {p.name: p.read_bytes() for p in map(Path, result.write(reference / "out.onnx",
                                                                         external_threshold=threshold))}
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    if existing:
        (out_dir / "out.onnx").write_bytes(b"previous")
    link = os.link

    def refuse_proc(source, *args, **kwargs):
        if str(source).startswith("/proc/"):
            raise PermissionError(errno.EPERM, os.strerror(errno.EPERM))
        return link(source, *args, **kwargs)

    monkeypatch.setattr(os, "link", refuse_proc)
    result.write(out_dir / "out.onnx", external_threshold=threshold)
    assert {p.name: p.read_bytes() for p in out_dir.iterdir()} == expected
    assert leftovers(out_dir) == []
