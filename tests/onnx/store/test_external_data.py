"""Models with external data: read lazily, written with their data next to the output, byte-identical when
folded again. The default suite forces the large-model path with a 1 KiB threshold; ``BNFOLD_SLOW=1`` also
runs it on a model generated above 2 GiB."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper, numpy_helper

from bnfold import InputError, fold_onnx, write_model
from bnfold.cli import main
from bnfold.onnx.store import model_store
from bnfold.onnx.store.external import external_ref, inline_array, is_external, model_tensors
from bnfold.onnx.store.io import read_model
from bnfold.onnx.store.limits import ALIGNMENT, PROTOBUF_LIMIT
from tests.support.graphs import FLOAT, GraphBuilder

DOMAIN = "custom"


def constant(name: str, array: np.ndarray) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], name=name, value=numpy_helper.from_array(array, name))


def block_function(rng: np.random.Generator) -> onnx.FunctionProto:
    floats = lambda *shape: rng.normal(size=shape).astype(np.float32)  # noqa: E731
    return helper.make_function(DOMAIN, "Block", ["x"], ["y"], [
        constant("fw", floats(32, 16, 3, 3)),
        helper.make_node("Conv", ["x", "fw"], ["fc"], pads=[1, 1, 1, 1]),
        constant("fg", rng.uniform(0.5, 1.5, 32).astype(np.float32)), constant("fb", floats(32)),
        constant("fm", floats(32)), constant("fv", rng.uniform(0.5, 2.0, 32).astype(np.float32)),
        helper.make_node("BatchNormalization", ["fc", "fg", "fb", "fm", "fv"], ["y"], name="fn_bn"),
    ], [helper.make_opsetid("", 17)])


def mixed_model() -> onnx.ModelProto:
    """Conv->BN->Relu->Conv (the second weight, 72 KiB, has no BN), an If whose branch folds, and a function."""
    g = GraphBuilder(seed=3)
    x = g.input("x", [1, 16, 8, 8])
    cond = g.input("cond", [1], onnx.TensorProto.BOOL)
    first = g.bn(g.node("Conv", [x, g.weight([32, 16, 3, 3], name="W1")], name="conv1", pads=[1, 1, 1, 1]), 32,
                 name="bn1")
    second = g.node("Conv", [g.node("Relu", [first]), g.weight([64, 32, 3, 3], name="W2")], name="conv2")
    mark = len(g.nodes), len(g.initializers)
    branch_out = g.bn(g.node("Conv", [x, g.weight([32, 16, 3, 3], name="W3")], name="conv3"), 32, name="bn3")
    then_nodes, then_inits = g.nodes[mark[0]:], g.initializers[mark[1]:]
    del g.nodes[mark[0]:], g.initializers[mark[1]:]
    other = helper.make_node("Conv", [x, g.weight([32, 16, 3, 3], name="W4")], ["other"], name="conv4")
    g.nodes.append(helper.make_node(
        "If", [cond], ["branch"], name="if",
        then_branch=helper.make_graph(then_nodes, "then", [], [helper.make_tensor_value_info(branch_out, FLOAT, None)],
                                      then_inits),
        else_branch=helper.make_graph([other], "else", [], [helper.make_tensor_value_info("other", FLOAT, None)]),
    ))
    g.nodes.append(helper.make_node("Block", [x], ["called"], domain=DOMAIN, name="call"))
    graph = helper.make_graph(g.nodes, "mixed", g.inputs, [
        helper.make_tensor_value_info(second, FLOAT, [1, 64, 6, 6]),
        helper.make_tensor_value_info("branch", FLOAT, [1, 32, 6, 6]),
        helper.make_tensor_value_info("called", FLOAT, [1, 32, 8, 8])], g.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)],
                              functions=[block_function(g.rng)])
    model.ir_version = 10
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.fixture
def source(tmp_path: Path) -> Path:
    """The mixed model with every tensor of 1 KiB or more in ``model.onnx.data``."""
    directory = tmp_path / "in"
    directory.mkdir()
    write_model(mixed_model(), directory / "model.onnx", external_threshold=0)
    assert len(os.listdir(directory)) == 2
    return directory / "model.onnx"


def outputs(path: Path, cond: bool) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).normal(size=(1, 16, 8, 8)).astype(np.float32)
    return session.run(None, {"x": x, "cond": np.array([cond])})


def assert_same_outputs(original: Path, folded: Path) -> None:
    for cond in (True, False):
        for want, got in zip(outputs(original, cond), outputs(folded, cond), strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(np.max(np.abs(want))))


def fold_cli(source: Path, target: Path, *extra: str) -> dict:
    result = CliRunner().invoke(main, ["fold", str(source), "-o", str(target), "--json", *extra])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def external_tensors(path: Path) -> dict[str, onnx.TensorProto]:
    model = onnx.load(path, load_external_data=False)
    return {t.name: t for t in model_tensors(model) if is_external(t)}


def test_forced_external_round_trip_writes_one_named_data_file_next_to_the_output(source: Path, tmp_path: Path):
    target = tmp_path / "out" / "folded.onnx"
    target.parent.mkdir()
    report = fold_cli(source, target, "--external-threshold", "1024", "--external-data", "weights.bin")
    assert report["verification"]["passed"]
    assert {(r["scope"], r["bn"]) for r in report["batchnorms"] if r["status"] == "folded"} == {
        ("", "bn1"), ("if/then_branch", "bn3"), ("function:custom.Block", "fn_bn")}
    assert sorted(os.listdir(target.parent)) == ["folded.onnx", "weights.bin"]
    stored = external_tensors(target)
    assert {e.value for t in stored.values() for e in t.external_data if e.key == "location"} == {"weights.bin"}
    assert set(stored) == {"W1", "W2", "W3", "W4", "fw_bnfold"}, "weights of 1 KiB or more, a function's too"
    assert int(next(e.value for e in stored["W2"].external_data if e.key == "offset")) % ALIGNMENT == 0
    onnx.checker.check_model(target, full_check=True)
    assert_same_outputs(source, target)
    untouched = external_ref(external_tensors(source)["W2"], source.parent)
    copied = external_ref(stored["W2"], target.parent)
    with open(untouched.path, "rb") as a, open(copied.path, "rb") as b:
        a.seek(untouched.offset)
        b.seek(copied.offset)
        assert a.read(untouched.length) == b.read(copied.length)


def test_tensors_no_fold_touches_are_never_read_into_memory(source: Path, monkeypatch):
    read: list[str] = []
    real = model_store.external_array

    def spy(tensor, base_dir):
        read.append(tensor.name)
        return real(tensor, base_dir)

    monkeypatch.setattr(model_store, "external_array", spy)
    result = fold_onnx(source, verify=False)
    assert len(result.report.folded) == 3
    assert "W2" not in read and "W4" not in read
    assert {"W1", "W3"} <= set(read)
    lazy = {t.name for t in model_tensors(result.model) if is_external(t)}
    assert {"W2", "W4"} <= lazy and result.folded.base_dir == source.parent


def test_small_model_with_external_data_is_written_as_one_file_by_default(source: Path, tmp_path: Path):
    target = tmp_path / "folded.onnx"
    fold_cli(source, target)
    assert sorted(os.listdir(tmp_path)) == ["folded.onnx", "in"]
    assert not external_tensors(target)
    assert_same_outputs(source, target)


def test_folding_the_folded_model_again_is_byte_identical(source: Path, tmp_path: Path):
    options = ["--external-threshold", "1024", "--external-data", "weights.bin"]
    runs = [tmp_path / name / "model.onnx" for name in ("once", "again", "twice")]
    for target in runs:
        target.parent.mkdir()
    fold_cli(source, runs[0], *options)
    fold_cli(source, runs[1], *options)
    second = fold_cli(runs[0], runs[2], *options)
    assert second["folded"] == 0
    for name in ("model.onnx", "weights.bin"):
        contents = {(run.parent / name).read_bytes() for run in runs}
        assert len(contents) == 1, f"{name} differs between runs"


def test_output_may_replace_the_input_and_its_data_file(source: Path, tmp_path: Path):
    reference = tmp_path / "reference"
    reference.mkdir()
    for name in os.listdir(source.parent):
        (reference / name).write_bytes((source.parent / name).read_bytes())
    fold_cli(source, source, "--overwrite-input", "--external-threshold", "1024")
    assert sorted(os.listdir(source.parent)) == ["model.onnx", "model.onnx.data"]
    assert_same_outputs(reference / "model.onnx", source)


def write_large_model(directory: Path, rows: int, columns: int) -> Path:
    """x[1, rows] -> MatMul(W, rows x columns, never touched) and x -> Gemm -> BN; the data file is written in
    chunks, so the model never has to fit in memory."""
    rng = np.random.default_rng(0)
    data_path = directory / "large.onnx.data"
    with open(data_path, "wb") as data:
        for start in range(0, rows, 1024):
            data.write(rng.standard_normal((min(1024, rows - start), columns), dtype=np.float32).tobytes())
    big = onnx.TensorProto(name="big", data_type=onnx.TensorProto.FLOAT, dims=[rows, columns],
                           data_location=onnx.TensorProto.EXTERNAL)
    for key, value in (("location", data_path.name), ("offset", "0"), ("length", str(rows * columns * 4))):
        entry = big.external_data.add()
        entry.key, entry.value = key, value
    g = GraphBuilder(seed=1)
    x = g.input("x", [1, rows])
    head = g.bn(g.node("Gemm", [x, g.weight([rows, 8], scale=0.01)], name="gemm"), 8, name="bn")
    g.nodes.append(helper.make_node("MatMul", [x, "big"], ["wide"], name="wide"))
    graph = helper.make_graph(g.nodes, "large", g.inputs, [helper.make_tensor_value_info(head, FLOAT, [1, 8]),
                                                            helper.make_tensor_value_info("wide", FLOAT, [1, columns])],
                              [*g.initializers, big])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    path = directory / "large.onnx"
    path.write_bytes(model.SerializeToString())
    return path


def test_forced_path_on_a_generated_model_with_lazy_tensors(tmp_path: Path):
    # The same code path as the slow test below, on a model of a few MB.
    check_large_model_round_trip(tmp_path, rows=1024, columns=1024, threshold="1024")


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("BNFOLD_SLOW") != "1", reason="set BNFOLD_SLOW=1 to run (writes ~9 GB)")
def test_model_over_2_gib_round_trips(tmp_path: Path):
    check_large_model_round_trip(tmp_path, rows=23200, columns=23200, threshold=str(PROTOBUF_LIMIT))


def check_large_model_round_trip(tmp_path: Path, rows: int, columns: int, threshold: str) -> None:
    source_dir, once, twice = (tmp_path / name for name in ("source", "once", "twice"))
    for directory in (source_dir, once, twice):
        directory.mkdir()
    source = write_large_model(source_dir, rows, columns)
    report = fold_cli(source, once / "model.onnx", "--external-threshold", threshold, "--iterations", "1")
    assert report["folded"] == 1 and report["verification"]["passed"]
    assert sorted(os.listdir(once)) == ["model.onnx", "model.onnx.data"]
    stored = external_tensors(once / "model.onnx")
    assert int(next(e.value for e in stored["big"].external_data if e.key == "offset")) % ALIGNMENT == 0
    again = fold_cli(once / "model.onnx", twice / "model.onnx", "--external-threshold", threshold, "--no-verify")
    assert again["folded"] == 0
    for name in ("model.onnx", "model.onnx.data"):
        assert files_equal(once / name, twice / name), f"{name} differs after folding again"


def files_equal(a: Path, b: Path, chunk: int = 64 << 20) -> bool:
    if a.stat().st_size != b.stat().st_size:
        return False
    with open(a, "rb") as left, open(b, "rb") as right:
        while block := left.read(chunk):
            if block != right.read(chunk):
                return False
    return True


def test_held_weights_reach_the_checker_of_a_model_staged_for_its_subgraph_tensors(tmp_path: Path, monkeypatch):
    """An untouched tensor on disk inside an If branch sends the guard's checker to a staged file; the
    weights the fold holds as arrays must be in it, or the checker would judge a model without them."""
    g = GraphBuilder(seed=4)
    x = g.input("x", [1, 16, 8, 8])
    cond = g.input("cond", [1], onnx.TensorProto.BOOL)
    folded = g.bn(g.node("Conv", [x, g.weight([32, 16, 3, 3], name="W1")], name="conv1"), 32, name="bn1")
    table = numpy_helper.from_array(np.arange(512, dtype=np.float32).reshape(1, 512), "table")
    branches = {
        name: helper.make_graph([helper.make_node("Identity", ["table"], [f"{name}_out"])], name, [],
                                [helper.make_tensor_value_info(f"{name}_out", FLOAT, [1, 512])], [table])
        for name in ("then", "else")}
    g.nodes.append(helper.make_node("If", [cond], ["picked"], then_branch=branches["then"],
                                    else_branch=branches["else"]))
    outputs = [helper.make_tensor_value_info(folded, FLOAT, [1, 32, 6, 6]),
               helper.make_tensor_value_info("picked", FLOAT, [1, 512])]
    model = helper.make_model(helper.make_graph(g.nodes, "staged", g.inputs, outputs, g.initializers),
                              opset_imports=[helper.make_opsetid("", 17)])
    write_model(model, tmp_path / "model.onnx", external_threshold=0)
    real_check = onnx.checker.check_model
    checked: list[onnx.ModelProto] = []

    def recording_check(model, *args, **kwargs):
        if isinstance(model, str):
            checked.append(onnx.load(model))
        return real_check(model, *args, **kwargs)

    monkeypatch.setattr(onnx.checker, "check_model", recording_check)
    result = fold_onnx(tmp_path / "model.onnx", verify=False)
    assert [(record.bn, record.status) for record in result.report.records] == [("bn1", "folded")]
    (staged,) = checked
    folded_w1 = next(t for t in result.model.graph.initializer if t.name == "W1")
    staged_w1 = next(t for t in staged.graph.initializer if t.name == "W1")
    np.testing.assert_array_equal(numpy_helper.to_array(staged_w1), numpy_helper.to_array(folded_w1))


def test_a_model_kept_on_disk_is_written_as_one_file_with_its_subgraph_and_function_tensors(source: Path,
                                                                                           tmp_path: Path):
    """``write_model`` of a model read without its external data: the tensors in the If branches and the
    function travel into the one output file too, not as references to a data file the output does not have."""
    model = read_model(source, load_external_data=False)
    assert any(is_external(t) for t in model_tensors(model) if t not in model.graph.initializer)
    target = tmp_path / "out" / "copy.onnx"
    target.parent.mkdir()
    write_model(model, target, base_dir=source.parent)
    assert os.listdir(target.parent) == ["copy.onnx"] and not external_tensors(target)
    assert_same_outputs(source, target)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from([np.float32, np.float64, np.float16, np.int8, np.uint8, np.int32, np.int64, np.uint64]),
       st.lists(st.integers(0, 4), max_size=4), st.booleans(), st.data())
def test_an_inline_tensor_reads_as_onnx_reads_it(dtype, shape, typed_fields, data):
    """``inline_array`` is onnx's ``to_array`` for tensors in the proto, raw or in typed fields, whatever the
    dtype and shape; a raw payload that does not match its dims is refused as onnx refuses it, as bad input."""
    value = np.asarray(data.draw(st.lists(st.integers(0, 100), min_size=int(np.prod(shape)),
                                          max_size=int(np.prod(shape)))), dtype=dtype).reshape(shape)
    tensor = numpy_helper.from_array(value, "t")
    if typed_fields:
        tensor = helper.make_tensor("t", tensor.data_type, shape, value.ravel().tolist())
    expected = numpy_helper.to_array(tensor)
    actual = inline_array(tensor)
    assert actual.dtype == expected.dtype and actual.shape == expected.shape and np.array_equal(actual, expected)
    assert not actual.flags.writeable or typed_fields
    if not typed_fields:
        tensor.raw_data += b"\0"
        with pytest.raises(ValueError):
            numpy_helper.to_array(tensor)
        with pytest.raises(InputError, match="the input model is damaged"):
            inline_array(tensor)
