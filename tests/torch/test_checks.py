"""The PyTorch front's verification: its outputs judged by the one compare rule (bnfold.core.compare)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from bnfold.torch.checks import compare  # noqa: E402 - only once torch is known to be there


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
