"""Inference gain: onnxruntime CPU latency of the original and the bnfold-folded model.

For each model and thread setting (1 intra-op thread, and onnxruntime's default), one worker holds six
sessions -- original and folded, each at ``ORT_DISABLE_ALL``, ``ORT_ENABLE_BASIC`` and ``ORT_ENABLE_ALL`` --
and, after a warm-up, runs them in rounds, each round in a fresh random order, so that any drift in machine
load hits all six alike. In a round each session makes untimed settling runs, then a block of timed ones (see
``SETTLE_RUNS``). Reported: the median (and 10th/90th percentiles) of the timed runs per session, the median
of three session creations per model and level, and how many cores other processes kept busy meanwhile.
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.harness import median, run_child
from bench.models import BuiltModel

LEVELS = ("disabled", "basic", "all")
ROLES = ("original", "folded")
WARMUP_RUNS = 5
# After switching sessions, runs stay slow for a while: the other sessions' intra-op threads keep spinning, and
# with several threads onnxruntime needs about seven runs to reach its steady speed (measured on MobileNetV2,
# 2 cores: 6.5 -> 3.2 ms). So each session's timed runs come in a block after untimed settling runs.
SETTLE_RUNS = 8
SETTLE_SECONDS = 0.25
BLOCK_RUNS = 5
SESSION_CREATIONS = 3
THREAD_SETTINGS = (1, 0)  # 0: onnxruntime's default (one thread per physical core)


def _session_options(level: str, threads: int) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = {
        "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[level]
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return options


def measure(args: list[str]) -> dict[str, Any]:
    """Worker task ``latency ORIGINAL FOLDED THREADS SECONDS MIN_ROUNDS MAX_ROUNDS``."""
    import onnxruntime as ort

    paths = {"original": args[0], "folded": args[1]}
    threads, budget, min_rounds, max_rounds = int(args[2]), float(args[3]), int(args[4]), int(args[5])
    variants = [(role, level) for level in LEVELS for role in ROLES]
    sessions: dict[tuple[str, str], Any] = {}
    creations: dict[tuple[str, str], list[float]] = {variant: [] for variant in variants}
    for _ in range(SESSION_CREATIONS):
        for variant in variants:
            role, level = variant
            started = time.perf_counter()
            sessions[variant] = ort.InferenceSession(paths[role], _session_options(level, threads),
                                                     providers=["CPUExecutionProvider"])
            creations[variant].append(time.perf_counter() - started)
    feeds = random_feeds(sessions[variants[0]])
    run_seconds = {}
    for variant, session in sessions.items():
        for _ in range(WARMUP_RUNS):
            started = time.perf_counter()
            session.run(None, feeds)
        run_seconds[variant] = time.perf_counter() - started
    round_seconds = sum(max(SETTLE_RUNS * run, SETTLE_SECONDS) + BLOCK_RUNS * run for run in run_seconds.values())
    rounds = int(min(max_rounds, max(min_rounds, budget / round_seconds)))
    timings: dict[tuple[str, str], list[float]] = {variant: [] for variant in variants}
    order = list(variants)
    shuffle = random.Random(0).shuffle
    others = _OtherProcessesCpu()
    for _ in range(rounds):
        shuffle(order)
        for variant in order:
            session = sessions[variant]
            settle_until = time.perf_counter() + SETTLE_SECONDS
            for _ in range(SETTLE_RUNS):
                session.run(None, feeds)
            while time.perf_counter() < settle_until:
                session.run(None, feeds)
            for _ in range(BLOCK_RUNS):
                ran = time.perf_counter()
                session.run(None, feeds)
                timings[variant].append(time.perf_counter() - ran)
    return {
        "threads": threads,
        "runs": rounds * BLOCK_RUNS,
        # On a shared machine other processes compete for the cores; how many they kept busy on average.
        "other_processes_cores": others.cores(),
        "latency_ms": {f"{role}/{level}": _stats(timings[(role, level)]) for role, level in variants},
        "session_seconds": {f"{role}/{level}": median(creations[(role, level)]) for role, level in variants},
    }


class _OtherProcessesCpu:
    """CPU time the rest of the machine used since construction, in cores: all busy time in /proc/stat minus
    this process's own (every thread of it)."""

    def __init__(self) -> None:
        self._started = (time.perf_counter(), _busy_seconds(), _own_seconds())

    def cores(self) -> float:
        wall, busy, own = self._started
        return max(0.0, ((_busy_seconds() - busy) - (_own_seconds() - own)) / (time.perf_counter() - wall))


def _busy_seconds() -> float:
    with open("/proc/stat") as stat:
        fields = [int(value) for value in stat.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle and iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _own_seconds() -> float:
    times = os.times()
    return times.user + times.system


def random_feeds(session: Any) -> dict[str, np.ndarray]:
    """Standard-normal inputs for ``session``, dynamic dimensions set to 1."""
    rng = np.random.default_rng(0)
    feeds = {}
    for spec in session.get_inputs():
        shape = [dim if isinstance(dim, int) else 1 for dim in spec.shape]
        dtype = np.float16 if spec.type == "tensor(float16)" else np.float32
        feeds[spec.name] = rng.standard_normal(shape).astype(dtype)
    return feeds


def _stats(seconds: list[float]) -> dict[str, float]:
    milliseconds = np.asarray(seconds) * 1e3
    return {"median": float(np.median(milliseconds)), "p10": float(np.percentile(milliseconds, 10)),
            "p90": float(np.percentile(milliseconds, 90))}


def measure_model(original: BuiltModel, folded: Path, folded_check: dict[str, Any], seconds: float,
                  rounds: tuple[int, int], scratch: Path, log: Any) -> dict[str, Any]:
    """Both thread settings for one model; the gains the issue asks about, as ratios folded/original - 1."""
    entry: dict[str, Any] = {
        "model": original.to_dict(),
        "folded": {key: folded_check.get(key) for key in ("bytes", "nodes", "batchnorms")},
        "threads": [],
    }
    for threads in THREAD_SETTINGS:
        child = run_child("latency", [original.path, folded, threads, seconds, *rounds], scratch,
                          timeout=60 + 20 * seconds)
        if child.failure is not None:
            entry["threads"].append({"threads": threads, "error": child.failure})
            log(f"    threads={threads or 'default'}: FAILED ({child.failure})")
            continue
        result = child.result
        latency = {key: value["median"] for key, value in result["latency_ms"].items()}
        result["gains"] = {
            # (2) vs (3): does the offline fold alone give what onnxruntime's own BASIC fusions give?
            "folded_disabled_vs_original_basic": latency["folded/disabled"] / latency["original/basic"] - 1,
            "folded_vs_original_disabled": latency["folded/disabled"] / latency["original/disabled"] - 1,
            "folded_vs_original_basic": latency["folded/basic"] / latency["original/basic"] - 1,
            "folded_vs_original_all": latency["folded/all"] / latency["original/all"] - 1,
        }
        entry["threads"].append(result)
        gains = result["gains"]
        log(f"    threads={threads or 'default'}: {result['runs']} runs; orig/disabled "
            f"{latency['original/disabled']:.2f} ms, folded/disabled {latency['folded/disabled']:.2f}, "
            f"orig/basic {latency['original/basic']:.2f}, folded/basic {latency['folded/basic']:.2f}, "
            f"all {latency['original/all']:.2f} -> {latency['folded/all']:.2f}; "
            f"(2) vs (3) {gains['folded_disabled_vs_original_basic']:+.1%}")
    return entry
