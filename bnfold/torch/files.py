"""fold_torch_file: fold a .pt2 program, a TorchScript file or a (trusted) pickled module on disk.

The input file is only read. The folded model is serialized in memory, loaded back and checked; what
:meth:`bnfold.FoldResult.write` writes (atomically, see :mod:`bnfold.core.atomic`) is those checked bytes.
"""

from __future__ import annotations

import io
import os
import zipfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from bnfold.core.compare import VerificationSet, VerifyReport
from bnfold.core.report import FoldReport
from bnfold.core.result import FoldResult
from bnfold.errors import InputError, OutputError, first_line
from bnfold.torch.checks import compare, exact_math
from bnfold.torch.result import TorchFolded, save_bytes, save_module
from bnfold.torch.running import Inputs, random_inputs
from bnfold.torch.trust import require_safe

Format = Literal["pt2", "torchscript", "pickle"]
Shapes = Mapping[str, Sequence[int]] | Sequence[Sequence[int]]


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
    say = progress or (lambda _message: None)
    if not source.is_file():
        raise InputError(f"{source} does not exist or is not a file")
    kind = detect_format(source)
    say(f"{source.name}: {kind}")
    fold = _FOLDERS[kind]
    data = _checked_bytes(source, kind, trust_pickle)
    with exact_math():
        folded, report = fold(
            source, data=data, trust_pickle=trust_pickle, input_shapes=input_shapes,
            export_onnx=None if export_onnx is None else Path(export_onnx), verify=verify,
            allow_train_mode=allow_train_mode, tolerance={"rtol": rtol, "atol": atol}, say=say,
        )
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


def _fold_pt2(
    source: Path, *, data: bytes, input_shapes, export_onnx, verify, tolerance, say, **_: Any
) -> tuple[TorchFolded, FoldReport]:
    from bnfold.torch.fold.exported import fold_exported

    program = _load(lambda: torch.export.load(io.BytesIO(data)), source, "a torch.export program")
    inputs = _program_inputs(program, input_shapes)
    reference = program.module()(*inputs.args, **inputs.kwargs) if inputs is not None else None
    say("folding the exported program")
    report = fold_exported(program)
    saved = _serialized(lambda buffer: torch.export.save(program, buffer))
    checks = []
    if verify and reference is not None:
        reloaded = torch.export.load(io.BytesIO(saved))
        folded_outputs = reloaded.module()(*inputs.args, **inputs.kwargs)  # type: ignore[union-attr]
        checks.append(compare(reference, folded_outputs, "pytorch (saved file)", **tolerance))
    if export_onnx is not None and inputs is not None:
        from bnfold.torch.export import export_and_check

        checks.append(export_and_check(program, inputs, reference, export_onnx, **tolerance))
    _attach(report, checks)
    return TorchFolded(program, save_bytes(saved), source), report


def _fold_torchscript(
    source: Path, *, data: bytes, input_shapes, export_onnx, verify, allow_train_mode, tolerance, say, **_: Any
) -> tuple[TorchFolded, FoldReport]:
    from bnfold.torch.fold.scripted import fold_scripted

    original = _load(lambda: torch.jit.load(io.BytesIO(data), map_location="cpu"), source, "TorchScript")
    work = torch.jit.load(io.BytesIO(data), map_location="cpu")
    if work.training:
        if not allow_train_mode:
            raise InputError(_TRAIN_MODE)
        work.eval()
        original.eval()
    inputs = random_inputs(original, input_shapes) if input_shapes is not None else None
    reference = original(*inputs.args, **inputs.kwargs) if inputs is not None else None
    say("folding the TorchScript module")
    report = fold_scripted(work)
    saved = _serialized(lambda buffer: torch.jit.save(work, buffer))
    reloaded = torch.jit.load(io.BytesIO(saved), map_location="cpu")
    checks = []
    if verify and inputs is not None:
        checks.append(compare(reference, reloaded(*inputs.args, **inputs.kwargs), "pytorch (saved file)", **tolerance))
    if export_onnx is not None and inputs is not None:
        from bnfold.torch.export import export_and_check

        checks.append(export_and_check(reloaded, inputs, reference, export_onnx, **tolerance))
    _attach(report, checks)
    return TorchFolded(reloaded, save_bytes(saved), source), report


def _fold_pickle(
    source: Path, *, data: None, trust_pickle, input_shapes, export_onnx, verify, allow_train_mode, tolerance, say,
) -> tuple[TorchFolded, FoldReport]:
    from bnfold.torch.fold.module import fold_module

    model = _load_pickle(source, trust_pickle)
    result = fold_module(
        model, None, inplace=True, allow_train_mode=allow_train_mode, input_shapes=input_shapes,
        verify=verify, export_onnx=None if export_onnx is None else str(export_onnx), progress=say, **tolerance,
    )
    return TorchFolded(result.model, save_module(result.model), source), result.report


_FOLDERS: dict[Format, Callable[..., tuple[TorchFolded, FoldReport]]] = {
    "pt2": _fold_pt2, "torchscript": _fold_torchscript, "pickle": _fold_pickle,
}


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


_TRAIN_MODE = (
    "the model is in training mode; save it after model.eval(), or pass allow_train_mode=True "
    "to fold its eval-mode behaviour"
)


def _program_inputs(program: Any, shapes: Shapes | None) -> Inputs | None:
    if shapes is not None:
        holder = nn.Module()
        floats = [t for t in program.state_dict.values() if t.is_floating_point()]
        if floats:
            holder.register_buffer("reference", floats[0].detach())
        return random_inputs(holder, shapes)
    stored = getattr(program, "example_inputs", None)
    if stored is None:
        return None
    args, kwargs = stored
    return Inputs(tuple(args), dict(kwargs))


def _attach(report: FoldReport, checks: list[VerifyReport]) -> None:
    if checks:
        report.verification = checks[0] if len(checks) == 1 else VerificationSet(checks)


def _load(load: Callable[[], Any], source: Path, what: str) -> Any:
    try:
        return load()
    except Exception as error:
        raise InputError(f"cannot load {source.name} as {what}: {first_line(error, 160)}") from error


def _serialized(save: Callable[[io.BytesIO], None]) -> bytes:
    buffer = io.BytesIO()
    try:
        save(buffer)
    except Exception as error:
        raise OutputError(f"cannot write the folded model: {type(error).__name__}: {error}") from error
    return buffer.getvalue()


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
        return program.module(), _program_inputs(program, input_shapes)
    if kind == "torchscript":
        model = _load(lambda: torch.jit.load(io.BytesIO(data), map_location="cpu"), source, "TorchScript")  # type: ignore[arg-type]
    else:
        model = _load_pickle(source, trust_pickle)
    model.eval()
    return model, random_inputs(model, input_shapes) if input_shapes is not None else None
