"""Verifying a folded model as the fold leaves it (its ``ModelStore``): weights the fold wrote held as
numpy arrays, the others still in the input's files. Every way onnxruntime or onnx.reference is given such a
model must run exactly those weights: the right ones pass, a wrong one fails."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from bnfold import fold_onnx, write_model
from bnfold.onnx.store import limits, model_store
from bnfold.onnx.verify import unwritten as unwritten_module
from tests.support.graphs import GraphBuilder


def conv_bn_then_conv(dtype: type = np.float32) -> onnx.ModelProto:
    """Conv -> BN (folds: its weight becomes a held array) -> Relu -> Conv (no BN: its weight stays where it
    was read from); the Relu's and the second convolution's outputs are graph outputs."""
    g = GraphBuilder(seed=5, dtype=dtype)
    x = g.input("x", [1, 16, 8, 8])
    folded = g.bn(g.node("Conv", [x, g.weight([32, 16, 3, 3], name="W1")], name="conv1", pads=[1, 1, 1, 1]), 32,
                  name="bn1")
    activated = g.node("Relu", [folded])
    untouched = g.node("Conv", [activated, g.weight([8, 32, 3, 3], name="W2")], name="conv2")
    return g.model([activated, untouched], output_shapes=[[1, 32, 8, 8], [1, 8, 6, 6]])


def source_of(kind: str, model: onnx.ModelProto, tmp_path: Path) -> onnx.ModelProto | Path:
    if kind == "proto":
        return model
    path = tmp_path / "model.onnx"
    write_model(model, path, external_threshold=0 if kind == "external data" else 2**31 - 2**24)
    return path


@pytest.fixture(params=["in place", "staged: too large for one message", "staged: onnxruntime before 1.21"])
def route(request, monkeypatch) -> str:
    """How onnxruntime gets the folded model: as it is, or from a temporary file written for it."""
    if request.param == "in place":
        if unwritten_module.ort_version() < unwritten_module.EXTERNAL_DATA_FOLDER_SINCE:
            pytest.skip("this onnxruntime cannot find a model's external data unless it reads the model's file")

        def no_file(*args, **kwargs):
            raise AssertionError("the folded model was written to a file")
        monkeypatch.setattr(model_store, "staged_file", no_file)
    elif request.param == "staged: too large for one message":
        monkeypatch.setattr(limits, "PROTOBUF_LIMIT", 0)
    else:
        monkeypatch.setattr(unwritten_module, "EXTERNAL_DATA_FOLDER_SINCE", (10**6,))
    return request.param


def spoil_held_weights(monkeypatch) -> None:
    """Make the fold hold every weight it writes with its first output channel 1% off, as a buggy fold would."""
    real_hold = model_store.hold

    def spoiled(tensor, value, name, held):
        value = np.array(value)  # a deferred product computed, or an array copied
        value[0] *= 1.01
        real_hold(tensor, value, name, held)

    monkeypatch.setattr(model_store, "hold", spoiled)


@pytest.mark.parametrize("kind", ["single file", "external data", "proto"])
def test_the_folded_weights_are_what_is_verified(kind: str, route: str, tmp_path: Path, monkeypatch):
    source = source_of(kind, conv_bn_then_conv(), tmp_path)
    result = fold_onnx(source)
    report = result.report.verification
    assert report.passed and report.engine == "onnxruntime", report.render()
    assert result.report.folded and result.folded.store.held, "the fold should hold its weight as an array"

    spoil_held_weights(monkeypatch)
    wrong = fold_onnx(source).report.verification
    assert wrong.engine == "onnxruntime"
    assert [output.passed for output in wrong.outputs] == [False, False], wrong.render()


@pytest.mark.parametrize("kind", ["single file", "external data"])
def test_the_reference_evaluator_runs_the_folded_weights(kind: str, tmp_path: Path, monkeypatch):
    source = source_of(kind, conv_bn_then_conv(np.float64), tmp_path)  # onnxruntime has no float64 Conv
    report = fold_onnx(source).report.verification
    assert report.passed and report.engine == "onnx.reference", report.render()

    spoil_held_weights(monkeypatch)
    wrong = fold_onnx(source).report.verification
    assert wrong.engine == "onnx.reference" and not wrong.passed, wrong.render()


@pytest.mark.parametrize("kind", ["single file", "external data", "proto"])
def test_verification_leaves_the_folded_model_as_it_was(kind: str, route: str, tmp_path: Path):
    source = source_of(kind, conv_bn_then_conv(), tmp_path)
    verified, unverified = fold_onnx(source), fold_onnx(source, verify=False)
    assert verified.report.verification.passed
    assert verified.model.SerializeToString() == unverified.model.SerializeToString()
