"""fold_torch_file: fold a .pt2 program, a TorchScript file or a (trusted) pickled module on disk.

The input file is only read. The folded model is serialized in memory, loaded back and checked; what
:meth:`bnfold.FoldResult.write` writes (atomically, see :mod:`bnfold.core.atomic`) is those checked bytes.
"""

from __future__ import annotations

import io
import os
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from bnfold.core.compare import VerifyReport
from bnfold.core.report import FoldReport
from bnfold.core.result import FoldResult
from bnfold.errors import InputError, first_line
from bnfold.torch.checks import compare, exact_math
from bnfold.torch.forms import Options, Shapes, fold_program, fold_script, program_inputs, skipped_notice
from bnfold.torch.result import TorchFolded, save_module
from bnfold.torch.running import Inputs, random_inputs
from bnfold.torch.trust import require_safe

Format = Literal["pt2", "torchscript", "pickle"]


def detect_format(path: Path) -> Format:
    """The file's format from its content (zip members or pickle header), not its extension."""
    try:
        with path.open("rb") as handle:
            head = handle.read(4)
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        else:
            names = []
    except (OSError, zipfile.BadZipFile) as error:
        raise InputError(f"cannot read {path}: {error}") from error
    members = {name.split("/", 1)[1] if "/" in name else name for name in names}
    if "archive_format" in members or any(m.startswith("models/") for m in members):
        return "pt2"
    if any(m.startswith("code/") for m in members) and "constants.pkl" in members:
        return "torchscript"
    if "data.pkl" in members or (not names and head[:1] == b"\x80"):
        return "pickle"
    raise InputError(f"{path} is not a .pt2 program, a TorchScript file or a pickled torch module")


def fold_file(
    input_path: str | os.PathLike[str],
    *,
    trust_pickle: bool = False,
    input_shapes: Shapes | None = None,
    export_onnx: str | os.PathLike[str] | None = None,
    verify: bool = True,
    allow_train_mode: bool = False,
    rtol: float | None = None,
    atol: float | None = None,
    progress: Callable[[str], None] | None = None,
) -> FoldResult:
    source = Path(input_path)
    options = Options(
        input_shapes, None if export_onnx is None else Path(export_onnx), verify, allow_train_mode,
        {"rtol": rtol, "atol": atol}, progress or (lambda _message: None),
    )
    if not source.is_file():
        raise InputError(f"{source} does not exist or is not a file")
    kind = detect_format(source)
    options.say(f"{source.name}: {kind}")
    data = _checked_bytes(source, kind, trust_pickle)
    with exact_math():
        if kind == "pt2":
            program = _load(lambda: torch.export.load(io.BytesIO(data)), source, "a torch.export program")  # type: ignore[arg-type]
            folded, report = fold_program(program, program_inputs(program, input_shapes), options, source=source)
        elif kind == "torchscript":
            original, work = (
                _load(lambda: torch.jit.load(io.BytesIO(data), map_location="cpu"), source, "TorchScript")  # type: ignore[arg-type]
                for _ in range(2)
            )
            inputs = random_inputs(original, input_shapes) if input_shapes is not None else None
            folded, report = fold_script(original, work, inputs, options, source=source)
        else:
            folded, report = _fold_pickle(source, trust_pickle, options)
    return FoldResult(folded, report)


def _checked_bytes(source: Path, kind: Format, trust: bool) -> bytes | None:
    """A .pt2 or TorchScript file's bytes, read once and proven not to run code of its own on loading or
    running (:mod:`bnfold.torch.trust`); ``None`` for a pickle, which :func:`_load_pickle` refuses untrusted."""
    if kind == "pickle":
        return None
    try:
        data = source.read_bytes()
    except OSError as error:
        raise InputError(f"cannot read {source}: {error}") from error
    require_safe(data, kind, source.name, trust)
    return data


def _fold_pickle(source: Path, trust_pickle: bool, options: Options) -> tuple[TorchFolded, FoldReport]:
    from bnfold.torch.fold.module import fold_module

    model = _load_pickle(source, trust_pickle)
    result = fold_module(
        model, None, inplace=True, allow_train_mode=options.allow_train_mode, input_shapes=options.input_shapes,
        verify=options.verify, export_onnx=None if options.export_onnx is None else str(options.export_onnx),
        progress=options.say, **options.tolerance,
    )
    if options.verify and result.report.verification is None:
        result.report.notes.append(skipped_notice("a pickled module holds no example inputs"))
    return TorchFolded(result.model, save_module(result.model), source), result.report


def _load_pickle(source: Path, trust_pickle: bool) -> nn.Module:
    if not trust_pickle:
        raise InputError(
            f"{source.name} is a pickled module and unpickling runs arbitrary code: "
            "refusing to load it without trust_pickle=True (--trust-pickle)"
        )
    model = _load(lambda: torch.load(str(source), map_location="cpu", weights_only=False), source, "a torch file")
    if not isinstance(model, nn.Module):
        raise InputError(
            f"{source.name} holds a {type(model).__name__}, not a module: a state dict cannot be folded "
            "without the model's code"
        )
    return model


def _load(load: Callable[[], Any], source: Path, what: str) -> Any:
    try:
        return load()
    except Exception as error:
        raise InputError(f"cannot load {source.name} as {what}: {first_line(error, 160)}") from error


def compare_files(
    original_path: str | os.PathLike[str],
    candidate_path: str | os.PathLike[str],
    *,
    trust_pickle: bool = False,
    input_shapes: Shapes | None = None,
    rtol: float | None = None,
    atol: float | None = None,
) -> VerifyReport:
    """Run two PyTorch files (any of the formats :func:`fold_file` reads) on the same inputs and compare
    their outputs: generated for ``input_shapes``, else the example inputs the original ``.pt2`` stores."""
    original, inputs = _runnable(Path(original_path), trust_pickle, input_shapes)
    candidate, _ = _runnable(Path(candidate_path), trust_pickle, None)
    if inputs is None:
        raise InputError(f"{Path(original_path).name} stores no example inputs: give input shapes "
                         "(--input-shape 1x3x224x224) to generate them")
    with exact_math(), torch.no_grad():
        expected = _run(original, inputs, Path(original_path).name)
        got = _run(candidate, inputs, Path(candidate_path).name)
    return compare(expected, got, "pytorch", rtol, atol)


def _run(model: Any, inputs: Inputs, name: str) -> Any:
    try:
        return model(*inputs.args, **inputs.kwargs)
    except Exception as error:
        raise InputError(f"{name} does not run on the inputs: {first_line(error, 160)}") from error


def _runnable(source: Path, trust_pickle: bool, input_shapes: Shapes | None) -> tuple[Any, Inputs | None]:
    """The file's model as a callable in eval mode, and inputs for it (generated, or stored in a .pt2)."""
    if not source.is_file():
        raise InputError(f"{source} does not exist or is not a file")
    kind = detect_format(source)
    data = _checked_bytes(source, kind, trust_pickle)
    if kind == "pt2":
        program = _load(lambda: torch.export.load(io.BytesIO(data)), source, "a torch.export program")  # type: ignore[arg-type]
        return program.module(), program_inputs(program, input_shapes)
    if kind == "torchscript":
        model = _load(lambda: torch.jit.load(io.BytesIO(data), map_location="cpu"), source, "TorchScript")  # type: ignore[arg-type]
    else:
        model = _load_pickle(source, trust_pickle)
    model.eval()
    return model, random_inputs(model, input_shapes) if input_shapes is not None else None
