"""The CLI through click's runner: exit codes, JSON shape, atomic output, input untouched."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

from bnfold.cli import main
from tests.support.graphs import GraphBuilder, count_ops


@pytest.fixture
def model_path(tmp_path: Path) -> Path:
    g = GraphBuilder()
    x = g.input("x", ["batch", 3, 8, 8])
    y = g.bn(g.node("Conv", [x, g.weight([4, 3, 3, 3])], pads=[1, 1, 1, 1]), 4)
    standalone = g.bn(g.node("Relu", [y]), 4)
    path = tmp_path / "model.onnx"
    onnx.save(g.model([standalone]), path)
    return path


def invoke(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_fold_writes_a_verified_model_and_leaves_the_input_alone(model_path, tmp_path):
    before = model_path.read_bytes()
    out = tmp_path / "folded.onnx"
    result = invoke("fold", model_path, "-o", out)
    assert result.exit_code == 0, result.output
    assert model_path.read_bytes() == before
    folded = onnx.load(out)
    assert count_ops(folded) == 1
    assert "conv-bn" in result.output and "no_linear_neighbour" in result.output
    assert "PASSED" in result.output
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temporary file remains"


def test_fold_json_is_machine_readable(model_path, tmp_path):
    result = invoke("fold", model_path, "-o", tmp_path / "f.onnx", "--json")
    assert result.exit_code == 0
    payload = json.loads(result.output)
    assert payload["folded"] == 1 and payload["left"] == 1
    assert payload["totals"]["bn_before"] == 2 and payload["totals"]["bn_after"] == 1
    reasons = {r["status"]: r for r in payload["batchnorms"]}
    assert reasons["folded"]["pattern"] == "conv-bn"
    assert reasons["left"]["reason"] == "no_linear_neighbour"
    assert payload["verification"]["passed"] is True
    assert payload["written"] == [str(tmp_path / "f.onnx")]


def test_inspect_writes_nothing_and_explains(model_path, tmp_path):
    result = invoke("inspect", model_path, "--json")
    assert result.exit_code == 0
    payload = json.loads(result.output)
    assert [r["status"] for r in payload["batchnorms"]] == ["folded", "left"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_output_equal_to_input_is_refused_without_the_flag(model_path):
    before = model_path.read_bytes()
    result = invoke("fold", model_path, "-o", model_path)
    assert result.exit_code == 2
    assert "overwrite" in result.output
    assert model_path.read_bytes() == before
    result = invoke("fold", model_path, "-o", model_path, "--overwrite-input")
    assert result.exit_code == 0
    assert count_ops(onnx.load(model_path)) == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["fold", "missing.onnx", "-o", "out.onnx"], "no such file"),
        (["inspect", "empty"], "no .onnx model in this directory"),
        (["fold", "MODEL", "--only", "conv-bm"], "unknown pattern"),
        (["verify", "MODEL", "missing.onnx"], "no such file"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(model_path, tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(main, [str(model_path) if a == "MODEL" else a for a in args])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output


def test_garbage_file_is_refused(tmp_path):
    path = tmp_path / "picture.onnx"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    result = CliRunner().invoke(main, ["fold", str(path), "-o", str(tmp_path / "o.onnx")])
    assert result.exit_code == 2
    assert result.output.count("\n") == 1 and "not an ONNX model" in result.output


def test_empty_file_is_refused(tmp_path):
    path = tmp_path / "empty.onnx"
    path.touch()
    result = CliRunner().invoke(main, ["inspect", str(path)])
    assert (result.exit_code, "empty" in result.output) == (2, True)


def test_verify_exit_codes_separate_equivalent_from_wrong(model_path, tmp_path):
    out = tmp_path / "folded.onnx"
    assert invoke("fold", model_path, "-o", out).exit_code == 0
    assert invoke("verify", model_path, out).exit_code == 0
    broken = onnx.load(out)
    conv = broken.graph.node[0]
    initializers = {t.name: t for t in broken.graph.initializer}
    weight = numpy_helper.to_array(initializers[conv.input[1]]).copy()
    weight[2] *= 1.01  # one channel's scale off by 1%
    initializers[conv.input[1]].CopyFrom(numpy_helper.from_array(weight, conv.input[1]))
    wrong = tmp_path / "wrong.onnx"
    onnx.save(broken, wrong)
    result = invoke("verify", model_path, wrong, "--json")
    assert result.exit_code == 1
    payload = json.loads(result.output)
    assert payload["passed"] is False


def test_verify_uses_given_inputs_and_input_shapes(model_path, tmp_path):
    inputs = tmp_path / "inputs.npz"
    np.savez(inputs, x=np.random.default_rng(0).normal(size=(2, 3, 8, 8)).astype(np.float32))
    assert invoke("verify", model_path, model_path, "--inputs", inputs).exit_code == 0
    assert invoke("verify", model_path, model_path, "--input-shape", "x:4x3x8x8").exit_code == 0
    result = CliRunner().invoke(main, ["verify", str(model_path), str(model_path), "--input-shape", "x:4xa"])
    assert result.exit_code == 2


def test_fold_that_fails_verification_writes_nothing(model_path, tmp_path, monkeypatch):
    import bnfold.onnx.verify.verify

    real = bnfold.onnx.verify.verify.verify_onnx

    def strict(*args, **kwargs):
        kwargs["atol"], kwargs["rtol"] = 0.0, 0.0
        return real(*args, **kwargs)

    monkeypatch.setattr(bnfold.onnx.verify.verify, "verify_onnx", strict)
    out = tmp_path / "f.onnx"
    out.write_bytes(b"previous")
    result = invoke("fold", model_path, "-o", out)
    assert result.exit_code == 1
    assert out.read_bytes() == b"previous"
    assert "NOT written" in result.output


def test_cli_shim_runs_from_a_checkout():
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    completed = subprocess.run([sys.executable, str(root / "cli.py"), "--help"], capture_output=True, text=True,
                               cwd=root, check=False)
    assert completed.returncode == 0
    assert "fold" in completed.stdout and "verify" in completed.stdout


@pytest.mark.parametrize("entry", ["console script", "python -m bnfold", "cli.py"])
def test_every_process_entry_point_folds_and_fails_as_the_command_does(entry, model_path, tmp_path):
    """The processes users start run ``bnfold.cli.run`` (``main`` with the collector frozen, then
    ``end_process``): same output, same exit codes, the model written."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    command = {"console script": [str(Path(sys.executable).parent / "bnfold")],
               "python -m bnfold": [sys.executable, "-m", "bnfold"],
               "cli.py": [sys.executable, str(root / "cli.py")]}[entry]
    out = tmp_path / "out.onnx"
    folded = subprocess.run([*command, "fold", str(model_path), "-o", str(out), "--no-verify", "--json"],
                            capture_output=True, text=True, cwd=root, check=False)
    assert folded.returncode == 0, folded.stderr
    assert json.loads(folded.stdout)["written"] == [str(out)] and onnx.load(out).graph.node
    missing = subprocess.run([*command, "fold", str(tmp_path / "missing.onnx")], capture_output=True, text=True,
                             cwd=root, check=False)
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines() == [f"bnfold: error: {tmp_path / 'missing.onnx'}: no such file"]


@pytest.mark.parametrize(("ending", "status", "stdout", "stderr"), [
    ("print('folded', end=''); end_process(None)", 0, "folded", ""),
    ("print('partial', end=''); end_process(2)", 2, "partial", ""),
    ("end_process('bnfold: error: a message')", 1, "", "bnfold: error: a message\n"),
    ("reader, writer = os.pipe(); os.close(reader); os.dup2(writer, 1); print('lost'); end_process(0)", 0, "", ""),
    ("os.close(1); sys.stdout = None; end_process(1)", 1, "", ""),
])
def test_the_process_ends_with_its_output_flushed_and_its_exit_code(ending, status, stdout, stderr):
    """``end_process`` skips the interpreter's teardown, never what was printed: buffered output reaches the
    pipe. Output nobody reads any more (the pipe's reader left, stdout was closed) changes no exit status:
    the status says what bnfold did, not Python's 120."""
    import os
    import subprocess
    import sys

    buffered = {name: value for name, value in os.environ.items() if name != "PYTHONUNBUFFERED"}
    ended = subprocess.run([sys.executable, "-c", f"import os, sys\nfrom bnfold.cli import end_process\n{ending}"],
                           capture_output=True, text=True, check=False, env=buffered)
    assert (ended.returncode, ended.stdout, ended.stderr) == (status, stdout, stderr)


def _torch_model():
    torch = pytest.importorskip("torch")
    from tests.support.zoo import resnet

    module, shape = resnet()
    return torch, module, shape


def test_fold_torchscript_file_through_the_cli(tmp_path):
    torch, module, shape = _torch_model()
    source = tmp_path / "model.ts"
    torch.jit.save(torch.jit.script(module), source)
    out = tmp_path / "folded.ts"
    result = invoke("fold", source, "-o", out, "--input-shape", "x".join(map(str, shape)), "--json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output)
    assert payload["folded"] > 0 and payload["verification"]["passed"]
    folded = torch.jit.load(out)
    example = torch.randn(*shape)
    torch.testing.assert_close(folded(example), module(example), rtol=1e-4, atol=1e-4)


def test_pickled_module_is_refused_unless_trusted(tmp_path):
    torch, module, shape = _torch_model()
    source = tmp_path / "model.pt"
    torch.save(module, source)
    out = tmp_path / "folded.pt"
    refused = CliRunner().invoke(main, ["fold", str(source), "-o", str(out)])
    assert refused.exit_code == 2 and "pickle" in refused.output and not out.exists()
    trusted = invoke("fold", source, "-o", out, "--trust-pickle", "--input-shape", "x".join(map(str, shape)))
    assert trusted.exit_code == 0, trusted.output
    assert out.exists()


def _process(*args: str, **options) -> subprocess.CompletedProcess:
    """The console script, as users start it."""
    return subprocess.run([str(Path(sys.executable).parent / "bnfold"), *args], check=False, **options)


@pytest.mark.parametrize("stdout", ["closed", "reader gone"])
def test_a_stdout_nobody_reads_keeps_the_exit_code_and_the_written_model(stdout, model_path, tmp_path):
    out = tmp_path / "out.onnx"
    reader, writer = os.pipe()
    os.close(reader)
    try:
        if stdout == "closed":
            ended = _process("fold", str(model_path), "-o", str(out), "--json", stderr=subprocess.PIPE, text=True,
                             preexec_fn=lambda: os.close(1))
        else:
            ended = _process("fold", str(model_path), "-o", str(out), stdout=writer, stderr=subprocess.PIPE,
                             text=True)
    finally:
        os.close(writer)
    assert (ended.returncode, ended.stderr) == (0, "")
    assert count_ops(onnx.load(out)) == 1


def _pt2(tmp_path: Path, name: str = "model.pt2", scale: float = 1.0) -> Path:
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).eval()
    with torch.no_grad():
        module[1].running_var.uniform_(0.5, 2.0)
        module[0].weight.mul_(scale)
    path = tmp_path / name
    torch.export.save(torch.export.export(module, (torch.randn(1, 3, 8, 8),)), str(path))
    return path


@pytest.mark.parametrize(("command", "options", "option"), [
    ("fold", ["--only", "no-such-pattern", "--rtol", "0", "--atol", "0", "--inputs", "missing.npz"], "--only"),
    ("fold", ["--external-threshold", "0"], "--external-threshold"),
    ("fold", ["--seed", "0"], "--seed"),
    ("inspect", ["--standalone", "conv"], "--standalone"),
    ("verify", ["--iterations", "2"], "--iterations"),
])
def test_onnx_options_on_a_torch_file_are_refused(tmp_path, command, options, option):
    source = _pt2(tmp_path)
    files = [str(source)] * (2 if command == "verify" else 1)
    result = CliRunner().invoke(main, [command, *files, *options, *(["-o", str(tmp_path / "o.pt2")]
                                                                   if command == "fold" else [])])
    assert result.exit_code == 2, result.output
    assert result.output.count("\n") == 1 and f"{option} does not apply to PyTorch files" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt2"]


@pytest.mark.parametrize(("command", "option"), [
    ("fold", ["--trust-pickle"]), ("fold", ["--export-onnx", "x.onnx"]), ("fold", ["--allow-train-mode"]),
    ("inspect", ["--trust-pickle"]), ("verify", ["--trust-pickle"]),
])
def test_torch_options_on_an_onnx_model_are_refused(model_path, tmp_path, command, option):
    files = [str(model_path)] * (2 if command == "verify" else 1)
    result = CliRunner().invoke(main, [command, *files, *option])
    assert result.exit_code == 2, result.output
    assert result.output.count("\n") == 1 and f"{option[0]} does not apply to ONNX models" in result.output


def test_inspect_and_verify_take_torch_files_with_the_onnx_json_keys(model_path, tmp_path):
    source = _pt2(tmp_path)
    inspected = invoke("inspect", source, "--json")
    assert inspected.exit_code == 0, inspected.output
    payload = json.loads(inspected.output)
    assert [r["status"] for r in payload["batchnorms"]] == ["folded"]
    assert payload.keys() == json.loads(invoke("inspect", model_path, "--json").output).keys()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.pt2"]
    folded = tmp_path / "folded.pt2"
    onnx_fold = json.loads(invoke("fold", model_path, "-o", tmp_path / "folded.onnx", "--json").output)
    assert json.loads(invoke("fold", source, "-o", folded, "--json").output).keys() == onnx_fold.keys()
    same = invoke("verify", source, folded, "--json")
    assert same.exit_code == 0, same.output
    onnx_keys = json.loads(invoke("verify", model_path, model_path, "--json").output).keys()
    assert json.loads(same.output).keys() == onnx_keys and json.loads(same.output)["passed"] is True
    wrong = invoke("verify", source, _pt2(tmp_path, "wrong.pt2", scale=1.01), "--input-shape", "1x3x8x8")
    assert wrong.exit_code == 1 and "FAILED" in wrong.output
    loose = invoke("verify", source, tmp_path / "wrong.pt2", "--input-shape", "1x3x8x8", "--atol", "1e9")
    assert loose.exit_code == 0, "--rtol/--atol are one rule for both fronts"
    too_big = CliRunner().invoke(main, ["verify", str(source), str(folded), "--input-shape", "2x3x8x8"])
    assert too_big.exit_code == 2 and too_big.output.count("\n") == 1 and "does not run" in too_big.output
    mixed = CliRunner().invoke(main, ["verify", str(model_path), str(source)])
    assert mixed.exit_code == 2 and mixed.output.count("\n") == 1 and "ONNX model with a PyTorch file" in mixed.output


def test_importing_bnfold_for_pytorch_leaves_onnx_unimported():
    code = "import sys, bnfold; bnfold.fold_module; bnfold.FoldResult; print('onnx' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert (done.returncode, done.stdout.strip()) == (0, "False"), done.stderr
