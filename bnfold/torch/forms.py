"""Fold the graph forms of a PyTorch model, from memory or from a file: a ``torch.export`` program and a
TorchScript module.

Each is folded, serialized, loaded back and verified as loaded back: :attr:`FoldResult.model` is the loaded-back
model and :meth:`FoldResult.write` writes the very bytes that were checked. Without inputs nothing is run, and
the report says that verification was skipped and how to enable it.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bnfold.core.compare import VerificationSet, VerifyReport
from bnfold.core.report import FoldReport
from bnfold.errors import InputError, OutputError
from bnfold.torch.checks import compare, exact_math
from bnfold.torch.result import TorchFolded, save_bytes
from bnfold.torch.running import Inputs, normalize_inputs, random_inputs

Shapes = Mapping[str, Sequence[int]] | Sequence[Sequence[int]]


@dataclass
class Options:
    """What the caller asked for, the same for every form."""

    input_shapes: Shapes | None = None
    export_onnx: Path | None = None
    verify: bool = True
    allow_train_mode: bool = False
    tolerance: dict[str, float | None] = field(default_factory=dict)
    say: Callable[[str], None] = lambda _message: None


TRAIN_MODE = (
    "the model is in training mode; save it after model.eval(), or pass allow_train_mode=True "
    "to fold its eval-mode behaviour"
)


def fold_in_memory(model: Any, example_inputs: Any, *, inplace: bool, options: Options) -> tuple[TorchFolded,
                                                                                                   FoldReport]:
    """An ``ExportedProgram`` or a ``ScriptModule`` the caller holds; untouched unless ``inplace``."""
    with exact_math():
        if isinstance(model, torch.export.ExportedProgram):
            work = model if inplace else _copy_program(model)
            inputs = _given_or_generated(example_inputs, options.input_shapes, _weights_holder(model))
            return fold_program(work, inputs if inputs is not None else stored_inputs(model), options,
                                reference_model=model.module() if not inplace else None)
        work = model if inplace else _copy_script(model)
        inputs = _given_or_generated(example_inputs, options.input_shapes, model)
        return fold_script(model, work, inputs, options)


def fold_program(program: Any, inputs: Inputs | None, options: Options, *, reference_model: Any = None,
                 source: Path | None = None) -> tuple[TorchFolded, FoldReport]:
    """Fold ``program`` in place; ``reference_model`` (else ``program`` before folding) gives the reference."""
    from bnfold.torch.fold.exported import fold_exported

    clock = _Clock()
    reference = None
    if inputs is not None:
        runner = reference_model if reference_model is not None else program.module()
        reference = _run(runner, inputs)
    clock.lap("reference run")
    options.say("folding the exported program")
    report = fold_exported(program)
    clock.lap("fold")
    saved = _serialized(lambda buffer: torch.export.save(program, buffer))
    clock.lap("save")
    reloaded = torch.export.load(io.BytesIO(saved))
    clock.lap("load the saved program")
    checks = []
    if options.verify and inputs is not None:
        checks.append(compare(reference, _run(reloaded.module(), inputs), "pytorch (saved file)",
                              **options.tolerance))
    clock.lap("verify")
    _export(reloaded, inputs, reference, options, checks)
    _attach(report, checks, options, "the program stores no example inputs")
    report.seconds.update(clock.seconds)
    return TorchFolded(reloaded, save_bytes(saved), source), report


class _Clock:
    """Seconds per stage, for the report (and the benchmark's picture of where the time goes)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.last = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.seconds[stage] = self.seconds.get(stage, 0.0) + now - self.last
        self.last = now


def fold_script(original: Any, work: Any, inputs: Inputs | None, options: Options,
                source: Path | None = None) -> tuple[TorchFolded, FoldReport]:
    """Fold the TorchScript module ``work`` in place; ``original`` (its twin, unfolded) gives the reference."""
    from bnfold.torch.fold.scripted import fold_scripted

    if work.training:
        if not options.allow_train_mode:
            raise InputError(TRAIN_MODE)
        work.eval()
        original.eval()
    reference = _run(original, inputs) if inputs is not None else None
    options.say("folding the TorchScript module")
    report = fold_scripted(work)
    saved = _serialized(lambda buffer: torch.jit.save(work, buffer))
    reloaded = torch.jit.load(io.BytesIO(saved), map_location="cpu")
    checks = []
    if options.verify and inputs is not None:
        checks.append(compare(reference, _run(reloaded, inputs), "pytorch (saved file)", **options.tolerance))
    _export(reloaded, inputs, reference, options, checks)
    _attach(report, checks, options, "a TorchScript module holds no example inputs")
    return TorchFolded(reloaded, save_bytes(saved), source), report


def stored_inputs(program: Any) -> Inputs | None:
    """The example inputs a ``.pt2`` program was exported with, if it kept them."""
    stored = getattr(program, "example_inputs", None)
    if stored is None:
        return None
    args, kwargs = stored
    return Inputs(tuple(args), dict(kwargs))


def program_inputs(program: Any, shapes: Shapes | None) -> Inputs | None:
    """Inputs generated for ``shapes`` (the program's dtype), else the ones it stores."""
    if shapes is not None:
        return random_inputs(_weights_holder(program), shapes)
    return stored_inputs(program)


def _weights_holder(program: Any) -> nn.Module:
    """A module whose one buffer has the program's floating dtype and device, for :func:`random_inputs`."""
    holder = nn.Module()
    floats = [t for t in program.state_dict.values() if t.is_floating_point()]
    if floats:
        holder.register_buffer("reference", floats[0].detach())
    return holder


def _given_or_generated(example_inputs: Any, shapes: Shapes | None, like: nn.Module) -> Inputs | None:
    inputs = normalize_inputs(example_inputs)
    if inputs is None and shapes is not None:
        inputs = random_inputs(like, shapes)
    return inputs


def _copy_program(program: Any) -> Any:
    """A copy through torch.export's own format: a deep copy renames graph nodes away from the signature."""
    return torch.export.load(io.BytesIO(_serialized(lambda buffer: torch.export.save(program, buffer))))


def _copy_script(module: Any) -> Any:
    """A copy with its own types: a deep copy would share the method graphs, which the fold edits."""
    return torch.jit.load(io.BytesIO(_serialized(lambda buffer: torch.jit.save(module, buffer))),
                          map_location="cpu")


def _run(model: Any, inputs: Inputs) -> Any:
    try:
        with torch.no_grad():
            return model(*inputs.args, **inputs.kwargs)
    except Exception as error:
        raise InputError(f"the model failed on the inputs: {type(error).__name__}: {str(error)[:160]}") from error


def _export(model: Any, inputs: Inputs | None, reference: Any, options: Options, checks: list[VerifyReport]) -> None:
    if options.export_onnx is None:
        return
    if inputs is None:
        raise InputError("exporting to ONNX needs example inputs or input shapes")
    from bnfold.torch.export import export_and_check

    checks.append(export_and_check(model, inputs, reference, options.export_onnx, **options.tolerance))


def _attach(report: FoldReport, checks: list[VerifyReport], options: Options, why: str) -> None:
    if checks:
        report.verification = checks[0] if len(checks) == 1 else VerificationSet(checks)
    elif options.verify:
        report.notes.append(skipped_notice(why))


def skipped_notice(why: str) -> str:
    return (f"verification skipped: {why}; give input shapes (--input-shape 1x3x224x224, input_shapes=) "
            "or example inputs to verify the folded model")


def _serialized(save: Callable[[io.BytesIO], None]) -> bytes:
    buffer = io.BytesIO()
    try:
        save(buffer)
    except Exception as error:
        raise OutputError(f"cannot write the folded model: {type(error).__name__}: {error}") from error
    return buffer.getvalue()
