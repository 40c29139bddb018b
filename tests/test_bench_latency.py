"""The latency benchmark's statistics: confidence intervals of medians across instances, and the goal verdicts
built on them (no onnxruntime session is run).

White-box tests of :mod:`bench.report`: they call its private verdict helpers on made-up measurements."""

from __future__ import annotations

import random

import pytest

from bench import report
from bench.latency import CONFIGS, GAINS, median_interval, summarize


@pytest.mark.parametrize(("count", "depth", "coverage"), [
    (3, 1, 0.75),  # below five draws no interval reaches 90%: the full range, with the coverage it has
    (5, 1, 1 - 2 / 32),
    (8, 2, 1 - 2 * 9 / 256),
    (20, 6, None),
])
def test_median_interval_is_the_deepest_order_statistics_keeping_the_confidence(count, depth, coverage):
    values = [float(value) for value in range(count, 0, -1)]  # unsorted on purpose
    interval = median_interval(values)
    assert (interval["low"], interval["high"]) == (depth, count + 1 - depth)
    if coverage is not None:
        assert interval["confidence"] == pytest.approx(coverage)
    assert interval["confidence"] >= 0.9 or count < 5


def test_median_interval_covers_the_median_as_often_as_it_claims():
    draws = random.Random(0)
    trials, covered = 4000, 0
    for _ in range(trials):
        interval = median_interval([draws.lognormvariate(0, 1) for _ in range(6)])  # median of lognormal(0,1): 1
        covered += interval["low"] <= 1 <= interval["high"]
    assert covered / trials == pytest.approx(median_interval([0.0] * 6)["confidence"], abs=0.02)


def _instance(latency_ms: dict[str, float], quiet_rounds: int = 2) -> dict:
    return {"threads": 1, "rounds": 2, "quiet_rounds": quiet_rounds, "other_processes_cores": 0.0,
            "latency_ms": latency_ms, "runs": dict.fromkeys(CONFIGS, 10),
            "session_seconds": dict.fromkeys(CONFIGS, 0.1)}


def test_gains_are_paired_within_each_instance():
    # Instances differ by a factor of two (a slow process), the folded model is 10% faster in every one of them:
    # pairing within an instance sees exactly -10%, comparing medians across instances would not.
    instances = [_instance({config: scale * (0.9 if config.startswith("folded") else 1.0) for config in CONFIGS})
                 for scale in (1.0, 2.0, 1.5, 1.2, 1.8)]
    summary = summarize(instances)
    for name in ("folded_vs_original_disabled", "folded_vs_original_basic", "folded_vs_original_all"):
        assert summary["gains"][name]["low"] == pytest.approx(-0.1)
        assert summary["gains"][name]["high"] == pytest.approx(-0.1)
    assert set(summary["gains"]) == set(GAINS)
    assert summary["runs"]["original/basic"] == 50


def latency_goal(measured):
    """The report's sentence on the goal "folded at least as fast as the original at BASIC"."""
    return report._verdict_summary(report._latency_verdicts(measured, "folded_vs_original_basic", 0.0)) + "."


@pytest.mark.parametrize(("gains", "verdict"), [
    ((-0.03, -0.02, -0.01, -0.02, -0.025), "met for 1 of 1."),
    ((-0.03, 0.01, -0.01, -0.02, -0.025), "met for 0 of 1; within noise for"),
    ((0.03, 0.01, 0.02, 0.04, 0.025), "met for 0 of 1; **not met** for"),
])
def test_a_goal_is_missed_only_beyond_the_noise(gains, verdict):
    instances = [_instance({**dict.fromkeys(CONFIGS, 10.0), "folded/basic": 10.0 * (1 + gain)}) for gain in gains]
    entry = {"model": {"name": "m", "ort_fuses": False}, "threads": [summarize(instances)]}
    measured = [(entry, threads) for threads in report._measured(entry)]
    assert latency_goal(measured).startswith(verdict)


@pytest.mark.parametrize(("quiet_rounds", "contended"), [
    ((2, 2, 2, 2, 2), False),
    ((0, 0, 2, 1, 2), False),  # two spoiled instances of five: their median is still a quiet one's
    ((0, 0, 0, 1, 2), True),
])
def test_a_measurement_is_contended_when_half_its_instances_had_no_quiet_round(quiet_rounds, contended):
    summary = summarize([_instance(dict.fromkeys(CONFIGS, 10.0), quiet) for quiet in quiet_rounds])
    assert report._contended(summary) is contended


def test_a_contended_measurement_is_not_judged():
    instances = [_instance({**dict.fromkeys(CONFIGS, 10.0), "folded/basic": 12.0}, quiet_rounds=0) for _ in range(5)]
    entry = {"model": {"name": "m", "ort_fuses": False}, "threads": [summarize(instances)]}
    measured = [(entry, threads) for threads in report._measured(entry)]
    assert latency_goal(measured).startswith("met for 0 of 1; not judged (⚠) for m")
