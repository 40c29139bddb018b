"""External data locations are checked before a byte is read: anything outside the model's directory,
missing or inconsistent is refused with one line, and the file is never opened."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from bnfold import InputError, OutputError, fold_onnx, read_model, write_model
from bnfold.cli import main
from bnfold.onnx.store import external
from tests.support.graphs import GraphBuilder

WEIGHT_BYTES = 16 * 3 * 3 * 3 * 4


def conv_bn_model() -> onnx.ModelProto:
    g = GraphBuilder()
    x = g.input("x", [1, 3, 6, 6])
    return g.model([g.bn(g.node("Conv", [x, g.weight([16, 3, 3, 3], name="W")]), 16)])


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    """``tmp_path/model/model.onnx`` whose weight W is in ``weights.bin``; a secret file sits next to the dir."""
    directory = tmp_path / "model"
    directory.mkdir()
    write_model(conv_bn_model(), directory / "model.onnx", external_data="weights.bin", external_threshold=0)
    (tmp_path / "secret.bin").write_bytes(b"\x01" * WEIGHT_BYTES)
    return directory


def set_entries(path: Path, **entries: str) -> None:
    """Rewrite W's external-data entries in the .onnx file (the data file stays as it is)."""
    model = onnx.load(path, load_external_data=False)
    weight = next(t for t in model.graph.initializer if t.name == "W")
    current = {e.key: e.value for e in weight.external_data}
    current.update(entries)
    del weight.external_data[:]
    for key, value in current.items():
        entry = weight.external_data.add()
        entry.key, entry.value = key, value
    path.write_bytes(model.SerializeToString())


@pytest.fixture
def opened(monkeypatch) -> list[str]:
    """Every file the external-data module opens."""
    paths: list[str] = []
    real_open = open

    def spy(file, *args, **kwargs):
        paths.append(os.fspath(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(external, "open", spy, raising=False)
    return paths


def test_external_weight_is_found_next_to_the_model(model_dir: Path):
    lazy = read_model(model_dir / "model.onnx", load_external_data=False)
    assert next(t for t in lazy.graph.initializer if t.name == "W").data_location == onnx.TensorProto.EXTERNAL
    loaded = read_model(model_dir / "model.onnx")
    assert all(t.data_location != onnx.TensorProto.EXTERNAL for t in loaded.graph.initializer)
    np.testing.assert_array_equal(
        onnx.numpy_helper.to_array(next(t for t in loaded.graph.initializer if t.name == "W")),
        onnx.numpy_helper.to_array(next(t for t in conv_bn_model().graph.initializer if t.name == "W")))


def escape_by_symlink(model_dir: Path) -> dict[str, str]:
    (model_dir / "link.bin").symlink_to(model_dir.parent / "secret.bin")
    return {"location": "link.bin"}


def symlink_loop(model_dir: Path) -> dict[str, str]:
    (model_dir / "loop_a").symlink_to(model_dir / "loop_b")
    (model_dir / "loop_b").symlink_to(model_dir / "loop_a")
    return {"location": "loop_a"}


def truncate(model_dir: Path) -> dict[str, str]:
    data = model_dir / "weights.bin"
    data.write_bytes(data.read_bytes()[:-10])
    return {}


@pytest.mark.parametrize(
    ("tamper", "message"),
    [
        (lambda d: {"location": str(d.parent / "secret.bin")}, "absolute path"),
        (lambda d: {"location": "../secret.bin"}, "outside the model's directory"),
        (lambda d: {"location": "sub/../../secret.bin"}, "outside the model's directory"),
        (escape_by_symlink, "outside the model's directory"),
        (lambda d: {"location": "."}, "outside the model's directory"),
        (lambda d: {"location": ""}, "names no file"),
        (lambda d: {"location": "gone.bin"}, "missing"),
        (symlink_loop, "unusable external data location"),
        (lambda d: {"location": "nul\0byte.bin"}, "unusable external data location"),
        (lambda d: (d / "sub").mkdir() or {"location": "sub"}, "not a regular file"),
        (truncate, "truncated"),
        (lambda d: {"offset": str(10**9)}, "beyond the end"),
        (lambda d: {"offset": "12"}, "truncated"),
        (lambda d: {"length": "8"}, "need"),
        (lambda d: {"offset": "0x10"}, "not an integer"),
        (lambda d: {"offset": "-4"}, "negative"),
    ],
    ids=["absolute", "dotdot", "nested-dotdot", "symlink-outside", "directory-itself", "empty", "missing",
         "symlink-loop", "nul-byte", "a-directory", "truncated-file", "offset-beyond-eof", "range-past-eof",
         "length-mismatch", "bad-offset", "negative-offset"],
)
@pytest.mark.parametrize("lazy", [False, True], ids=["loaded", "lazy"])
def test_unsafe_or_inconsistent_location_is_refused_without_reading(model_dir: Path, opened, tamper, message, lazy):
    path = model_dir / "model.onnx"
    set_entries(path, **tamper(model_dir))
    with pytest.raises(InputError) as error:
        read_model(path, load_external_data=not lazy)
    assert message in str(error.value) and "\n" not in str(error.value)
    assert str(error.value).startswith(str(path))
    assert opened == [], "nothing is opened before every tensor is checked"


def test_symlink_that_stays_inside_the_directory_is_followed(model_dir: Path):
    (model_dir / "alias.bin").symlink_to(model_dir / "weights.bin")
    set_entries(model_dir / "model.onnx", location="alias.bin")
    result = fold_onnx(model_dir / "model.onnx", verify=False)
    assert result.report.folded


def test_a_location_approved_before_is_checked_again_once_it_leads_elsewhere(model_dir: Path):
    """A path found inside the directory is taken again only while it leads to that same file: a symlink
    swapped to point outside after a first fold is refused on the next read."""
    alias = model_dir / "alias.bin"
    alias.symlink_to(model_dir / "weights.bin")
    set_entries(model_dir / "model.onnx", location="alias.bin")
    assert fold_onnx(model_dir / "model.onnx", verify=False).report.folded
    alias.unlink()
    alias.symlink_to(model_dir.parent / "secret.bin")
    with pytest.raises(InputError, match="outside the model's directory"):
        fold_onnx(model_dir / "model.onnx", verify=False)


def test_fold_and_cli_refuse_an_escaping_location_with_exit_code_2(model_dir: Path, tmp_path: Path):
    set_entries(model_dir / "model.onnx", location="../secret.bin")
    with pytest.raises(InputError, match="outside the model's directory"):
        fold_onnx(model_dir / "model.onnx")
    out = tmp_path / "out.onnx"
    result = CliRunner().invoke(main, ["fold", str(model_dir / "model.onnx"), "-o", str(out)])
    assert result.exit_code == 2
    assert "outside the model's directory" in result.output and not out.exists()


def test_a_location_edited_after_loading_is_checked_again_at_write(model_dir: Path, tmp_path: Path):
    lazy = read_model(model_dir / "model.onnx", load_external_data=False)
    weight = next(t for t in lazy.graph.initializer if t.name == "W")
    next(e for e in weight.external_data if e.key == "location").value = "../secret.bin"
    with pytest.raises(InputError, match="outside"):
        write_model(lazy, tmp_path / "out.onnx", base_dir=model_dir)
    assert not (tmp_path / "out.onnx").exists()


def test_proto_with_unloaded_external_data_is_refused(model_dir: Path):
    lazy = onnx.load(model_dir / "model.onnx", load_external_data=False)
    with pytest.raises(InputError, match="pass its path"):
        fold_onnx(lazy, verify=False)


def test_writing_a_lazy_model_needs_its_source_directory(model_dir: Path, tmp_path: Path):
    lazy = read_model(model_dir / "model.onnx", load_external_data=False)
    with pytest.raises(OutputError, match="base_dir"):
        write_model(lazy, tmp_path / "out.onnx")


@pytest.mark.parametrize("name", ["sub/weights.bin", "../weights.bin", "..", ".", "a\\b", "out.onnx"])
def test_external_data_name_must_be_a_plain_file_name_other_than_the_model(tmp_path: Path, name: str):
    with pytest.raises(OutputError, match="external data name"):
        write_model(conv_bn_model(), tmp_path / "out.onnx", external_data=name, external_threshold=0)
    assert os.listdir(tmp_path) == []


def test_write_model_does_not_modify_the_model(tmp_path: Path):
    model = conv_bn_model()
    before = model.SerializeToString()
    write_model(model, tmp_path / "out.onnx", external_threshold=0)
    assert model.SerializeToString() == before
    assert sorted(os.listdir(tmp_path)) == ["out.onnx", "out.onnx.data"]


def test_no_data_file_when_no_tensor_is_large_enough(tmp_path: Path):
    g = GraphBuilder()
    model = g.model([g.node("Conv", [g.input("x", [1, 3, 6, 6]), g.weight([4, 3, 3, 3])])])
    write_model(model, tmp_path / "out.onnx", external_threshold=0)
    assert os.listdir(tmp_path) == ["out.onnx"]
