"""White-box tests of one module, ``onnx/store/model_store.py``: a tensor's value is the same wherever the
store keeps its bytes, and every way of handing the model over gives the same model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from bnfold import InputError, write_model
from bnfold.onnx.store import limits
from bnfold.onnx.store.external import is_external
from bnfold.onnx.store.model_store import ModelStore
from tests.support.graphs import GraphBuilder


def conv_model() -> onnx.ModelProto:
    g = GraphBuilder(seed=3)
    x = g.input("x", [1, 64, 4, 4])
    y = g.node("Conv", [x, g.weight([64, 64, 3, 3], name="W")], name="conv", pads=[1, 1, 1, 1])
    return g.model([g.bn(y, 64, name="bn")])


@pytest.fixture(params=["proto", "file", "external data"])
def store(request, tmp_path: Path) -> ModelStore:
    model = conv_model()
    if request.param == "proto":
        return ModelStore.copy_of(model)
    path = tmp_path / "model.onnx"
    write_model(model, path, external_threshold=0 if request.param == "external data" else limits.PROTOBUF_LIMIT)
    return ModelStore.read(path)


def weight(store: ModelStore) -> onnx.TensorProto:
    return next(tensor for tensor in store.proto.graph.initializer if tensor.name == "W")


def expected_weight() -> np.ndarray:
    return numpy_helper.to_array(next(t for t in conv_model().graph.initializer if t.name == "W"))


def test_a_tensor_reads_the_same_wherever_its_bytes_are(store: ModelStore):
    np.testing.assert_array_equal(store.array(weight(store), main_graph=True), expected_weight())


def test_a_replaced_weight_is_held_and_every_handover_gives_it(store: ModelStore, tmp_path: Path):
    doubled = (expected_weight() * 2).astype(np.float32)
    store.replace(weight(store), doubled, "W", main_graph=True)
    assert store.is_held(weight(store)) and not weight(store).HasField("raw_data")
    np.testing.assert_array_equal(store.array(weight(store), main_graph=True), doubled)
    proto, arrays = store.held_as_external("nowhere")
    assert list(arrays) == ["W"] and is_external(next(t for t in proto.graph.initializer if t.name == "W"))
    skeleton = store.weightless()
    assert skeleton is None or "W" in {value.name for value in skeleton.graph.input}
    with store.staged() as staged:
        staged_weight = onnx.load(staged).graph.initializer
    store.write(tmp_path / "out.onnx")
    written = onnx.load(tmp_path / "out.onnx").graph.initializer
    inline = store.inline().graph.initializer
    for initializers in (staged_weight, written, inline):
        np.testing.assert_array_equal(numpy_helper.to_array(next(t for t in initializers if t.name == "W")), doubled)
    assert not store.held


def test_a_subgraph_value_is_never_held(store: ModelStore):
    tensor = onnx.TensorProto()
    store.replace(tensor, np.ones(1024, np.float32), "inner", main_graph=False)
    assert not store.held and tensor.HasField("raw_data")


def test_a_proto_with_tensors_on_disk_is_refused_with_one_line(tmp_path: Path):
    path = tmp_path / "model.onnx"
    write_model(conv_model(), path, external_threshold=0)
    with pytest.raises(InputError, match="external files that are not loaded"):
        ModelStore.copy_of(onnx.load(path, load_external_data=False))
