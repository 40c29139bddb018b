"""The quick profile of the random-graph fuzzer (the long one: ``python -m bnfold.testing.fuzz``): on every
random model the fold does not crash, gives a valid and equivalent model, leaves every unsafe batch norm,
and folding its result again changes nothing."""

from __future__ import annotations

from hypothesis import HealthCheck, assume, given, settings

from bnfold.testing.graph_fuzz import check, fuzz_cases, generator_problem

QUICK_EXAMPLES = 600


@settings(max_examples=QUICK_EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(fuzz_cases())
def test_random_graphs_fold_safely_exactly_and_idempotently(case):
    problem = generator_problem(case)
    assume(problem is None or problem[0] != "unrunnable")  # no engine here can run it; nothing to compare
    assert problem is None, f"the generator made an invalid model: {problem[1]}"
    verdict = check(case)
    assert not verdict.problems, f"{case.describe()}: {verdict.problems}"
