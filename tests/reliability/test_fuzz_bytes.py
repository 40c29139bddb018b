"""The quick profile of the byte-mutation fuzzer, and its crash isolation: a worker that dies or hangs is the
failure of the mutant it was on, and the next mutant gets a fresh worker."""

from __future__ import annotations

import sys
from pathlib import Path

from tests.support.byte_fuzz import IsolatedRunner, campaign

# A stand-in worker: answers like the real one, but aborts (as a C++ crash would) on a directory named
# "crash" and never answers on one named "hang".
FAKE_WORKER = """
import json, os, sys, time
for line in sys.stdin:
    name = os.path.basename(line.strip())
    if name == "crash":
        os.abort()
    if name == "hang":
        time.sleep(60)
    print(json.dumps({"outcome": "refused", "detail": name}), flush=True)
"""


def test_mutants_of_real_models_end_in_success_or_the_one_line_error():
    found = campaign(150, seed=1, isolated=False)
    assert found.failures == [], found.failures
    assert found.refused > 0 and found.ok > 0


def test_the_isolated_worker_runs_real_mutants():
    found = campaign(8, seed=2, isolated=True)
    assert found.failures == [] and found.mutants == 8 and found.restarts == 0


def test_a_worker_that_crashes_or_hangs_costs_only_that_mutant(tmp_path: Path):
    with IsolatedRunner([sys.executable, "-c", FAKE_WORKER], timeout=3) as runner:
        results = [runner.evaluate(tmp_path / name) for name in ("first", "crash", "after", "hang", "last")]
    assert [r.outcome for r in results] == ["refused", "failure", "refused", "failure", "refused"]
    assert "signal 6" in results[1].detail and "hang" in results[3].detail
    assert runner.restarts == 2
