"""The one compare rule (bnfold.core.compare) on arrays, as both fronts hand them to it."""

from __future__ import annotations

import json
import math
import re
import warnings
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from bnfold.core.compare import (
    CHANNEL_MIN_ELEMENTS,
    DEFAULT_TOLERANCES,
    VerificationSet,
    VerifyReport,
    channel_scales,
    check_tolerances,
    compare_output,
    default_tolerances,
)
from bnfold.errors import InputError

FLOAT_DTYPES = [np.float64, np.float32, np.float16]
shapes = hnp.array_shapes(min_dims=1, max_dims=4, min_side=1, max_side=6)


@st.composite
def outputs(draw: st.DrawFn, dtype: type = np.float32) -> np.ndarray:
    """An NCHW-like output of moderate finite values, with at least two channels."""
    shape = draw(hnp.array_shapes(min_dims=2, max_dims=4, min_side=2, max_side=5))
    return draw(hnp.arrays(dtype, shape, elements=st.floats(-100, 100, width=np.dtype(dtype).itemsize * 8)))


def compared(reference: np.ndarray, candidate: np.ndarray, **tolerances: float | None):
    return compare_output("y", [reference], [candidate], **tolerances)


@settings(max_examples=60, deadline=None)
@given(st.data(), st.sampled_from(FLOAT_DTYPES))
def test_an_exact_copy_passes_with_zero_error(data, dtype):
    reference = data.draw(outputs(dtype))
    output = compared(reference, reference.copy())
    assert output.passed and output.mismatched == 0 and output.total == reference.size
    assert output.max_abs_error == output.max_rel_error == output.required_atol == output.required_rtol == 0.0


@settings(max_examples=60, deadline=None)
@given(outputs(), st.sampled_from([0.97, 0.99, 1.01, 1.05]))
def test_one_channel_scaled_by_a_percent_or_more_fails(reference, factor):
    channel = reference[:, 0]
    assume(np.abs(channel).max() >= 0.1 * np.abs(reference).max() and np.abs(channel).max() > 1)
    candidate = reference.copy()
    candidate[:, 0] *= np.float32(factor)
    output = compared(reference, candidate)
    assert not output.passed and output.mismatched >= 1


@settings(max_examples=60, deadline=None)
@given(outputs(np.float64), st.floats(0, 1e-3), st.floats(1e-3, 1))
def test_looser_tolerances_never_turn_a_pass_into_a_fail(reference, tight, loose):
    candidate = reference + np.random.default_rng(0).standard_normal(reference.shape) * 1e-3
    for name in ("rtol", "atol"):
        strict, lenient = (compared(reference, candidate, **{name: value}) for value in (tight, loose))
        assert strict.mismatched >= lenient.mismatched
        assert not strict.passed or lenient.passed


@settings(max_examples=60, deadline=None)
@given(outputs(np.float64), st.floats(1e-6, 1e-2))
def test_the_required_tolerances_are_tight(reference, noise):
    candidate = reference + noise * np.random.default_rng(1).standard_normal(reference.shape)
    output = compared(reference, candidate, rtol=0.0, atol=0.0)
    assume(output.required_atol > 0)
    assert compared(reference, candidate, rtol=0.0, atol=output.required_atol * (1 + 1e-9)).passed
    assert not compared(reference, candidate, rtol=0.0, atol=output.required_atol * (1 - 1e-6)).passed


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_nan_must_sit_at_the_same_positions_and_stays_out_of_the_statistics(data):
    reference = data.draw(outputs(np.float64))
    mask = data.draw(hnp.arrays(np.bool_, reference.shape))
    reference = np.where(mask, np.nan, reference)
    output = compared(reference, reference.copy())
    assert output.passed and math.isfinite(output.max_abs_error)
    flat = reference.reshape(-1).copy()
    flat[data.draw(st.integers(0, flat.size - 1))] = 0.5  # a NaN made a number, or a number moved
    moved = flat.reshape(reference.shape)
    assume(not np.array_equal(moved, reference, equal_nan=True))
    assert not compared(reference, moved).passed


def test_infinities_must_match_in_sign():
    reference = np.array([np.inf, -np.inf, 1.0])
    assert compared(reference, reference.copy()).passed
    assert compared(reference, -reference).mismatched == 3


@settings(max_examples=60, deadline=None)
@given(st.sampled_from([np.int8, np.int32, np.int64, np.uint8, np.bool_]), st.data())
def test_integer_and_bool_outputs_must_match_exactly_whatever_the_tolerance(dtype, data):
    reference = data.draw(hnp.arrays(dtype, shapes))
    assert compared(reference, reference.copy(), rtol=1.0, atol=1.0).passed
    flat = reference.reshape(-1).copy()
    flat[0] = not flat[0] if dtype is np.bool_ else flat[0] ^ 1
    assert not compared(reference, flat.reshape(reference.shape), rtol=1.0, atol=1e9).passed


def test_int64_beyond_two_to_the_53_compares_exactly():
    reference = np.array([2**53 + 1], np.int64)
    assert not compared(reference, reference - 1).passed


def test_another_dtype_or_shape_fails_whole_with_a_note():
    reference = np.ones((2, 3), np.float32)
    for candidate in (reference.astype(np.float64), reference.reshape(3, 2)):
        notes: list[str] = []
        output = compare_output("y", [reference], [candidate], notes=notes)
        assert not output.passed and output.mismatched == output.total == 6 and notes


def test_default_atol_is_the_dtype_factor_times_the_largest_finite_magnitude():
    reference = np.array([np.nan, -8.0, 2.0, 0.0, np.inf, 3.0], np.float32)
    output = compared(reference, reference.copy())
    assert (output.rtol, output.atol) == (1e-4, 1e-4 * 8.0)
    assert compared(np.zeros(3, np.float16), np.zeros(3, np.float16)).atol == DEFAULT_TOLERANCES["float16"][1]


def test_each_channel_of_a_feature_map_has_its_own_scale():
    scales = np.array([1.0, 1000.0, 0.0, 5.0])
    reference = (np.ones((2, 4, 4, 4)) * scales[None, :, None, None]).astype(np.float32)
    assert channel_scales(reference)[0].tolist() == [1.0, 1000.0, 1.0, 5.0]  # a channel of zeros: 1
    assert channel_scales(reference)[1] == 16
    wrong = reference.copy()
    wrong[1, 0, 3, 3] += np.float32(0.01)  # 100x channel 0's tolerance, 1e-5 of channel 1's values
    output = compared(reference, wrong)
    assert not output.passed and output.mismatched == 1 and output.atol == pytest.approx(1e-4)
    assert output.required_atol == pytest.approx(0.01 - 1e-4, rel=1e-3)
    # Channels of fewer than CHANNEL_MIN_ELEMENTS elements (a [1, 1000, 1, 1] classifier output) share one.
    logits = np.linspace(-5, 5, 1000, dtype=np.float32).reshape(1, 1000, 1, 1)
    assert channel_scales(logits)[0].tolist() == [5.0]


@st.composite
def dominated(draw: st.DrawFn) -> tuple[np.ndarray, tuple[int, ...]]:
    """A feature map [N, C, positions] of typical magnitude ~1 in which some channels hold huge values
    anywhere, and the position of one element in a channel without any."""
    batch, channels = draw(st.integers(1, 2)), draw(st.integers(2, 6))
    positions = draw(st.integers(max(1, -(-CHANNEL_MIN_ELEMENTS // batch)), 40))
    typical = draw(hnp.arrays(np.float64, (batch, channels, positions),
                              elements=st.floats(0.5, 2.0) | st.floats(-2.0, -0.5)))
    victim_channel = draw(st.integers(0, channels - 1))
    for channel in draw(st.sets(st.integers(0, channels - 1).filter(lambda c: c != victim_channel), min_size=1)):
        flat = typical[:, channel].reshape(-1)
        huge = draw(st.lists(st.integers(0, flat.size - 1), min_size=1, max_size=flat.size, unique=True))
        flat[huge] = draw(st.floats(1e3, 1e12)) * np.sign(flat[huge])  # clipped to float16's range below
        typical[:, channel] = flat.reshape(batch, positions)
    victim = (draw(st.integers(0, batch - 1)), victim_channel, draw(st.integers(0, positions - 1)))
    return typical, victim


@settings(max_examples=150, deadline=None)
@given(dominated(), st.sampled_from(FLOAT_DTYPES), st.floats(5, 100))
def test_large_values_in_other_channels_cannot_hide_an_error(case, dtype, k):
    """A planted error of k times the default tolerance of the typical elements (so k * factor * typical,
    far below the large values' scale) fails however large, however many and wherever in other channels the
    large values are."""
    values, victim = case
    reference = np.clip(values, -6e4, 6e4).astype(dtype) if dtype is np.float16 else values.astype(dtype)
    rtol, factor = DEFAULT_TOLERANCES[np.dtype(dtype).name]
    candidate = reference.copy()
    candidate[victim] += dtype(k * (factor + rtol) * 2.0)  # typical magnitudes are at most 2
    output = compared(reference, candidate)
    assert not output.passed and output.mismatched >= 1
    assert compared(reference, reference.copy()).passed


def test_an_output_with_no_element_is_empty_and_never_passes():
    for shape in [(0,), (2, 0, 3)]:
        output = compared(np.zeros(shape, np.float32), np.zeros(shape, np.float32))
        assert output.empty and not output.passed and output.total == 0
        report = VerifyReport([output], 1, "onnxruntime")
        assert report.status == "unverified" and not report.passed
        assert report.render().splitlines()[-1].startswith("UNVERIFIED: output(s) y had no element")
    some_runs_empty = compare_output("y", [np.zeros(0), np.ones(2)], [np.zeros(0), np.ones(2)])
    assert some_runs_empty.passed and not some_runs_empty.empty


def test_runs_are_judged_each_at_its_own_scale():
    """A run of large values does not widen the tolerance of a run of small ones."""
    small, large = np.full(4, 1.0, np.float32), np.full(4, 1e6, np.float32)
    assert not compare_output("y", [large, small], [large, small + np.float32(1e-2)]).passed
    output = compare_output("y", [large, small], [large, small + np.float32(1e-5)])
    assert output.passed and output.atol == pytest.approx(1e-4 * 1.0)
    assert output.required_atol < output.atol


def test_a_passing_report_has_finite_relative_errors_and_warns_about_nothing():
    reference = np.array([0.0, 1e-30, 1.0, 5.0, -3.0], np.float32)
    candidate = reference + np.float32(1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        output = compared(reference, candidate)
        report = VerifyReport([output], 1, "onnxruntime")
        payload = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert output.passed and output.max_rel_error < 1 and None not in payload["outputs"][0].values()
    assert "inf" not in report.render()


def test_bfloat16_has_its_own_defaults():
    reference = np.array([1.0, -2.0], ml_dtypes.bfloat16)
    output = compared(reference, reference.copy())
    assert output.passed and (output.rtol, output.atol) == (5e-2, 1.5e-1 * 2.0)
    assert default_tolerances("bfloat16") == DEFAULT_TOLERANCES["bfloat16"]
    with pytest.raises(InputError, match="no default tolerance"):
        default_tolerances(np.complex64)


@pytest.mark.parametrize("value", [-1.0, math.nan, math.inf])
def test_unusable_tolerances_are_refused(value):
    for name in ("rtol", "atol"):
        with pytest.raises(InputError, match=f"{name} must be a finite number >= 0"):
            check_tolerances(**{"rtol": None, "atol": None, name: value})


def test_a_verdict_is_json_safe_and_one_schema_for_single_and_several_checks():
    reference = np.array([0.0, 1.0])
    missed = compared(reference, np.array([1.0, 1.0]))
    report = VerifyReport([missed], 1, "onnxruntime")
    payload = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert payload["outputs"][0]["required_rtol"] is None and payload["passed"] is False
    assert set(payload) == {"passed", "status", "engine", "iterations", "sizes", "outputs", "unexercised", "expected",
                            "seconds", "notes", "problem"}
    both = VerificationSet([report, VerifyReport([], 1, "pytorch", problem="the outputs have a different structure")])
    assert [set(check) for check in both.to_dict()["checks"]] == [set(payload)] * 2
    assert not both.passed and "FAILED: the outputs have a different structure" in both.render()


@pytest.mark.parametrize("document", ["README.md", "docs/verification.md"])
def test_the_documented_default_tolerances_are_the_ones_in_force(document):
    text = (Path(__file__).parents[2] / document).read_text(encoding="utf-8")
    rows = re.findall(r"^\| (\w+) \| ([\d.e-]+) \| ([\d.e-]+) \|$", text, flags=re.MULTILINE)
    assert {dtype: (float(rtol), float(factor)) for dtype, rtol, factor in rows} == DEFAULT_TOLERANCES
