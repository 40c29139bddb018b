"""What every section of the benchmark shares: measured child processes, model file sizes, the machine.

Each measurement runs in a fresh ``python -m bench.worker`` process, so imports, caches and the memory of one
tool never leak into another's figures. A child's peak resident set is its own ``VmHWM`` (from
``/proc/self/status``, read by the worker as it finishes), not ``ru_maxrss``: on Linux a child's ``ru_maxrss``
(from ``wait4``, ``RUSAGE_CHILDREN`` or even its own ``RUSAGE_SELF``) keeps the resident set of the process it
was forked from across ``exec`` -- a 10 MiB child of an 800 MiB parent reports 811 MiB. This module imports
nothing heavy, so a worker's own start-up stays out of the tool's figures.
"""

from __future__ import annotations

import compileall
import contextlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
MiB = 2**20


@dataclass
class ChildRun:
    """One finished worker process: its wall time, exit status and the JSON it wrote."""

    wall_seconds: float
    returncode: int
    result: dict[str, Any]
    log_tail: str

    @property
    def peak_rss_mib(self) -> float:
        return self.result["peak_rss_mib"]

    @property
    def failure(self) -> str | None:
        """Why the child did not produce a result (error, crash, abort, timeout), or None."""
        if self.returncode == 0 and "error" not in self.result:
            return None
        if "error" in self.result:
            return self.result["error"]
        tail = f": {self.log_tail}" if self.log_tail else ""
        if self.returncode < 0:
            return f"killed by {signal.Signals(-self.returncode).name}{tail}"
        return f"exit status {self.returncode}{tail}"


def compile_bytecode() -> None:
    """Compile bnfold's and the benchmark's modules, as ``pip install`` does for an installed package. With
    ``PYTHONDONTWRITEBYTECODE`` set (as on this project's machines) a checkout would otherwise be compiled
    from source in every measured process, adding about 70 ms to bnfold's import that no user pays."""
    for package in ("bnfold", "bench"):
        compileall.compile_dir(REPO / package, quiet=1)


def run_child(task: str, args: Sequence[str], scratch: Path, timeout: float) -> ChildRun:
    """Run ``python -m bench.worker TASK RESULT ARGS...`` and time it. The child's stdout and stderr go to a
    log (anchors print tables and progress); its last line is kept for failure messages."""
    scratch.mkdir(parents=True, exist_ok=True)
    handle, result_name = tempfile.mkstemp(prefix=f"{task}-", suffix=".json", dir=scratch)
    os.close(handle)
    result_path = Path(result_name)
    log_path = result_path.with_suffix(".log")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    command = [sys.executable, "-m", "bench.worker", task, str(result_path), *map(str, args)]
    with open(log_path, "wb") as log:
        started = time.perf_counter()
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env,
                                   start_new_session=True)
        # Popen.wait(timeout) polls with sleeps of up to 50 ms, which would round every wall time up to the
        # next poll; a blocking wait with a watchdog thread for the timeout sees the exit at once.
        expired = threading.Event()
        watchdog = threading.Timer(timeout, _kill_group, (process, expired))
        watchdog.start()
        returncode = process.wait()
        wall = time.perf_counter() - started
        watchdog.cancel()
        timed_out = expired.is_set()
    try:
        result = json.loads(result_path.read_text()) if result_path.stat().st_size else {}
    except (OSError, json.JSONDecodeError):
        result = {}
    if timed_out:
        result = {"error": f"timed out after {timeout:.0f} s"}
    tail = _last_line(log_path)
    result_path.unlink(missing_ok=True)
    log_path.unlink(missing_ok=True)
    return ChildRun(wall, returncode, result, tail)


def _kill_group(process: subprocess.Popen[bytes], expired: threading.Event) -> None:
    expired.set()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)


def _last_line(path: Path) -> str:
    try:
        lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return lines[-1][:300] if lines else ""


def model_bytes(path: Path) -> int:
    """The model file plus every external data file it names."""
    import onnx

    model = onnx.load(path, load_external_data=False)
    locations = {entry.value for tensor in _tensors(model) for entry in tensor.external_data if entry.key == "location"}
    return path.stat().st_size + sum((path.parent / location).stat().st_size for location in locations)


def _tensors(model: Any) -> Iterator[Any]:
    yield from model.graph.initializer
    for node in model.graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t


def remove_model(path: Path) -> None:
    """Delete a model and its external data files (each tool's output sits in a directory of its own)."""
    shutil.rmtree(path.parent, ignore_errors=True)


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def self_rss_mib() -> tuple[float, float]:
    """(current, peak) resident set of this process, from /proc/self/status."""
    fields = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) / 1024
    return fields.get("VmRSS", 0.0), fields.get("VmHWM", 0.0)


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    import numpy
    import onnx
    import onnxruntime

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        with open("/proc/meminfo") as info:
            memory = int(next(line.split()[1] for line in info if line.startswith("MemTotal"))) * 1024
    except (OSError, StopIteration):
        memory = 0
    versions = {"python": platform.python_version(), "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
                "numpy": numpy.__version__}
    for package in ("bnfold", "torch", "onnxscript", "onnxoptimizer", "onnxslim"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(memory / 2**30, 1),
        "os": f"{platform.system()} {platform.release()}",
        "load_average_at_start": [round(value, 2) for value in os.getloadavg()],
        "versions": versions,
    }
