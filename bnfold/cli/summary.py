"""What a batch prints: one row per model as a text table (stdout), as JSON (``--json``), and as a Markdown
table appended to a file (``--summary-md``, e.g. ``"$GITHUB_STEP_SUMMARY"``, which GitHub Actions shows on
the run's page)."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any, NamedTuple

from bnfold.cli.batch import RESULT_NAMES, Outcome, counts_of
from bnfold.core.atomic import check_destination
from bnfold.core.report import JSON_SCHEMA, render_table
from bnfold.errors import OutputError


class Row(NamedTuple):
    model: str
    result: str
    batch_norms: str  # "before -> after"
    detail: str  # the output written, what would fold, or the error


def row(outcome: Outcome, result: str, detail: str) -> Row:
    counts = counts_of(outcome.payload)
    return Row(os.fsdecode(outcome.model.source), result, "" if counts is None else f"{counts[0]} -> {counts[1]}",
               detail)


def fold_row(outcome: Outcome) -> Row:
    written = (outcome.payload or {}).get("written") or []
    if outcome.code == 0:
        detail = f"wrote {written[0]}" if written else "nothing written"
    elif outcome.payload is not None and not written and outcome.message == "":
        detail = f"NOT written: {outcome.model.output}"
    else:
        detail = outcome.message
    return row(outcome, RESULT_NAMES.get(outcome.code, f"exit {outcome.code}"), detail)


def headline(command: str, rows: list[Row]) -> str:
    tally = Counter(r.result for r in rows)
    parts = ", ".join(f"{count} {result}" for result, count in sorted(tally.items(), key=lambda kv: -kv[1]))
    return f"bnfold {command}: {len(rows)} model{'s' if len(rows) != 1 else ''}: {parts}"


def render_text(command: str, rows: list[Row]) -> str:
    table = render_table(["model", "result", "batch norms", "output / why"], [list(r) for r in rows])
    return f"{table}\n\n{headline(command, rows)}"


def render_markdown(command: str, rows: list[Row]) -> str:
    lines = [f"### {headline(command, rows)}", "", "| model | result | batch norms | output / why |",
             "|---|---|---|---|"]
    for r in rows:
        result = r.result if r.result in ("ok", "clean") else f"**{r.result}**"
        lines.append(f"| `{_cell(r.model)}` | {result} | {_cell(r.batch_norms)} | {_cell(r.detail)} |")
    return "\n".join(lines) + "\n\n"


def _cell(text: str) -> str:
    """Text that cannot end a Markdown table cell or row early."""
    return " ".join(text.replace("|", "\\|").replace("`", "'").split())


def to_json(command: str, outcomes: list[Outcome], rows: list[Row], code: int) -> dict[str, Any]:
    """The batch as JSON (docs/json-schema.md): each model's ``report`` is what ``bnfold <command> MODEL
    --json`` prints for it alone (null when it printed none, e.g. on bad input)."""
    return {
        "schema": JSON_SCHEMA,
        "command": command,
        "exit_code": code,
        "models": [{"input": r.model, "output": None if o.model.output is None else os.fsdecode(o.model.output),
                    "exit_code": o.code, "result": r.result, "message": o.message, "report": o.payload}
                   for o, r in zip(outcomes, rows, strict=True)],
    }


def check_summary_destination(path: Path) -> None:
    """``--summary-md`` must be a file that can be appended to (checked before any work)."""
    if path.exists():
        if path.is_dir():
            raise OutputError(f"{path}: is a directory")
        if not os.access(path, os.W_OK):
            raise OutputError(f"{path}: cannot append to it ({os.strerror(13)})")
        return
    check_destination(path)


def append_markdown(path: Path, text: str) -> None:
    """Append ``text`` (the way GitHub's step summary is meant to be written: several steps may add to it)."""
    try:
        with open(path, "a", encoding="utf-8", errors="replace") as handle:
            handle.write(text)
    except OSError as error:
        raise OutputError(f"{path}: cannot write the summary ({error.strerror or error})") from None
