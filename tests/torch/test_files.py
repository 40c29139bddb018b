"""fold_torch_file on .pt2, TorchScript and pickled files: round trips, refusals, atomic writes."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

from bnfold import FoldResult  # noqa: E402
from bnfold.core.compare import VerifyReport  # noqa: E402
from bnfold.core.report import FoldReport  # noqa: E402
from bnfold.errors import InputError  # noqa: E402
from bnfold.torch import fold_torch_file  # noqa: E402
from tests.support.torch_cases import randomize  # noqa: E402
from tests.torch.test_anchors import ConvCalledTwice, Section3  # noqa: E402

X = torch.randn(2, 3, 8, 8)


def fold_and_write(source: Path, target: Path, **options) -> FoldReport:
    """fold_torch_file, then the result written to ``target``: what the command does."""
    result = fold_torch_file(source, **options)
    result.write(target)
    return result.report


def _records(report) -> dict[str, str]:
    return {r.bn: (r.pattern if r.status == "folded" else r.reason) or "" for r in report.records}


def _error(want: torch.Tensor, got: torch.Tensor) -> float:
    return (want - got).abs().max().item() / max(1.0, want.abs().max().item())


def test_pt2_round_trip_folds_and_stays_loadable(tmp_path: Path) -> None:
    model = randomize(Section3(relu_before_bnpre=True))
    source, target = tmp_path / "model.pt2", tmp_path / "folded.pt2"
    torch.export.save(torch.export.export(model, (X,)), str(source))
    before = source.read_bytes()
    report = fold_and_write(source, target)
    assert source.read_bytes() == before
    assert _records(report) == {
        "bn1": "conv-bn", "bnt": "convtranspose-bn", "bnpre": "bn-conv", "bn3": "input_fan_out",
        "bnfc": "linear-bn",
    }
    assert report.verification is not None and report.verification.passed
    folded = torch.export.load(str(target))
    batch_norms = [n for n in folded.graph.nodes if "batch_norm" in str(n.target)]
    assert len(batch_norms) == 1
    assert _error(model(X), folded.module()(X)) < 1e-5


def test_pt2_decomposed_program_folds_addmm_and_mm(tmp_path: Path) -> None:
    model = randomize(nn.Sequential(
        nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.Flatten(),
        nn.Linear(144, 5, bias=False), nn.BatchNorm1d(5), nn.Linear(5, 6), nn.BatchNorm1d(6),
    ))
    program = torch.export.export(model, (X,)).run_decompositions()
    source, target = tmp_path / "model.pt2", tmp_path / "folded.pt2"
    torch.export.save(program, str(source))
    report = fold_and_write(source, target)
    assert _records(report) == {"1": "conv-bn", "4": "linear-bn", "6": "linear-bn"}
    assert _error(model(X), torch.export.load(str(target)).module()(X)) < 1e-5


def test_pt2_reused_conv_is_left(tmp_path: Path) -> None:
    model = randomize(ConvCalledTwice(two_bns=True))
    x = torch.randn(2, 4, 6, 6)
    source, target = tmp_path / "model.pt2", tmp_path / "folded.pt2"
    torch.export.save(torch.export.export(model, (x,)), str(source))
    report = fold_and_write(source, target)
    # Neither batch norm folds into the conv both branches call (module_reused); the sum of the two branches
    # then merges, batch norms included, into one new conv (parallel-branches), exact up to one rounding.
    assert set(_records(report).values()) == {"parallel-branches"}
    assert _error(model(x), torch.export.load(str(target)).module()(x)) < 1e-6


@pytest.mark.parametrize("how", ["script", "trace"])
def test_torchscript_round_trip(tmp_path: Path, how: str) -> None:
    model = randomize(Section3(relu_before_bnpre=True))
    scripted = torch.jit.script(model) if how == "script" else torch.jit.trace(model, X)
    source, target = tmp_path / "model.ts", tmp_path / "folded.ts"
    torch.jit.save(scripted, str(source))
    before = source.read_bytes()
    report = fold_and_write(source, target, input_shapes=[(2, 3, 8, 8)])
    assert source.read_bytes() == before
    outcome = _records(report)
    assert outcome["bn1"] == "conv-bn" and outcome["bn3"] == "input_fan_out"
    assert outcome["bnt"] == "convtranspose-bn" and outcome["bnpre"] == "bn-conv"
    assert report.verification is not None and report.verification.passed, report.render()
    folded = torch.jit.load(str(target))
    assert _error(model(X), folded(X)) < 1e-5


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


class TwoBlocks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = Block(), Block()

    def forward(self, x):
        return self.second(self.first(x))


def test_torchscript_shared_class_graph_folds_in_every_instance(tmp_path: Path) -> None:
    model = randomize(TwoBlocks())
    x = torch.randn(2, 4, 5, 5)
    source, target = tmp_path / "model.pt", tmp_path / "folded.pt"
    torch.jit.save(torch.jit.script(model), str(source))
    report = fold_and_write(source, target, input_shapes=[(2, 4, 5, 5)])
    assert _records(report) == {"first.bn": "conv-bn", "second.bn": "conv-bn"}
    assert _error(model(x), torch.jit.load(str(target))(x)) < 1e-5


def test_torchscript_shared_class_graph_is_left_when_one_instance_cannot_fold(tmp_path: Path) -> None:
    model = randomize(TwoBlocks())
    model.second.bn.running_var[0] = float("nan")
    source, target = tmp_path / "model.pt", tmp_path / "folded.pt"
    torch.jit.save(torch.jit.script(model), str(source))
    report = fold_and_write(source, target, input_shapes=[(2, 4, 5, 5)])
    assert _records(report) == {"first.bn": "shared_code", "second.bn": "non_finite_params"}


def test_pickled_module_is_refused_by_default(tmp_path: Path) -> None:
    source, target = tmp_path / "model.bin", tmp_path / "folded.bin"
    torch.save(randomize(TwoBlocks()), str(source))
    with pytest.raises(InputError, match="unpickling runs arbitrary code"):
        fold_and_write(source, target)
    assert not target.exists()


def test_pickled_module_folds_when_trusted(tmp_path: Path) -> None:
    model = randomize(TwoBlocks())
    x = torch.randn(2, 4, 5, 5)
    source, target = tmp_path / "model.pth", tmp_path / "folded.pth"
    torch.save(model, str(source))
    report = fold_and_write(source, target, trust_pickle=True, input_shapes=[(2, 4, 5, 5)])
    assert report.verification.passed and len(report.folded) == 2
    folded = torch.load(str(target), weights_only=False)
    assert type(folded) is TwoBlocks and isinstance(folded.first.bn, nn.Identity)
    assert _error(model(x), folded(x)) < 1e-5


def test_state_dict_is_not_a_model(tmp_path: Path) -> None:
    source = tmp_path / "weights.pt"
    torch.save(randomize(TwoBlocks()).state_dict(), str(source))
    with pytest.raises(InputError, match="state dict"):
        fold_torch_file(source, trust_pickle=True)


@pytest.mark.parametrize("content", [b"", b"not a model at all", b"PK\x03\x04broken zip"])
def test_bad_files_raise_one_line_input_errors(tmp_path: Path, content: bytes) -> None:
    source = tmp_path / "model.pt2"
    source.write_bytes(content)
    with pytest.raises(InputError) as caught:
        fold_torch_file(source)
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "out.pt2").exists()


def test_truncated_pt2_is_an_input_error_and_leaves_no_output(tmp_path: Path) -> None:
    source = tmp_path / "model.pt2"
    torch.export.save(torch.export.export(randomize(TwoBlocks()), (torch.randn(1, 4, 5, 5),)), str(source))
    broken = tmp_path / "broken.pt2"
    broken.write_bytes(source.read_bytes()[: source.stat().st_size // 2])
    target = tmp_path / "out.pt2"
    target.write_bytes(b"previous")
    with pytest.raises(InputError):
        fold_and_write(broken, target)
    assert target.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.pt2", "model.pt2", "out.pt2"]


def test_format_is_detected_by_content_not_extension(tmp_path: Path) -> None:
    model = randomize(TwoBlocks())
    source, target = tmp_path / "model.pt2", tmp_path / "folded.bin"
    torch.jit.save(torch.jit.script(model), str(source))
    report = fold_and_write(source, target)
    assert len(report.folded) == 2
    x = torch.randn(1, 4, 5, 5)
    assert _error(model(x), torch.jit.load(str(target))(x)) < 1e-5


def test_export_onnx_verifies_under_onnxruntime(tmp_path: Path) -> None:
    model = randomize(Section3(relu_before_bnpre=True))
    source, target, onnx_path = tmp_path / "m.pt", tmp_path / "f.pt", tmp_path / "f.onnx"
    torch.save(model, str(source))
    report = fold_and_write(
        source, target, trust_pickle=True, input_shapes=[(2, 3, 8, 8)], export_onnx=onnx_path
    )
    assert report.verification.passed, report.render()
    assert [c["engine"] for c in report.verification.to_dict()["checks"]] == [
        "pytorch", "onnxruntime (optimizations disabled)",
    ]
    assert onnx_path.exists()


def test_output_equal_to_input_is_refused(tmp_path: Path) -> None:
    source = tmp_path / "model.ts"
    torch.jit.save(torch.jit.script(randomize(TwoBlocks())), str(source))
    result = fold_torch_file(source)
    before = source.read_bytes()
    with pytest.raises(InputError, match="differ"):
        result.write(source)
    assert source.read_bytes() == before
    assert result.write(source, overwrite_input=True) == [source]
    assert len(fold_torch_file(source).report.folded) == 0, "the input now holds the folded model"


def test_failed_verification_is_a_verdict_and_nothing_is_written_until_asked(tmp_path: Path, monkeypatch) -> None:
    import bnfold.torch.forms

    def wrong(reference, candidate, target, **_tolerance):
        return VerifyReport([], 1, target, problem="forced to fail")

    monkeypatch.setattr(bnfold.torch.forms, "compare", wrong)
    source = tmp_path / "model.ts"
    torch.jit.save(torch.jit.script(randomize(TwoBlocks())), str(source))
    result = fold_torch_file(source, input_shapes=[(1, 4, 5, 5)])
    assert isinstance(result, FoldResult) and isinstance(result.model, torch.jit.ScriptModule)
    assert result.report.verification is not None and not result.report.verification.passed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.ts"]


def test_one_result_type_for_every_front(tmp_path: Path) -> None:
    import bnfold

    module = randomize(TwoBlocks()).eval()
    result = bnfold.fold_module(module, torch.randn(1, 4, 5, 5))
    assert isinstance(result, bnfold.FoldResult) and isinstance(result.model, TwoBlocks)
    assert result.write(tmp_path / "folded.pt") == [tmp_path / "folded.pt"]
    assert type(torch.load(str(tmp_path / "folded.pt"), weights_only=False)) is TwoBlocks
    source = tmp_path / "model.pt2"
    torch.export.save(torch.export.export(module, (torch.randn(1, 4, 5, 5),)), str(source))
    exported = bnfold.fold_torch_file(source)
    assert isinstance(exported, bnfold.FoldResult)
    assert isinstance(exported.model, torch.export.ExportedProgram)


def test_tolerances_reach_the_pytorch_verification(tmp_path: Path) -> None:
    source = tmp_path / "model.pt2"
    torch.export.save(torch.export.export(randomize(TwoBlocks()).eval(), (torch.randn(1, 4, 5, 5),)), str(source))
    checked = fold_torch_file(source, rtol=0.25, atol=0.5).report.verification.to_dict()
    assert [(o["rtol"], o["atol"]) for o in checked["outputs"]] == [(0.25, 0.5)]
