"""The benchmark in one command: ``python -m bench [--quick]`` (see BENCHMARKS.md for what it measures).

Builds the models in code, runs every section, writes ``<out>/*.json`` and the plots, and regenerates the
report. Large temporary models go to a scratch directory outside the repository (``--scratch``, default the
system temporary directory), removed at the end.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench import fold_speed, latency, report
from bench.harness import REPO, compile_bytecode, machine, run_child
from bench.models import BuiltModel, describe, float16_variant
from bench.tools import BNFOLD, FLOOR, FOLDERS

SECTIONS = ("tools", "latency", "precision", "scale")
# Larger models are folded twice per tool, not three times: a round costs 45 s at 600 MB and 75 s at 2.5 GB
# (the full run must stay near 15 minutes). Once would leave a figure to chance: on this machine the kernel's
# share of a 600 MB fold varies from 0.4 s to 2 s between runs.
REPEAT_LIMIT_BYTES = 5 * 10**8
LARGE_MODEL_REPEATS = 2
DISK_MARGIN = 8  # a scale point needs the model, six outputs and a staging copy on disk at once


@dataclass(frozen=True)
class Mode:
    """What one kind of run measures. ``latency_cases`` must be among ``cases``: the latency section times the
    folded models the tools section wrote."""

    name: str
    cases: tuple[str, ...]
    latency_cases: tuple[str, ...]
    precision_cases: tuple[str, ...]
    scale_mb: tuple[float, ...]
    headline_mb: float  # the scale point the headline figures, the --verify cost and the profile are taken on
    verify_cases: tuple[str, ...]  # models whose runs, not their session creation, dominate --verify
    repeats: int
    latency_instances: int  # fresh processes per model and thread setting, each with its own six sessions
    latency_seconds: float  # of rounds per model and thread setting, split among its instances
    latency_rounds: tuple[int, int]  # per instance: at least, at most
    precision_inputs: int
    verify_iterations: int


FULL = Mode(
    name="full",
    cases=("resnet50", "mobilenet_v2", "densenet121", "unet", "mlp", "bn_before_conv", "affine_chain",
           "standalone_bn", "standalone_bn_conv"),
    latency_cases=("resnet50", "mobilenet_v2", "unet", "mlp", "bn_before_conv", "affine_chain", "standalone_bn",
                   "standalone_bn_conv"),
    precision_cases=("resnet50", "mobilenet_v2", "unet", "mlp", "bn_before_conv", "affine_chain", "standalone_bn"),
    scale_mb=(1, 4, 16, 64, 200, 600, 2500),
    headline_mb=200,
    verify_cases=("resnet50",),
    repeats=3,
    latency_instances=5,
    latency_seconds=10,
    latency_rounds=(1, 100),
    precision_inputs=3,
    verify_iterations=3,
)
QUICK = Mode(
    name="quick",
    cases=("mobilenet_v2", "bn_before_conv"),
    # Two latency cases and three scale sizes took 2.5 minutes on a slower 2-core machine.
    latency_cases=("bn_before_conv",),
    precision_cases=("bn_before_conv",),
    scale_mb=(1, 64),
    headline_mb=64,
    verify_cases=("mobilenet_v2",),
    repeats=1,
    latency_instances=3,
    latency_seconds=3,
    latency_rounds=(1, 20),
    precision_inputs=2,
    verify_iterations=3,
)


class Bench:
    """One benchmark run: its mode, directories and log."""

    def __init__(self, mode: Mode, out: Path, scratch: Path) -> None:
        self.mode = mode
        self.out = out
        self.scratch = scratch
        self.models_dir = scratch / "models"
        self.outputs_dir = scratch / "outputs"
        self.verify_entries: list[dict[str, Any]] = []
        self.started = time.perf_counter()

    def log(self, message: str) -> None:
        print(f"[{time.perf_counter() - self.started:6.0f} s] {message}", flush=True)

    def build(self, requests: list[str]) -> list[BuiltModel]:
        child = run_child("build", [self.models_dir, *requests], self.scratch, timeout=600 + 60 * len(requests))
        if child.failure is not None:
            raise RuntimeError(f"building {', '.join(requests)} failed: {child.failure}")
        return [describe(Path(entry.pop("path")), **entry) for entry in child.result["models"]]

    def repeats_for(self, model: BuiltModel) -> int:
        return self.mode.repeats if model.bytes <= REPEAT_LIMIT_BYTES else min(self.mode.repeats, LARGE_MODEL_REPEATS)

    def save(self, name: str, payload: Any) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"{name}.json").write_text(results_json(payload))


def results_json(payload: list[Any] | dict[str, Any]) -> str:
    """The results as the repository keeps them: one line per entry of a list (per key of a dict), so that a
    rerun's diff is a line per model, not one per number. Floats keep every digit: the report compares some
    exactly (an error equal to the original's means nothing was folded)."""
    if isinstance(payload, list):
        brackets, lines = "[]", [json.dumps(entry, default=_json_default) for entry in payload]
    else:
        brackets = "{}"
        lines = [f"{json.dumps(key)}: {json.dumps(value, default=_json_default)}" for key, value in payload.items()]
    return brackets[0] + "\n" + ",\n".join(" " + line for line in lines) + "\n" + brackets[1] + "\n"


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot serialize {type(value).__name__}")


def run_tools(bench: Bench, cases: dict[str, BuiltModel]) -> dict[str, dict[str, Any]]:
    """Every tool on every case model; the outputs stay for the latency and precision sections."""
    bench.log("tools: fold time, memory, what is left, equivalence")
    entries = fold_speed.measure_models([cases[name] for name in bench.mode.cases], bench.repeats_for,
                                        bench.outputs_dir, bench.scratch, bench.log, keep_outputs=True)
    bench.save("tools", entries)
    for name in bench.mode.verify_cases:
        _verify_cost(bench, cases[name])
    return {entry["model"]["name"]: entry for entry in entries}


def run_latency(bench: Bench, cases: dict[str, BuiltModel], tool_entries: dict[str, dict[str, Any]]) -> None:
    bench.log("latency: onnxruntime CPU, original vs bnfold-folded")
    entries = []
    for name in bench.mode.latency_cases:
        bench.log(f"  {name}")
        bnfold_row = next(row for row in tool_entries[name]["tools"] if row["tool"] == BNFOLD.name)
        if bnfold_row.get("verdict") != fold_speed.VERDICT_EQUIVALENT:
            entries.append({"model": cases[name].to_dict(), "error": f"bnfold's output is {bnfold_row.get('verdict')}"})
            continue
        folded = fold_speed.output_path(cases[name], BNFOLD, bench.outputs_dir)
        entries.append(latency.measure_model(cases[name], folded, bnfold_row, bench.mode.latency_seconds,
                                             bench.mode.latency_rounds, bench.mode.latency_instances,
                                             bench.scratch, bench.log))
    bench.save("latency", entries)


def run_precision(bench: Bench, cases: dict[str, BuiltModel], tool_entries: dict[str, dict[str, Any]]) -> None:
    """float32: the outputs of the tools section (folded here if it did not run); float16: each case converted,
    then folded by every tool."""
    bench.log("precision: error against a float64 evaluation of the original")
    entries = []
    for name in bench.mode.precision_cases:
        fp32 = cases[name]
        fp16 = float16_variant(fp32)
        for model in (fp32, fp16):
            if model.name in tool_entries:
                rows = tool_entries[model.name]["tools"]
            else:
                bench.log(f"  {model.name}: folding with every tool")
                rows = fold_speed.measure_models([model], lambda _: 1, bench.outputs_dir, bench.scratch, bench.log,
                                                 keep_outputs=True, tools=FOLDERS)[0]["tools"]
            checks = {row["tool"]: {key: row.get(key) for key in ("verdict", "detail", "batchnorms")}
                      for row in rows if row["tool"] != FLOOR.name}
            candidates = [f"{tool.name}={fold_speed.output_path(model, tool, bench.outputs_dir)}" for tool in FOLDERS
                          if fold_speed.output_path(model, tool, bench.outputs_dir).exists()]
            child = run_child("precision", [model.path, bench.mode.precision_inputs, *candidates], bench.scratch,
                              timeout=1800)
            entry = {"model": model.to_dict(), **child.result, "checks": checks}
            if child.failure is not None:
                entry["error"] = child.failure
            entries.append(entry)
            errors = entry.get("errors", {})
            bench.log(f"    {model.dtype}: " + ", ".join(
                f"{tool} {figures['rms_relative_error']:.2e}" if "rms_relative_error" in figures else f"{tool} error"
                for tool, figures in errors.items()))
        shutil.rmtree(bench.outputs_dir / fp16.name, ignore_errors=True)
        shutil.rmtree(fp16.path.parent, ignore_errors=True)
    bench.save("precision", entries)


def run_scale(bench: Bench) -> None:
    """Fold time and memory from 1 MB to the largest size, each tool against the floor; on the headline size
    also the cost of --verify and the profile of the fold path. Each model is deleted once measured."""
    bench.log("scale: fold time and peak memory against model size")
    entries, profile_entry = [], None
    for size_mb in _affordable_sizes(bench):
        (model,) = bench.build([f"scale:{size_mb:g}"])
        entry = fold_speed.measure_models([model], bench.repeats_for, bench.outputs_dir, bench.scratch, bench.log,
                                          keep_outputs=False)[0]
        entry["target_mb"] = size_mb
        entries.append(entry)
        if size_mb == bench.mode.headline_mb:
            _verify_cost(bench, model)
            profile_entry = _profile(bench, model)
        shutil.rmtree(model.path.parent, ignore_errors=True)
        bench.save("scale", entries)
    if profile_entry is not None:
        bench.save("profile", profile_entry)


def _affordable_sizes(bench: Bench) -> list[float]:
    free = shutil.disk_usage(bench.scratch).free
    sizes = [size for size in bench.mode.scale_mb if size * 10**6 * DISK_MARGIN < free]
    for size in sorted(set(bench.mode.scale_mb) - set(sizes)):
        bench.log(f"  skipping the {size:g} MB point: {free / 1e9:.1f} GB free in {bench.scratch}, "
                  f"{size * DISK_MARGIN / 1e3:.1f} GB needed")
    return sizes


def _verify_cost(bench: Bench, model: BuiltModel) -> None:
    bench.log(f"  --verify cost on {model.name}")
    folded = bench.outputs_dir / "verify" / "model.onnx"
    folded.parent.mkdir(parents=True, exist_ok=True)
    timeout = fold_speed.timeout_for(model) * 3
    iterations = bench.mode.verify_iterations
    child = run_child("verify-cost", [model.path, json.dumps(model.fold_options), iterations, folded], bench.scratch,
                      timeout)
    entry = {"model": model.to_dict(), **child.result}
    if child.failure is None:
        baseline = run_child("verify-baseline", [model.path, folded, iterations], bench.scratch, timeout)
        entry.update(baseline.result)
        child = baseline
    if child.failure is not None:
        entry["error"] = child.failure
    else:
        verification = entry["stages"]["verify"] - entry["verify_weights_seconds"]
        entry["verify_vs_baseline"] = verification / entry["baseline_seconds"]
        bench.log(f"    verify {verification:.2f} s (and {entry['verify_weights_seconds']:.2f} s computing folded "
                  f"weights) vs two sessions and {iterations}x two runs {entry['baseline_seconds']:.2f} s")
    shutil.rmtree(folded.parent, ignore_errors=True)
    bench.verify_entries.append(entry)
    bench.save("verify", bench.verify_entries)


def _profile(bench: Bench, model: BuiltModel) -> dict[str, Any]:
    bench.log(f"  profiling bnfold fold --no-verify on {model.name}")
    target = bench.outputs_dir / "profile" / "model.onnx"
    target.parent.mkdir(parents=True, exist_ok=True)
    entry: dict[str, Any] = {"model": model.to_dict()}
    for mode in ("cprofile", "memory"):
        child = run_child("profile", [mode, model.path, target], bench.scratch, timeout=fold_speed.timeout_for(model))
        entry[mode] = child.result if child.failure is None else {"error": child.failure}
    shutil.rmtree(target.parent, ignore_errors=True)
    return entry


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small models and short runs (under 2 minutes)")
    parser.add_argument("--out", type=Path, help="results directory (default: bench/results, bench/results/quick)")
    parser.add_argument("--report", type=Path,
                        help="report file (default: BENCHMARKS.md for the default full run, else <out>/BENCHMARKS.md)")
    parser.add_argument("--scratch", type=Path, default=Path(tempfile.gettempdir()),
                        help="where temporary models go (default: %(default)s)")
    parser.add_argument("--only", choices=SECTIONS, action="append", help="run only these sections (repeatable)")
    parser.add_argument("--report-only", action="store_true", help="regenerate the report from existing results")
    args = parser.parse_args(argv)
    mode = QUICK if args.quick else FULL
    out = args.out or (REPO / "bench" / "results" / ("quick" if args.quick else ""))
    # Only the default full run's results make the repository's BENCHMARKS.md; any other run reports beside them.
    report_path = args.report or (out / "BENCHMARKS.md" if args.quick or args.out else REPO / "BENCHMARKS.md")
    if not args.report_only:
        _run(mode, out, args.scratch, args.only or list(SECTIONS), argv if argv is not None else sys.argv[1:])
    report.write(out, report_path)
    print(f"wrote {report_path}")


def _run(mode: Mode, out: Path, scratch_root: Path, sections: list[str], argv: list[str]) -> None:
    missing = [f"{tool.name}: {tool.missing()}" for tool in FOLDERS if tool.missing()]
    scratch = Path(tempfile.mkdtemp(prefix="bnfold-bench-", dir=scratch_root))
    bench = Bench(mode, out, scratch)
    compile_bytecode()
    started = datetime.datetime.now(datetime.timezone.utc)
    try:
        for note in missing:
            bench.log(f"anchor skipped: {note}")
        needed = list(dict.fromkeys(mode.cases + mode.latency_cases + mode.precision_cases))
        cases: dict[str, BuiltModel] = {}
        if {"tools", "latency", "precision"} & set(sections):
            bench.log(f"building {len(needed)} models in {scratch}")
            cases = {model.name: model for model in bench.build(needed)}
        tool_entries = run_tools(bench, cases) if {"tools", "latency"} & set(sections) else {}
        if "latency" in sections:
            run_latency(bench, cases, tool_entries)
        if "precision" in sections:
            run_precision(bench, cases, tool_entries)
        if "scale" in sections:
            run_scale(bench)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    bench.save("run", {
        "mode": asdict(mode),
        "command": shlex.join(["python", "-m", "bench", *argv]),
        "started_utc": started.isoformat(timespec="seconds"),
        "seconds": time.perf_counter() - bench.started,
        "sections": sections,
        "skipped_anchors": missing,
        "machine": machine(),
    })

