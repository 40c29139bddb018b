"""Faults that leave nothing behind, through real processes: SIGKILL at any moment, a second stop signal
during the cleanup of the first, and the input truncated while bnfold reads it (SIGBUS through the memory
map). Each leaves neither a temporary file beside the output nor a damaged destination, and ends with one
line where the process survives."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import onnx
import pytest

from tests.reliability.test_faults import conv_chain, leftovers, staging_started
from tests.support.bad_inputs import conv_bn


@pytest.fixture(scope="module")
def big_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("big") / "big.onnx"
    onnx.save(conv_chain(channels=320, layers=8), path)  # ~30 MB: its weights are mapped, its write takes a while
    return path


@pytest.fixture(scope="module")
def reference(big_model: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, float]:
    """The complete output of an undisturbed run, and how long that run took."""
    out = tmp_path_factory.mktemp("reference") / "out.onnx"
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "bnfold", "fold", big_model, "-o", out, "--no-verify"], check=True,
                   capture_output=True, timeout=300)
    return out.read_bytes(), time.monotonic() - started


def fold_command(source: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "bnfold", "fold", os.fspath(source), "-o", os.fspath(out), "--no-verify"]


def wait_for_write(process: subprocess.Popen[str], directory: Path, timeout: float = 120) -> bool:
    deadline = time.monotonic() + timeout
    while process.poll() is None and time.monotonic() < deadline:
        if staging_started(process.pid, directory):
            return True
        time.sleep(0.0005)
    return False


def destination_state(out: Path, old: bytes, new: bytes) -> str:
    if not out.exists():
        return "absent"
    content = out.read_bytes()
    assert content in (old, new), "the destination is neither the old model nor the complete new one"
    return "new" if content == new else "old"


def test_sigkill_at_any_moment_leaves_no_temporary_file(big_model: Path, reference, tmp_path: Path):
    new, duration = reference
    old = conv_bn().SerializeToString()
    out = tmp_path / "out.onnx"
    rng = random.Random(1)
    states = []
    for at in [None, None, *(rng.uniform(0.3, duration * 1.1) for _ in range(4))]:
        out.write_bytes(old)
        process = subprocess.Popen(fold_command(big_model, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True)
        if at is None:
            assert wait_for_write(process, tmp_path), "the write began"
        else:
            time.sleep(at)
        process.kill()
        process.communicate(timeout=60)
        assert leftovers(tmp_path) == [], f"SIGKILL at {at}"
        states.append(destination_state(out, old, new))
    assert states[:2] == ["old", "old"], "killed mid-write, the old output stays"


@pytest.mark.parametrize("gap", [0.0, 0.002, 0.02])
def test_a_second_signal_cannot_cut_the_cleanup_of_the_first_short(big_model: Path, reference, tmp_path: Path,
                                                                    gap: float):
    new, _ = reference
    old = conv_bn().SerializeToString()
    out = tmp_path / "out.onnx"
    for first, second in [(signal.SIGINT, signal.SIGTERM), (signal.SIGTERM, signal.SIGINT),
                          (signal.SIGINT, signal.SIGINT)]:
        out.write_bytes(old)
        process = subprocess.Popen(fold_command(big_model, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True)
        assert wait_for_write(process, tmp_path)
        process.send_signal(first)
        time.sleep(gap)
        if process.poll() is None:
            process.send_signal(second)
        _, stderr = process.communicate(timeout=60)
        # Python runs signal handlers between bytecodes, lowest signal number first: two signals that both
        # arrive during one long C call (a write, a serialization) are handled in that order, not as sent.
        assert process.returncode in {128 + first, 128 + second}, (first, second, process.returncode, stderr)
        assert stderr.count("\n") == 1 and "interrupted" in stderr and "Traceback" not in stderr, stderr
        assert leftovers(tmp_path) == []
        assert destination_state(out, old, new) == "old"


def test_sigbus_through_a_mapped_weight_is_one_line_and_exit_2(big_model: Path, tmp_path: Path):
    """Deterministic: a weight of the input is mapped and read after the file shrank, in a process with the
    command line's handler (the timing of a real run is the next test's)."""
    source = tmp_path / "model.onnx"
    shutil.copy(big_model, source)
    script = textwrap.dedent(f"""
        import os, numpy as np
        from bnfold.core.faults import exit_on_bus_error
        from bnfold.onnx.store.model_store import ModelStore
        exit_on_bus_error(2)
        store = ModelStore.read({os.fspath(source)!r})
        weight = max(store.proto.graph.initializer, key=lambda t: int(np.prod(t.dims)))
        array = store.array(weight, main_graph=True)
        os.truncate({os.fspath(source)!r}, 4096)
        print(float(array.sum()))
    """)
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                               check=False, cwd=Path(__file__).resolve().parents[2])
    assert completed.returncode == 2, completed.stderr
    assert completed.stdout == ""
    assert completed.stderr.count("\n") == 1 and "SIGBUS" in completed.stderr and "shrank" in completed.stderr


def test_an_input_truncated_while_it_is_folded_never_ends_silently(big_model: Path, reference, tmp_path: Path):
    new, duration = reference
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "out.onnx"
    source = tmp_path / "in.onnx"
    codes = []
    for at in [duration * fraction for fraction in (0.15, 0.3, 0.45, 0.6, 0.75, 0.9)]:
        shutil.copy(big_model, source)
        out.unlink(missing_ok=True)
        process = subprocess.Popen(fold_command(source, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True)
        time.sleep(at)
        os.truncate(source, 4096)
        _, stderr = process.communicate(timeout=120)
        codes.append(process.returncode)
        assert process.returncode in (0, 2), (at, process.returncode, stderr)
        if process.returncode == 2:
            assert stderr.count("\n") == 1 and stderr.startswith("bnfold: error: "), stderr
            assert not out.exists(), "nothing written from a damaged input"
        else:
            assert out.read_bytes() == new
        assert leftovers(out_dir) == [] and "Traceback" not in stderr
    assert 2 in codes, "some truncation fell inside the run"
