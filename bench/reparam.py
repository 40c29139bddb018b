"""Structural re-parameterization: latency of re-parameterizable timm models folded by bnfold, against the
model authors' own deploy form.

``python -m bench.reparam [--out bench/results] [--instances 5]`` builds each model of :data:`MODELS` with
random weights and random batch-norm statistics, exports it to ONNX in its train-time structure (TorchScript
exporter, every batch norm kept) and in its deploy form (``timm.utils.reparameterize_model``, exported as
usual, Conv+BN fused by the exporter), folds the
train-time export twice -- with the merge patterns skipped (what bnfold did before it merged branches) and as
bnfold does now -- and times all four under onnxruntime ``ORT_ENABLE_ALL``, one intra-op thread, 64x64 input.

The export needs torch and timm; ``--models DIR`` measures the exports an earlier ``--export-only`` wrote
there, so the two stages may run in different environments. Timing follows :mod:`bench.latency`: each
instance creates fresh sessions in a random order and runs them in interleaved rounds, each round in a new
random order; a ratio (variant ÷ deploy form) is paired within an instance and summarised over instances by
its median and a distribution-free confidence interval. Writes ``reparam.json`` and ``reparam_latency.png``.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from bench.latency import median_interval

MODELS = ("repvgg_a0", "mobileone_s0", "fastvit_t8", "repghostnet_050")
VARIANTS = ("train", "before", "now", "deploy")
LABELS = {"train": "train-time export", "before": "bnfold, batch norms only", "now": "bnfold now",
          "deploy": "timm deploy form"}
MERGE_PATTERNS = ["parallel-branches", "serial-conv", "serial-gemm"]
SHAPE = (1, 3, 64, 64)
GOAL_RATIO = 1.05
ROUNDS = 30
RUNS_PER_BLOCK = 3


def export(models_dir: Path) -> None:
    """Write ``NAME.train.onnx`` and ``NAME.deploy.onnx`` for every model."""
    import timm
    import torch

    models_dir.mkdir(parents=True, exist_ok=True)
    for name in MODELS:
        torch.manual_seed(0)
        model = _randomize_batchnorm(timm.create_model(name, pretrained=False).eval())
        deploy = timm.utils.reparameterize_model(copy.deepcopy(model))
        example = torch.randn(*SHAPE, generator=torch.Generator().manual_seed(0))
        # The train-time structure keeps every branch and batch norm; the deploy form is exported as its
        # authors would, the exporter fusing what batch norms it has left into their convolutions.
        torch.onnx.export(model, (example,), str(models_dir / f"{name}.train.onnx"), dynamo=False,
                          training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False,
                          input_names=["x"], output_names=["y"])
        torch.onnx.export(deploy, (example,), str(models_dir / f"{name}.deploy.onnx"), dynamo=False,
                          input_names=["x"], output_names=["y"])


def _randomize_batchnorm(model: Any) -> Any:
    import torch

    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and module.running_var is not None:
                channels = module.num_features
                module.running_mean.copy_(torch.randn(channels, generator=generator) * 0.5)
                module.running_var.copy_(torch.rand(channels, generator=generator) * 1.5 + 0.5)
                if module.weight is not None:
                    module.weight.copy_(torch.rand(channels, generator=generator) + 0.5)
                    module.bias.copy_(torch.randn(channels, generator=generator) * 0.5)
    return model


def fold(models_dir: Path) -> dict[str, Any]:
    """Fold each train-time export both ways; what each fold left and whether it verified."""
    from bnfold import fold_onnx

    folds: dict[str, Any] = {}
    for name in MODELS:
        train = models_dir / f"{name}.train.onnx"
        folds[name] = {}
        for variant, options in (("before", {"skip": MERGE_PATTERNS}), ("now", {})):
            started = time.perf_counter()
            result = fold_onnx(train, **options)
            seconds = time.perf_counter() - started
            result.write(models_dir / f"{name}.{variant}.onnx")
            folds[name][variant] = {"verified": result.report.verification.passed, "fold_seconds": seconds,
                                    "batchnorms_left": result.report.totals.bn_after}
    return folds


def op_counts(path: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in onnx.load(path, load_external_data=False).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def measure(models_dir: Path, name: str, instances: int) -> dict[str, Any]:
    """Per instance the median latency of each variant; ratios to the deploy form over instances."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    feeds = {"x": np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)}
    shuffle = random.Random(0).shuffle
    medians: list[dict[str, float]] = []
    outputs: dict[str, np.ndarray] = {}
    for _ in range(instances):
        order = list(VARIANTS)
        shuffle(order)
        sessions = {variant: ort.InferenceSession(str(models_dir / f"{name}.{variant}.onnx"), options,
                                                  providers=["CPUExecutionProvider"]) for variant in order}
        for variant, session in sessions.items():
            outputs[variant] = session.run(None, feeds)[0]
            session.run(None, feeds)
        runs: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
        for _ in range(ROUNDS):
            shuffle(order)
            for variant in order:
                sessions[variant].run(None, feeds)  # settles caches after the switch
                for _ in range(RUNS_PER_BLOCK):
                    started = time.perf_counter()
                    sessions[variant].run(None, feeds)
                    runs[variant].append(time.perf_counter() - started)
        medians.append({variant: 1e3 * statistics.median(seconds) for variant, seconds in runs.items()})
    reference = outputs["train"].astype(np.float64)
    scale = float(np.max(np.abs(reference))) or 1.0
    return {
        "latency_ms": {v: median_interval([m[v] for m in medians]) for v in VARIANTS},
        "ratio_to_deploy": {v: median_interval([m[v] / m["deploy"] for m in medians]) for v in VARIANTS},
        "max_error_vs_train": {v: float(np.max(np.abs(outputs[v] - reference))) / scale for v in VARIANTS},
        "instances": medians,
    }


def table(results: dict[str, Any]) -> str:
    lines = ["| model | Conv nodes: train → bnfold before → bnfold now → deploy | latency ÷ deploy form: "
             "train / before / **now** (90% CI) | deploy (ms) | max error of now vs train (relative) |",
             "|---|---|---|---|---|"]
    for name in MODELS:
        entry = results["models"][name]
        convs = " → ".join(str(entry["ops"][v].get("Conv", 0)) for v in VARIANTS)
        ratio = entry["ratio_to_deploy"]
        now = ratio["now"]
        ratios = (f"{ratio['train']['median']:.2f}× / {ratio['before']['median']:.2f}× / "
                  f"**{now['median']:.2f}×** [{now['low']:.2f}, {now['high']:.2f}]")
        lines.append(f"| {name} | {convs} | {ratios} | {entry['latency_ms']['deploy']['median']:.2f} | "
                     f"{entry['max_error_vs_train']['now']:.1e} |")
    return "\n".join(lines)


def section(out: Path, relative: str) -> list[str]:
    """BENCHMARKS.md's section, from ``out/reparam.json`` (none if ``python -m bench.reparam`` has not run)."""
    path = out / "reparam.json"
    if not path.exists():
        return []
    results = json.loads(path.read_text())
    lines = [
        "## Structural re-parameterization: merged branches against the deploy form", "",
        "Re-parameterizable timm models with random weights and batch-norm statistics, exported in their "
        "train-time structure (every branch and batch norm kept) and folded by bnfold, against the authors' own "
        "deploy form (`timm.utils.reparameterize_model`, exported as usual). onnxruntime `ORT_ENABLE_ALL`, 1 "
        f"thread, {SHAPE[2]}x{SHAPE[3]} input; ratios are paired within each of "
        f"{len(next(iter(results['models'].values()))['instances'])} instances of fresh sessions run in "
        "interleaved rounds, as medians with a distribution-free confidence interval. *bnfold, batch norms only* "
        "skips the merge patterns (`--skip parallel-branches,serial-conv,serial-gemm`): what bnfold gave before "
        f"it merged branches. Goal: bnfold now within {GOAL_RATIO}× of the deploy form, with no more Conv nodes.",
        "", table(results), "",
    ]
    if (out / "reparam_latency.png").exists():
        lines += [f"![latency against the deploy form]({relative}/reparam_latency.png)", ""]
    lines += ["Regenerate with `python -m bench.reparam` (needs torch and timm; `--export-only` and `--models DIR` "
              "split the export from the timing).", ""]
    return lines


def plot(results: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    figure, axes = plt.subplots(figsize=(8, 4.5))
    width = 0.27
    for offset, variant in enumerate(("train", "before", "now")):
        ratios = [results["models"][name]["ratio_to_deploy"][variant] for name in MODELS]
        positions = [i + (offset - 1) * width for i in range(len(MODELS))]
        errors = [[r["median"] - r["low"] for r in ratios], [r["high"] - r["median"] for r in ratios]]
        axes.bar(positions, [r["median"] for r in ratios], width, yerr=errors, capsize=3, label=LABELS[variant])
    axes.axhline(1.0, color="black", linewidth=1)
    axes.axhline(GOAL_RATIO, color="red", linestyle=":", label=f"goal: {GOAL_RATIO}× the deploy form")
    axes.set_xticks(range(len(MODELS)), MODELS)
    axes.set_ylabel("onnxruntime latency ÷ timm deploy form")
    axes.set_title("ORT_ENABLE_ALL, 1 thread, 64x64 input")
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--models", type=Path, help="directory of the exports (default: OUT/reparam_models)")
    parser.add_argument("--export-only", action="store_true", help="export the models, measure nothing")
    parser.add_argument("--instances", type=int, default=5)
    args = parser.parse_args()
    models_dir = args.models or args.out / "reparam_models"
    if args.export_only or not all((models_dir / f"{name}.train.onnx").exists() for name in MODELS):
        export(models_dir)
        if args.export_only:
            return
    folds = fold(models_dir)
    results: dict[str, Any] = {"shape": SHAPE, "rounds": ROUNDS, "models": {}}
    for name in MODELS:
        entry = measure(models_dir, name, args.instances)
        entry["ops"] = {variant: op_counts(models_dir / f"{name}.{variant}.onnx") for variant in VARIANTS}
        entry["folds"] = folds[name]
        results["models"][name] = entry
        print(f"{name}: now/deploy {entry['ratio_to_deploy']['now']['median']:.3f}", flush=True)
    from bench.run import results_json  # bench.run reports this section: imported here, not at the top

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "reparam.json").write_text(results_json(results))
    plot(results, args.out / "reparam_latency.png")
    print(table(results))


if __name__ == "__main__":
    main()
