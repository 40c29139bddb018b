"""Every in-memory form through fold_module (ExportedProgram, ScriptModule scripted or traced), batch norms
inside other modules in TorchScript, and the notice when nothing could be verified."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from click.testing import CliRunner  # noqa: E402
from torch import nn  # noqa: E402

import bnfold  # noqa: E402
from bnfold.cli import main  # noqa: E402
from bnfold.errors import InputError  # noqa: E402
from tests.support.torch_cases import max_error, randomize  # noqa: E402

X = torch.randn(2, 3, 8, 8)


def _model() -> nn.Module:
    return randomize(nn.Sequential(
        nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 6, 1), nn.BatchNorm2d(6),
    )).eval()


def _status(result) -> dict[str, str]:
    return {r.bn: r.pattern if r.status == "folded" else r.reason for r in result.report.records}


def test_exported_program_in_memory_folds_into_a_new_program(tmp_path: Path) -> None:
    model = _model()
    program = torch.export.export(model, (X,))
    state = {name: tensor.clone() for name, tensor in program.state_dict.items()}
    result = bnfold.fold_module(program)  # verified with the inputs it was exported with
    assert isinstance(result.model, torch.export.ExportedProgram)
    assert _status(result) == {"1": "conv-bn", "4": "conv-bn"}
    assert result.report.verification is not None and result.report.verification.passed
    assert not [n for n in result.model.graph.nodes if "batch_norm" in str(n.target)]
    assert state.keys() == program.state_dict.keys()
    assert all(torch.equal(state[name], program.state_dict[name]) for name in state), "the input is untouched"
    assert max_error(model, result.model.module(), X) < 1e-5
    result.write(tmp_path / "folded.pt2")
    assert max_error(model, torch.export.load(str(tmp_path / "folded.pt2")).module(), X) < 1e-5


@pytest.mark.parametrize("how", ["script", "trace"])
def test_script_module_in_memory_folds_into_a_new_script_module(tmp_path: Path, how: str) -> None:
    model = _model()
    scripted = torch.jit.script(model) if how == "script" else torch.jit.trace(model, X)
    code = scripted.code
    result = bnfold.fold_module(scripted, X)
    assert isinstance(result.model, torch.jit.ScriptModule)
    assert _status(result) == {"1": "conv-bn", "4": "conv-bn"}  # traced: the bias-free conv gets a bias
    assert result.report.verification.passed
    assert scripted.code == code and max_error(model, scripted, X) == 0.0, "the input is untouched"
    assert max_error(model, result.model, X) < 1e-5
    result.write(tmp_path / "folded.ts")
    assert max_error(model, torch.jit.load(str(tmp_path / "folded.ts")), X) < 1e-5


def test_exported_programs_module_is_pointed_to_the_program() -> None:
    with pytest.raises(InputError, match="pass the ExportedProgram itself"):
        bnfold.fold_module(torch.export.export(_model(), (X,)).module(), X)


def test_no_inputs_means_a_notice_that_verification_was_skipped() -> None:
    result = bnfold.fold_module(torch.jit.trace(_model(), X))
    assert result.report.verification is None
    assert any("verification skipped" in note and "--input-shape" in note for note in result.report.notes)
    assert "verification skipped" in result.report.render()
    assert not bnfold.fold_module(_model(), X).report.notes


class BatchNormAct(nn.BatchNorm2d):
    """A batch norm, then more work in the same module (timm's BatchNormAct2d, rank check included)."""

    def __init__(self, channels: int) -> None:
        super().__init__(channels)
        self.drop = nn.Identity()
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch._assert(x.ndim == 4, "expected a 4-D input")
        x = nn.functional.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                     self.training, 0.1, self.eps)
        return self.act(self.drop(x))


class UncheckedBatchNormAct(BatchNormAct):
    """The same without the rank check: scripted, nothing pins the rank its batch norm sees."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                     self.training, 0.1, self.eps)
        return self.act(self.drop(x))


class FunctionalInputTwice(nn.Module):
    """A batch norm whose input something else reads too: not a batch norm of the module's input alone."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.randn(channels))
        self.register_buffer("var", torch.rand(channels) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.batch_norm(x, self.mean, self.var, None, None, False, 0.1, 1e-5) + x


class ReadsInputTwice(nn.Module):
    """A batch norm whose input something else reads too: not a batch norm of the module's input alone."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(x) + x


def _bn_act_model(checked: bool = True) -> nn.Module:
    return randomize(nn.Sequential(
        nn.Conv2d(3, 4, 3, bias=False), BatchNormAct(4), nn.Conv2d(4, 4, 3, padding=1),
        BatchNormAct(4) if checked else UncheckedBatchNormAct(4), nn.Conv2d(4, 4, 1), ReadsInputTwice(4),
        nn.Conv2d(4, 4, 1), FunctionalInputTwice(4),
    )).eval()


@pytest.mark.parametrize("how", ["script", "trace"])
def test_batch_norm_at_the_start_of_another_module_folds_and_the_rest_stays(how: str) -> None:
    model = _bn_act_model()
    scripted = torch.jit.script(model) if how == "script" else torch.jit.trace(model, X)
    result = bnfold.fold_module(scripted, X)
    status = _status(result)
    assert (status["1"], status["3"]) == ("conv-bn", "conv-bn")
    assert result.report.verification.passed and max_error(model, result.model, X) < 1e-5
    assert "(act).forward" in result.model._modules["1"].code  # the activation after it is kept
    assert "batch_norm" not in result.model._modules["1"].code
    # a BN module inside an opaque module, and a batch_norm that is not its module's input's sole reader: left
    left = {r.bn: r.reason for r in result.report.left}
    assert left == {"5.bn": "no_linear_neighbour", "7": "unsupported_bn"}


def test_scripted_batch_norm_of_unproven_rank_is_left() -> None:
    """Scripted code without a rank check takes any rank: a BN after a Conv2d might see a 3-D input."""
    model = _bn_act_model(checked=False)
    result = bnfold.fold_module(torch.jit.script(model), X)
    assert _status(result)["3"] == "unknown_shape" and _status(result)["1"] == "conv-bn"
    assert max_error(model, result.model, X) < 1e-5


def test_shared_scripted_class_folds_in_every_instance_or_none() -> None:
    """Scripted instances of one class share one graph: the BN leaves it only if it folds in each of them."""
    model = randomize(nn.Sequential(
        nn.Conv2d(3, 4, 3, bias=False), BatchNormAct(4), nn.ReLU(), BatchNormAct(4),
    )).eval()
    result = bnfold.fold_module(torch.jit.script(model), X)
    assert _status(result) == {"1": "shared_code", "3": "no_linear_neighbour"}
    assert max_error(model, result.model, X) == 0.0


def test_cli_says_when_a_traced_file_was_not_verified(tmp_path: Path) -> None:
    source = tmp_path / "model.ts"
    torch.jit.save(torch.jit.trace(_model(), X), str(source))
    result = CliRunner().invoke(main, ["fold", str(source), "-o", str(tmp_path / "out.ts")])
    assert result.exit_code == 0 and "verification skipped" in result.output and "--input-shape" in result.output
    result = CliRunner().invoke(main, ["fold", str(source), "-o", str(tmp_path / "out2.ts"), "--json"])
    assert any("verification skipped" in note for note in json.loads(result.output)["notes"])


@pytest.mark.parametrize("form", ["export", "script", "trace"])
def test_inspect_and_verify_take_every_file_form(tmp_path: Path, form: str) -> None:
    model = _model()
    source = tmp_path / ("model.pt2" if form == "export" else "model.ts")
    if form == "export":
        torch.export.save(torch.export.export(model, (X,)), str(source))
    else:
        torch.jit.save(torch.jit.script(model) if form == "script" else torch.jit.trace(model, X), str(source))
    inspected = CliRunner().invoke(main, ["inspect", str(source)])
    assert inspected.exit_code == 0 and inspected.output.count("conv-bn") == 2
    folded = tmp_path / f"folded{source.suffix}"
    assert CliRunner().invoke(main, ["fold", str(source), "-o", str(folded), "--input-shape", "2x3x8x8"]).exit_code == 0
    verified = CliRunner().invoke(main, ["verify", str(source), str(folded), "--input-shape", "2x3x8x8"])
    assert verified.exit_code == 0 and "PASSED" in verified.output
    if form != "export":  # TorchScript stores no inputs: one line says how to give them
        unverifiable = CliRunner().invoke(main, ["verify", str(source), str(folded)])
        assert unverifiable.exit_code == 2 and "--input-shape" in unverifiable.output


def test_torch_use_never_imports_onnx(tmp_path: Path) -> None:
    """A PyTorch user's fold through the API (module, TorchScript, .pt2) loads neither onnx nor onnxruntime."""
    import subprocess
    import sys

    source = tmp_path / "model.pt2"
    torch.export.save(torch.export.export(_model(), (X,)), str(source))
    script = (
        "import sys, torch, bnfold\n"
        "from torch import nn\n"
        "model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()\n"
        "x = torch.randn(1, 3, 8, 8)\n"
        "bnfold.fold_module(model, x); bnfold.fold_module(torch.jit.trace(model, x), x)\n"
        f"bnfold.fold_torch_file({str(source)!r})\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('onnx', 'onnxruntime')))\n"
    )
    loaded = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert loaded.stdout.strip() == "[]"
