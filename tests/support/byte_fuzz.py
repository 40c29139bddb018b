"""A mutation fuzzer over the bytes of real model files: each mutant goes through ``bnfold fold`` (read,
fold, check, verify, write), which must end in success or in the one-line error with exit code 2; never a
traceback, an internal error, a file written on failure, a hang, or a crash of the interpreter.

Mutations: truncate, flip bits, overwrite bytes with boundary values, splice in a piece of another model,
repeat or delete a stretch, insert an overlong varint. Seeds are the sample models in ``models/`` (when
run from a checkout) and models built here, one of them with its weights in an external data file (a
mutation then hits either file).

:func:`evaluate` runs one mutant in this process. :class:`IsolatedRunner` runs mutants in a worker process
(``python -m tests.support.byte_fuzz --worker``) and restarts it when it dies, so a segfault or an abort in
protobuf's or onnx's C++ code is recorded as a failure of that mutant instead of ending the fuzzing.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from onnx import ModelProto, TensorProto, helper, numpy_helper

MAIN_FILE = "model.onnx"
CASE_TIMEOUT = 120.0
_INTERESTING_BYTES = (0x00, 0x01, 0x7F, 0x80, 0xFF)


@dataclass(frozen=True)
class Mutant:
    """Files of one mutated model (name -> bytes; the model is ``model.onnx``) and how it was made."""

    files: dict[str, bytes]
    how: str


@dataclass(frozen=True)
class Result:
    """``outcome``: ``ok`` (folded and written), ``refused`` (one-line error, exit 2), ``not_equivalent``
    (verification failed, exit 1, nothing written: e.g. weights so large that the original overflows to
    infinity where the folded model does not) or ``failure``."""

    outcome: str
    detail: str = ""


# --- seeds -------------------------------------------------------------------------------------------

def _linear_model(kind: str) -> ModelProto:
    rng = np.random.default_rng(0)
    nodes: list = []
    initializers = []

    def const(name: str, array: np.ndarray) -> str:
        initializers.append(numpy_helper.from_array(array.astype(np.float32), name))
        return name

    def bn(value: str, channels: int, name: str) -> str:
        params = [const(f"{name}_{k}", v) for k, v in enumerate(
            [rng.uniform(0.5, 1.5, channels), rng.normal(size=channels), rng.normal(size=channels),
             rng.uniform(0.5, 2.0, channels)])]
        nodes.append(helper.make_node("BatchNormalization", [value, *params], [f"{name}_out"], name=name))
        return f"{name}_out"

    if kind == "gemm":
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 16])
        nodes.append(helper.make_node("Gemm", ["x", const("w", rng.normal(size=(16, 8))), const("c", np.zeros(8))],
                                      ["g"], name="gemm", alpha=0.5))
        out, shape = bn("g", 8, "bn"), [2, 8]
    else:
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])
        nodes.append(helper.make_node("Conv", ["x", const("w", rng.normal(size=(8, 3, 3, 3)))], ["c"], name="conv",
                                      pads=[1, 1, 1, 1]))
        out, shape = bn("c", 8, "bn"), [1, 8, 8, 8]
        if kind == "branch":
            then = helper.make_graph([helper.make_node("Relu", [out], ["t"])], "then", [],
                                     [helper.make_tensor_value_info("t", TensorProto.FLOAT, shape)])
            other = helper.make_graph([helper.make_node("Neg", [out], ["e"])], "else", [],
                                      [helper.make_tensor_value_info("e", TensorProto.FLOAT, shape)])
            nodes.append(helper.make_node("If", ["cond"], ["y"], then_branch=then, else_branch=other))
            out = "y"
    inputs = [x] + ([helper.make_tensor_value_info("cond", TensorProto.BOOL, [])] if kind == "branch" else [])
    graph = helper.make_graph(nodes, kind, inputs, [helper.make_tensor_value_info(out, TensorProto.FLOAT, shape)],
                              initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def seeds(sample_dir: Path | None = None) -> dict[str, dict[str, bytes]]:
    """Seed models by name -> their files. ``sample_dir`` defaults to the checkout's ``models/``."""
    from bnfold.onnx.store.io import write_model

    found: dict[str, dict[str, bytes]] = {}
    for kind in ("conv", "gemm", "branch"):
        found[kind] = {MAIN_FILE: _linear_model(kind).SerializeToString()}
    with tempfile.TemporaryDirectory() as staging:
        path = Path(staging) / MAIN_FILE
        write_model(_linear_model("conv"), path, external_data="weights.bin", external_threshold=0)
        found["external"] = {p.name: p.read_bytes() for p in Path(staging).iterdir()}
    directory = sample_dir or Path(__file__).resolve().parents[2] / "models"
    for sample in sorted(directory.glob("*.onnx")) if directory.is_dir() else []:
        found[sample.stem] = {MAIN_FILE: sample.read_bytes()}
    return found


# --- mutations ---------------------------------------------------------------------------------------

def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def mutate(data: bytes, donor: bytes, rng: random.Random) -> tuple[bytes, str]:
    """One random mutation of ``data`` (``donor``: another model to splice from) and its description."""
    size = len(data)
    at = rng.randrange(size) if size else 0
    kind = rng.choice(["truncate", "flip", "set", "splice", "repeat", "delete", "varint"])
    if kind == "truncate":
        return data[:at], f"truncate at {at} of {size}"
    if kind == "flip":
        mutated = bytearray(data)
        positions = [rng.randrange(size) for _ in range(rng.randint(1, 8))] if size else []
        for position in positions:
            mutated[position] ^= 1 << rng.randrange(8)
        return bytes(mutated), f"flip bits at {positions}"
    if kind == "set":
        mutated = bytearray(data)
        positions = [rng.randrange(size) for _ in range(rng.randint(1, 4))] if size else []
        for position in positions:
            mutated[position] = rng.choice(_INTERESTING_BYTES)
        return bytes(mutated), f"set bytes at {positions}"
    if kind == "splice":
        start = rng.randrange(len(donor)) if donor else 0
        piece = donor[start:start + rng.randint(1, 4096)]
        end = min(size, at + rng.randint(0, 4096))
        return data[:at] + piece + data[end:], f"splice {len(piece)} donor bytes over {at}:{end}"
    if kind == "repeat":
        end = min(size, at + rng.randint(1, 4096))
        return data[:end] + data[at:end] * rng.randint(1, 3) + data[end:], f"repeat {at}:{end}"
    if kind == "delete":
        end = min(size, at + rng.randint(1, 4096))
        return data[:at] + data[end:], f"delete {at}:{end}"
    value = rng.choice([2**31 - 1, 2**31, 2**32, 2**63 - 1, 2**64 - 1])
    return data[:at] + _varint(value) + data[at:], f"insert varint {value} at {at}"


def mutants(seed_files: dict[str, dict[str, bytes]], count: int, seed: int) -> Iterator[Mutant]:
    rng = random.Random(seed)
    names = sorted(seed_files)
    for _ in range(count):
        name = rng.choice(names)
        files = dict(seed_files[name])
        target = rng.choice(sorted(files))
        donor = seed_files[rng.choice(names)][MAIN_FILE]
        files[target], how = mutate(files[target], donor, rng)
        yield Mutant(files, f"{name}/{target}: {how}")


# --- one mutant --------------------------------------------------------------------------------------

def evaluate(directory: Path) -> Result:
    """``bnfold fold`` on ``directory/model.onnx`` (through the command, in this process); whether it ended
    as the contract says."""
    from click.testing import CliRunner

    from bnfold.cli import main

    out = directory.parent / f"{directory.name}.folded.onnx"
    before = sorted(os.listdir(directory))
    result = CliRunner().invoke(main, ["fold", str(directory / MAIN_FILE), "-o", str(out), "--iterations", "1"])
    written = out.exists()
    for path in directory.parent.glob(f"{directory.name}.folded.onnx*"):
        path.unlink()
    escaped = result.exception if not isinstance(result.exception, SystemExit) else None
    if escaped is not None:
        return Result("failure", f"{type(escaped).__name__} escaped the command: {escaped}")
    if sorted(os.listdir(directory)) != before:
        return Result("failure", "the input directory changed")
    stderr = result.stderr
    if "Traceback" in stderr:
        return Result("failure", "a traceback was printed")
    if result.exit_code == 0:
        return Result("ok") if written else Result("failure", "exit 0 but nothing was written")
    if written:
        return Result("failure", f"exit {result.exit_code} but the output was written")
    if result.exit_code == 2 and stderr.startswith("bnfold: error: ") and stderr.count("\n") == 1:
        return Result("refused", stderr.strip()[len("bnfold: error: "):])
    if result.exit_code == 1 and "\nFAILED: " in result.stdout and not stderr:
        return Result("not_equivalent", result.stdout.split("\nFAILED: ", 1)[1].splitlines()[0])
    return Result("failure", f"exit {result.exit_code}: {stderr.strip()[:300]}")


def _write_case(mutant: Mutant, root: Path, index: int) -> Path:
    directory = root / f"case{index}"
    directory.mkdir()
    for name, data in mutant.files.items():
        (directory / name).write_bytes(data)
    return directory


# --- crash isolation ---------------------------------------------------------------------------------

class IsolatedRunner:
    """Runs :func:`evaluate` in a worker process, one case at a time; a worker that dies or hangs is the
    failure of the case it was on, and a fresh worker takes the next."""

    def __init__(self, command: list[str] | None = None, timeout: float = CASE_TIMEOUT) -> None:
        self.command = command or [sys.executable, "-m", "tests.support.byte_fuzz", "--worker"]
        self.timeout = timeout
        self.restarts = 0
        self._worker: subprocess.Popen[str] | None = None

    def __enter__(self) -> IsolatedRunner:
        return self

    def __exit__(self, *_: object) -> None:
        self._stop()

    def _stop(self) -> None:
        if self._worker is not None:
            self._worker.kill()
            self._worker.wait()
            self._worker = None

    def evaluate(self, directory: Path) -> Result:
        if self._worker is None:
            self._worker = subprocess.Popen(self.command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                            stderr=subprocess.DEVNULL, text=True, bufsize=1)
        worker = self._worker
        assert worker.stdin is not None and worker.stdout is not None
        try:
            worker.stdin.write(str(directory) + "\n")
            worker.stdin.flush()
        except BrokenPipeError:
            pass
        line = _read_line(worker, self.timeout)
        if line is None:
            worker.kill()
            code = worker.wait()
            self._worker = None
            self.restarts += 1
            if code is not None and code < 0 and code != -9:
                return Result("failure", f"the interpreter died: signal {-code}")
            return Result("failure", f"the interpreter died (exit {code})" if code != -9 else
                          f"no result within {self.timeout:.0f} s (hang)")
        answer = json.loads(line)
        return Result(answer["outcome"], answer["detail"])


def _read_line(worker: subprocess.Popen[str], timeout: float) -> str | None:
    """The worker's next line, or None if it exits or stays silent for ``timeout`` seconds."""
    import selectors

    assert worker.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(worker.stdout, selectors.EVENT_READ)
        if not selector.select(timeout):
            return None
    line = worker.stdout.readline()
    return line or None


def _worker() -> None:
    """Evaluate the directory named on each line of stdin; answer with one JSON line each."""
    for line in sys.stdin:
        result = evaluate(Path(line.strip()))
        print(json.dumps({"outcome": result.outcome, "detail": result.detail}), flush=True)


# --- a campaign --------------------------------------------------------------------------------------

@dataclass
class Campaign:
    mutants: int = 0
    ok: int = 0
    refused: int = 0
    not_equivalent: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)  # (how the mutant was made, what went wrong)
    restarts: int = 0

    def to_dict(self) -> dict[str, object]:
        return {"mutants": self.mutants, "ok": self.ok, "refused": self.refused,
                "not_equivalent": self.not_equivalent,
                "failures": [{"mutant": how, "failure": what} for how, what in self.failures],
                "worker_restarts": self.restarts}


def campaign(count: int, seed: int = 0, *, isolated: bool = True, keep_failures: Path | None = None,
             progress: Callable[[int, int], None] | None = None) -> Campaign:
    """Run ``count`` mutants (in a worker process when ``isolated``); failing mutants are copied to
    ``keep_failures`` for reproduction."""
    found = Campaign()
    seed_files = seeds()
    with tempfile.TemporaryDirectory(prefix="bnfold-bytes-") as name, (
            IsolatedRunner() if isolated else _InProcess()) as runner:
        root = Path(name)
        for index, mutant in enumerate(mutants(seed_files, count, seed)):
            directory = _write_case(mutant, root, index)
            result = runner.evaluate(directory)
            found.mutants += 1
            if result.outcome == "ok":
                found.ok += 1
            elif result.outcome == "refused":
                found.refused += 1
            elif result.outcome == "not_equivalent":
                found.not_equivalent += 1
            else:
                found.failures.append((mutant.how, result.detail))
                if keep_failures is not None:
                    kept = keep_failures / f"mutant-{seed}-{index}"
                    kept.mkdir(parents=True, exist_ok=True)
                    for file_name, data in mutant.files.items():
                        (kept / file_name).write_bytes(data)
                    (kept / "failure.txt").write_text(f"{mutant.how}\n{result.detail}\n")
            for path in directory.iterdir():
                path.unlink()
            directory.rmdir()
            if progress is not None:
                progress(index + 1, count)
        found.restarts = getattr(runner, "restarts", 0)
    return found


class _InProcess:
    def __enter__(self) -> _InProcess:
        return self

    def __exit__(self, *_: object) -> None:
        return None

    @staticmethod
    def evaluate(directory: Path) -> Result:
        return evaluate(directory)


if __name__ == "__main__" and sys.argv[1:] == ["--worker"]:
    _worker()
