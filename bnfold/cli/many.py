"""``bnfold fold`` and ``bnfold inspect`` on many models: the options, the check mode, and one run from the
arguments to the exit code (the running itself is :mod:`bnfold.cli.batch`'s, the tables
:mod:`bnfold.cli.summary`'s)."""

from __future__ import annotations

import glob
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import click

from bnfold.cli.batch import (
    RESULT_NAMES,
    Batch,
    Outcome,
    batch_code,
    find_models,
    forwarded_options,
    with_outputs,
    would_fold,
)
from bnfold.cli.common import EXIT_OK, emit
from bnfold.cli.summary import (
    Row,
    append_markdown,
    check_summary_destination,
    fold_row,
    render_markdown,
    render_text,
    row,
    to_json,
)
from bnfold.errors import OutputError

EXIT_CHECK_FAILED = 1  # inspect --check: a model still holds a batch norm bnfold would fold
# Options of the batch itself, never passed on to a model's own run.
BATCH_ONLY = {"output", "output_dir", "jobs", "summary_md", "as_json", "check"}


def batch_options(function: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option("-j", "--jobs", type=click.IntRange(min=0), default=1, show_default=True,
                     help="Many models: how many run at once, each in a process of its own (0: one per CPU)."),
        click.option("--summary-md", type=click.Path(dir_okay=False),
                     help="Many models: append a Markdown table of the results to this file (e.g. "
                          "\"$GITHUB_STEP_SUMMARY\")."),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def is_batch(models: Sequence[str], *, several_outputs: bool, single_output: bool) -> bool:
    """Whether the arguments ask for the batch (several models, a directory, a glob, or a batch option)
    rather than one model's full report. With one output named (``-o``) only a batch option does: a
    directory is then a mistake the single run names."""
    ctx = click.get_current_context()
    batch_option_given = any(ctx.get_parameter_source(name) not in (None, click.core.ParameterSource.DEFAULT)
                             for name in ("jobs", "summary_md"))
    if single_output:
        return batch_option_given
    only = Path(models[0])
    return (len(models) > 1 or several_outputs or batch_option_given or only.is_dir()
            or (not only.exists() and glob.has_magic(models[0])))


def run_many(command: str, models: Sequence[str], *, output: str | None, output_dir: str | None, jobs: int,
             summary_md: str | None, as_json: bool, check: bool = False) -> NoReturn:
    """Run ``command`` on every model the arguments name (for ``fold``: into ``output``, when one model is
    named, or ``output_dir``), print the table (or JSON), append the Markdown summary, and exit with the
    batch's code. Argument errors come before any model runs."""
    found = find_models(models)
    if output is not None:
        if len(found) != 1:
            raise click.UsageError("-o names one output; for several models use --output-dir")
        found = [found[0]._replace(output=Path(output))]
    elif command == "fold":
        found = with_outputs(found, Path(output_dir) if output_dir else None)
    if summary_md is not None:
        check_summary_destination(Path(summary_md))
    if output_dir is not None:
        _make_directories(found_outputs=[model.output for model in found if model.output is not None])
    child = [command, *forwarded_options(click.get_current_context(), BATCH_ONLY)]
    outcomes = Batch(child, jobs, show_progress=not as_json).run(found)
    if check:
        outcomes = [_checked(outcome) for outcome in outcomes]
    rows = [(_check_row if check else fold_row if command == "fold" else _inspect_row)(o) for o in outcomes]
    code = batch_code([outcome.code for outcome in outcomes])
    title = f"{command} --check" if check else command
    if summary_md is not None:
        append_markdown(Path(summary_md), render_markdown(title, rows))
    emit(as_json, lambda: to_json(title, outcomes, rows, code), lambda: render_text(title, rows))
    sys.exit(code)


def _make_directories(found_outputs: list[Path]) -> None:
    for directory in sorted({output.parent for output in found_outputs}):
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise OutputError(f"{directory}: cannot create the output directory ({error.strerror or error})") \
                from None


def _checked(outcome: Outcome) -> Outcome:
    """A model inspected without error fails the check if it still holds a batch norm that would fold."""
    if outcome.code != EXIT_OK:
        return outcome
    names = would_fold(outcome.payload)
    if not names:
        return outcome
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    return outcome._replace(code=EXIT_CHECK_FAILED, message=f"{len(names)} batch norm(s) would fold: {shown}")


def _check_row(outcome: Outcome) -> Row:
    result = {EXIT_OK: "clean", EXIT_CHECK_FAILED: "would fold"}.get(outcome.code) or \
        RESULT_NAMES.get(outcome.code, f"exit {outcome.code}")
    return row(outcome, result, outcome.message or "no batch norm bnfold would fold")


def _inspect_row(outcome: Outcome) -> Row:
    names = would_fold(outcome.payload)
    detail = outcome.message or (f"{len(names)} batch norm(s) would fold" if names else "nothing would fold")
    return row(outcome, RESULT_NAMES.get(outcome.code, f"exit {outcome.code}"), detail)
