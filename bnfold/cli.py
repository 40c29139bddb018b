"""The ``bnfold`` command line: ``fold``, ``inspect``, ``verify``.

Exit codes: 0 success (and equivalent), 1 verification failed, 2 usage error or bad input,
3 internal error, 128 + signal number when SIGINT (130) or SIGTERM (143) stops it. Errors are one line on
stderr; set ``BNFOLD_DEBUG=1`` for a traceback.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import click

from bnfold.core.atomic import same_file
from bnfold.core.interrupts import Interrupted, interrupt_on_stop_signals
from bnfold.core.report import FoldReport
from bnfold.core.result import FoldResult
from bnfold.errors import BnfoldError, InputError, InternalError, MissingDependencyError
from bnfold.onnx.api import fold_onnx, inspect_onnx
from bnfold.onnx.fold.patterns import PATTERN_NAMES, STANDALONE_MODES
from bnfold.onnx.store.limits import PROTOBUF_LIMIT
from bnfold.reasons import Reason

EXIT_OK, EXIT_NOT_EQUIVALENT, EXIT_BAD_INPUT, EXIT_INTERNAL = 0, 1, 2, 3
_TORCH_MAGIC = (b"PK\x03\x04", b"\x80")  # zip archives (.pt2, TorchScript, torch.save) and raw pickles


def _parse_shapes(values: tuple[str, ...]) -> dict[str, list[int]] | list[list[int]] | None:
    """``name:1x3x224x224`` entries, or bare ``1x3x224x224`` entries taken by position."""
    if not values:
        return None
    named: dict[str, list[int]] = {}
    positional: list[list[int]] = []
    for value in values:
        name, _, dims = value.rpartition(":")
        try:
            shape = [int(d) for d in dims.lower().split("x")]
        except ValueError:
            raise click.BadParameter(f"{value!r}: expected name:1x3x224x224", param_hint="--input-shape") from None
        if any(d < 0 for d in shape):
            raise click.BadParameter(f"{value!r}: dimensions must be >= 0", param_hint="--input-shape")
        if name:
            named[name] = shape
        else:
            positional.append(shape)
    if named and positional:
        raise click.BadParameter("give every shape a name, or none", param_hint="--input-shape")
    return named or positional


def _progress(enabled: bool) -> Callable[[str, int, int], None] | None:
    """A one-line counter on stderr, only for a person watching a terminal."""
    if not enabled or not sys.stderr.isatty():
        return None

    def show(stage: str, done: int, total: int) -> None:
        click.echo(f"\r\033[K{stage}: {done}/{total}", err=True, nl=done >= total)

    return show


def _status(enabled: bool) -> Callable[[str], None] | None:
    """A status line on stderr for PyTorch work, only for a person watching a terminal."""
    if not enabled or not sys.stderr.isatty():
        return None
    return lambda message: click.echo(f"\r\033[K{message}", err=True, nl=False)


def _warn_guarded(report: FoldReport) -> None:
    """A site the per-pattern guard left is a bnfold bug the user should report, even though the rest of
    the model folded; say so on stderr, where it does not disturb --json."""
    for record in report.left:
        if record.reason == Reason.GUARD_REJECTED:
            where = f"{record.scope}/{record.bn}" if record.scope else record.bn
            click.echo(f"bnfold: warning: {where}: {record.message}", err=True)


def _emit(as_json: bool, payload: Callable[[], dict[str, Any]], text: Callable[[], str]) -> None:
    """Print the JSON payload or the text; only the one printed is built (a report's dict is not free).

    A reader that has gone (a closed stdout, a pipe whose reader exited) changes nothing about what was
    done: the report is dropped and the exit code stays the verdict's."""
    try:
        click.echo(json.dumps(payload(), indent=2, default=float) if as_json else text())
    except (OSError, ValueError):  # ValueError: the stream was closed
        _drop_stdout()


def _drop_stdout() -> None:
    """Send whatever is still buffered for stdout nowhere, so ending the process cannot fail on it."""
    sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - lives until the process ends


def _is_torch_file(path: Path) -> bool:
    if not path.is_file():
        return False
    try:
        with open(path, "rb") as handle:
            head = handle.read(4)
    except OSError:
        return False
    return head.startswith(_TORCH_MAGIC) or path.suffix in {".pt2", ".pt", ".pth", ".ts"}


# Options that mean something for one kind of input only; given for the other kind, they are refused.
_ONNX_ONLY = {"only", "skip", "standalone", "allow_overridable", "external_data", "external_threshold", "inputs",
              "iterations", "seed"}
_TORCH_ONLY = {"trust_pickle", "export_onnx", "allow_train_mode"}


def _refuse_options_for(torch_input: bool) -> None:
    """Exit 2 with one line when an option given on the command line does not apply to the input's kind."""
    ctx = click.get_current_context()
    foreign, kind = (_ONNX_ONLY, "PyTorch files") if torch_input else (_TORCH_ONLY, "ONNX models")
    for param in ctx.command.params:
        source = ctx.get_parameter_source(param.name) if param.name else None
        if param.name in foreign and source not in (None, click.core.ParameterSource.DEFAULT):
            option = max(param.opts, key=len)
            raise click.UsageError(f"{option} does not apply to {kind}", ctx)


class _Command(click.Group):
    """Maps bnfold's own errors to one line and an exit code instead of a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            with interrupt_on_stop_signals():
                return super().invoke(ctx)
        except MissingDependencyError as error:
            self._fail(error, EXIT_BAD_INPUT)
        except InputError as error:
            self._fail(error, EXIT_BAD_INPUT)
        except InternalError as error:
            self._fail(error, EXIT_INTERNAL)
        except BnfoldError as error:
            self._fail(error, EXIT_BAD_INPUT)
        except (click.exceptions.Exit, click.Abort):
            raise
        except click.ClickException as error:
            context = error.ctx if isinstance(error, click.UsageError) else None
            hint = f" (see '{context.command_path} --help')" if context is not None else ""
            self._fail(f"{error.format_message().rstrip('.')}{hint}", error.exit_code)
        except KeyboardInterrupt as interrupt:
            signum = interrupt.signum if isinstance(interrupt, Interrupted) else signal.SIGINT
            self._fail(f"interrupted by {signal.Signals(signum).name}; no partial output was left", 128 + signum)
        except Exception as error:  # noqa: BLE001 - the last line of defence against a traceback
            if os.environ.get("BNFOLD_DEBUG"):
                raise
            self._fail(f"internal error ({type(error).__name__}: {error}); please report it", EXIT_INTERNAL)

    @staticmethod
    def _fail(error: object, code: int) -> None:
        message = " ".join(str(error).split()) or type(error).__name__
        click.echo(f"bnfold: error: {message}", err=True)
        sys.exit(code)


_patterns_help = f"Pattern names: {', '.join(PATTERN_NAMES)}."
_standalone_option = click.option(
    "--standalone", type=click.Choice(STANDALONE_MODES),
    help="Rewrite each batch norm that folds into no layer as one Mul and one Add, or as one depthwise 1x1 Conv "
         "(faster under onnxruntime's default ORT_ENABLE_ALL). Off by default.",
)

_trust_pickle_option = click.option("--trust-pickle", is_flag=True,
                                    help="PyTorch: allow loading pickled modules (runs their code).")
_train_mode_option = click.option("--allow-train-mode", is_flag=True,
                                  help="PyTorch: fold a train-mode model as its eval behaviour.")


def _verify_options(function: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option("--inputs", type=click.Path(dir_okay=False), help="A .npz of input arrays (name -> array)."),
        click.option("--input-shape", "input_shapes", multiple=True, metavar="NAME:1x3x224x224",
                     help="Shape for an input with dynamic dims (default 1 per dynamic dim)."),
        click.option("--iterations", type=click.IntRange(min=1), default=3, show_default=True,
                     help="Random input draws to compare (ignored with --inputs)."),
        click.option("--seed", type=int, default=0, show_default=True, help="Seed for generated inputs."),
        click.option("--rtol", type=float, help="Relative tolerance (default depends on dtype)."),
        click.option("--atol", type=float, help="Absolute tolerance (default: scaled to the output's magnitude)."),
        click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON."),
    ]
    for option in reversed(options):
        function = option(function)
    return function


@click.group(cls=_Command, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="bnfold")
def main() -> None:
    """Fold inference-time BatchNormalization into neighbouring linear layers, exactly, and prove it."""


@main.command()
@click.argument("model", type=click.Path())
@click.option("-o", "--output", type=click.Path(), help="Output file (default: <input>.folded.<ext>).")
@click.option("--verify/--no-verify", default=True, show_default=True,
              help="Compare original and folded under onnxruntime (optimizations off); not written if they differ.")
@click.option("--only", multiple=True, help=f"Fold only these patterns. {_patterns_help}")
@click.option("--skip", multiple=True, help="Do not fold these patterns.")
@_standalone_option
@click.option("--allow-overridable", is_flag=True,
              help="Treat initializers that are also graph inputs as constants.")
@click.option("--overwrite-input", is_flag=True, help="Allow the output to replace the input file.")
@click.option("--external-data", metavar="NAME", help="File name for external tensor data of large outputs.")
@click.option("--external-threshold", type=click.IntRange(min=0), default=PROTOBUF_LIMIT, show_default=True,
              help="Write tensors as external data when the model has at least this many bytes.")
@_trust_pickle_option
@click.option("--export-onnx", type=click.Path(dir_okay=False), help="PyTorch: also export the folded model to ONNX.")
@_train_mode_option
@_verify_options
def fold(model: str, output: str | None, verify: bool, only: tuple[str, ...], skip: tuple[str, ...],
         standalone: str | None, allow_overridable: bool, overwrite_input: bool, external_data: str | None,
         external_threshold: int,
         trust_pickle: bool, export_onnx: str | None, allow_train_mode: bool, inputs: str | None,
         input_shapes: tuple[str, ...], iterations: int, seed: int, rtol: float | None, atol: float | None,
         as_json: bool) -> None:
    """Fold MODEL's batch norms and write the result to --output."""
    source = Path(model)
    target = Path(output) if output else source.with_name(f"{source.stem}.folded{source.suffix or '.onnx'}")
    if same_file(source, target) and not overwrite_input:
        raise InputError(f"{target}: refusing to overwrite the input (pass --overwrite-input to allow it)")
    shapes = _parse_shapes(input_shapes)
    torch_input = _is_torch_file(source)
    _refuse_options_for(torch_input)
    result: FoldResult
    if torch_input:
        from bnfold import fold_torch_file

        result = fold_torch_file(source, trust_pickle=trust_pickle, input_shapes=shapes, export_onnx=export_onnx,
                                 verify=verify, allow_train_mode=allow_train_mode, rtol=rtol, atol=atol,
                                 progress=_status(not as_json))
        write_options: dict[str, Any] = {"overwrite_input": overwrite_input}
    else:
        result = fold_onnx(source, verify=verify, only=only, skip=skip, standalone=standalone,
                           allow_overridable=allow_overridable, inputs=inputs, input_shapes=_named(shapes),
                           iterations=iterations, seed=seed, rtol=rtol, atol=atol, progress=_progress(not as_json))
        _warn_guarded(result.report)
        write_options = {"external_data": external_data, "external_threshold": external_threshold}
    report = result.report
    passed = report.verification is None or report.verification.passed
    written = result.write(target, **write_options) if passed else []
    note = f"\nwrote {target}" if written else f"\nNOT written: {target} (verification failed)"
    _emit(as_json, lambda: {"input": str(source), "output": str(target), "written": [str(p) for p in written],
                            **report.to_dict()}, lambda: report.render() + note)
    sys.exit(EXIT_OK if passed else EXIT_NOT_EQUIVALENT)


def _named(shapes: dict[str, list[int]] | list[list[int]] | None) -> dict[str, list[int]] | None:
    if isinstance(shapes, list):
        raise click.BadParameter("ONNX inputs need named shapes (name:1x3x224x224)", param_hint="--input-shape")
    return shapes


@main.command()
@click.argument("model", type=click.Path())
@click.option("--only", multiple=True, help=f"Consider only these patterns. {_patterns_help}")
@click.option("--skip", multiple=True, help="Do not consider these patterns.")
@_standalone_option
@click.option("--allow-overridable", is_flag=True, help="Treat initializers that are also graph inputs as constants.")
@_trust_pickle_option
@_train_mode_option
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def inspect(model: str, only: tuple[str, ...], skip: tuple[str, ...], standalone: str | None,
            allow_overridable: bool, trust_pickle: bool, allow_train_mode: bool, as_json: bool) -> None:
    """Show what would fold in MODEL and why each other batch norm stays. Writes nothing."""
    torch_input = _is_torch_file(Path(model))
    _refuse_options_for(torch_input)
    if torch_input:
        from bnfold import fold_torch_file

        report = fold_torch_file(model, trust_pickle=trust_pickle, verify=False, allow_train_mode=allow_train_mode,
                                 progress=_status(not as_json)).report
    else:
        report = inspect_onnx(model, only=only, skip=skip, standalone=standalone,
                              allow_overridable=allow_overridable)
        _warn_guarded(report)
    _emit(as_json, lambda: {"input": model, **report.to_dict()}, report.render)


@main.command()
@click.argument("original", type=click.Path())
@click.argument("candidate", type=click.Path())
@_trust_pickle_option
@_verify_options
def verify(original: str, candidate: str, trust_pickle: bool, inputs: str | None, input_shapes: tuple[str, ...],
           iterations: int, seed: int, rtol: float | None, atol: float | None, as_json: bool) -> None:
    """Check that CANDIDATE computes what ORIGINAL computes (exit 0) or not (exit 1)."""
    shapes = _parse_shapes(input_shapes)
    for path in (original, candidate):
        if not Path(path).is_file():
            raise InputError(f"{path}: no such file" if not Path(path).exists() else f"{path}: not a file")
    kinds = {_is_torch_file(Path(path)) for path in (original, candidate)}
    if len(kinds) > 1:
        raise InputError("cannot compare an ONNX model with a PyTorch file; convert one so both are the same kind")
    torch_input = kinds.pop()
    _refuse_options_for(torch_input)
    if torch_input:
        from bnfold.torch.deps import require_torch

        require_torch()
        from bnfold.torch.files import compare_files

        checked = compare_files(original, candidate, trust_pickle=trust_pickle, input_shapes=shapes, rtol=rtol,
                                atol=atol)
        _emit(as_json, checked.to_dict, checked.render)
        sys.exit(EXIT_OK if checked.passed else EXIT_NOT_EQUIVALENT)
    from bnfold.onnx.verify.verify import verify_onnx

    report = verify_onnx(original, candidate, inputs=inputs, input_shapes=_named(shapes), iterations=iterations,
                         seed=seed, rtol=rtol, atol=atol, progress=_progress(not as_json))
    _emit(as_json, report.to_dict, report.render)
    sys.exit(EXIT_OK if report.passed else EXIT_NOT_EQUIVALENT)


def run(args: list[str] | None = None) -> NoReturn:
    """The ``bnfold`` command as a process of its own (the console script, ``python -m bnfold``, ``cli.py``):
    :func:`run_command`, then :func:`end_process`."""
    end_process(run_command(args))


def run_command(args: list[str] | None = None) -> object:
    """:func:`main` in a process that ends with it; the exit code it asks for (as ``SystemExit`` has it).

    Everything imported is alive until the process ends, so the garbage collector is told to leave it be
    (``gc.freeze``): the fold's collections no longer walk onnx's, numpy's and protobuf's objects again and
    again. Not for in-process callers of :func:`main`, whose objects outlive the command."""
    gc.freeze()
    try:
        main(args=args, prog_name="bnfold")
    except SystemExit as exit_:
        return exit_.code
    return EXIT_OK


def end_process(code: object) -> NoReturn:
    """End the process with ``code`` (as ``SystemExit`` takes it) once stdout and stderr are flushed, without
    the interpreter's teardown: every file bnfold writes is closed (and synced) by then, and tearing down
    onnx, numpy, protobuf and the model's objects only to free memory the exit frees anyway took 7 ms of a
    0.2 s fold of a 1 MB model and 20 ms at 16 MB. (mypy ends its processes the same way.)"""
    if code is None:
        status = EXIT_OK
    elif isinstance(code, int):
        status = code
    else:
        with contextlib.suppress(OSError, ValueError, AttributeError):  # no stderr, or nobody reading it
            sys.stderr.write(f"{code}\n")
        status = 1
    for stream in (sys.stdout, sys.stderr):
        # A stream that is missing (its descriptor was closed at start) or whose reader has gone: what
        # bnfold did is done and its exit code says so (not Python's 120, which would claim a failure).
        with contextlib.suppress(OSError, ValueError, AttributeError):
            stream.flush()
    os._exit(status)
