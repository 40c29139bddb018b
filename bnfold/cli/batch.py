"""Many models at once: ``bnfold fold`` and ``bnfold inspect`` over files, directories and globs.

Each model runs in a child process of its own (``python -m bnfold <command> MODEL ... --json``), ``jobs`` at a
time: a model that crashes, exhausts memory or hangs stops nothing but itself, and every model gets exactly
the verdict, exit code and output a run on it alone would give. A stop signal is passed on to the running
children, which clean up as they would alone, and then ends the batch with one line.

The batch's exit code is the largest of the models' codes (0 all ok, 1 some verification failed or, for
``inspect --check``, some model still holds a batch norm bnfold would fold, 2 some model was bad input,
3 some model met an internal error or was killed).
"""

from __future__ import annotations

import concurrent.futures
import glob
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import click

from bnfold.cli.common import EXIT_BAD_INPUT, EXIT_INTERNAL, EXIT_NOT_EQUIVALENT, EXIT_OK, is_terminal
from bnfold.core.atomic import same_file
from bnfold.core.interrupts import Interrupted, deferred_interrupts
from bnfold.errors import InputError

MODEL_SUFFIX = ".onnx"  # what a directory is searched for
FOLDED_MARK = ".folded"  # bnfold's own default outputs, never taken as inputs from a directory


class Model(NamedTuple):
    """One model of a batch: where it was found (``root``: the directory argument it was found under, if
    any) and where its output goes (``output``, for ``fold``)."""

    source: Path
    root: Path | None = None
    output: Path | None = None


class Outcome(NamedTuple):
    model: Model
    code: int
    payload: dict[str, Any] | None  # the child's --json report, when it printed one
    message: str  # the child's error line, or how it ended


def find_models(arguments: Sequence[str]) -> list[Model]:
    """The models the arguments name: files as given, directories searched (recursively) for ``*.onnx``
    files other than bnfold's own ``*.folded.onnx`` outputs and hidden ones, glob patterns (``**``
    too) that the shell left unexpanded. Each model once. Raises :class:`InputError` for an argument that
    names nothing."""
    found: list[Model] = []
    for argument in arguments:
        path = Path(argument)
        if path.is_dir():
            models = [Model(p, path) for p in sorted(path.rglob(f"*{MODEL_SUFFIX}")) if _searchable(p, path)]
            if not models:
                raise InputError(f"{argument}: no {MODEL_SUFFIX} model in this directory")
            found += models
        elif os.path.lexists(path):
            found.append(Model(path))
        elif glob.has_magic(argument):
            matches = [Path(p) for p in sorted(glob.glob(argument, recursive=True)) if Path(p).is_file()]
            if not matches:
                raise InputError(f"{argument}: matches no file")
            found += [Model(p) for p in matches]
        else:
            raise InputError(f"{argument}: no such file")
    unique: list[Model] = []
    for model in found:
        if not any(same_file(model.source, seen.source) for seen in unique):
            unique.append(model)
    return unique


def _searchable(path: Path, root: Path) -> bool:
    relative = path.relative_to(root)
    return (path.is_file() and not path.name.endswith(f"{FOLDED_MARK}{MODEL_SUFFIX}")
            and not any(part.startswith(".") for part in relative.parts))


def with_outputs(models: list[Model], output_dir: Path | None) -> list[Model]:
    """Each model with its output: under ``output_dir`` by the same name (by its path below the directory
    argument it was found in), else ``<stem>.folded<suffix>`` beside it. Two models may not share an output,
    nor may an output be its own input."""
    placed: list[Model] = []
    for model in models:
        source = model.source
        if output_dir is None:
            output = source.with_name(f"{source.stem}{FOLDED_MARK}{source.suffix or MODEL_SUFFIX}")
        elif model.root is not None:
            output = output_dir / source.relative_to(model.root)
        else:
            output = output_dir / source.name
        if same_file(source, output) or os.path.abspath(source) == os.path.abspath(output):
            raise InputError(f"{output}: the output of {source} would replace it; choose another --output-dir")
        clash = next((other for other in placed if os.path.abspath(other.output or "") == os.path.abspath(output)),
                     None)
        if clash is not None:
            raise InputError(f"{output}: the output of both {clash.source} and {source}")
        placed.append(model._replace(output=output))
    return placed


def forwarded_options(ctx: click.Context, skip: set[str]) -> list[str]:
    """The options given on the command line (not defaults), as arguments for a child, except ``skip``."""
    args: list[str] = []
    for param in ctx.command.params:
        name = param.name
        if not isinstance(param, click.Option) or name is None or name in skip:
            continue
        if ctx.get_parameter_source(name) in (None, click.core.ParameterSource.DEFAULT):
            continue
        value, option = ctx.params[name], param.opts[0]
        if param.is_flag and param.secondary_opts:
            args.append(option if value else param.secondary_opts[0])
        elif param.is_flag:
            args += [option] if value else []
        elif param.multiple:
            for item in value:
                args += [option, str(item)]
        else:
            args += [option, str(value)]
    return args


def workers(jobs: int) -> int:
    return jobs or os.cpu_count() or 1


class Batch:
    """Runs one child per model, ``jobs`` at once; passes a stop signal on to the running children."""

    def __init__(self, command: list[str], jobs: int, show_progress: bool) -> None:
        self._command = command
        self._jobs = workers(jobs)
        self._running: set[subprocess.Popen[bytes]] = set()
        self._lock = threading.Lock()
        self._stopping = False
        self._show_progress = show_progress and is_terminal(sys.stderr)

    def run(self, models: list[Model]) -> list[Outcome]:
        outcomes: dict[int, Outcome] = {}
        pool = concurrent.futures.ThreadPoolExecutor(self._jobs, thread_name_prefix="bnfold-batch")
        try:
            futures = {pool.submit(self._one, model): index for index, model in enumerate(models)}
            for future in concurrent.futures.as_completed(futures):
                outcome = future.result()
                outcomes[futures[future]] = outcome
                self._progress(len(outcomes), len(models), outcome.model.source)
        except KeyboardInterrupt as interrupt:
            signum = interrupt.signum if isinstance(interrupt, Interrupted) else signal.SIGINT
            with deferred_interrupts():  # the children clean up; a second signal must not orphan them
                self._stop(signum)
                pool.shutdown(wait=True, cancel_futures=True)
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            if self._show_progress:
                click.echo("", err=True)
        return [outcomes[index] for index in range(len(models))]

    def _one(self, model: Model) -> Outcome:
        args = [sys.executable, "-m", "bnfold", *self._command, os.fspath(model.source)]
        if model.output is not None:
            args += ["-o", os.fspath(model.output)]
        with self._lock:
            if self._stopping:
                return Outcome(model, EXIT_INTERNAL, None, "not run: interrupted")
            # A session of its own: a terminal's Ctrl-C reaches the batch, which passes it on once.
            child = subprocess.Popen([*args, "--json"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, start_new_session=True)
            self._running.add(child)
        try:
            stdout, stderr = child.communicate()
        finally:
            with self._lock:
                self._running.discard(child)
        return _outcome(model, child.returncode, stdout, stderr)

    def _stop(self, signum: int) -> None:
        with self._lock:
            self._stopping = True
            for child in self._running:
                child.send_signal(signum)

    def _progress(self, done: int, total: int, source: Path) -> None:
        if not self._show_progress:
            return
        width = 24
        filled = width * done // total
        click.echo(f"\r\033[K[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {source.name}", err=True,
                   nl=False)


def _outcome(model: Model, returncode: int, stdout: bytes, stderr: bytes) -> Outcome:
    payload: dict[str, Any] | None = None
    try:
        parsed = json.loads(stdout) if stdout.strip() else None
        payload = parsed if isinstance(parsed, dict) else None
    except ValueError:
        payload = None
    lines = stderr.decode("utf-8", "replace").strip().splitlines()
    errors = [line.removeprefix("bnfold: error: ") for line in lines if line.startswith("bnfold: error: ")]
    if returncode < 0:
        return Outcome(model, EXIT_INTERNAL, payload, f"killed by {signal.Signals(-returncode).name}")
    message = errors[-1] if errors else (lines[-1] if lines and returncode else "")
    return Outcome(model, returncode, payload, message)


def batch_code(codes: Sequence[int]) -> int:
    """The batch's exit code: the largest of the models' codes (0 for none)."""
    return max(codes, default=EXIT_OK)


RESULT_NAMES = {EXIT_OK: "ok", EXIT_NOT_EQUIVALENT: "not equivalent", EXIT_BAD_INPUT: "bad input",
                EXIT_INTERNAL: "internal error"}


def counts_of(payload: dict[str, Any] | None) -> tuple[int, int] | None:
    """(batch norms before, after) from a report, if it has totals."""
    totals = (payload or {}).get("totals")
    if not isinstance(totals, dict):
        return None
    return int(totals.get("bn_before", 0)), int(totals.get("bn_after", 0))


def would_fold(payload: dict[str, Any] | None) -> list[str]:
    """The batch norms (not Mul/Add runs) an inspect report says would fold, by name."""
    records = (payload or {}).get("batchnorms") or []
    return [f"{r['scope']}/{r['bn']}" if r.get("scope") else str(r.get("bn")) for r in records
            if r.get("status") == "folded" and r.get("op_type", "BatchNormalization") == "BatchNormalization"]

