"""The folding tools under comparison, each as its users run it, plus the floor they are measured against.

Each tool's :attr:`Tool.load` imports what the tool needs and returns a function
``fold(source, target, external, options)``, so that a worker can time the import apart from the work.
``external`` asks for the output's tensors in one external data file (models over protobuf's 2 GB limit);
``options`` are bnfold's per-model keyword arguments (other tools have no equivalent and ignore them).

- ``floor``: ``onnx.load`` + ``onnx.save`` of the same model, the least any file-to-file tool must do.
- ``bnfold``: the ``bnfold fold IN -o OUT --no-verify`` command, run in-process through its console-script entry
  point (``bnfold.cli.run``: the command, then the process's end, after the worker has written its findings).
- ``ort-basic``: onnxruntime's offline optimizer: a session at ``ORT_ENABLE_BASIC`` (its Conv/ConvTranspose+BN,
  MatMul+BN, Conv+Mul/Add fusions; the level whose output is still standard ONNX) saving
  ``optimized_model_filepath``.
- ``onnxscript``: ``onnxscript.rewriter.rewrite`` with its three batch-norm rules (Conv, ConvTranspose, Gemm) on
  an ``onnx_ir`` model loaded lazily from the file, saved with ``onnx_ir.save``.
- ``onnxoptimizer``: ``onnxoptimizer.optimize(model, ["fuse_bn_into_conv"])``.
- ``onnxslim``: ``onnxslim.slim(IN, OUT)`` with its defaults (all fusions, constant folding, shape inference).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

# How a tool's process ends with an exit code, when the tool has a way of its own.
ProcessEnd = Callable[[object], NoReturn]
# Folds SOURCE into TARGET; returns the tool's ProcessEnd, or None to end the process as Python does.
Fold = Callable[[Path, Path, bool, dict[str, Any]], ProcessEnd | None]


@dataclass(frozen=True)
class Tool:
    name: str
    label: str
    package: str
    load: Callable[[], Fold]
    # Models this large the tool cannot fold by construction; it is not run on them (see ``cannot_fold``).
    max_model_bytes: int | None = None
    limit_reason: str = ""

    def cannot_fold(self, model_bytes: int) -> str | None:
        """Why the tool is known to fail on a model of ``model_bytes`` (it would only spend minutes finding out)."""
        if self.max_model_bytes is not None and model_bytes >= self.max_model_bytes:
            return f"not run: {self.limit_reason}"
        return None

    def missing(self) -> str | None:
        """Why this tool cannot run here (its package is not installed), or None."""
        if importlib.util.find_spec(self.package) is None:
            return f"{self.package} is not installed (pip install -e '.[bench]')"
        return None


def _data_file(target: Path) -> str:
    return f"{target.name}.data"


def _load_floor() -> Fold:
    import onnx

    def fold(source: Path, target: Path, external: bool, options: dict[str, Any]) -> None:
        model = onnx.load(source)
        onnx.save(model, target, save_as_external_data=external, all_tensors_to_one_file=True,
                  location=_data_file(target), size_threshold=1024)

    return fold


def _load_bnfold() -> Fold:
    from bnfold.cli import end_process, run_command

    def fold(source: Path, target: Path, external: bool, options: dict[str, Any]) -> ProcessEnd:
        arguments = ["fold", str(source), "-o", str(target), "--no-verify", "--json"]
        for key, value in options.items():
            arguments += [f"--{key.replace('_', '-')}", str(value)]
        code = run_command(arguments)
        if code:
            raise RuntimeError(f"bnfold exited with status {code}")
        return end_process  # the bnfold process skips the interpreter's teardown

    return fold


def _load_ort_basic() -> Fold:
    import onnxruntime as ort

    def fold(source: Path, target: Path, external: bool, options: dict[str, Any]) -> None:
        session_options = ort.SessionOptions()
        session_options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        session_options.optimized_model_filepath = str(target)
        if external:
            session_options.add_session_config_entry(
                "session.optimized_model_external_initializers_file_name", _data_file(target))
            session_options.add_session_config_entry(
                "session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        ort.InferenceSession(str(source), session_options, providers=["CPUExecutionProvider"])

    return fold


def _load_onnxscript() -> Fold:
    import onnx_ir as ir
    from onnxscript import rewriter
    from onnxscript.rewriter.rules.common import (
        fuse_batchnorm_into_conv_rule,
        fuse_batchnorm_into_conv_transpose_rule,
        fuse_batchnorm_into_gemm_rule,
    )

    rules = [fuse_batchnorm_into_conv_rule, fuse_batchnorm_into_conv_transpose_rule, fuse_batchnorm_into_gemm_rule]

    def fold(source: Path, target: Path, external: bool, options: dict[str, Any]) -> None:
        model = rewriter.rewrite(ir.load(source), pattern_rewrite_rules=rules)
        ir.save(model, target, external_data=_data_file(target) if external else None)

    return fold


def _load_onnxoptimizer() -> Fold:
    import onnx
    import onnxoptimizer

    def fold(source: Path, target: Path, external: bool, options: dict[str, Any]) -> None:
        model = onnxoptimizer.optimize(onnx.load(source), ["fuse_bn_into_conv"])
        onnx.save(model, target, save_as_external_data=external, all_tensors_to_one_file=True,
                  location=_data_file(target), size_threshold=1024)

    return fold


def _load_onnxslim() -> Fold:
    import onnxslim

    def fold(source: Path, target: Path, external: bool, options: dict[str, Any]) -> None:
        if onnxslim.slim(str(source), str(target), save_as_external_data=external) is None and not target.exists():
            raise RuntimeError("onnxslim returned without writing a model")

    return fold


FLOOR = Tool("floor", "onnx load+save", "onnx", _load_floor)
BNFOLD = Tool("bnfold", "bnfold", "bnfold", _load_bnfold)
ANCHORS = (
    Tool("ort-basic", "onnxruntime BASIC", "onnxruntime", _load_ort_basic),
    Tool("onnxscript", "onnxscript rewriter", "onnxscript", _load_onnxscript),
    Tool("onnxoptimizer", "onnxoptimizer", "onnxoptimizer", _load_onnxoptimizer, max_model_bytes=2**31,
         limit_reason="optimize() takes the model as one protobuf message, which cannot reach 2 GiB "
                      "(it failed after 73 s at 2.5 GB)"),
    Tool("onnxslim", "onnxslim", "onnxslim", _load_onnxslim),
)
TOOLS = {tool.name: tool for tool in (FLOOR, BNFOLD, *ANCHORS)}
FOLDERS = (BNFOLD, *ANCHORS)
