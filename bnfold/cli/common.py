"""What every ``bnfold`` command shares: exit codes, one-line errors, output that survives a reader that
has gone, option groups, and telling ONNX files from PyTorch ones."""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from bnfold.core.interrupts import Interrupted, interrupt_on_stop_signals
from bnfold.core.report import FoldReport
from bnfold.errors import BnfoldError, InputError, InternalError, MissingDependencyError
from bnfold.onnx.fold.patterns import PATTERN_NAMES, STANDALONE_MODES
from bnfold.reasons import Reason

EXIT_OK, EXIT_NOT_EQUIVALENT, EXIT_BAD_INPUT, EXIT_INTERNAL = 0, 1, 2, 3
TORCH_MAGIC = (b"PK\x03\x04", b"\x80")  # zip archives (.pt2, TorchScript, torch.save) and raw pickles


def parse_shapes(values: tuple[str, ...]) -> dict[str, list[int]] | list[list[int]] | None:
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


def is_terminal(stream: object) -> bool:
    """Whether ``stream`` is an open terminal (a closed or missing stderr is not)."""
    try:
        return bool(stream.isatty())  # type: ignore[attr-defined]
    except (AttributeError, ValueError, OSError):
        return False


def progress(enabled: bool) -> Callable[[str, int, int], None] | None:
    """A one-line counter on stderr, only for a person watching a terminal."""
    if not enabled or not is_terminal(sys.stderr):
        return None

    def show(stage: str, done: int, total: int) -> None:
        click.echo(f"\r\033[K{stage}: {done}/{total}", err=True, nl=done >= total)

    return show


def status(enabled: bool) -> Callable[[str], None] | None:
    """A status line on stderr for PyTorch work, only for a person watching a terminal."""
    if not enabled or not is_terminal(sys.stderr):
        return None
    return lambda message: click.echo(f"\r\033[K{message}", err=True, nl=False)


def warn_guarded(report: FoldReport) -> None:
    """A site the per-pattern guard left is a bnfold bug the user should report, even though the rest of
    the model folded; say so on stderr, where it does not disturb --json."""
    for record in report.left:
        if record.reason == Reason.GUARD_REJECTED:
            where = f"{record.scope}/{record.bn}" if record.scope else record.bn
            click.echo(f"bnfold: warning: {where}: {record.message}", err=True)


def emit(as_json: bool, payload: Callable[[], dict[str, Any]], text: Callable[[], str]) -> None:
    """Print the JSON payload or the text; only the one printed is built (a report's dict is not free).

    A reader that has gone (a closed stdout, a pipe whose reader exited) changes nothing about what was
    done: the report is dropped and the exit code stays the verdict's."""
    try:
        click.echo(json.dumps(payload(), indent=2, default=float) if as_json else text())
    except (OSError, ValueError):  # ValueError: the stream was closed
        drop_stdout()


def drop_stdout() -> None:
    """Send whatever is still buffered for stdout nowhere, so ending the process cannot fail on it."""
    sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - lives until the process ends


def is_torch_file(path: Path) -> bool:
    if not path.is_file():
        return False
    try:
        with open(path, "rb") as handle:
            head = handle.read(4)
    except OSError:
        return False
    return head.startswith(TORCH_MAGIC) or path.suffix in {".pt2", ".pt", ".pth", ".ts"}


# Options that mean something for one kind of input only; given for the other kind, they are refused.
ONNX_ONLY = {"only", "skip", "standalone", "allow_overridable", "external_data", "external_threshold", "inputs",
              "iterations", "seed"}
TORCH_ONLY = {"trust_pickle", "export_onnx", "allow_train_mode"}


def refuse_options_for(torch_input: bool) -> None:
    """Exit 2 with one line when an option given on the command line does not apply to the input's kind."""
    ctx = click.get_current_context()
    foreign, kind = (ONNX_ONLY, "PyTorch files") if torch_input else (TORCH_ONLY, "ONNX models")
    for param in ctx.command.params:
        source = ctx.get_parameter_source(param.name) if param.name else None
        if param.name in foreign and source not in (None, click.core.ParameterSource.DEFAULT):
            option = max(param.opts, key=len)
            raise click.UsageError(f"{option} does not apply to {kind}", ctx)


class Command(click.Group):
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


patterns_help = f"Pattern names: {', '.join(PATTERN_NAMES)}."
standalone_option = click.option(
    "--standalone", type=click.Choice(STANDALONE_MODES),
    help="Rewrite each batch norm that folds into no layer as one Mul and one Add, or as one depthwise 1x1 Conv "
         "(faster under onnxruntime's default ORT_ENABLE_ALL). Off by default.",
)

trust_pickle_option = click.option("--trust-pickle", is_flag=True,
                                    help="PyTorch: allow loading pickled modules (runs their code).")
train_mode_option = click.option("--allow-train-mode", is_flag=True,
                                  help="PyTorch: fold a train-mode model as its eval behaviour.")


def verify_options(function: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option("--inputs", multiple=True, type=click.Path(),
                     help="Inputs to run on: an .npz (name -> array), ONNX test data (input_N.pb, a test_data_set_N "
                          "directory or a directory of them, whose output_N.pb are compared too). Repeat for "
                          "several samples."),
        click.option("--input-shape", "input_shapes", multiple=True, metavar="NAME:1x3x224x224",
                     help="Shape for an input with dynamic dims (ONNX default: two sizes the model runs at)."),
        click.option("--iterations", type=click.IntRange(min=1), default=3, show_default=True,
                     help="Random input draws to compare (ignored with --inputs)."),
        click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
                     help="Seed for generated inputs."),
        click.option("--rtol", type=float, help="Relative tolerance (default depends on dtype)."),
        click.option("--atol", type=float, help="Absolute tolerance (default: scaled to the output's magnitude)."),
        click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON."),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def named_shapes(shapes: dict[str, list[int]] | list[list[int]] | None) -> dict[str, list[int]] | None:
    if isinstance(shapes, list):
        raise click.BadParameter("ONNX inputs need named shapes (name:1x3x224x224)", param_hint="--input-shape")
    return shapes
