"""Where ``bnfold fold --no-verify`` spends its time and memory, on one model.

Two passes, each in a worker of its own so that neither disturbs the other:

- ``cprofile``: the command under :mod:`cProfile`; the functions with the most time of their own, and bnfold's
  functions with the most cumulative time.
- ``memory``: the command with a thread that samples the resident set every few milliseconds together with the
  main thread's stack, giving per stage (bnfold's three outermost frames below the command) the time spent
  and the lowest and highest RSS seen.
"""

from __future__ import annotations

import cProfile
import pstats
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.harness import self_rss_mib

TOP_FUNCTIONS = 15
SAMPLE_SECONDS = 0.01
STAGE_DEPTH = 3


def _run_command(source: str, target: str) -> Callable[[], None]:
    from bnfold.cli import main

    def run() -> None:
        try:
            main(["fold", source, "-o", target, "--no-verify", "--json"], prog_name="bnfold")
        except SystemExit as exit_:
            if exit_.code:
                raise RuntimeError(f"bnfold exited with status {exit_.code}") from None

    return run


def measure(args: list[str]) -> dict[str, Any]:
    """Worker task ``profile cprofile|memory SOURCE TARGET``."""
    mode, source, target = args
    run = _run_command(source, target)
    return _cprofile(run) if mode == "cprofile" else _memory(run)


def _location(function: tuple[str, int, str]) -> str:
    filename, line, name = function
    if filename == "~":
        return name  # a builtin, e.g. <method 'SerializeToString' ...>
    package_path = filename.split("/site-packages/")[-1]
    bnfold_at = package_path.rfind("bnfold/")
    return f"{package_path[bnfold_at:] if bnfold_at >= 0 else package_path}:{line}({name})"


def _cprofile(run: Callable[[], None]) -> dict[str, Any]:
    profiler = cProfile.Profile()
    started = time.perf_counter()
    profiler.runcall(run)
    total = time.perf_counter() - started
    stats = pstats.Stats(profiler).stats  # function -> (calls, primitive calls, own time, cumulative, callers)
    own = sorted(stats.items(), key=lambda item: item[1][2], reverse=True)[:TOP_FUNCTIONS]
    bnfold = sorted(((function, figures) for function, figures in stats.items() if "/bnfold/" in function[0]),
                    key=lambda item: item[1][3], reverse=True)[:TOP_FUNCTIONS]
    return {
        "total_seconds": total,
        "own_time": [{"function": _location(f), "calls": v[1], "seconds": v[2]} for f, v in own],
        "bnfold_cumulative": [{"function": _location(f), "calls": v[1], "seconds": v[3]} for f, v in bnfold],
    }


def _stage(frame: Any) -> str:
    """bnfold's outermost frames below the command, e.g. ``api.fold_onnx > guard.__call__``."""
    names = []
    while frame is not None:
        filename = frame.f_code.co_filename
        if "/bnfold/" in filename:
            names.append(f"{Path(filename).stem}.{frame.f_code.co_name}")
        frame = frame.f_back
    names.reverse()
    below_command = names[names.index("cli.fold") + 1:] if "cli.fold" in names else []
    return " > ".join(below_command[:STAGE_DEPTH]) or "(start-up and imports)"


def _memory(run: Callable[[], None]) -> dict[str, Any]:
    main_thread = threading.main_thread().ident
    samples: list[tuple[float, float, str]] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            frame = sys._current_frames().get(main_thread)
            samples.append((time.perf_counter(), self_rss_mib()[0], _stage(frame)))
            time.sleep(SAMPLE_SECONDS)

    sampler = threading.Thread(target=sample, daemon=True)
    started = time.perf_counter()
    sampler.start()
    try:
        run()
    finally:
        done.set()
        sampler.join()
    stages: dict[str, dict[str, float]] = {}
    previous = started
    for when, rss, stage in samples:
        figures = stages.setdefault(stage, {"seconds": 0.0, "rss_low_mib": rss, "rss_high_mib": rss})
        figures["seconds"] += when - previous
        figures["rss_low_mib"] = min(figures["rss_low_mib"], rss)
        figures["rss_high_mib"] = max(figures["rss_high_mib"], rss)
        previous = when
    return {"total_seconds": time.perf_counter() - started, "peak_rss_mib": self_rss_mib()[1],
            "stages": [{"stage": stage, **figures} for stage, figures in stages.items()]}
