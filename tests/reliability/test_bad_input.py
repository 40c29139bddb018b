"""Every bad input of the catalog (:mod:`tests.support.bad_inputs`), through the command line and the API:
one line on stderr, exit code 2, no traceback, nothing written; the API raises the documented error."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from bnfold.cli import main
from tests.support.bad_inputs import (
    CASES,
    BadInput,
    Outcome,
    available,
    judge,
    run_api,
    run_api_subprocess,
    run_cli_subprocess,
    scratch,
    snapshot,
)


def skip_unless_available(case: BadInput) -> None:
    reason = available(case)
    if reason is not None:
        pytest.skip(reason)


@pytest.mark.parametrize("case", CASES, ids=[case.key for case in CASES])
def test_command_line(case: BadInput):
    skip_unless_available(case)
    with scratch(case) as directory:
        if directory is None:
            pytest.skip("cannot mount a small file system here (needs root)")
        setup = case.build(directory)
        before = snapshot(directory)
        if "unprivileged" in case.needs or "own process" in case.needs:
            outcome = run_cli_subprocess(case, setup, directory)
        else:
            result = CliRunner().invoke(main, setup.args)
            escaped = result.exception if not isinstance(result.exception, SystemExit) else None
            outcome = Outcome(result.exit_code, result.stdout, result.stderr,
                              problems=[f"{type(escaped).__name__} escaped: {escaped}"] if escaped else [])
        judged = judge(case, outcome, before, snapshot(directory), setup)
    assert judged.passed, f"{case.what}: {judged.problems}"


@pytest.mark.parametrize("case", CASES, ids=[case.key for case in CASES])
def test_api(case: BadInput):
    skip_unless_available(case)
    if "unprivileged" in case.needs:
        problems = run_api_subprocess(case)
    else:
        with scratch(case) as directory:
            if directory is None:
                pytest.skip("cannot mount a small file system here (needs root)")
            problems = run_api(case, case.build(directory))
    assert not problems, f"{case.what}: {problems}"
