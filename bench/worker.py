"""``python -m bench.worker TASK RESULT_JSON ARGS...``: one measurement in a fresh process.

The parent (see :func:`bench.harness.run_child`) times the whole process; the worker adds what only it can
see (import time apart from work time, its peak resident set after the imports and at the end) and writes its
findings as JSON to ``RESULT_JSON``. Only the standard library and :mod:`bench.tools` are imported before
the measured tool, so the tool's import cost is its own.
"""

from __future__ import annotations

import importlib
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from bench.harness import self_rss_mib
from bench.tools import TOOLS, ProcessEnd

# How this process ends once its findings are written: as the measured tool's own process would.
_process_end: ProcessEnd = sys.exit


def fold(args: list[str]) -> dict[str, Any]:
    """``fold TOOL SOURCE TARGET EXTERNAL OPTIONS_JSON``: import the tool, then fold SOURCE into TARGET."""
    global _process_end
    name, source, target, external, options = args
    started = time.perf_counter()
    run = TOOLS[name].load()
    imported = time.perf_counter()
    _, import_peak = self_rss_mib()
    _process_end = run(Path(source), Path(target), external == "1", json.loads(options)) or sys.exit
    finished = time.perf_counter()
    return {"import_seconds": imported - started, "work_seconds": finished - imported,
            "import_peak_rss_mib": import_peak}


# Tasks other than ``fold`` live with the section that needs them.
TASKS = {
    "fold": fold,
    "build": "bench.models:build_task",
    "check": "bench.fold_speed:check",
    "verify-cost": "bench.fold_speed:verify_cost",
    "verify-baseline": "bench.fold_speed:verify_baseline",
    "latency": "bench.latency:measure",
    "precision": "bench.precision:measure",
    "profile": "bench.profile:measure",
}


def main() -> None:
    task, result_path, *args = sys.argv[1:]
    handler = TASKS[task]
    if isinstance(handler, str):
        module, function = handler.split(":")
        handler = getattr(importlib.import_module(module), function)
    status = 0
    try:
        result = handler(args)
    except Exception as error:  # noqa: BLE001 - a failing tool is a finding to report, not a crash of the benchmark
        traceback.print_exc()
        message = " ".join(str(error).split()) or type(error).__name__
        result = {"error": f"{type(error).__name__}: {message[:400]}"}
        status = 1
    result["peak_rss_mib"] = self_rss_mib()[1]
    Path(result_path).write_text(json.dumps(result))
    _process_end(status)


if __name__ == "__main__":
    main()
