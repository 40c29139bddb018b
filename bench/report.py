"""BENCHMARKS.md and the plots, from the JSON results of a run (``python -m bench --report-only`` redoes it)."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from bench.latency import CONTENDED_CORES, format_gain
from bench.reparam import section as reparam_section
from bench.tools import FOLDERS, TOOLS

GOAL_FLOOR_RATIO = 1.3
GOAL_MEMORY_RATIO = 2.0
GOAL_LATENCY_GAP = 0.02
# float32 errors of different, equally exact folds differ by a few percent with the order of roundings.
PRECISION_MARGIN = 1.1
# onnxoptimizer leaves the fold arithmetic in the graph: its weights are the original ones, so it is not an
# offline fold whose rounding could be compared.
RUNTIME_FOLDERS = ("onnxoptimizer",)
LINEARITY_MIN_BYTES = 10 * 10**6  # below this, start-up costs hide the size dependence
LATENCY_CONFIGS = (
    ("original/disabled", "(1) original, DISABLE_ALL"),
    ("folded/disabled", "(2) folded, DISABLE_ALL"),
    ("original/basic", "(3) original, BASIC"),
    ("folded/basic", "(4) folded, BASIC"),
    ("original/all", "(5) original, ALL"),
    ("folded/all", "(5) folded, ALL"),
)
LATENCY_GAINS = (
    ("folded_disabled_vs_original_basic", "(2) vs (3)"),
    ("folded_vs_original_disabled", "folded vs original, DISABLE_ALL"),
    ("folded_vs_original_basic", "folded vs original, BASIC"),
    ("folded_vs_original_all", "folded vs original, ALL"),
)


def _load(out: Path, name: str) -> Any:
    path = out / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def write(out: Path, report_path: Path) -> None:
    results = {name: _load(out, name) for name in ("run", "tools", "scale", "verify", "profile", "latency",
                                                    "precision")}
    plots = _plots(out, results)
    relative = os.path.relpath(out, report_path.parent)
    goals = _Goals(results)
    lines = [*_header(results, goals), *_headline(results, goals), *_goal_details(goals),
             *_scale(results, plots, relative), *_tools(results),
             *_verify(results), *_latency(results, plots, relative), *reparam_section(out, relative),
             *_precision(results), *_profile(results), *_method(results)]
    report_path.write_text("\n".join(lines).rstrip() + "\n")


# --- formatting ------------------------------------------------------------------------------------

def _table(header: list[str], rows: Iterable[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return [*lines, ""]


def _seconds(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "–"
    return f"{value:.3f}" if value < 1 else f"{value:.2f}" if value < 100 else f"{value:.0f}"


def _ratio(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}×"


def _scale_verdicts(scale: list[dict[str, Any]]) -> tuple[dict[str, list[str]], list[str]]:
    """Faster than every anchor at every size, judged run against run (each tool's runs are interleaved with
    bnfold's, so both met the same machine): met where each of bnfold's runs beat each of the anchor's, not
    met where each lost, within the noise where they overlap. Also where the time went where it was not met."""
    verdicts: dict[str, list[str]] = {"met": [], "within noise": [], "not met": []}
    splits = []
    for entry in scale:
        bnfold = _row(entry, "bnfold")
        ours = [run["wall_seconds"] for run in bnfold.get("runs", [])]
        for row in entry["tools"]:
            theirs = [run["wall_seconds"] for run in row.get("runs", [])]
            if row["tool"] in ("floor", "bnfold") or not theirs or not ours:
                continue
            verdict = "met" if max(ours) < min(theirs) else "not met" if max(theirs) < min(ours) else "within noise"
            medians = f"{_seconds(row['wall_seconds'])} s, bnfold {_seconds(bnfold['wall_seconds'])} s"
            verdicts[verdict].append(f"{row['label']} at {_mb(entry['model']['bytes'])} MB ({medians})")
            if verdict != "met":
                splits.append(f"at {_mb(entry['model']['bytes'])} MB bnfold {_split(bnfold)}, "
                              f"{row['label']} {_split(row)}")
    return verdicts, splits


def _split(row: dict[str, Any]) -> str:
    wall, imports, work = row["wall_seconds"], row.get("import_seconds"), row.get("work_seconds")
    if imports is None or work is None:
        return f"{_seconds(wall)} s"
    return f"{_seconds(wall)} s = {_seconds(imports)} + {_seconds(work)} + {_seconds(wall - imports - work)}"


def _mb(count: float) -> str:
    return f"{count / 1e6:.1f}" if count < 1e9 else f"{count / 1e6:.0f}"


def _sci(value: float | None) -> str:
    return "–" if value is None else f"{value:.2e}"


def _label(tool: str) -> str:
    return TOOLS[tool].label if tool in TOOLS else tool


def _goal(met: bool) -> str:
    return "met" if met else "**not met**"


def _row(entry: dict[str, Any], tool: str) -> dict[str, Any]:
    return next((row for row in entry["tools"] if row["tool"] == tool), {})


def _verdict(row: dict[str, Any]) -> str:
    verdict = row.get("verdict", "–")
    if verdict == "equivalent" and row.get("tolerance_used") is not None:
        return f"equivalent ({row['tolerance_used']:.0%} of tol.)"
    if row.get("detail") and verdict != "equivalent":
        return f"{verdict}: {row['detail'][:120].replace('|', '/')}"
    return verdict


# --- sections --------------------------------------------------------------------------------------

def _header(results: dict[str, Any], goals: _Goals) -> list[str]:
    run = results["run"] or {}
    machine = run.get("machine", {})
    versions = machine.get("versions", {})
    lines = [
        "# Benchmarks",
        "",
        *_glance(results, goals),
        "Regenerate everything below (models, measurements, JSON, plots and this file) with one command:",
        "",
        "```sh",
        ".venv/bin/pip install -e '.[bench]'   # the anchors and matplotlib; missing anchors are skipped",
        ".venv/bin/python -m bench             # full run, ~15 min on 2 cores; writes bench/results/, BENCHMARKS.md",
        ".venv/bin/python -m bench --quick     # under 2 minutes; writes bench/results/quick/ (BENCHMARKS.md inside)",
        "```",
        "",
        f"This file was generated by `bench/report.py` from the results of `{run.get('command', '?')}`, "
        f"started {run.get('started_utc', '?')} and taking {run.get('seconds', 0) / 60:.1f} minutes. "
        "Do not edit it by hand.",
        "",
        "## Machine",
        "",
        f"- CPU: {machine.get('cpu', '?')}, {machine.get('cores', '?')} cores; memory {machine.get('memory_gib', '?')} "
        f"GiB; {machine.get('os', '?')}; no GPU (onnxruntime CPUExecutionProvider).",
        "- Versions: " + ", ".join(f"{name} {version or 'not installed'}" for name, version in versions.items()) + ".",
        f"- Load average at the start: {machine.get('load_average_at_start', '?')}. The machine is shared with other "
        "work; timings are medians, and everything compared is interleaved (see Method).",
        "",
    ]
    for note in run.get("skipped_anchors", []):
        lines.insert(-1, f"- Anchor skipped: {note}.")
    return lines


def _headline_scale_entry(results: dict[str, Any]) -> dict[str, Any] | None:
    run, scale = results["run"], results["scale"]
    if not run or not scale:
        return None
    headline = run["mode"]["headline_mb"]
    return next((entry for entry in scale if entry.get("target_mb") == headline), None)


def _size(count: float) -> str:
    return f"{count / 1e9:.1f} GB" if count >= 1e9 else f"{_mb(count)} MB"


class _Goals:
    """Every goal's verdicts, computed once from the results: the table at a glance, the headline and the
    details below it all say the same."""

    def __init__(self, results: dict[str, Any]) -> None:
        self.scale = _scale_verdicts(results["scale"]) if results["scale"] else None
        self.latency: dict[str, dict[str, list[str]]] = {}
        self.measured = [(entry, threads) for entry in results["latency"] or [] for threads in _measured(entry)]
        if self.measured:
            self.latency = {
                "gap": _latency_verdicts(self.measured, "folded_disabled_vs_original_basic", GOAL_LATENCY_GAP),
                "basic": _latency_verdicts(self.measured, "folded_vs_original_basic", 0.0),
                "all": _latency_verdicts(self.measured, "folded_vs_original_all", 0.0),
                "unfused": _latency_verdicts(self.measured, "folded_vs_original_basic", 0.0,
                                             lambda entry: not entry["model"]["ort_fuses"]),
            }
        self.precision = _precision_verdicts(results["precision"]) if results["precision"] else None


def _glance(results: dict[str, Any], goals: _Goals) -> list[str]:
    """One small table: the figures a reader wants first, each with its goal and verdict."""
    rows = []
    scale, run = results["scale"], results["run"]
    if scale and run:
        sizes = {16, run["mode"]["headline_mb"], max(entry.get("target_mb", 0) for entry in scale)}
        for entry in scale:
            bnfold, floor = _row(entry, "bnfold"), _row(entry, "floor")
            if entry.get("target_mb") in sizes and "wall_seconds" in bnfold and "wall_seconds" in floor:
                ratio = bnfold["wall_vs_floor"]
                rows.append([f"fold time ÷ `onnx.load` + `onnx.save`, {_size(entry['model']['bytes'])}",
                             f"{_ratio(ratio)} ({_seconds(bnfold['wall_seconds'])} s against "
                             f"{_seconds(floor['wall_seconds'])} s)",
                             f"≤ {GOAL_FLOOR_RATIO}×", _goal(ratio <= GOAL_FLOOR_RATIO)])
    entry = _headline_scale_entry(results)
    bnfold = _row(entry, "bnfold") if entry is not None else {}
    if "peak_rss_vs_model" in bnfold:
        rows.append([f"peak memory ÷ model size, {_size(entry['model']['bytes'])}",
                     f"{bnfold['peak_rss_vs_model']:.2f}× ({bnfold['peak_rss_mib']:.0f} MiB)",
                     f"≤ {GOAL_MEMORY_RATIO}×", _goal(bnfold["peak_rss_vs_model"] <= GOAL_MEMORY_RATIO)])
        anchors = [row for row in entry["tools"] if row["tool"] not in ("floor", "bnfold") and "wall_seconds" in row]
        if anchors and goals.scale is not None:
            fastest = min(anchors, key=lambda row: row["wall_seconds"])
            rows.append([f"fold time ÷ the fastest other tool's, {_size(entry['model']['bytes'])}",
                         f"{_ratio(bnfold['wall_seconds'] / fastest['wall_seconds'])} ({fastest['label']} "
                         f"{_seconds(fastest['wall_seconds'])} s)",
                         "faster than every other tool at every size", _verdict_summary(goals.scale[0], short=True)])
    if goals.latency:
        rows.append(["inference latency: folded (no optimizations) ÷ original (BASIC fusions)",
                     f"{len(goals.measured)} measurements", f"≤ 1 + {GOAL_LATENCY_GAP:.0%}",
                     _verdict_summary(goals.latency["gap"], short=True)])
        rows.append(["inference latency: folded ÷ original, at BASIC / ALL", f"{len(goals.measured)} measurements each",
                     "≤ 1", _verdict_summary(goals.latency["basic"], short=True) + " / "
                     + _verdict_summary(goals.latency["all"], short=True)])
    if goals.precision is not None:
        worse, compared, _ = goals.precision
        rows.append(["float error ÷ other tools' offline folds", f"{compared} comparisons",
                     f"≤ {PRECISION_MARGIN:g}×", _goal(not worse)])
    if not rows:
        return []
    return [*_table(["figure", "measured", "goal", "verdict"], rows),
            "Fold times are of the whole `bnfold fold --no-verify` command in a fresh process, on a ResNet-101 "
            "layout; the goals and the figures behind each verdict are under Headline and Goals in detail.", ""]


def _headline(results: dict[str, Any], goals: _Goals) -> list[str]:
    lines = ["## Headline", ""]
    entry = _headline_scale_entry(results)
    if entry is not None:
        model, bnfold, floor = entry["model"], _row(entry, "bnfold"), _row(entry, "floor")
        if "wall_seconds" in bnfold and "wall_seconds" in floor:
            lines += [
                f"On the {_mb(model['bytes'])} MB {model['shows'].split(',')[0]}, `bnfold fold --no-verify`:",
                "",
                f"- **Time:** {_seconds(bnfold['wall_seconds'])} s against {_seconds(floor['wall_seconds'])} s for "
                f"`onnx.load` + `onnx.save`: **{_ratio(bnfold['wall_vs_floor'])} the floor** (goal ≤ "
                f"{GOAL_FLOOR_RATIO}×: {_goal(bnfold['wall_vs_floor'] <= GOAL_FLOOR_RATIO)}). Without start-up and "
                f"imports: {_seconds(bnfold['work_seconds'])} s against {_seconds(floor['work_seconds'])} s, "
                f"{_ratio(bnfold['work_vs_floor'])}.",
                f"- **Memory:** peak RSS {bnfold['peak_rss_mib']:.0f} MiB = **{bnfold['peak_rss_vs_model']:.2f}× the "
                f"model** (goal ≤ {GOAL_MEMORY_RATIO}×: {_goal(bnfold['peak_rss_vs_model'] <= GOAL_MEMORY_RATIO)}); "
                f"{bnfold['peak_above_imports_vs_model']:.2f}× above its imports. The floor peaks at "
                f"{floor['peak_rss_mib']:.0f} MiB ({floor['peak_rss_vs_model']:.2f}×).",
            ]
            anchors = [row for row in entry["tools"]
                       if row["tool"] not in ("floor", "bnfold") and "wall_seconds" in row]
            if anchors:
                ranked = sorted(anchors, key=lambda row: row["wall_seconds"])
                lines.append("- **Against the anchors:** " + ", ".join(
                    f"{row['label']} {_seconds(row['wall_seconds'])} s" for row in ranked)
                    + f" (the fastest: {_ratio(ranked[0].get('wall_vs_floor'))} the floor).")
    if goals.scale is not None:
        lines.append("- **Faster than every anchor at every size:** " + _verdict_summary(goals.scale[0], short=True)
                     + ".")
    if goals.latency:
        lines += [
            f"- **Latency (2) within {GOAL_LATENCY_GAP:.0%} of (3)** (folded, no optimizations, against the original "
            "with BASIC fusions): " + _verdict_summary(goals.latency["gap"], short=True) + ".",
            "- **Folded at least as fast as the original:** at BASIC " + _verdict_summary(goals.latency["basic"],
                                                                                         short=True)
            + "; at ALL " + _verdict_summary(goals.latency["all"], short=True) + ".",
            "- **Strictly faster where onnxruntime cannot fuse:** " + _verdict_summary(goals.latency["unfused"],
                                                                                     short=True) + ".",
        ]
    if goals.precision is not None:
        worse, compared, float16_ratios = goals.precision
        lines.append(f"- **Precision never worse than an anchor's offline fold** (RMS error ≤ {PRECISION_MARGIN:g}×, "
                     f"{compared} comparisons): {_goal(not worse)}.")
        if float16_ratios:
            lines.append(f"- **Better on float16:** the anchors' offline folds have {min(float16_ratios):.2f}× to "
                         f"{max(float16_ratios):.2f}× bnfold's RMS error ({len(float16_ratios)} comparisons).")
    return [*lines, ""]


def _goal_details(goals: _Goals) -> list[str]:
    """Each goal's verdict with every measurement behind it."""
    lines = []
    if goals.scale is not None:
        verdicts, splits = goals.scale
        lines.append("- **Faster than every anchor at every size** (scale curve, whole-command wall time; met where "
                     "every bnfold run beat every run of the anchor, interleaved with it; with three runs each, one "
                     "comparison of equal speeds in 20 still lands wholly on one side by chance): "
                     + _verdict_summary(verdicts) + ".")
        if splits:
            lines.append("- Where the time goes (median wall = imports + work + the rest: interpreter start-up and "
                         "exit): " + "; ".join(splits) + ".")
    if goals.latency:
        contended = sum(_contended(threads) for _, threads in goals.measured)
        confidence = _lowest_confidence(goals.measured)
        lines += [
            f"- Latency figures are medians over instances (fresh processes) with a confidence interval of at least "
            f"{confidence:.0%} in brackets. A goal counts as met or not met only where the whole interval lies on "
            "one side of its bound; otherwise the difference is within the measured noise. Where two speeds are "
            f"equal, one comparison in {2 / (1 - confidence):.0f} still lands wholly on the slower side by chance. "
            "Measurements in which, for half the instances or more, other processes kept "
            f"{CONTENDED_CORES:g} core or more busy in every round (marked ⚠; onnxruntime's threads then wait for a "
            f"core) are not judged: {contended} of {len(goals.measured)}.",
            f"- **Latency (2) within {GOAL_LATENCY_GAP:.0%} of (3)** (folded without onnxruntime's optimizations "
            "against the original with its BASIC fusions): " + _verdict_summary(goals.latency["gap"]) + ".",
            "- **Folded at least as fast as the original** (within noise: no difference measurable): at BASIC "
            + _verdict_summary(goals.latency["basic"]) + ". At ALL " + _verdict_summary(goals.latency["all"]) + ".",
            "- **Strictly faster where onnxruntime cannot fuse** (models marked so, folded against the original at "
            "BASIC; within noise: faster not shown): " + _verdict_summary(goals.latency["unfused"]) + ".",
        ]
    if goals.precision is not None:
        worse, compared, _ = goals.precision
        lines.append(f"- **Precision never worse than an anchor's offline fold** (bnfold's RMS error at most "
                     f"{PRECISION_MARGIN:g}× that of an anchor that folded batch norms of the same model; "
                     f"{compared} comparisons, see Precision): "
                     + (_goal(True) if not worse else f"{_goal(False)}: {', '.join(worse)}."))
    return ["## Goals in detail", "", *lines, ""] if lines else []


def _precision_verdicts(precision: list[dict[str, Any]]) -> tuple[list[str], int, list[float]]:
    """Comparisons where bnfold's error exceeds an offline fold's by the margin, how many were made, and the
    anchors' float16 errors as multiples of bnfold's."""
    worse, compared, float16_ratios = [], 0, []
    for entry in precision:
        errors = entry.get("errors", {})
        ours = errors.get("bnfold", {}).get("rms_relative_error")
        for tool, figures in errors.items():
            if not _folds_offline(tool, entry) or ours is None:
                continue
            compared += 1
            if entry["model"]["dtype"] == "float16":
                float16_ratios.append(figures["rms_relative_error"] / ours)
            if ours > PRECISION_MARGIN * figures["rms_relative_error"]:
                worse.append(f"{entry['model']['name']} vs {_label(tool)} "
                             f"({ours / figures['rms_relative_error']:.2f}×)")
    return worse, compared, float16_ratios


def _folds_offline(tool: str, entry: dict[str, Any]) -> bool:
    """Whether ``tool``'s figures on this precision entry are those of an offline fold to compare bnfold's
    with: an anchor that is no runtime folder, produced a model that ran, and folded at least one batch norm."""
    figures = entry.get("errors", {}).get(tool, {})
    left = entry.get("checks", {}).get(tool, {}).get("batchnorms")
    return (tool not in ("bnfold", "original", *RUNTIME_FOLDERS) and "rms_relative_error" in figures
            and left is not None and left < entry["model"]["batchnorms"])


def _measured(entry: dict[str, Any]) -> list[dict[str, Any]]:
    """The thread settings of a latency entry that were measured (on instances: earlier results lack them)."""
    return [threads for threads in entry.get("threads", []) if "instances" in threads]


def _contended(threads: dict[str, Any]) -> bool:
    """Whether other processes kept the cores busy during every round of half the instances or more, which
    the median over instances is no longer robust against."""
    spoiled = sum(instance["quiet_rounds"] == 0 for instance in threads["instances"])
    return 2 * spoiled >= len(threads["instances"])


def _lowest_confidence(measured: list[tuple[dict[str, Any], dict[str, Any]]]) -> float:
    return min((gain["confidence"] for _, threads in measured for gain in threads["gains"].values()), default=0.0)


def _latency_verdicts(measured: list[tuple[dict[str, Any], dict[str, Any]]], gain: str, bound: float,
                      scope: Any = lambda entry: True) -> dict[str, list[str]]:
    """Which measurements have ``gain`` below ``bound`` (its whole confidence interval), above it, or either."""
    verdicts: dict[str, list[str]] = {"met": [], "within noise": [], "not met": [], "not judged (⚠)": []}
    for entry, threads in measured:
        if not scope(entry):
            continue
        figures = threads["gains"][gain]
        if _contended(threads):
            verdict = "not judged (⚠)"
        else:
            verdict = "met" if figures["high"] < bound else "not met" if figures["low"] > bound else "within noise"
        verdicts[verdict].append(f"{entry['model']['name']} ({_threads(threads['threads'])}: {format_gain(figures)})")
    return verdicts


def _verdict_summary(verdicts: dict[str, list[str]], short: bool = False) -> str:
    """"met for K of N; within noise for ...; **not met** for ...", from labels by verdict ("met" first); the
    short form counts the labels instead of listing them."""
    total = sum(map(len, verdicts.values()))
    parts = [f"met for {len(verdicts['met'])} of {total}"]
    parts += [f"{_goal(False) if verdict == 'not met' else verdict} for "
              f"{_count(verdict, labels) if short else ', '.join(labels)}"
              for verdict, labels in verdicts.items() if verdict != "met" and labels]
    return "; ".join(parts)


def _count(verdict: str, labels: list[str]) -> str:
    """How many labels; for "not met", also what they measured (each label without its figures)."""
    if verdict != "not met":
        return str(len(labels))
    return f"{len(labels)} ({', '.join(dict.fromkeys(label.split(' (')[0] for label in labels))})"


def _threads(threads: int) -> str:
    return "1 thread" if threads == 1 else "default threads"


def _fit_exponent(points: list[tuple[float, float]]) -> float | None:
    """The slope of log(cost) against log(size): 1.0 is linear growth."""
    points = [(size, cost) for size, cost in points if size >= LINEARITY_MIN_BYTES and cost > 0]
    if len(points) < 2:
        return None
    xs = [math.log(size) for size, _ in points]
    ys = [math.log(cost) for _, cost in points]
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    spread = sum((x - mean_x) ** 2 for x in xs)
    return sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / spread if spread else None


def _scale(results: dict[str, Any], plots: dict[str, str], relative: str) -> list[str]:
    scale = results["scale"]
    if not scale:
        return ["## Fold time and memory against model size", "", "Not run.", ""]
    tools = [row["tool"] for row in scale[0]["tools"]]
    lines = [
        "## Fold time and memory against model size",
        "",
        "ResNet-101 layout (104 Conv+BN, exported by the TorchScript exporter) at widths giving 1 MB to the "
        "largest size; models of 2 GB and more keep their tensors in one external data file. Each cell is the "
        "median wall time of the whole command in a fresh process, and its multiple of the floor "
        "(`onnx.load` + `onnx.save`) measured in the same run.",
        "",
    ]
    for key in ("fold_time", "peak_memory"):
        if key in plots:
            lines += [f"![{key}]({relative}/{plots[key]})", ""]
    lines += _table(
        ["model", "MB", *(_label(tool) for tool in tools)],
        ([entry["model"]["name"], _mb(entry["model"]["bytes"]),
          *(_time_cell(_row(entry, tool)) for tool in tools)] for entry in scale))
    lines += ["Peak resident set (MiB) and its multiple of the model size:", ""]
    lines += _table(
        ["model", "MB", *(_label(tool) for tool in tools)],
        ([entry["model"]["name"], _mb(entry["model"]["bytes"]),
          *(_memory_cell(_row(entry, tool)) for tool in tools)] for entry in scale))
    lines += [f"Growth with size: the exponent k of a fit cost ∝ size^k over the models of "
              f"{LINEARITY_MIN_BYTES // 10**6} MB and more (1.0 = linear; work time excludes start-up and imports). "
              "The peak-memory fit leaves out models with external data, which tools may read tensor by tensor.",
              ""]
    rows = []
    for tool in tools:
        wall = _fit_exponent([(e["model"]["bytes"], _row(e, tool).get("wall_seconds", 0)) for e in scale])
        work = _fit_exponent([(e["model"]["bytes"], _row(e, tool).get("work_seconds", 0)) for e in scale])
        memory = _fit_exponent([(e["model"]["bytes"], _row(e, tool).get("peak_rss_mib", 0)) for e in scale
                                if not e["model"]["external_data"]])
        rows.append([_label(tool), *(f"{value:.2f}" if value is not None else "–" for value in (wall, work, memory))])
    lines += _table(["tool", "k (wall time)", "k (work time)", "k (peak RSS)"], rows)
    failures = [f"- {_label(row['tool'])} on {entry['model']['name']}: {_verdict(row)}" for entry in scale
                for row in entry["tools"] if row.get("verdict") not in ("equivalent", None)]
    if failures:
        lines += ["Outputs that were not equivalent, not valid, or not produced:", "", *failures, ""]
    return lines


def _time_cell(row: dict[str, Any]) -> str:
    if "wall_seconds" not in row:
        return row.get("verdict", "–")
    flag = "" if row.get("verdict") == "equivalent" else f" ({row.get('verdict')})"
    return f"{_seconds(row['wall_seconds'])} s ({_ratio(row.get('wall_vs_floor'))}){flag}"


def _memory_cell(row: dict[str, Any]) -> str:
    if "peak_rss_mib" not in row:
        return row.get("verdict", "–")
    return f"{row['peak_rss_mib']:.0f} ({row['peak_rss_vs_model']:.1f}×)"


def _tools(results: dict[str, Any]) -> list[str]:
    tools = results["tools"]
    if not tools:
        return ["## Every tool on the benchmark models", "", "Not run.", ""]
    lines = [
        "## Every tool on the benchmark models",
        "",
        "What each tool leaves and whether its output is right: batch norms and nodes before → after, output size, "
        "and the check of the output (`onnx.checker` full check, then `bnfold.onnx.verify.verify` against the "
        "original at `ORT_DISABLE_ALL` on 2 random inputs; the percentage is how much of the default float32 "
        "tolerance the largest difference used). Times are the median whole-command wall time (× the floor).",
        "",
    ]
    names = [row["tool"] for row in tools[0]["tools"] if row["tool"] != "floor"]
    total_bn = sum(entry["model"]["batchnorms"] for entry in tools)
    total_nodes = sum(entry["model"]["nodes"] for entry in tools)
    summary = []
    for tool in names:
        rows = [_row(entry, tool) for entry in tools]
        summary.append([_label(tool), f"{sum(row.get('batchnorms', 0) for row in rows)} of {total_bn}",
                        f"{sum(row.get('nodes', 0) for row in rows)} of {total_nodes}",
                        f"{sum(row.get('verdict') == 'equivalent' for row in rows)} of {len(rows)}"])
    lines += ["Over all these models:", "", *_table(["tool", "batch norms left", "nodes left", "outputs equivalent"],
                                                   summary)]
    for entry in tools:
        model = entry["model"]
        lines += [f"**{model['name']}** — {model['shows']}; {_mb(model['bytes'])} MB, {model['batchnorms']} BN, "
                  f"{model['nodes']} nodes.", ""]
        lines += _table(
            ["tool", "wall s (× floor)", "work s", "peak MiB", "BN left", "nodes", "output MB", "check"],
            ([row["label"], _time_cell(row) if "wall_seconds" in row else "–",
              _seconds(row.get("work_seconds")), f"{row['peak_rss_mib']:.0f}" if "peak_rss_mib" in row else "–",
              str(row.get("batchnorms", "–")), f"{model['nodes']} → {row.get('nodes', '–')}",
              _mb(row["bytes"]) if "bytes" in row else "–", _verdict(row)]
             for row in entry["tools"]))
    return lines


def _verify(results: dict[str, Any]) -> list[str]:
    entries = results["verify"]
    if not entries:
        return []
    lines = [
        "## Cost of --verify",
        "",
        "`fold_onnx(verify=True)`'s verification stage against what it fundamentally needs: creating an "
        "onnxruntime session (`ORT_DISABLE_ALL`) for the original and for the folded model from their files, "
        "and running each once per iteration, measured in a fresh process of its own (as verification runs in one: "
        "a process's first sessions cost more than later ones). The stage begins by computing the folded weights "
        "the fold deferred to the write (onnxruntime computes with them in place, and the write then saves them "
        "as they are): that is the fold's own work done earlier, shown apart and left out of the ratio.",
        "",
    ]
    rows = []
    for entry in entries:
        if "error" in entry:
            rows.append([entry["model"]["name"], entry["error"], "", "", "", "", ""])
            continue
        rows.append([entry["model"]["name"], str(entry["iterations"]), _seconds(entry["stages"]["verify"]),
                     f"{_seconds(entry.get('verify_weights_seconds'))} + {_seconds(entry['verify_session_seconds'])}"
                     f" + {_seconds(entry['verify_run_seconds'])}",
                     _seconds(entry["baseline_seconds"]),
                     f"{_seconds(entry['baseline_session_seconds'])} + {_seconds(entry['baseline_run_seconds'])}",
                     _ratio(entry["verify_vs_baseline"])])
    return lines + _table(["model", "iterations", "verify s", "of which weights + sessions + runs",
                           "2 sessions + 2 runs/it. s",
                           "sessions + runs", "(verify − weights) ÷ baseline"], rows)


def _latency(results: dict[str, Any], plots: dict[str, str], relative: str) -> list[str]:
    entries = results["latency"]
    if not entries:
        return ["## Inference latency", "", "Not run.", ""]
    lines = [
        "## Inference latency",
        "",
        "onnxruntime CPU latency in milliseconds for the original and the bnfold-folded model at each graph "
        "optimization level. Each thread setting is measured on several instances, fresh processes with their own "
        "six sessions run interleaved in rounds (see Method); a cell is the median over the instances of each "
        "instance's median run, in brackets the confidence interval of that median (with five instances, the "
        "lowest to the highest instance). Gains are folded ÷ original − 1 (negative is faster), taken within each "
        "instance and summarised the same way: a gain whose interval spans 0 is within the noise. (2) vs (3) asks "
        "whether folding offline gives everything onnxruntime's own BASIC fusions give.",
        "",
    ]
    for key in ("latency_1", "latency_0"):
        if key in plots:
            lines += [f"![{key}]({relative}/{plots[key]})", ""]
    for entry in entries:
        model = entry["model"]
        lines.append(f"**{model['name']}** — {model['shows']}. onnxruntime fuses its batch norms itself: "
                     f"{'yes' if model.get('ort_fuses', True) else 'no'}.")
        if "error" in entry:
            lines += ["", f"Not measured: {entry['error']}.", ""]
            continue
        folded = entry["folded"]
        lines += [f"File {_mb(model['bytes'])} → {_mb(folded['bytes'] or 0)} MB, nodes {model['nodes']} → "
                  f"{folded['nodes']}, batch norms {model['batchnorms']} → {folded['batchnorms']}.", ""]
        measured = _measured(entry)
        if measured:
            lines += ["", *_table(["configuration", *(f"{_threads(t['threads'])}{' ⚠' if _contended(t) else ''}"
                                                      for t in measured)], _latency_rows(measured))]
        for threads in entry["threads"]:
            if "error" in threads:
                lines += [f"{_threads(threads['threads'])}: not measured ({threads['error']}).", ""]
            elif "instances" not in threads:
                lines += [f"{_threads(threads['threads'])}: measured by an earlier method; rerun the latency section.",
                          ""]
    return lines


def _latency_rows(measured: list[dict[str, Any]]) -> list[list[str]]:
    def latency(figures: dict[str, float]) -> str:
        return f"{figures['median']:.2f} ({figures['low']:.2f}–{figures['high']:.2f})"

    def creations(threads: dict[str, Any], role: str) -> str:
        return " / ".join(_seconds(threads["session_seconds"][f"{role}/{level}"]) for level in ("disabled", "basic",
                                                                                               "all"))

    def rounds(threads: dict[str, Any]) -> str:
        return (f"{len(threads['instances'])} × {min(threads['rounds'])}–{max(threads['rounds'])}; "
                f"{sum(threads['quiet_rounds'])} of {sum(threads['rounds'])}; {min(threads['runs'].values())}; "
                f"{threads['other_processes_cores']:.2f}")

    return [
        *([label, *(latency(t["latency_ms"][key]) for t in measured)] for key, label in LATENCY_CONFIGS),
        *([label, *(format_gain(t["gains"][gain]) for t in measured)] for gain, label in LATENCY_GAINS),
        ["session creation, original (DISABLE / BASIC / ALL) s", *(creations(t, "original") for t in measured)],
        ["session creation, folded (DISABLE / BASIC / ALL) s", *(creations(t, "folded") for t in measured)],
        ["instances × rounds; quiet rounds; timed runs per configuration; cores other processes kept busy",
         *(rounds(t) for t in measured)],
    ]


def _precision(results: dict[str, Any]) -> list[str]:
    entries = results["precision"]
    if not entries:
        return ["## Precision", "", "Not run.", ""]
    tools = ["original", *(tool.name for tool in FOLDERS)]
    lines = [
        "## Precision",
        "",
        "RMS error of each model's output relative to the RMS of the exact output, where exact is the original "
        "model evaluated in float64 (see Method); the unfolded original run in its own dtype is the first "
        "column. In brackets: the tool's error ÷ bnfold's (above 1: bnfold is more precise), or why there is no "
        "fold to compare: a tool that left every batch norm in place (no BN folded) or whose error is the "
        "original's to the last bit (nothing folded) computes what the original does.",
        "",
        "How to read the float16 rows: any offline fold must store the folded weights W·s in float16, one "
        "rounding the original never makes, so a folded float16 model is less precise than the unfolded one. "
        "The question is how much: folding in the model's dtype (onnxruntime, onnxscript, onnxslim) rounds "
        "s, then W·s and the bias terms in float16; bnfold folds in float64 and rounds once. onnxoptimizer is "
        "no offline fold: it leaves the arithmetic as Cast/Add/Sqrt/Div/Mul nodes evaluated at every run, and "
        "onnxruntime's CPU provider runs those float16 nodes through inserted casts to float32, so its weights "
        "are never rounded to float16 and it shows the unfolded original's error, at the price of the extra nodes "
        "in the Tools table.",
        "",
    ]
    rows = []
    for entry in entries:
        errors = entry.get("errors", {})
        ours = errors.get("bnfold", {}).get("rms_relative_error")
        cells = []
        for tool in tools:
            figures = errors.get(tool)
            if figures is None:
                check = entry.get("checks", {}).get(tool, {})
                cells.append(check.get("verdict", "–") if check else "–")
            elif "error" in figures:
                cells.append(f"fails: {figures['error'][:80].replace('|', '/')}")
            elif tool in ("original", "bnfold") or not ours:
                cells.append(_sci(figures["rms_relative_error"]))
            elif entry.get("checks", {}).get(tool, {}).get("batchnorms") == entry["model"]["batchnorms"] > 0:
                cells.append(f"{_sci(figures['rms_relative_error'])} (no BN folded)")
            elif figures["rms_relative_error"] == errors.get("original", {}).get("rms_relative_error"):
                # Bit for bit the original's error: the tool changed none of the arithmetic (affine_chain has
                # no BN, and onnxscript and onnxoptimizer fold no Mul/Add into a MatMul).
                cells.append(f"{_sci(figures['rms_relative_error'])} (nothing folded)")
            elif tool in RUNTIME_FOLDERS:
                cells.append(f"{_sci(figures['rms_relative_error'])} (runtime fold)")
            else:
                cells.append(f"{_sci(figures['rms_relative_error'])} ({figures['rms_relative_error'] / ours:.2f})")
        rows.append([entry["model"]["name"].removesuffix("_fp16"), entry["model"]["dtype"], *cells])
    lines += _table(["model", "dtype", *(("unfolded original" if tool == "original" else _label(tool))
                                         for tool in tools)], rows)
    checks = [f"- {entry['model']['name']}, {_label(tool)}: {_verdict(check)}" for entry in entries
              for tool, check in entry.get("checks", {}).items() if check.get("verdict") not in ("equivalent", None)]
    if checks:
        lines += ["float16 outputs that were not equivalent or not produced:", "", *checks, ""]
    return lines


def _profile(results: dict[str, Any]) -> list[str]:
    profile = results["profile"]
    if not profile:
        return []
    lines = [
        "## Where bnfold's fold time and memory go",
        "",
        f"`bnfold fold --no-verify` on {profile['model']['name']} ({_mb(profile['model']['bytes'])} MB).",
        "",
    ]
    memory = profile.get("memory", {})
    if "stages" in memory:
        lines += [f"Stages (a thread sampling the resident set and the main thread's stack every 10 ms; "
                  f"{_seconds(memory['total_seconds'])} s, peak {memory['peak_rss_mib']:.0f} MiB):", ""]
        lines += _table(["stage", "s", "RSS MiB low → high"],
                        ([f"`{stage['stage']}`", _seconds(stage["seconds"]),
                          f"{stage['rss_low_mib']:.0f} → {stage['rss_high_mib']:.0f}"]
                         for stage in memory["stages"] if stage["seconds"] >= 0.01))
    cprofile = profile.get("cprofile", {})
    if "own_time" in cprofile:
        lines += [f"cProfile ({_seconds(cprofile['total_seconds'])} s under the profiler), most time of their own:",
                  ""]
        lines += _table(["function", "calls", "s"], ([f"`{item['function']}`", str(item["calls"]),
                                                      _seconds(item["seconds"])] for item in cprofile["own_time"]))
        lines += ["bnfold's functions by cumulative time:", ""]
        lines += _table(["function", "calls", "s"], ([f"`{item['function']}`", str(item["calls"]),
                                                      _seconds(item["seconds"])]
                                                     for item in cprofile["bnfold_cumulative"]))
    return lines


def _method(results: dict[str, Any]) -> list[str]:
    run = results["run"] or {}
    mode = run.get("mode", {})
    return [
        "## Method",
        "",
        "- **Models** are built in code from `tests.support.zoo` and `bench/models.py` with seed 0 (random weights,"
        " random non-trivial BN statistics; nothing is downloaded) and exported by the TorchScript exporter at "
        "opset 17 with every BatchNorm kept (`TrainingMode.PRESERVE`). The float16 variants convert every float "
        "initializer, Constant and graph type of the float32 export.",
        "- **Processes:** every tool run, check and measurement is a fresh `python -m bench.worker` process. Wall "
        "time is the whole process as a user would wait for it; work time excludes interpreter start-up and the "
        "tool's imports. Peak memory is the process's own `VmHWM`, read as it exits: on Linux a child's "
        "`ru_maxrss` (`wait4`, `RUSAGE_CHILDREN`, even its own `RUSAGE_SELF`) inherits the resident set of the "
        "process it was forked from, which would add the benchmark driver's memory to every tool. The parent "
        "waits for each child blocking, not by polling (polls would round times up to 50 ms), and compiles the "
        "bytecode of bnfold's checkout first, as `pip install` does for an installed package.",
        f"- **Repeats:** {mode.get('repeats', '?')} rounds per model up to 1 GB (at most two above), tools interleaved "
        "within each round; medians are reported.",
        "- **Anchors as their users run them:** onnxruntime's offline optimizer is a session at `ORT_ENABLE_BASIC` "
        "with `optimized_model_filepath` (external initializers for models over 2 GB); onnxscript is "
        "`rewriter.rewrite` with its three batch-norm rules on an `onnx_ir` model loaded from the file and "
        "saved with `onnx_ir.save`; onnxoptimizer runs only `fuse_bn_into_conv` (which removes the BN but leaves "
        "the arithmetic as runtime nodes); onnxslim runs `slim()` with its defaults. bnfold runs "
        "`bnfold fold IN -o OUT --no-verify` (plus `--standalone mul-add` on standalone_bn and `--standalone conv` "
        "on standalone_bn_conv, the same model, the one where its opt-in rewrites apply).",
        "- **Equivalence** of every output is checked with `bnfold.onnx.verify.verify` against the original, both at "
        "`ORT_DISABLE_ALL` (so onnxruntime's own fusions cannot hide a wrong fold), after `onnx.checker`'s full "
        "check. A tool that crashes, times out, writes an invalid model or a different function is reported so.",
        f"- **Latency:** per model and thread setting (intra-op threads 1, and onnxruntime's default; inter-op "
        f"threads 1), {mode.get('latency_instances', '?')} instances, each a fresh process holding six sessions "
        "(original and folded at three levels), the thread settings alternating. Why instances: two sessions of "
        "one model and level keep different speeds for as long as they live (on the 167 MB MLP at 1 thread, "
        "identical sessions in one process: 11.1 to 12.7 ms; the spread collapses when the weights are put on huge "
        "pages, so it is where they land in memory), and a process can start in a bad moment. In an instance, a "
        "throwaway session first takes onnxruntime's one-time costs, the six are created in random order (creation"
        " time: the median over instances), warmed up by two runs each, then run in rounds, each in a new random "
        f"order, for about {mode.get('latency_seconds', '?')} s per thread setting in all (at least "
        f"{mode.get('latency_rounds', ['?'])[0]} round per instance). In a round every session makes untimed "
        "settling runs (2, and at default threads at least 0.1 s: the threads of the session that ran before spin "
        "for about 50 ms and halve the next one's speed), then a timed block of at least 3 runs and 0.05 s. "
        "Rounds during which other processes kept half a core busy are dropped when the instance has quieter "
        "ones. An instance's latency per configuration is the median of its timed runs, and its gains are ratios "
        "of those, paired within the instance. Across instances: the median, and the confidence interval for the "
        "median from order statistics, [x(j), x(n+1−j)] covering it with probability 1 − 2·P(Binomial(n, ½) < j) "
        "(the deepest j keeping 90%; with 5 instances the lowest to the highest, 94%): it needs no assumption on "
        "the shape of the noise, which here has long tails (a busy neighbour slows a 2-thread run threefold). "
        "Goals are judged on that interval, so a difference smaller than the measured noise is reported as such.",
        "- **Precision ground truth:** the original model with every float tensor and type converted to float64 "
        "(exact for float32 and float16 values) and run by `onnx.reference`, on the same inputs (rounded to the "
        f"model's dtype first), {mode.get('precision_inputs', '?')} standard-normal inputs per model. Candidates run"
        " under onnxruntime at `ORT_DISABLE_ALL` in their own dtype.",
        "- **--verify cost** is taken on the headline scale model (a 32×32 input: session creation dominates) and "
        f"on {', '.join(mode.get('verify_cases', [])) or 'no other model'} (runs dominate); the **profile** on the "
        "headline scale model.",
        "",
    ]


# --- plots -----------------------------------------------------------------------------------------

def _plots(out: Path, results: dict[str, Any]) -> dict[str, str]:
    """PNG files written into ``out``: name -> file name. None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return {}
    plots = {}
    scale = results["scale"]
    if scale:
        tools = [row["tool"] for row in scale[0]["tools"]]
        for key, field, ylabel in (("fold_time", "wall_seconds", "wall time of the command (s)"),
                                   ("peak_memory", "peak_rss_mib", "peak resident set (MiB)")):
            figure, axes = plt.subplots(figsize=(7.5, 5))
            for tool in tools:
                points = [(entry["model"]["bytes"] / 1e6, _row(entry, tool)[field]) for entry in scale
                          if field in _row(entry, tool)]
                if points:
                    style = {"linewidth": 2.5, "color": "black"} if tool == "bnfold" else {}
                    style = {"linestyle": "--", "color": "grey"} if tool == "floor" else style
                    axes.plot(*zip(*points, strict=True), marker="o", label=_label(tool), **style)
            if key == "peak_memory":
                sizes = [entry["model"]["bytes"] / 1e6 for entry in scale]
                axes.plot(sizes, [size * 1e6 * GOAL_MEMORY_RATIO / 2**20 for size in sizes], linestyle=":",
                          color="red", label=f"{GOAL_MEMORY_RATIO:g}× model size")
            axes.set_xscale("log")
            axes.set_yscale("log")
            axes.set_xlabel("model size (MB)")
            axes.set_ylabel(ylabel)
            axes.set_title(f"{'Fold time' if key == 'fold_time' else 'Peak memory'} against model size")
            axes.grid(True, which="both", alpha=0.3)
            axes.legend()
            figure.tight_layout()
            figure.savefig(out / f"{key}_vs_size.png", dpi=110)
            plt.close(figure)
            plots[key] = f"{key}_vs_size.png"
    latency = results["latency"]
    if latency:
        for threads in (1, 0):
            measured = [(entry["model"]["name"], t) for entry in latency for t in _measured(entry)
                        if t["threads"] == threads]
            if not measured:
                continue
            figure, axes = plt.subplots(figsize=(max(7.5, 1.3 * len(measured)), 5))
            width = 0.8 / len(LATENCY_CONFIGS)
            for index, (key, label) in enumerate(LATENCY_CONFIGS):
                # Divided by the original at DISABLE_ALL; the whiskers are each configuration's confidence interval.
                ratios = [{bound: t["latency_ms"][key][bound] / t["latency_ms"]["original/disabled"]["median"]
                           for bound in ("median", "low", "high")} for _, t in measured]
                values = [figures["median"] for figures in ratios]
                whiskers = [[figures["median"] - figures["low"] for figures in ratios],
                            [figures["high"] - figures["median"] for figures in ratios]]
                axes.bar([position + (index - 2.5) * width for position in range(len(measured))], values, width,
                         yerr=whiskers, capsize=2, label=label)
            axes.set_xticks(range(len(measured)), [name for name, _ in measured], rotation=20)
            axes.axhline(1.0, color="grey", linewidth=0.8)
            axes.set_ylabel("latency ÷ original at DISABLE_ALL")
            axes.set_title(f"onnxruntime CPU latency, {_threads(threads)}")
            axes.legend(fontsize=8, ncol=3)
            figure.tight_layout()
            figure.savefig(out / f"latency_{'1_thread' if threads == 1 else 'default_threads'}.png", dpi=110)
            plt.close(figure)
            plots[f"latency_{threads}"] = f"latency_{'1_thread' if threads == 1 else 'default_threads'}.png"
    return plots
