"""Inputs as people have them: ONNX test data (input_N.pb, test_data_set_N directories with expected
output_N.pb) shipped in the onnx package, several samples, and .npz archives read without loading what the
model does not take; special files refused, big-endian arrays converted."""

from __future__ import annotations

import os
import shutil
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

import bnfold
from bnfold.cli import run_command
from bnfold.errors import InputError
from bnfold.onnx.verify.verify import verify_onnx
from tests.support.verify_models import unary

ONNX_DATA = Path(onnx.__file__).parent / "backend" / "test" / "data"
BN_2D = ONNX_DATA / "pytorch-converted" / "test_BatchNorm2d_eval"
BN_NODE = ONNX_DATA / "node" / "test_batchnorm_example"


@pytest.mark.parametrize("case", [BN_2D, BN_2D / "test_data_set_0", BN_2D / "test_data_set_0" / "input_0.pb"],
                         ids=["model-dir", "data-set", "pb-file"])
def test_onnx_test_data_is_read_and_its_expected_outputs_are_compared(case):
    model = BN_2D / "model.onnx"
    verification = verify_onnx(model, model, inputs=case)
    assert verification.passed and verification.iterations == 1
    if case.name == "input_0.pb":
        assert verification.expected is None  # a lone input file brings no expected output
    else:
        expected = verification.expected
        assert expected is not None and expected.passed and len(expected.outputs) == 1
        assert "against the expected outputs" in verification.render()
        assert verification.to_dict()["expected"]["passed"] is True


def test_a_fold_is_checked_against_the_expected_outputs_of_a_test_data_set(tmp_path: Path):
    """A Conv -> BN model with a test_data_set_0 made from its own outputs, as exporters ship them."""
    rng = np.random.default_rng(0)
    stats = {name: rng.uniform(0.5, 1.5, 4).astype(np.float32) for name in ("gamma", "beta", "mean", "var")}
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"]),
         helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 4, 4])],
        [numpy_helper.from_array(rng.normal(0, 0.5, (4, 3, 3, 3)).astype(np.float32), "w"),
         *(numpy_helper.from_array(value, name) for name, value in stats.items())])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = rng.standard_normal((1, 3, 6, 6)).astype(np.float32)
    [y] = ReferenceEvaluator(model).run(None, {"x": x})
    data_set = tmp_path / "test_data_set_0"
    data_set.mkdir()
    (data_set / "input_0.pb").write_bytes(numpy_helper.from_array(x, "x").SerializeToString())
    (data_set / "output_0.pb").write_bytes(numpy_helper.from_array(y, "y").SerializeToString())
    verification = bnfold.fold_onnx(model, inputs=tmp_path).report.verification
    assert verification.status == "passed" and verification.expected.passed
    assert verification.expected.outputs[0].total == y.size


def test_several_data_sets_are_several_samples(tmp_path: Path):
    for index in range(3):
        shutil.copytree(BN_2D / "test_data_set_0", tmp_path / f"test_data_set_{index}")
    report = verify_onnx(BN_2D / "model.onnx", BN_2D / "model.onnx", inputs=tmp_path)
    assert report.iterations == 3 and report.passed
    both = verify_onnx(BN_2D / "model.onnx", BN_2D / "model.onnx", inputs=[tmp_path, tmp_path / "test_data_set_1"])
    assert both.iterations == 4


def test_a_candidate_that_misses_the_expected_outputs_fails(tmp_path: Path):
    data_set = tmp_path / "test_data_set_0"
    shutil.copytree(BN_2D / "test_data_set_0", data_set)
    tensor = onnx.load_tensor(str(data_set / "output_0.pb"))
    wrong = numpy_helper.to_array(tensor) + 1.0
    (data_set / "output_0.pb").write_bytes(numpy_helper.from_array(wrong, tensor.name).SerializeToString())
    report = verify_onnx(BN_2D / "model.onnx", BN_2D / "model.onnx", inputs=data_set)
    # The original misses them as much as the candidate: noted, not counted against the candidate.
    assert report.passed and report.expected is not None and report.expected.outputs == []
    assert "the original itself differs from the expected output" in report.expected.notes[0]


def test_the_cli_takes_several_inputs_and_test_data_directories(tmp_path: Path, capsys):
    model = str(BN_2D / "model.onnx")
    args = ["verify", model, model, "--inputs", str(BN_2D / "test_data_set_0"), "--inputs",
            str(BN_2D / "test_data_set_0" / "input_0.pb"), "--json"]
    assert run_command(args) == 0
    assert '"iterations": 2' in capsys.readouterr().out
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    assert run_command(["verify", model, model, "--inputs", str(fifo)]) == 2
    assert "not a regular file or directory" in capsys.readouterr().err


def test_an_unused_array_is_refused_from_its_header_without_being_read(tmp_path: Path):
    """Its header claims 2**40 floats (4 TiB) over 8 stored bytes: reading it would fail or exhaust memory,
    so the refusal can only come from the names."""
    path = tmp_path / "inputs.npz"
    np.savez(path, x=np.ones((2, 3), np.float32))
    header = np.lib.format.header_data_from_array_1_0(np.zeros(1, np.float32))
    header["shape"] = (2**40,)
    with zipfile.ZipFile(path, "a") as archive, archive.open("huge.npy", "w") as member:
        np.lib.format.write_array_header_1_0(member, header)
        member.write(b"\0" * 8)
    with pytest.raises(InputError, match="huge that are not model inputs"):
        verify_onnx(unary("Relu"), unary("Relu"), inputs=path)
    model_input = tmp_path / "claims.npz"
    with zipfile.ZipFile(model_input, "w") as archive, archive.open("x.npy", "w") as member:
        np.lib.format.write_array_header_1_0(member, header)
    with pytest.raises(InputError, match="got shape \\[1099511627776\\] for input 'x'"):
        verify_onnx(unary("Relu"), unary("Relu"), inputs=model_input)


def test_big_endian_arrays_are_converted(tmp_path: Path):
    path = tmp_path / "inputs.npz"
    values = np.arange(6, dtype=">f4").reshape(2, 3)
    np.savez(path, x=values)
    report = verify_onnx(unary("Relu"), unary("Relu"), inputs=path)
    assert report.passed and report.outputs[0].total == 6
    assert verify_onnx(unary("Relu"), unary("Relu"), inputs={"x": values}).passed


@pytest.mark.parametrize("content, message", [
    (b"not a zip", "expected a .npz archive"),
    (b"", "expected a .npz archive"),
], ids=["text", "empty"])
def test_files_that_are_not_inputs_get_one_line(tmp_path: Path, content, message):
    path = tmp_path / "inputs.npz"
    path.write_bytes(content)
    with pytest.raises(InputError, match=message):
        verify_onnx(unary("Relu"), unary("Relu"), inputs=path)
    with pytest.raises(InputError, match="found neither"):
        verify_onnx(unary("Relu"), unary("Relu"), inputs=tmp_path)
    bad_pb = tmp_path / "input_0.pb"
    bad_pb.write_bytes(b"\xff\xff\xff")
    with pytest.raises(InputError, match="not an ONNX TensorProto"):
        verify_onnx(unary("Relu"), unary("Relu"), inputs=bad_pb)
