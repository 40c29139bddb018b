"""The benchmark's result files: the same data as JSON, one line per entry, so a rerun's diff stays small."""

from __future__ import annotations

import json
from pathlib import Path

from bench.run import results_json

RESULTS = Path(__file__).resolve().parent.parent / "bench" / "results"


def test_results_hold_one_line_per_entry_and_every_digit():
    entries = [{"model": {"name": "a", "path": Path("/m/a.onnx")}, "seconds": 0.1 + 0.2}, {"error": "x"}]
    text = results_json(entries)
    assert len(text.splitlines()) == 4
    assert json.loads(text) == [{"model": {"name": "a", "path": "/m/a.onnx"}, "seconds": 0.1 + 0.2}, {"error": "x"}]
    run = {"mode": {"cases": ("a", "b")}, "seconds": 1.5}
    assert results_json(run) == '{\n "mode": {"cases": ["a", "b"]},\n "seconds": 1.5\n}\n'
    assert json.loads(results_json([])) == []


def test_the_kept_results_are_written_as_a_run_writes_them():
    for path in sorted(RESULTS.rglob("*.json")):
        assert path.read_text() == results_json(json.loads(path.read_text())), path
