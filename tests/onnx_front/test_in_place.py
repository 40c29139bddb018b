"""Weights read from disk are scaled where they lie (``ScaledWeight.cast(in_place=True)``): the folded model
must be exactly what a fold into fresh arrays gives, and a fold refused after overwriting a weight must leave
that weight as the file has it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from graphs import GraphBuilder, assert_equivalent
from onnx import numpy_helper

from bnfold import fold_onnx, write_model
from bnfold.affine import ScaledWeight
from bnfold.onnx_front.io import LAZY_MIN_BYTES

# A 64x64x3x3 float32 weight is 147 KiB: left in the file by the lazy reader, so read by the fold itself.
CHANNELS = 64
assert CHANNELS * CHANNELS * 9 * 4 >= LAZY_MIN_BYTES


@pytest.fixture
def overwrites(monkeypatch) -> list[bool]:
    """For each cast of a scaled weight, whether it wrote into the weight (refused or not)."""
    seen: list[bool] = []
    cast = ScaledWeight.cast

    def spy(self, dtype, what, *, in_place=False):
        before = self.weight.copy()
        try:
            return cast(self, dtype, what, in_place=in_place)
        finally:
            seen.append(not np.array_equal(before, self.weight, equal_nan=True))

    monkeypatch.setattr(ScaledWeight, "cast", spy)
    return seen


def chain(weight_scale: float = 0.5, gamma: float | None = None) -> onnx.ModelProto:
    """Conv -> BN -> Relu -> Conv -> BN, every conv weight large enough to stay on disk."""
    g = GraphBuilder(seed=11)
    x = g.input("x", [1, CHANNELS, 6, 6])
    y = x
    for position in range(2):
        conv = g.node("Conv", [y, g.weight([CHANNELS, CHANNELS, 3, 3], name=f"W{position}", scale=weight_scale)],
                      name=f"conv{position}", pads=[1, 1, 1, 1])
        gamma_name, beta, mean, var = g.bn_params(CHANNELS)
        if gamma is not None:
            gamma_name = g.const(np.full(CHANNELS, gamma))
        y = g.node("Relu", [g.node("BatchNormalization", [conv, gamma_name, beta, mean, var], name=f"bn{position}")])
    return g.model([y])


def write(model: onnx.ModelProto, tmp_path: Path) -> Path:
    path = tmp_path / "model.onnx"
    write_model(model, path)
    return path


def test_weights_scaled_in_place_fold_exactly_as_in_memory(tmp_path: Path, overwrites: list[bool]):
    model = chain()
    from_file = fold_onnx(write(model, tmp_path), verify=False).model
    assert overwrites and all(overwrites), "the weights read from the file were scaled where they lay"
    overwrites.clear()
    in_memory = fold_onnx(model, verify=False).model
    assert not any(overwrites), "a caller's model is never overwritten"
    assert from_file.SerializeToString() == in_memory.SerializeToString()
    assert_equivalent(model, from_file)


def test_a_fold_refused_after_overwriting_keeps_the_weight_of_the_file(tmp_path: Path, overwrites: list[bool]):
    """gamma 1e30 times weights around 1e10 overflows float32: the cast overwrote each weight before it could
    know, so the refusal must send the next read (the output's writer) back to the file."""
    model = chain(weight_scale=1e10, gamma=1e30)
    path = write(model, tmp_path)
    result = fold_onnx(path, verify=False)
    assert overwrites and all(overwrites)
    assert {record.reason for record in result.report.records} == {"cast_overflow"}
    out = tmp_path / "out.onnx"
    result.write(out)
    written = {t.name: numpy_helper.to_array(t) for t in onnx.load(out).graph.initializer}
    for tensor in model.graph.initializer:
        np.testing.assert_array_equal(written[tensor.name], numpy_helper.to_array(tensor))


def test_a_weight_two_convolutions_share_is_overwritten_only_by_its_last_reader(tmp_path: Path,
                                                                                  overwrites: list[bool]):
    """The first fold gives its conv a weight of its own; only then is the shared one read by one node alone."""
    g = GraphBuilder(seed=3)
    x = g.input("x", [1, CHANNELS, 6, 6])
    shared = g.weight([CHANNELS, CHANNELS, 3, 3], name="shared")
    outputs = [g.bn(g.node("Conv", [x, shared], name=f"conv{i}", pads=[1, 1, 1, 1]), CHANNELS, name=f"bn{i}")
               for i in range(2)]
    model = g.model(outputs)
    result = fold_onnx(write(model, tmp_path), verify=False)
    assert overwrites == [False, True]
    assert_equivalent(model, result.model)


def test_a_weight_overwritten_by_a_refused_fold_is_read_again_by_the_next(tmp_path: Path, overwrites: list[bool]):
    """BN(gamma 1e30) -> Conv -> BN: the first batch norm's fold scales the conv weight in place and overflows;
    the second one folds into the same weight, which must be the file's, not the overflowed one."""
    g = GraphBuilder(seed=5)
    x = g.input("x", [1, CHANNELS, 6, 6])
    gamma, beta, mean, var = g.bn_params(CHANNELS)
    huge = g.node("BatchNormalization", [x, g.const(np.full(CHANNELS, 1e30)), beta, mean, var], name="bn_huge")
    weight = g.weight([CHANNELS, CHANNELS, 3, 3], name="W", scale=1e10)
    model = g.model([g.bn(g.node("Conv", [huge, weight], name="conv", pads=[1, 1, 1, 1]), CHANNELS, name="bn")])
    from_file = fold_onnx(write(model, tmp_path), verify=False)
    assert overwrites[0], "the refused fold overwrote the weight"
    statuses = {record.bn: (record.status, record.reason) for record in from_file.report.records}
    assert statuses["bn_huge"] == ("left", "cast_overflow") and statuses["bn"][0] == "folded"
    in_memory = fold_onnx(model, verify=False).model
    assert from_file.model.SerializeToString() == in_memory.SerializeToString()
