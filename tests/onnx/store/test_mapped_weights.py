"""Large weights read from a model's file are read-only views of it (mapped), and the weights folded from them
are computed only as the output is written (``deferred.RoundedProduct``): the folded model must be exactly what
a fold in memory gives, refusals included, and a source that changes underneath must stop the write with one
line, never crash it.

White-box tests of :mod:`bnfold.onnx.store.external` where they count open mappings: one reads its private
``_MAPPED_LENGTHS``, which no public API shows."""

from __future__ import annotations

import gc
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from bnfold import fold_onnx, write_model
from bnfold.errors import InputError
from bnfold.onnx.store import external, limits
from bnfold.onnx.store.deferred import RoundedProduct
from bnfold.onnx.store.limits import LAZY_MIN_BYTES, MAP_MIN_BYTES
from tests.support.graphs import GraphBuilder, assert_equivalent

# A 96x96x3x3 float32 weight is 324 KiB: left in the file by the lazy reader, and mapped when a fold reads it.
CHANNELS = 96
assert max(LAZY_MIN_BYTES, MAP_MIN_BYTES) <= CHANNELS * CHANNELS * 9 * 4


def chain(weight_scale: float = 0.5, gamma: float | None = None) -> onnx.ModelProto:
    """Conv -> BN -> Relu -> Conv -> BN, every conv weight large enough to be mapped."""
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


def write(model: onnx.ModelProto, tmp_path: Path, name: str = "model.onnx") -> Path:
    path = tmp_path / name
    write_model(model, path)
    return path


def initializers(path: Path) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(path).graph.initializer}


@pytest.mark.parametrize("external", [False, True], ids=["one file", "external data"])
def test_weights_folded_from_a_file_are_computed_as_written_and_equal_the_fold_in_memory(tmp_path: Path,
                                                                                        external: bool):
    model = chain()
    path = tmp_path / "model.onnx"
    write_model(model, path, external_threshold=0 if external else 2**31)
    from_file = fold_onnx(path, verify=False)
    deferred = [name for name, value in from_file.folded.store.held.items() if isinstance(value, RoundedProduct)]
    assert sorted(deferred) == ["W0", "W1"], "the folded weights wait for the write"
    out = tmp_path / "out.onnx"
    from_file.write(out)
    in_memory = fold_onnx(model, verify=False).model
    assert onnx.load(out).SerializeToString() == in_memory.SerializeToString()
    assert from_file.model.SerializeToString() == in_memory.SerializeToString()
    assert_equivalent(model, from_file.model)


def test_a_refused_fold_leaves_the_weights_of_the_file(tmp_path: Path):
    """gamma 1e30 times weights around 1e10 overflows float32: the bound refuses it before any product exists."""
    model = chain(weight_scale=1e10, gamma=1e30)
    result = fold_onnx(write(model, tmp_path), verify=False)
    assert {record.reason for record in result.report.records} == {"cast_overflow"}
    in_memory = fold_onnx(model, verify=False)
    assert [r.to_dict() for r in result.report.records] == [r.to_dict() for r in in_memory.report.records]
    out = tmp_path / "out.onnx"
    result.write(out)
    written = initializers(out)
    for tensor in model.graph.initializer:
        np.testing.assert_array_equal(written[tensor.name], numpy_helper.to_array(tensor))


def test_a_weight_two_convolutions_share_folds_into_two_weights(tmp_path: Path):
    g = GraphBuilder(seed=3)
    x = g.input("x", [1, CHANNELS, 6, 6])
    shared = g.weight([CHANNELS, CHANNELS, 3, 3], name="shared")
    outputs = [g.bn(g.node("Conv", [x, shared], name=f"conv{i}", pads=[1, 1, 1, 1]), CHANNELS, name=f"bn{i}")
               for i in range(2)]
    model = g.model(outputs)
    result = fold_onnx(write(model, tmp_path), verify=False)
    assert result.model.SerializeToString() == fold_onnx(model, verify=False).model.SerializeToString()
    assert_equivalent(model, result.model)


def test_a_deferred_weight_folded_again_is_computed_first(tmp_path: Path):
    """BN -> Conv -> BN: the second fold reads the weight the first one deferred, rounded as the first one
    left it, exactly as in memory."""
    g = GraphBuilder(seed=5)
    x = g.input("x", [1, CHANNELS, 6, 6])
    before = g.bn(x, CHANNELS, name="bn_before")
    weight = g.weight([CHANNELS, CHANNELS, 3, 3], name="W")
    model = g.model([g.bn(g.node("Conv", [before, weight], name="conv"), CHANNELS, name="bn_after")])
    from_file = fold_onnx(write(model, tmp_path), verify=False)
    assert {record.status for record in from_file.report.records} == {"folded"}
    assert from_file.model.SerializeToString() == fold_onnx(model, verify=False).model.SerializeToString()
    assert_equivalent(model, from_file.model)


def test_a_fold_written_over_its_own_input_reads_the_input_as_it_was(tmp_path: Path):
    """The atomic rename replaces the file's name, not the bytes the mapping reads."""
    model = chain()
    path = write(model, tmp_path)
    fold_onnx(path, verify=False).write(path, overwrite_input=True)
    assert onnx.load(path).SerializeToString() == fold_onnx(model, verify=False).model.SerializeToString()


def test_a_source_that_shrinks_before_the_write_is_refused_with_one_line(tmp_path: Path):
    """Reading a mapped page past the new end of the file would kill the process (SIGBUS)."""
    path = write(chain(), tmp_path)
    result = fold_onnx(path, verify=False)
    os.truncate(path, path.stat().st_size // 2)
    out = tmp_path / "out.onnx"
    with pytest.raises(InputError, match="shrank while the model was being folded"):
        result.write(out)
    assert not out.exists()


def test_another_models_shrunken_source_does_not_stop_this_write(tmp_path: Path):
    """Only the files this model's deferred weights read are checked."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    shrunk = write(chain(), tmp_path / "a")
    kept = fold_onnx(shrunk, verify=False)
    os.truncate(shrunk, shrunk.stat().st_size // 2)
    model = chain()
    result = fold_onnx(write(model, tmp_path / "b"), verify=False)
    out = tmp_path / "out.onnx"
    result.write(out)
    assert onnx.load(out).SerializeToString() == fold_onnx(model, verify=False).model.SerializeToString()
    with pytest.raises(InputError, match="shrank"):
        kept.write(tmp_path / "kept.onnx")


def test_verification_of_a_fold_whose_source_shrank_is_refused_with_one_line(tmp_path: Path):
    from bnfold.onnx.verify.verify import verify_onnx

    model = chain()
    path = write(model, tmp_path)
    result = fold_onnx(path, verify=False)
    os.truncate(path, path.stat().st_size // 2)
    with pytest.raises(InputError, match="shrank"):
        verify_onnx(model, result.folded.store)


def test_a_verified_fold_computes_each_deferred_weight_once(tmp_path: Path, monkeypatch):
    """Verification needs the folded weights as arrays; the write then takes those arrays, not the products."""
    computed: list[tuple[int, ...]] = []
    as_array = RoundedProduct.__array__

    def counted(self, *args, **kwargs):
        computed.append(self.shape)
        return as_array(self, *args, **kwargs)

    monkeypatch.setattr(RoundedProduct, "__array__", counted)
    monkeypatch.setattr(RoundedProduct, "blocks", lambda self: pytest.fail("a verified weight was computed again"))
    model = chain()
    result = fold_onnx(write(model, tmp_path), verify=True)
    assert result.report.verification.passed
    assert len(computed) == 2
    out = tmp_path / "out.onnx"
    result.write(out)
    assert onnx.load(out).SerializeToString() == fold_onnx(model, verify=False).model.SerializeToString()


def test_a_model_with_a_file_per_tensor_maps_no_more_files_than_the_cap(tmp_path: Path, monkeypatch):
    """Each mapping keeps a descriptor open; with every tensor in a file of its own (as some exporters write
    large models), mapping them all could run out of descriptors. Past the cap, tensors are read instead."""
    gc.collect()  # other tests' mappings
    monkeypatch.setattr(limits, "MAX_MAPPED_FILES", len(external._MAPPED_LENGTHS) + 1)
    model = chain()
    onnx.save(chain(), tmp_path / "model.onnx", save_as_external_data=True, all_tensors_to_one_file=False,
              size_threshold=MAP_MIN_BYTES)
    assert len(list(tmp_path.iterdir())) == 3, "each conv weight in a file of its own"
    result = fold_onnx(tmp_path / "model.onnx", verify=False)
    assert len(external._MAPPED_LENGTHS) <= limits.MAX_MAPPED_FILES
    deferred = [name for name, value in result.folded.store.held.items() if isinstance(value, RoundedProduct)]
    assert len(deferred) == 1, "the mapped weight is deferred, the one read is folded at once"
    assert result.model.SerializeToString() == fold_onnx(model, verify=False).model.SerializeToString()
