"""Inference gain: onnxruntime CPU latency of the original and the bnfold-folded model.

Per model and thread setting (1 intra-op thread, and onnxruntime's default) the measurement is repeated on
several *instances*, each a fresh worker process with its own six sessions -- original and folded, each at
``ORT_DISABLE_ALL``, ``ORT_ENABLE_BASIC`` and ``ORT_ENABLE_ALL``. One session per configuration would compare
session instances, not models: two sessions of the same model and level can differ in speed for as long as
they live (on the 167 MB MLP at 1 thread, identical sessions in one process ran at medians of 11.1 to 12.7 ms,
the spread collapsing when the weights sit on huge pages -- it is where the weights land in memory).

In an instance the sessions are created in a random order, warmed up, then run in rounds, each round in a
fresh random order, so that drifting machine load hits all six alike; in a round each session makes untimed
settling runs, then a block of timed ones (see ``SETTLE_SECONDS``). Rounds during which other processes kept
``CONTENDED_CORES`` or more busy are left out when the instance has quieter ones: on 2 cores such a burst
makes onnxruntime at default threads up to three times slower, for every configuration that happens to run
in it. An instance's figure for a configuration is the median of its timed runs. Gains (folded ÷ original − 1)
are paired within an instance, where both sessions ran interleaved, and summarised across instances by their
median with a distribution-free confidence interval for that median (:func:`median_interval`): instances are
independent draws, so nothing need be assumed about the shape of the noise. Session creation is the median
over the instances.
"""

from __future__ import annotations

import math
import os
import random
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.harness import run_child
from bench.models import BuiltModel

LEVELS = ("disabled", "basic", "all")
ROLES = ("original", "folded")
CONFIGS = tuple(f"{role}/{level}" for level in LEVELS for role in ROLES)
# Each gain is folded ÷ original − 1 between two configurations of one instance.
GAINS = {
    # (2) vs (3): does the offline fold alone give what onnxruntime's own BASIC fusions give?
    "folded_disabled_vs_original_basic": ("folded/disabled", "original/basic"),
    "folded_vs_original_disabled": ("folded/disabled", "original/disabled"),
    "folded_vs_original_basic": ("folded/basic", "original/basic"),
    "folded_vs_original_all": ("folded/all", "original/all"),
}
# The first run of a session allocates its buffers; the second estimates its run time for the round budget.
WARMUP_RUNS = 2
# After switching sessions, the previous session's intra-op threads keep spinning for about 50 ms and slow the
# next one down to half its speed (measured at default threads on MobileNetV2 and bn_before_conv, 2 cores). At
# 1 thread there are no such threads and only the first run or two after a switch are slow (caches). Timed
# runs come after this much settling.
SETTLE_RUNS = 2
SETTLE_SECONDS = 0.1  # only with intra-op threads
# Short blocks make many rounds, so that a burst of load elsewhere spoils a minority of each session's runs.
BLOCK_RUNS = 3
BLOCK_SECONDS = 0.05
# Other processes keeping this much of a core busy make a round unreliable.
CONTENDED_CORES = 0.5
# The smallest coverage a confidence interval of a median must have; with five instances it is the lowest to
# the highest value (93.75%).
CONFIDENCE = 0.9
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
    """Worker task ``latency ORIGINAL FOLDED THREADS SECONDS MIN_ROUNDS MAX_ROUNDS SEED``: one instance."""
    import onnxruntime as ort

    paths = {"original": args[0], "folded": args[1]}
    threads, budget, min_rounds, max_rounds = int(args[2]), float(args[3]), int(args[4]), int(args[5])
    shuffle = random.Random(int(args[6])).shuffle

    def create(config: str) -> Any:
        role, level = config.split("/")
        return ort.InferenceSession(paths[role], _session_options(level, threads), providers=["CPUExecutionProvider"])

    # The first session of a model in a process pays one-time costs (twice the creation time of MobileNetV2);
    # a throwaway creation keeps them out of whichever configuration comes first.
    create(CONFIGS[0])
    order = list(CONFIGS)
    shuffle(order)
    sessions, creation_seconds = {}, {}
    for config in order:
        started = time.perf_counter()
        sessions[config] = create(config)
        creation_seconds[config] = time.perf_counter() - started
    feeds = random_feeds(sessions[CONFIGS[0]])
    run_seconds = {config: _warm_up(session, feeds) for config, session in sessions.items()}
    settle_seconds = SETTLE_SECONDS if threads != 1 else 0.0
    round_seconds = sum(max(SETTLE_RUNS * run, settle_seconds) + max(BLOCK_RUNS * run, BLOCK_SECONDS)
                        for run in run_seconds.values())
    rounds = int(min(max_rounds, max(min_rounds, budget / round_seconds)))
    blocks: dict[str, list[list[float]]] = {config: [] for config in CONFIGS}
    # On a shared machine other processes compete for the cores; how many they kept busy in each round.
    contention = []
    for _ in range(rounds):
        others = _OtherProcessesCpu()
        shuffle(order)
        for config in order:
            blocks[config].append(_settled_block(sessions[config], feeds, settle_seconds))
        contention.append(others.cores())
    quiet = [index for index, cores in enumerate(contention) if cores < CONTENDED_CORES]
    kept = quiet or range(rounds)
    timings = {config: [run for index in kept for run in blocks[config][index]] for config in CONFIGS}
    return {
        "threads": threads,
        "rounds": rounds,
        "quiet_rounds": len(quiet),
        "other_processes_cores": statistics.fmean(contention),
        "latency_ms": {config: 1e3 * statistics.median(seconds) for config, seconds in timings.items()},
        "runs": {config: len(seconds) for config, seconds in timings.items()},
        "session_seconds": creation_seconds,
    }


def _warm_up(session: Any, feeds: dict[str, np.ndarray]) -> float:
    """Seconds of the last warm-up run."""
    for _ in range(WARMUP_RUNS):
        started = time.perf_counter()
        session.run(None, feeds)
    return time.perf_counter() - started


def _settled_block(session: Any, feeds: dict[str, np.ndarray], settle_seconds: float) -> list[float]:
    """Untimed settling runs, then the seconds of each timed run of one block."""
    settled, runs = time.perf_counter() + settle_seconds, 0
    while runs < SETTLE_RUNS or time.perf_counter() < settled:
        session.run(None, feeds)
        runs += 1
    seconds: list[float] = []
    block_end = time.perf_counter() + BLOCK_SECONDS
    while len(seconds) < BLOCK_RUNS or time.perf_counter() < block_end:
        started = time.perf_counter()
        session.run(None, feeds)
        seconds.append(time.perf_counter() - started)
    return seconds


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


def median_interval(values: list[float]) -> dict[str, float]:
    """The median of independent draws and a distribution-free confidence interval for the median of their
    distribution: the order statistics x(j) and x(n+1-j) enclose it unless j or more draws fall on one side,
    so the interval covers it with probability 1 - 2 P(Binomial(n, 1/2) < j). ``j`` is the deepest that keeps
    at least ``CONFIDENCE``; below five draws none does, and the interval is the lowest to the highest value
    with the coverage it has (75% for three)."""
    ordered = sorted(values)
    count = len(ordered)

    def coverage(depth: int) -> float:
        return 1 - 2 * sum(math.comb(count, below) for below in range(depth)) / 2**count

    depth = 1
    while depth < (count + 1) // 2 and coverage(depth + 1) >= CONFIDENCE:
        depth += 1
    return {"median": statistics.median(ordered), "low": ordered[depth - 1], "high": ordered[count - depth],
            "confidence": coverage(depth)}


def summarize(instances: list[dict[str, Any]]) -> dict[str, Any]:
    """One thread setting across its instances: each configuration's latency and each gain as a median with
    its confidence interval, session creation as the median."""
    return {
        "threads": instances[0]["threads"],
        "instances": instances,
        "rounds": [instance["rounds"] for instance in instances],
        "quiet_rounds": [instance["quiet_rounds"] for instance in instances],
        "runs": {config: sum(instance["runs"][config] for instance in instances) for config in CONFIGS},
        "other_processes_cores": statistics.fmean(instance["other_processes_cores"] for instance in instances),
        "latency_ms": {config: median_interval([instance["latency_ms"][config] for instance in instances])
                       for config in CONFIGS},
        "gains": {name: median_interval([instance["latency_ms"][folded] / instance["latency_ms"][original] - 1
                                         for instance in instances])
                  for name, (folded, original) in GAINS.items()},
        "session_seconds": {config: statistics.median(instance["session_seconds"][config] for instance in instances)
                            for config in CONFIGS},
    }


def measure_model(original: BuiltModel, folded: Path, folded_check: dict[str, Any], seconds: float,
                  rounds: tuple[int, int], instances: int, scratch: Path, log: Any) -> dict[str, Any]:
    """Both thread settings for one model, ``instances`` fresh processes each, sharing ``seconds`` of rounds
    per thread setting. The settings alternate, so that the instances of each are spread over the whole
    measurement and a burst of load elsewhere spoils at most a few of them."""
    entry: dict[str, Any] = {
        "model": original.to_dict(),
        "folded": {key: folded_check.get(key) for key in ("bytes", "nodes", "batchnorms")},
    }
    results: dict[int, list[dict[str, Any]]] = {threads: [] for threads in THREAD_SETTINGS}
    failures: dict[int, str] = {}
    for instance in range(instances):
        for threads in THREAD_SETTINGS:
            if threads in failures:
                continue
            child = run_child("latency", [original.path, folded, threads, seconds / instances, *rounds, instance],
                              scratch, timeout=60 + 20 * seconds / instances)
            if child.failure is None:
                results[threads].append(child.result)
            else:
                failures[threads] = child.failure
                log(f"    threads={threads or 'default'}: FAILED ({child.failure})")
    entry["threads"] = []
    for threads in THREAD_SETTINGS:
        if threads in failures:
            entry["threads"].append({"threads": threads, "error": failures[threads]})
            continue
        summary = summarize(results[threads])
        entry["threads"].append(summary)
        latency = {config: figures["median"] for config, figures in summary["latency_ms"].items()}
        gains = summary["gains"]
        log(f"    threads={threads or 'default'}: {instances} instances, {min(summary['runs'].values())} runs; "
            f"orig/disabled {latency['original/disabled']:.2f} ms, folded/disabled {latency['folded/disabled']:.2f}, "
            f"orig/basic {latency['original/basic']:.2f}, folded/basic {latency['folded/basic']:.2f}, "
            f"all {latency['original/all']:.2f} -> {latency['folded/all']:.2f}; BASIC "
            f"{format_gain(gains['folded_vs_original_basic'])}, (2) vs (3) "
            f"{format_gain(gains['folded_disabled_vs_original_basic'])}")
    return entry


def format_gain(gain: dict[str, float]) -> str:
    """``+1.2% [-0.5, +3.0]``: the median gain and its confidence interval."""
    return f"{gain['median']:+.1%} [{gain['low']:+.1%}, {gain['high']:+.1%}]"
