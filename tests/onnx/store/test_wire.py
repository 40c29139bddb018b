"""Reading a model without parsing its large tensors, and writing it back streamed: the tensors are exactly
the file's, and what is written is byte for byte what protobuf's own serialization gives."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from unittest import mock

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from google.protobuf import unknown_fields
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from bnfold import fold_onnx, write_model
from bnfold.cli import main
from bnfold.onnx.store import external, limits
from bnfold.onnx.store.io import read_model_lazy
from bnfold.onnx.store.limits import LAZY_MIN_BYTES
from tests.support.graphs import GraphBuilder

MODELS = sorted((Path(__file__).resolve().parents[3] / "models").glob("*.onnx"))

DTYPES = [np.float32, np.float16, np.float64, np.int64, np.int8, np.uint8]


def left_on_disk(model: onnx.ModelProto) -> list[TensorProto]:
    return [tensor for tensor in model.graph.initializer if external.is_external(tensor)]


@pytest.mark.parametrize("path", MODELS, ids=[path.stem for path in MODELS])
def test_sample_models_round_trip_byte_for_byte(path: Path, tmp_path: Path):
    lazy = read_model_lazy(path)
    assert left_on_disk(lazy), "the sample models have weights large enough to stay on disk"
    out = tmp_path / "out.onnx"
    write_model(lazy, out, base_dir=path.parent)
    assert out.read_bytes() == onnx.load(path).SerializeToString() == path.read_bytes()


@pytest.mark.parametrize("path", MODELS[:1], ids=[path.stem for path in MODELS[:1]])
def test_tensors_left_on_disk_read_back_as_the_parsed_model_has_them(path: Path):
    parsed = {tensor.name: numpy_helper.to_array(tensor) for tensor in onnx.load(path).graph.initializer}
    for tensor in left_on_disk(read_model_lazy(path)):
        np.testing.assert_array_equal(external.external_array(tensor, path.parent), parsed[tensor.name])


def with_unknown_field(message):
    """``message`` as a newer onnx (or another producer) might write it: with fields this onnx does not know,
    a varint and a length-delimited one numbered 1000 (two-byte keys)."""
    extra = bytes([0xC0, 0x3E, 42, 0xC2, 0x3E, 3]) + b"new"  # keys 1000 << 3 | 0 and | 2
    return type(message).FromString(message.SerializeToString() + extra)


def random_model(draw) -> onnx.ModelProto:
    count = draw(st.integers(1, 6))
    initializers, nodes, value = [], [], "x"
    for position in range(count):
        dtype = draw(st.sampled_from(DTYPES))
        elements = draw(st.sampled_from([0, 1, 7, LAZY_MIN_BYTES // 8, LAZY_MIN_BYTES // 4, LAZY_MIN_BYTES]))
        data = np.random.default_rng(position).standard_normal(elements).astype(dtype)
        tensor = numpy_helper.from_array(data, f"t{position}")
        if draw(st.booleans()):
            tensor.doc_string = f"tensor {position} ü"
        if draw(st.booleans()):
            entry = tensor.metadata_props.add()
            entry.key, entry.value = "origin", "test"
        if draw(st.booleans()):
            tensor = with_unknown_field(tensor)
        initializers.append(tensor)
        node = helper.make_node("Identity", [value], [f"y{position}"], name=f"n{position}", doc_string="a node")
        nodes.append(with_unknown_field(node) if draw(st.booleans()) else node)
        value = f"y{position}"
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info(value, TensorProto.FLOAT, [2])], initializers,
                              doc_string=draw(st.sampled_from(["", "graph doc"])))
    if draw(st.booleans()):
        graph = with_unknown_field(graph)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="test")
    if draw(st.booleans()):
        helper.set_model_props(model, {"author": "someone", "licence": "MIT"})
    if draw(st.booleans()):
        model.functions.append(helper.make_function("local", "F", ["a"], ["b"],
                                                    [helper.make_node("Identity", ["a"], ["b"])],
                                                    [helper.make_opsetid("", 17)]))
    return with_unknown_field(model) if draw(st.booleans()) else model


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_model_round_trips_byte_for_byte(tmp_path_factory, data):
    model = random_model(data.draw)
    directory = tmp_path_factory.mktemp("wire")
    source = directory / "model.onnx"
    source.write_bytes(model.SerializeToString())
    lazy = read_model_lazy(source)
    for tensor in left_on_disk(lazy):
        assert external.payload_bytes(tensor) >= LAZY_MIN_BYTES
    out = directory / "out.onnx"
    write_model(lazy, out, base_dir=directory)
    assert out.read_bytes() == model.SerializeToString()
    # In memory every tensor is inline: small ones are encoded whole, large ones around their raw data.
    for split_from in (0, limits.SPLIT_FROM_BYTES):
        with mock.patch.object(limits, "SPLIT_FROM_BYTES", split_from):
            write_model(model, out)
        assert out.read_bytes() == model.SerializeToString()
    # With external data every tensor changes, but no field a newer onnx added is lost anywhere else.
    write_model(lazy, out, base_dir=directory, external_threshold=0)
    assert without_tensors(onnx.load(out)) == without_tensors(model)


def without_tensors(model: onnx.ModelProto) -> bytes:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    copy.graph.ClearField("initializer")
    return copy.SerializeToString()


def test_a_tensor_whose_bytes_do_not_match_its_dims_stays_inline_for_the_checker(tmp_path: Path):
    tensor = numpy_helper.from_array(np.zeros(512, np.float32), "W")
    tensor.dims[:] = [100]  # 2048 bytes for 100 floats
    graph = helper.make_graph([helper.make_node("Identity", ["W"], ["y"])], "g", [],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [100])], [tensor])
    source = tmp_path / "model.onnx"
    source.write_bytes(helper.make_model(graph).SerializeToString())
    lazy = read_model_lazy(source)
    assert not left_on_disk(lazy) and len(lazy.graph.initializer[0].raw_data) == 2048


def test_without_kernel_copies_the_tensors_are_copied_through_memory(tmp_path: Path, monkeypatch):
    def refuse(*_args):
        raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))

    monkeypatch.setattr(os, "copy_file_range", refuse, raising=False)
    path = MODELS[0]
    out = tmp_path / "out.onnx"
    write_model(read_model_lazy(path), out, base_dir=path.parent)
    assert out.read_bytes() == path.read_bytes()


def test_the_folded_model_in_the_api_holds_every_tensor(tmp_path: Path):
    """A path input is read lazily, but ``result.model`` is a complete model: it can be saved anywhere and
    does not depend on the input file any more."""
    source = tmp_path / "model.onnx"
    source.write_bytes(MODELS[0].read_bytes())
    result = fold_onnx(source, verify=False)
    model = result.model
    source.unlink()
    assert not left_on_disk(model) and result.folded.base_dir is None
    onnx.checker.check_model(model, full_check=True)
    assert model.SerializeToString() == fold_onnx(MODELS[0], verify=False).model.SerializeToString()


def test_folding_over_the_input_file_itself(tmp_path: Path):
    """With --overwrite-input the weights left on disk are read from the input while the output is written:
    the output is staged beside it and replaces it only when complete."""
    source = tmp_path / "model.onnx"
    source.write_bytes(MODELS[0].read_bytes())
    expected = fold_onnx(MODELS[0], verify=False).model.SerializeToString()
    result = CliRunner().invoke(main, ["fold", str(source), "-o", str(source), "--overwrite-input", "--no-verify"])
    assert result.exit_code == 0, result.output
    assert source.read_bytes() == expected


@pytest.mark.parametrize("channels", [4, 96], ids=["small weight", "weight left on disk"])
def test_a_fold_keeps_what_describes_the_model_and_its_weights(tmp_path: Path, channels: int):
    """A folded weight is the same parameter, scaled: its doc_string, metadata and any field a newer onnx wrote
    stay; so do such fields on the model, the graph and the nodes the fold does not remove."""
    g = GraphBuilder(seed=2)
    x = g.input("x", [1, channels, 5, 5])
    y = g.bn(g.node("Conv", [x, g.weight([channels, channels, 3, 3], name="W")], name="conv"), channels)
    model = g.model([g.node("Relu", [y], name="relu")])
    weight = next(t for t in model.graph.initializer if t.name == "W")
    weight.doc_string = "conv weight"
    entry = weight.metadata_props.add()
    entry.key, entry.value = "origin", "trained"
    weight.CopyFrom(with_unknown_field(weight))
    relu = next(n for n in model.graph.node if n.name == "relu")
    relu.CopyFrom(with_unknown_field(relu))
    model.graph.CopyFrom(with_unknown_field(model.graph))
    model = with_unknown_field(model)
    source = tmp_path / "model.onnx"
    source.write_bytes(model.SerializeToString())
    for folded in (fold_onnx(model, verify=False).model, fold_onnx(source, verify=False).model):
        assert not [n for n in folded.graph.node if n.op_type == "BatchNormalization"]
        described = next(t for t in folded.graph.initializer if t.name == "W")
        assert (described.doc_string, list(described.metadata_props)) == ("conv weight", list(weight.metadata_props))
        for original, copy in ((weight, described), (relu, next(n for n in folded.graph.node if n.name == "relu")),
                               (model.graph, folded.graph), (model, folded)):
            assert unknown_fields_of(copy) == unknown_fields_of(original) != []


def unknown_fields_of(message) -> list[tuple[int, int, object]]:
    return [(field.field_number, field.wire_type, field.data) for field in unknown_fields.UnknownFieldSet(message)]
