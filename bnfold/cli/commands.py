"""The ``bnfold`` commands: ``fold``, ``inspect``, ``verify``, each on one model (see :mod:`bnfold.cli.batch` for
many)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from bnfold.cli.common import (
    EXIT_NOT_EQUIVALENT,
    EXIT_OK,
    Command,
    emit,
    is_torch_file,
    named_shapes,
    parse_shapes,
    patterns_help,
    progress,
    refuse_options_for,
    standalone_option,
    status,
    train_mode_option,
    trust_pickle_option,
    verify_options,
    warn_guarded,
)
from bnfold.cli.many import batch_options, is_batch, run_many
from bnfold.core.atomic import check_destination, same_file
from bnfold.core.result import FoldResult
from bnfold.errors import InputError
from bnfold.onnx.api import fold_onnx, inspect_onnx
from bnfold.onnx.store.io import check_output
from bnfold.onnx.store.limits import PROTOBUF_LIMIT


@click.group(cls=Command, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="bnfold")
def main() -> None:
    """Fold inference-time BatchNormalization into neighbouring linear layers, exactly, and prove it."""


@main.command()
@click.argument("models", nargs=-1, required=True, type=click.Path())
@click.option("-o", "--output", type=click.Path(), help="Output file (default: <input>.folded.<ext>).")
@click.option("--output-dir", type=click.Path(file_okay=False),
              help="Many models: write each output here under its input's name (created if missing).")
@batch_options
@click.option("--verify/--no-verify", default=True, show_default=True,
              help="Compare original and folded under onnxruntime (optimizations off); not written if they differ.")
@click.option("--only", multiple=True, help=f"Fold only these patterns. {patterns_help}")
@click.option("--skip", multiple=True, help="Do not fold these patterns.")
@standalone_option
@click.option("--allow-overridable", is_flag=True,
              help="Treat initializers that are also graph inputs as constants.")
@click.option("--overwrite-input", is_flag=True, help="Allow the output to replace the input file.")
@click.option("--external-data", metavar="NAME", help="File name for external tensor data of large outputs.")
@click.option("--external-threshold", type=click.IntRange(min=0), default=PROTOBUF_LIMIT, show_default=True,
              help="Write tensors as external data when the model has at least this many bytes.")
@trust_pickle_option
@click.option("--export-onnx", type=click.Path(dir_okay=False), help="PyTorch: also export the folded model to ONNX.")
@train_mode_option
@verify_options
def fold(models: tuple[str, ...], output: str | None, output_dir: str | None, jobs: int, summary_md: str | None,
         verify: bool, only: tuple[str, ...], skip: tuple[str, ...],
         standalone: str | None, allow_overridable: bool, overwrite_input: bool, external_data: str | None,
         external_threshold: int,
         trust_pickle: bool, export_onnx: str | None, allow_train_mode: bool, inputs: tuple[str, ...],
         input_shapes: tuple[str, ...], iterations: int, seed: int, rtol: float | None, atol: float | None,
         as_json: bool) -> None:
    """Fold each model's batch norms and write the result to --output (one model) or --output-dir.

    MODELS are files, directories (searched for *.onnx) or glob patterns. Over several models, each runs in a
    process of its own (-j at once), one failing does not stop the others, and the exit code is the largest
    of theirs."""
    if output is not None and (len(models) > 1 or output_dir is not None):
        raise click.UsageError("-o names one output; for several models use --output-dir")
    if is_batch(models, several_outputs=output_dir is not None, single_output=output is not None):
        run_many("fold", models, output=output, output_dir=output_dir, jobs=jobs, summary_md=summary_md,
                 as_json=as_json)
    source = Path(models[0])
    target = Path(output) if output else source.with_name(f"{source.stem}.folded{source.suffix or '.onnx'}")
    shapes = parse_shapes(input_shapes)
    torch_input = is_torch_file(source)
    refuse_options_for(torch_input)
    _check_destinations(source, target, torch_input, overwrite_input, external_data, export_onnx)
    result: FoldResult
    if torch_input:
        from bnfold import fold_torch_file

        result = fold_torch_file(source, trust_pickle=trust_pickle, input_shapes=shapes, export_onnx=export_onnx,
                                 verify=verify, allow_train_mode=allow_train_mode, rtol=rtol, atol=atol,
                                 progress=status(not as_json))
        write_options: dict[str, Any] = {"overwrite_input": overwrite_input}
    else:
        result = fold_onnx(source, verify=verify, only=only, skip=skip, standalone=standalone,
                           allow_overridable=allow_overridable, inputs=list(inputs) or None,
                           input_shapes=named_shapes(shapes),
                           iterations=iterations, seed=seed, rtol=rtol, atol=atol, progress=progress(not as_json))
        warn_guarded(result.report)
        write_options = {"external_data": external_data, "external_threshold": external_threshold,
                         "overwrite_input": overwrite_input}
    report = result.report
    passed = report.verification is None or report.verification.passed
    written = result.write(target, **write_options) if passed else []
    verdict = getattr(report.verification, "status", "failed")  # unverified: a folded site no input reached
    note = f"\nwrote {target}" if written else f"\nNOT written: {target} (verification {verdict})"
    emit(as_json, lambda: {"input": str(source), "output": str(target), "written": [str(p) for p in written],
                            **report.to_dict()}, lambda: report.render() + note)
    sys.exit(EXIT_OK if passed else EXIT_NOT_EQUIVALENT)


@main.command()
@click.argument("models", nargs=-1, required=True, type=click.Path())
@click.option("--check", is_flag=True,
              help="Exit 1 if a model still holds a batch norm bnfold would fold (a lint for exported models).")
@batch_options
@click.option("--only", multiple=True, help=f"Consider only these patterns. {patterns_help}")
@click.option("--skip", multiple=True, help="Do not consider these patterns.")
@standalone_option
@click.option("--allow-overridable", is_flag=True, help="Treat initializers that are also graph inputs as constants.")
@trust_pickle_option
@train_mode_option
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def inspect(models: tuple[str, ...], check: bool, jobs: int, summary_md: str | None, only: tuple[str, ...],
            skip: tuple[str, ...], standalone: str | None, allow_overridable: bool, trust_pickle: bool,
            allow_train_mode: bool, as_json: bool) -> None:
    """Show what would fold in each model and why each other batch norm stays. Writes nothing.

    With --check, print one row per model and exit 1 if any still holds a batch norm bnfold would fold, 0 if
    none does (2 on bad input), as a pre-commit hook or CI step would use it."""
    if check or is_batch(models, several_outputs=False, single_output=False):
        run_many("inspect", models, output=None, output_dir=None, jobs=jobs, summary_md=summary_md, as_json=as_json,
                 check=check)
    model = models[0]
    torch_input = is_torch_file(Path(model))
    refuse_options_for(torch_input)
    if torch_input:
        from bnfold import fold_torch_file

        report = fold_torch_file(model, trust_pickle=trust_pickle, verify=False, allow_train_mode=allow_train_mode,
                                 progress=status(not as_json)).report
    else:
        report = inspect_onnx(model, only=only, skip=skip, standalone=standalone,
                              allow_overridable=allow_overridable)
        warn_guarded(report)
    emit(as_json, lambda: {"input": model, **report.to_dict()}, report.render)


@main.command()
@click.argument("original", type=click.Path())
@click.argument("candidate", type=click.Path())
@trust_pickle_option
@verify_options
def verify(original: str, candidate: str, trust_pickle: bool, inputs: tuple[str, ...], input_shapes: tuple[str, ...],
           iterations: int, seed: int, rtol: float | None, atol: float | None, as_json: bool) -> None:
    """Check that CANDIDATE computes what ORIGINAL computes (exit 0) or not (exit 1)."""
    shapes = parse_shapes(input_shapes)
    for path in (original, candidate):
        if not Path(path).is_file():
            raise InputError(f"{path}: no such file" if not Path(path).exists() else f"{path}: not a file")
    kinds = {is_torch_file(Path(path)) for path in (original, candidate)}
    if len(kinds) > 1:
        raise InputError("cannot compare an ONNX model with a PyTorch file; convert one so both are the same kind")
    torch_input = kinds.pop()
    refuse_options_for(torch_input)
    if torch_input:
        from bnfold.torch.deps import quiet_torch_warnings, require_torch

        require_torch()
        from bnfold.torch.files import compare_files

        with quiet_torch_warnings():
            checked = compare_files(original, candidate, trust_pickle=trust_pickle, input_shapes=shapes, rtol=rtol,
                                    atol=atol)
        emit(as_json, checked.to_dict, checked.render)
        sys.exit(EXIT_OK if checked.passed else EXIT_NOT_EQUIVALENT)
    from bnfold.onnx.verify.verify import verify_onnx

    report = verify_onnx(original, candidate, inputs=list(inputs) or None, input_shapes=named_shapes(shapes),
                         iterations=iterations, seed=seed, rtol=rtol, atol=atol, progress=progress(not as_json))
    emit(as_json, report.to_dict, report.render)
    sys.exit(EXIT_OK if report.passed else EXIT_NOT_EQUIVALENT)


def _check_destinations(source: Path, target: Path, torch_input: bool, overwrite_input: bool,
                        external_data: str | None, export_onnx: str | None) -> None:
    """Errors that depend only on the arguments, raised before anything is read: a destination that cannot
    be written (missing or read-only directory, a directory, a special file) or that names the input."""
    if same_file(source, target) and not overwrite_input:
        raise InputError(f"{target}: refusing to overwrite the input (pass --overwrite-input to allow it)")
    protected = [] if overwrite_input else [source]
    if torch_input:
        check_destination(target)
        if export_onnx is not None:
            check_output(Path(export_onnx), f"{Path(export_onnx).name}.data", [source, target])
    else:
        check_output(target, external_data or f"{target.name}.data", protected)
