"""PyTorch fold speed against the floor of the same run, and where the time goes.

Run: ``python -m bench.torch_speed [--repeats 3] [--out bench/results/torch_speed]``. Two goals (issue 16):

- **file**: ``bnfold fold model.pt2`` for torchvision's resnet18 (random weights and batch-norm statistics, nothing
  downloaded), against the floor any tool on that format pays: one process that imports torch, runs
  ``torch.export.load``, one forward pass and ``torch.export.save``. Each run is a fresh process; the two
  alternate ``repeats`` times so that background load hits both alike; the ratio is of the medians.
- **module**: ``bnfold.fold_module`` against ``torch.fx.experimental.optimization.fuse`` on models fx can trace,
  in one process per model, alternating. ``fold_module(model)`` folds only (as ``fuse`` does);
  ``fold_module(model, x)`` also runs the model twice to verify, so one forward pass is timed beside it.

Writes ``torch_speed.json``, ``torch_speed.svg`` (the stages of both file runs as stacked bars) and ``README.md``
(the summary) into ``--out``, and prints the summary.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.run import results_json

REPO = Path(__file__).resolve().parent.parent
MODULE_MODELS = ("resnet18", "mobilenet_v2", "efficientnet_b0")

_BUILD = """
import sys, torch, torchvision
torch.manual_seed(0)
model = getattr(torchvision.models, sys.argv[1])()
for module in model.modules():
    if isinstance(module, torch.nn.BatchNorm2d):
        module.running_mean.normal_(0, 0.1); module.running_var.uniform_(0.5, 2.0)
        module.weight.data.normal_(1, 0.1); module.bias.data.normal_(0, 0.1)
model.eval()
"""

_MAKE_PROGRAM = _BUILD + """
torch.export.save(torch.export.export(model, (torch.randn(1, 3, 224, 224),)), sys.argv[2])
"""

# The floor: what any tool that reads and writes a .pt2 pays, and nothing else (it leaves at once, as bnfold
# does, without tearing torch down).
_FLOOR = """
import json, os, sys, time
started = time.perf_counter()
import torch
imported = time.perf_counter()
program = torch.export.load(sys.argv[1])
loaded = time.perf_counter()
args, kwargs = program.example_inputs
with torch.no_grad():
    program.module()(*args, **kwargs)
ran = time.perf_counter()
torch.export.save(program, sys.argv[2])
saved = time.perf_counter()
print(json.dumps({"import torch": imported - started, "load": loaded - imported, "forward": ran - loaded,
                  "save": saved - ran}), flush=True)
os._exit(0)
"""

_MODULE = _BUILD + """
import copy, json, time, warnings
warnings.simplefilter("ignore")
from torch.fx.experimental.optimization import fuse
from bnfold.torch import fold_module
x = torch.randn(1, 3, 224, 224)
def timed(work):
    started = time.perf_counter()
    work()
    return time.perf_counter() - started
def forward():
    with torch.no_grad():
        model(x)
rounds = {"fx fuse": [], "fold_module(model)": [], "fold_module(model, x)": [], "one forward pass": []}
for _ in range(int(sys.argv[2])):
    rounds["fx fuse"].append(timed(lambda: fuse(copy.deepcopy(model))))
    copied = copy.deepcopy(model)
    rounds["fold_module(model)"].append(timed(lambda: fold_module(copied, inplace=True)))
    copied = copy.deepcopy(model)
    rounds["fold_module(model, x)"].append(timed(lambda: fold_module(copied, x, inplace=True)))
    rounds["one forward pass"].append(timed(forward))
print(json.dumps(rounds))
"""


def _python(code: str, *args: str) -> tuple[float, str]:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, check=False)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"child failed ({done.returncode}): {done.stderr.strip().splitlines()[-1:]}")
    return wall, done.stdout


def _bnfold(source: Path, target: Path) -> tuple[float, dict[str, float]]:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "bnfold", "fold", str(source), "-o", str(target), "--json"],
                          capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                          check=False)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"bnfold failed ({done.returncode}): {done.stderr.strip()[-300:]}")
    return wall, json.loads(done.stdout)["seconds"]


def measure_file(scratch: Path, repeats: int) -> dict[str, Any]:
    source = scratch / "resnet18.pt2"
    _python(_MAKE_PROGRAM, "resnet18", str(source))
    floor: list[tuple[float, dict[str, float]]] = []
    folds: list[tuple[float, dict[str, float]]] = []
    for _ in range(repeats):
        wall, out = _python(_FLOOR, str(source), str(scratch / "floor.pt2"))
        floor.append((wall, json.loads(out)))
        folds.append(_bnfold(source, scratch / "folded.pt2"))
    floor_wall = statistics.median(w for w, _ in floor)
    fold_wall = statistics.median(w for w, _ in folds)
    return {
        "model": "torchvision resnet18, 1x3x224x224, .pt2 of " + f"{source.stat().st_size / 1e6:.1f} MB",
        "floor_seconds": [w for w, _ in floor], "bnfold_seconds": [w for w, _ in folds],
        "ratio": fold_wall / floor_wall,
        "floor_stages": _median_stages([s for _, s in floor], floor_wall),
        "bnfold_stages": _median_stages([s for _, s in folds], fold_wall),
    }


def _median_stages(runs: list[dict[str, float]], wall: float) -> dict[str, float]:
    """Median seconds per stage; what the stages do not cover (interpreter start, imports, reading and checking
    the file, loading it) is the rest of the median wall time."""
    stages = {key: statistics.median(run.get(key, 0.0) for run in runs) for key in runs[0] if key != "total"}
    stages["start, imports, read and load" if "fold" in stages else "interpreter start and exit"] = max(
        0.0, wall - sum(stages.values()))
    return stages


def measure_modules(repeats: int) -> list[dict[str, Any]]:
    rows = []
    for name in MODULE_MODELS:
        _, out = _python(_MODULE, name, str(repeats))
        rounds = json.loads(out)
        medians = {tool: statistics.median(values) for tool, values in rounds.items()}
        rows.append({
            "model": name, "seconds": medians,
            "ratio_fold_only": medians["fold_module(model)"] / medians["fx fuse"],
            "ratio_verified": medians["fold_module(model, x)"] / (medians["fx fuse"] + medians["one forward pass"]),
        })
    return rows


def stages_svg(file_result: dict[str, Any]) -> str:
    """Two stacked horizontal bars (floor, bnfold), one segment per stage, with a legend: no plotting library."""
    palette = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7", "#9c755f",
               "#bab0ac"]
    bars = [("floor", file_result["floor_stages"]), ("bnfold fold", file_result["bnfold_stages"])]
    total = max(sum(stages.values()) for _, stages in bars)
    scale, left, top = 560 / total, 110, 40
    names = list(dict.fromkeys(name for _, stages in bars for name in stages))
    colour = {name: palette[i % len(palette)] for i, name in enumerate(names)}
    parts = [f'<text x="10" y="22" font-size="14">Where the time goes: {file_result["model"]} '
             f'(ratio {file_result["ratio"]:.2f}, medians)</text>']
    for row, (label, stages) in enumerate(bars):
        y, x = top + row * 50, float(left)
        parts.append(f'<text x="10" y="{y + 22}" font-size="12">{label}</text>')
        for name, seconds in stages.items():
            width = seconds * scale
            parts.append(f'<rect x="{x:.1f}" y="{y}" width="{width:.1f}" height="32" fill="{colour[name]}">'
                         f'<title>{name}: {seconds:.2f} s</title></rect>')
            x += width
        parts.append(f'<text x="{x + 6:.1f}" y="{y + 22}" font-size="12">{sum(stages.values()):.2f} s</text>')
    for index, name in enumerate(names):
        y = top + 110 + index * 18
        parts.append(f'<rect x="{left}" y="{y}" width="12" height="12" fill="{colour[name]}"/>'
                     f'<text x="{left + 18}" y="{y + 11}" font-size="12">{name}</text>')
    height = top + 120 + len(names) * 18
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="760" height="{height}" font-family="sans-serif">'
            + "".join(parts) + "</svg>\n")


def markdown(result: dict[str, Any]) -> str:
    file_result = result["file"]
    lines = [
        f"load average at start: {result['load_average']}",
        "",
        "| .pt2 fold | median s | runs |",
        "|---|---|---|",
        f"| floor (import torch, load, 1 forward, save) | {statistics.median(file_result['floor_seconds']):.2f} "
        f"| {', '.join(f'{s:.2f}' for s in file_result['floor_seconds'])} |",
        f"| `bnfold fold` | {statistics.median(file_result['bnfold_seconds']):.2f} "
        f"| {', '.join(f'{s:.2f}' for s in file_result['bnfold_seconds'])} |",
        f"| ratio | **{file_result['ratio']:.2f}** (goal ≤ 2) | |",
        "",
        "| model | fx fuse s | fold_module(model) s | ratio | fold_module(model, x) s | 1 forward s "
        "| ratio to fuse + 1 forward |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in result["module"]:
        s = row["seconds"]
        lines.append(f"| {row['model']} | {s['fx fuse']:.2f} | {s['fold_module(model)']:.2f} "
                     f"| **{row['ratio_fold_only']:.2f}** | {s['fold_module(model, x)']:.2f} "
                     f"| {s['one forward pass']:.2f} | {row['ratio_verified']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "torch_speed")
    options = parser.parse_args(argv)
    options.out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"load_average": [round(v, 2) for v in os.getloadavg()],
                              "cpus": os.cpu_count(), "repeats": options.repeats}
    with tempfile.TemporaryDirectory(prefix="bnfold-torch-speed-") as scratch:
        result["file"] = measure_file(Path(scratch), options.repeats)
    result["module"] = measure_modules(options.repeats)
    (options.out / "torch_speed.json").write_text(results_json(result))
    (options.out / "torch_speed.svg").write_text(stages_svg(result["file"]))
    summary = markdown(result)
    (options.out / "README.md").write_text(
        "# PyTorch fold speed\n\nGenerated by `python -m bench.torch_speed` (see its docstring for the method); "
        "do not edit by hand.\n\n![where the time goes](torch_speed.svg)\n\n" + summary + "\n")
    print(summary)


if __name__ == "__main__":
    main()
