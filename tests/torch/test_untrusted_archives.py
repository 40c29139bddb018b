""".pt2 and TorchScript archives crafted to run code on loading or running: refused with exit 2 and one line
unless trusted, and their payload (which would leave a marker file) never runs."""

from __future__ import annotations

import io
import json
import pickle
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from click.testing import CliRunner  # noqa: E402
from torch import nn  # noqa: E402

from bnfold.cli import main  # noqa: E402
from tests.support.torch_cases import randomize  # noqa: E402

X = torch.randn(1, 3, 8, 8)


class _Touch:
    """Unpickling this creates ``path``: the stand-in for arbitrary code."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _model() -> nn.Module:
    return randomize(nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU())).eval()


def _rewrite(source: Path, target: Path, edit: Callable[[str, bytes], bytes]) -> Path:
    """A copy of the zip ``source`` with each member's bytes passed through ``edit(name, bytes)``."""
    with zipfile.ZipFile(source) as original, zipfile.ZipFile(target, "w") as crafted:
        for info in original.infolist():
            crafted.writestr(info, edit(info.filename, original.read(info.filename)))
    return target


def _program(tmp_path: Path) -> Path:
    path = tmp_path / "model.pt2"
    torch.export.save(torch.export.export(_model(), (X,)), str(path))
    return path


def _pickled_weight(tmp_path: Path, marker: Path) -> Path:
    def edit(name: str, data: bytes) -> bytes:
        if name.endswith("model_weights_config.json"):
            config = json.loads(data)
            config["config"]["0.weight"]["use_pickle"] = True
            return json.dumps(config).encode()
        return pickle.dumps(_Touch(marker)) if name.endswith("/weight_0") else data

    return _rewrite(_program(tmp_path), tmp_path / "crafted.pt2", edit)


def _pickled_inputs(tmp_path: Path, marker: Path) -> Path:
    def edit(name: str, data: bytes) -> bytes:
        if not name.endswith("sample_inputs/model.pt"):
            return data
        buffer = io.BytesIO()
        torch.save(((X,), {"x": _Touch(marker)}), buffer)
        return buffer.getvalue()

    return _rewrite(_program(tmp_path), tmp_path / "crafted.pt2", edit)


def _file_mapping_node(tmp_path: Path, marker: Path) -> Path:
    """A graph node calling aten.from_file(..., shared=True), which creates the file when the program runs."""

    def edit(name: str, data: bytes) -> bytes:
        if not name.endswith("models/model.json"):
            return data
        program = json.loads(data)
        graph = program["graph_module"]["graph"]
        graph["nodes"].insert(0, {
            "target": "torch.ops.aten.from_file.default",
            "inputs": [
                {"name": "filename", "arg": {"as_string": str(marker)}, "kind": 1},
                {"name": "shared", "arg": {"as_bool": True}, "kind": 1},
                {"name": "size", "arg": {"as_int": 4}, "kind": 1},
            ],
            "outputs": [{"as_tensor": {"name": "mapped"}}], "metadata": {},
        })
        graph["tensor_values"]["mapped"] = {
            "dtype": 7, "sizes": [{"as_int": 4}], "requires_grad": False, "device": {"type": "cpu", "index": None},
            "strides": [{"as_int": 1}], "storage_offset": {"as_int": 0}, "layout": 7,
        }
        return json.dumps(program).encode()

    return _rewrite(_program(tmp_path), tmp_path / "crafted.pt2", edit)


class _MapsAFileWhenRun(nn.Module):
    """TorchScript code that writes a file when run: torch.from_file(..., shared=True) creates it."""

    def __init__(self, marker: str) -> None:
        super().__init__()
        self.inner = _model()
        self.marker = marker

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mapped = torch.from_file(self.marker, True, 4)  # used, so TorchScript keeps the call
        return self.inner(x) + 0 * mapped.sum()


class _MapsAFileOnLoad(nn.Module):
    """TorchScript code that writes a file as torch.jit.load restores it (its __setstate__)."""

    def __init__(self, marker: str) -> None:
        super().__init__()
        self.weight = torch.randn(4, 3, 3, 3)
        self.marker = marker

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.conv2d(x, self.weight)

    @torch.jit.export
    def __getstate__(self) -> tuple[torch.Tensor, str, bool]:
        return self.weight, self.marker, self.training

    @torch.jit.export
    def __setstate__(self, state: tuple[torch.Tensor, str, bool]) -> None:
        weight, self.marker, self.training = state
        self.weight = weight + 0 * torch.from_file(self.marker, True, 4).sum()


def _script(module: nn.Module, path: Path) -> Path:
    torch.jit.save(torch.jit.script(module.eval()), str(path))
    return path


def _script_on_load(tmp_path: Path, marker: Path) -> Path:
    return _script(_MapsAFileOnLoad(str(marker)), tmp_path / "crafted.ts")


def _script_when_run(tmp_path: Path, marker: Path) -> Path:
    return _script(_MapsAFileWhenRun(str(marker)), tmp_path / "crafted.ts")


CRAFTED = {
    "pt2 weight marked pickled": (_pickled_weight, "stored as a pickle"),
    "pt2 sample inputs beyond tensors": (_pickled_inputs, "sample inputs"),
    "pt2 node mapping a file": (_file_mapping_node, "from_file"),
    "TorchScript __setstate__ mapping a file": (_script_on_load, "from_file"),
    "TorchScript forward mapping a file": (_script_when_run, "from_file"),
}


@pytest.mark.parametrize("command", ["fold", "inspect", "verify"])
@pytest.mark.parametrize("case", sorted(CRAFTED))
def test_crafted_archive_is_refused_and_runs_nothing(tmp_path: Path, case: str, command: str) -> None:
    build, why = CRAFTED[case]
    marker = tmp_path / "marker"
    crafted = build(tmp_path, marker)
    arguments = {
        "fold": ["fold", crafted, "-o", tmp_path / "out" / crafted.name, "--input-shape", "1x3x8x8"],
        "inspect": ["inspect", crafted],
        "verify": ["verify", crafted, crafted, "--input-shape", "1x3x8x8"],
    }[command]
    (tmp_path / "out").mkdir()
    result = CliRunner().invoke(main, [str(a) for a in arguments])
    assert result.exit_code == 2, result.output
    assert result.output.count("\n") == 1 and why in result.output and "--trust-pickle" in result.output
    assert not marker.exists()
    assert not list((tmp_path / "out").iterdir())


@pytest.mark.parametrize("case", sorted(CRAFTED))
def test_the_payload_is_live_once_trusted(tmp_path: Path, case: str) -> None:
    """The crafted archives are real attacks: trusted, their payload runs (so the refusal above is what
    stops it)."""
    build, _ = CRAFTED[case]
    marker = tmp_path / "marker"
    crafted = build(tmp_path, marker)
    CliRunner().invoke(main, ["verify", str(crafted), str(crafted), "--trust-pickle", "--input-shape", "1x3x8x8"])
    assert marker.exists()


@pytest.mark.parametrize("how", ["export", "trace", "script"])
def test_ordinary_archives_need_no_trust(tmp_path: Path, how: str) -> None:
    model = _model()
    path = tmp_path / ("model.pt2" if how == "export" else "model.ts")
    if how == "export":
        torch.export.save(torch.export.export(model, (X,)), str(path))
    else:
        torch.jit.save(torch.jit.trace(model, X) if how == "trace" else torch.jit.script(model), str(path))
    result = CliRunner().invoke(main, ["fold", str(path), "-o", str(tmp_path / f"out{path.suffix}"),
                                       "--input-shape", "1x3x8x8"])
    assert result.exit_code == 0, result.output
