"""The PyTorch front's verification: its outputs judged by the one compare rule (bnfold.core.compare)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from bnfold.torch.checks import compare, judge_against_rounding  # noqa: E402 - only once torch is known to be there


def conv_output(dtype: torch.dtype) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    conv = torch.nn.Conv2d(3, 8, 3).to(dtype)
    with torch.no_grad():
        return conv(torch.randn(2, 3, 8, 8, generator=generator).to(dtype))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_an_exact_fold_passes_and_one_channel_off_by_a_percent_fails(dtype):
    reference = conv_output(dtype)
    assert compare(reference, reference.clone(), "pytorch").passed
    wrong = reference.clone()
    wrong[:, 0] *= 1.01 if dtype not in (torch.float16, torch.bfloat16) else 1.5
    report = compare(reference, wrong, "pytorch")
    assert not report.passed and report.outputs[0].mismatched > 0, report.render()
    assert report.outputs[0].dtype == str(dtype).removeprefix("torch.")


def test_nested_outputs_are_compared_one_by_one_and_plain_values_by_equality():
    x = conv_output(torch.float32)
    report = compare({"y": x, "n": 3}, {"y": x.clone(), "n": 3}, "pytorch")
    assert report.passed and len(report.outputs) == 1
    assert compare({"y": x, "n": 3}, {"y": x, "n": 4}, "pytorch").problem == "output 1 differs: 3 != 4"
    different = compare((x, x), (x,), "pytorch")
    assert not different.passed and different.problem == "the outputs have a different structure"


def test_another_shape_dtype_or_kind_fails_with_a_note():
    x = conv_output(torch.float32)
    for candidate in (x[:1], x.double(), 1.0):
        report = compare([x], [candidate], "pytorch")
        assert not report.passed and report.notes, report.render()


def test_integer_outputs_must_match_exactly():
    labels = torch.arange(6)
    assert compare(labels, labels.clone(), "pytorch").passed
    assert not compare(labels, labels + 1, "pytorch").passed


def _ill_conditioned(error_of_fold: float):
    """Outputs of scale ~276 whose float32 run is 0.028 off its float64 run (as random-init mixnet_s is), and a
    candidate ``error_of_fold`` away from the float32 reference."""
    generator = torch.Generator().manual_seed(0)
    exact = torch.randn(1, 1000, generator=generator, dtype=torch.float64) * 100
    reference = (exact + torch.randn(1, 1000, generator=generator, dtype=torch.float64) * 0.01).float()
    candidate = reference + torch.full((1, 1000), error_of_fold)
    return exact, reference, candidate


def test_a_fold_within_the_originals_own_rounding_passes_with_a_note():
    """White-box: judge_against_rounding. An exact fold of a model that amplifies rounding ~1e5-fold moves the
    output as far as float32 itself does; the fixed rule fails it, the original's own float32 error clears it."""
    exact, reference, candidate = _ill_conditioned(0.04)
    first = compare(reference, candidate, "pytorch")
    assert not first.passed
    judged = judge_against_rounding(first, reference, candidate, lambda: exact, None)
    assert judged.passed and "float32 rounding error" in judged.notes[-1]


@pytest.mark.parametrize("error_of_fold", [0.5, 5.0, -30.0])
def test_a_fold_beyond_the_originals_own_rounding_still_fails(error_of_fold):
    """White-box: judge_against_rounding. A wrong fold moves outputs far past float32's own error: the verdict
    stays failed, and a model that cannot run in float64 keeps its verdict too."""
    exact, reference, candidate = _ill_conditioned(error_of_fold)
    first = compare(reference, candidate, "pytorch")
    assert not judge_against_rounding(first, reference, candidate, lambda: exact, None).passed

    def cannot_run():
        raise RuntimeError("expected scalar type Float")

    assert judge_against_rounding(first, reference, candidate, cannot_run, None) is first
