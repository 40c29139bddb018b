"""Fold speed and memory: every tool on the same models, against the onnx load+save floor of the same run.

For each model, the tools run in turn (floor, bnfold, the anchors), ``repeats`` rounds interleaved so that a
change in background load hits every tool alike; each run is a fresh worker process. Figures per tool: wall
time of the whole process (what a user waits for), the time of the work alone (excluding interpreter start
and imports), and the peak resident set. After the last round each output is checked: batch norms and nodes
left, ``onnx.checker``, and equivalence with the original under onnxruntime at ``ORT_DISABLE_ALL``
(:func:`bnfold.onnx.verify.verify.verify_onnx`, which falls back to ``onnx.reference`` where onnxruntime lacks
a kernel).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from bench.harness import ChildRun, median, model_bytes, run_child
from bench.models import BuiltModel
from bench.tools import BNFOLD, FLOOR, FOLDERS, Tool

# Every tool gets this long per run, plus time in proportion to the model (2.5 GB: about 8 minutes).
TIMEOUT_SECONDS = 120
TIMEOUT_SECONDS_PER_GB = 140

VERDICT_EQUIVALENT = "equivalent"
VERDICT_WRONG = "WRONG"
VERDICT_INVALID = "invalid model"
VERDICT_FAILED = "failed"
VERDICT_SKIPPED = "skipped"


def timeout_for(model: BuiltModel) -> float:
    return TIMEOUT_SECONDS + TIMEOUT_SECONDS_PER_GB * model.bytes / 1e9


def output_path(model: BuiltModel, tool: Tool, out_root: Path) -> Path:
    return out_root / model.name / tool.name / "model.onnx"


def measure_model(model: BuiltModel, tools: tuple[Tool, ...], repeats: int, out_root: Path, scratch: Path,
                  log: Any) -> list[dict[str, Any]]:
    """Fold ``model`` with each tool ``repeats`` times (interleaved) and check each output once. Outputs are
    left in ``out_root/<model>/<tool>/`` for later sections; the caller removes them."""
    rows: dict[str, dict[str, Any]] = {}
    for tool in tools:
        missing, cannot = tool.missing(), tool.cannot_fold(model.bytes)
        rows[tool.name] = {"tool": tool.name, "label": tool.label, "runs": [],
                           **({"verdict": VERDICT_SKIPPED, "detail": missing} if missing else {}),
                           **({"verdict": VERDICT_FAILED, "detail": cannot} if cannot and not missing else {})}
    for _ in range(repeats):
        for tool in tools:
            row = rows[tool.name]
            if "verdict" in row:
                continue
            target = output_path(model, tool, out_root)
            shutil.rmtree(target.parent, ignore_errors=True)
            target.parent.mkdir(parents=True)
            # The previous run's output may still be in the page cache waiting to be written back; flushed
            # during this run, it would slow this tool down for the one before it (by seconds at 600 MB).
            os.sync()
            child = run_child("fold", [tool.name, model.path, target, "1" if model.external else "0",
                                       json.dumps(model.fold_options if tool is BNFOLD else {})],
                              scratch, timeout_for(model))
            if child.failure is not None:
                shutil.rmtree(target.parent, ignore_errors=True)
                row.update(verdict=VERDICT_FAILED, detail=child.failure)
                log(f"    {tool.name}: FAILED ({child.failure})")
                continue
            row["runs"].append(_run_figures(child))
    for tool in tools:
        row = rows[tool.name]
        if "verdict" not in row:
            row.update(_summary(row["runs"]))
            row.update(check_output(model, output_path(model, tool, out_root), scratch))
            log(f"    {tool.name:14} {row['wall_seconds']:7.2f} s  work {row['work_seconds']:7.2f} s  "
                f"peak {row['peak_rss_mib']:7.0f} MiB  BN {model.batchnorms}->{row.get('batchnorms', '?')}  "
                f"{row['verdict']}")
    return list(rows.values())


def _run_figures(child: ChildRun) -> dict[str, float]:
    result = child.result
    return {"wall_seconds": child.wall_seconds, "work_seconds": result["work_seconds"],
            "import_seconds": result["import_seconds"], "peak_rss_mib": child.peak_rss_mib,
            "import_peak_rss_mib": result["import_peak_rss_mib"]}


def _summary(runs: list[dict[str, float]]) -> dict[str, float]:
    return {key: median([run[key] for run in runs]) for key in runs[0]}


def check_output(model: BuiltModel, candidate: Path, scratch: Path) -> dict[str, Any]:
    child = run_child("check", [model.path, candidate], scratch, timeout_for(model))
    if child.failure is not None and "verdict" not in child.result:
        return {"verdict": VERDICT_FAILED, "detail": f"the check itself failed: {child.failure}"}
    child.result.pop("peak_rss_mib")  # the checker's own, not the tool's
    return child.result


def check(args: list[str]) -> dict[str, Any]:
    """Worker task ``check ORIGINAL CANDIDATE``: what the candidate left, and whether it is valid and
    equivalent to the original."""
    import onnx

    from bnfold.errors import InputError
    from bnfold.onnx.verify.verify import verify_onnx

    original, candidate = (Path(arg) for arg in args)
    model = onnx.load(candidate, load_external_data=False)
    result: dict[str, Any] = {
        "batchnorms": sum(node.op_type == "BatchNormalization" for node in model.graph.node),
        "nodes": len(model.graph.node),
        "bytes": model_bytes(candidate),
    }
    del model
    try:
        onnx.checker.check_model(str(candidate), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as error:
        return {**result, "verdict": VERDICT_INVALID, "detail": f"onnx.checker: {_first_line(error)}"}
    try:
        report = verify_onnx(original, candidate, iterations=2, seed=0)
    except InputError as error:
        return {**result, "verdict": VERDICT_INVALID, "detail": _first_line(error)}
    worst = max(report.outputs, key=lambda output: output.max_abs_error / max(output.atol, 1e-300))
    return {
        **result,
        "verdict": VERDICT_EQUIVALENT if report.passed else VERDICT_WRONG,
        "engine": report.engine,
        "max_abs_error": worst.max_abs_error,
        # How much of bnfold's default tolerance the worst output used (1.0 = at the limit).
        "tolerance_used": worst.max_abs_error / worst.atol if worst.atol else None,
    }


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:300]


def floor_ratios(rows: list[dict[str, Any]]) -> None:
    """Add each tool's time as a multiple of the floor's, wall to wall and work to work, in place."""
    floor = next((row for row in rows if row["tool"] == FLOOR.name and "wall_seconds" in row), None)
    if floor is None:
        return
    for row in rows:
        if "wall_seconds" in row:
            row["wall_vs_floor"] = row["wall_seconds"] / floor["wall_seconds"]
            row["work_vs_floor"] = row["work_seconds"] / floor["work_seconds"]


def measure_models(models: list[BuiltModel], repeats_for: Any, out_root: Path, scratch: Path, log: Any,
                   keep_outputs: bool, tools: tuple[Tool, ...] = (FLOOR, *FOLDERS)) -> list[dict[str, Any]]:
    """:func:`measure_model` for each model with ``tools``; one result entry per model."""
    entries = []
    for model in models:
        log(f"  {model.name} ({model.bytes / 1e6:.1f} MB, {model.batchnorms} BN)")
        rows = measure_model(model, tools, repeats_for(model), out_root, scratch, log)
        floor_ratios(rows)
        for row in rows:
            if "peak_rss_mib" in row:
                row["peak_rss_vs_model"] = row["peak_rss_mib"] * 2**20 / model.bytes
                row["peak_above_imports_vs_model"] = (
                    (row["peak_rss_mib"] - row["import_peak_rss_mib"]) * 2**20 / model.bytes)
        entries.append({"model": model.to_dict(), "tools": rows})
        if not keep_outputs:
            shutil.rmtree(out_root / model.name, ignore_errors=True)
    return entries


def verify_cost(args: list[str]) -> dict[str, Any]:
    """Worker task ``verify-cost SOURCE OPTIONS_JSON ITERATIONS FOLDED``: what ``fold_onnx(verify=True)`` spends
    on verification; the folded model is written to FOLDED for :func:`verify_baseline`."""
    from bnfold import fold_onnx

    source, options, iterations, folded = Path(args[0]), json.loads(args[1]), int(args[2]), Path(args[3])
    started = time.perf_counter()
    result = fold_onnx(source, verify=True, iterations=iterations, **options)
    total = time.perf_counter() - started
    verification = result.report.verification
    assert verification is not None
    result.write(folded)
    return {
        "fold_total_seconds": total,
        "stages": dict(result.report.seconds),
        "verify_weights_seconds": verification.seconds.get("weights"),
        "verify_session_seconds": verification.seconds.get("session"),
        "verify_run_seconds": verification.seconds.get("run"),
        "iterations": iterations,
    }


def verify_baseline(args: list[str]) -> dict[str, Any]:
    """Worker task ``verify-baseline SOURCE FOLDED ITERATIONS``: what two onnxruntime sessions (original and
    folded, ``ORT_DISABLE_ALL``) cost to create and to run once per iteration. A process of its own, like
    the verification it is compared with: a process's first sessions cost more than later ones."""
    import onnxruntime as ort

    from bench.latency import random_feeds

    source, folded, iterations = Path(args[0]), Path(args[1]), int(args[2])
    session_options = ort.SessionOptions()
    session_options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session_seconds, run_seconds = 0.0, 0.0
    for path in (source, folded):
        created = time.perf_counter()
        session = ort.InferenceSession(str(path), session_options, providers=["CPUExecutionProvider"])
        session_seconds += time.perf_counter() - created
        feeds = random_feeds(session)
        # Verification's runs include each session's first, which allocates; so do these.
        for _ in range(iterations):
            ran = time.perf_counter()
            session.run(None, feeds)
            run_seconds += time.perf_counter() - ran
        del session
    return {"baseline_session_seconds": session_seconds, "baseline_run_seconds": run_seconds,
            "baseline_seconds": session_seconds + run_seconds}
