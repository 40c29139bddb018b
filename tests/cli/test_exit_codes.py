"""Exit codes that tell the truth, through real processes: a written model is exit 0 whatever became of
stdout (closed, a pipe whose reader left, a full device), and odd but valid options never exit 3."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from bnfold.cli import main
from tests.support.bad_inputs import conv_bn

# Shell redirections a CI script may leave bnfold with.
STDOUT_FATES = {
    "closed": ">&-",
    "closed-with-stderr": ">&- 2>&-",
    "full-device": ">/dev/full",
    "reader-gone": "| head -c 1 >/dev/null",
}


@pytest.fixture
def model(tmp_path: Path) -> Path:
    path = tmp_path / "model.onnx"
    onnx.save(conv_bn(), path)
    return path


def shell(command: str, cwd: Path) -> int:
    """``command`` under sh; its first stage's exit code (a pipeline's own is the last stage's)."""
    status = cwd / "status"
    script = f"{{ {command}; echo $? > {status}; }}" if "|" not in command else \
        f"{{ {command.split('|')[0]}; echo $? > {status}; }} | {command.split('|', 1)[1]}"
    subprocess.run(["sh", "-c", script], cwd=cwd, timeout=120, check=False)
    return int(status.read_text())


@pytest.mark.parametrize("fate", list(STDOUT_FATES))
@pytest.mark.parametrize("as_json", [False, True], ids=["text", "json"])
def test_a_written_model_is_exit_0_whatever_became_of_stdout(model: Path, fate: str, as_json: bool):
    bnfold = f"{sys.executable} -m bnfold"
    flags = " --json" if as_json else ""
    code = shell(f"{bnfold} fold {model} -o out.onnx{flags} {STDOUT_FATES[fate]}", model.parent)
    assert code == 0
    assert "BatchNormalization" not in {n.op_type for n in onnx.load(model.parent / "out.onnx").graph.node}


def test_a_closed_stdout_leaves_no_traceback_on_stderr(model: Path):
    completed = subprocess.run(f"{sys.executable} -m bnfold fold {model} -o out.onnx >&-", shell=True,
                               cwd=model.parent, capture_output=True, text=True, timeout=120, check=False)
    assert completed.returncode == 0 and completed.stderr == ""


@pytest.mark.parametrize(("option", "code"), [
    (["--seed", "-1"], 2), (["--seed", str(2**70)], 0), (["--iterations", "0"], 2), (["--rtol", "nan"], 2),
])
def test_odd_option_values_never_exit_3(model: Path, option: list[str], code: int):
    completed = subprocess.run([sys.executable, "-m", "bnfold", "fold", model, "-o", model.parent / "o.onnx",
                                *option], capture_output=True, text=True, timeout=120, check=False)
    assert completed.returncode == code, completed.stderr
    assert "Traceback" not in completed.stderr
    if code:
        assert completed.stderr.count("\n") == 1


def test_exit_codes_do_not_depend_on_the_environment_encoding(model: Path):
    """A C locale (ASCII) and a non-UTF-8 file name: still one model written, exit 0."""
    odd = os.path.join(os.fsencode(model.parent), b"\xe9t\xe9.onnx")
    os.rename(model, odd)
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0"}
    completed = subprocess.run([sys.executable, "-m", "bnfold", "fold", odd], env=env, capture_output=True,
                               timeout=120, check=False)
    assert completed.returncode == 0, completed.stderr


_ONNX_TEST_DATA = Path(onnx.__file__).parent / "backend" / "test" / "data" / "simple"


@pytest.mark.parametrize("name", ["test_gradient_of_add", "test_strnorm_model_monday_casesensintive_lower"])
def test_a_model_left_unchanged_exits_0_even_where_onnxruntime_cannot_open_it(name, tmp_path):
    """The onnx package's own models with a training op (Gradient) or a StringNormalizer locale onnxruntime
    lacks: nothing folds, so the model written is the input and no run is needed; a pipeline that runs bnfold
    over every model must not break on them (issue 18)."""
    source = _ONNX_TEST_DATA / name / "model.onnx"
    out = tmp_path / "out.onnx"
    result = CliRunner().invoke(main, ["fold", str(source), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "UNCHANGED" in result.output and "onnxruntime cannot load" in result.output
    assert out.read_bytes() == source.read_bytes()


def sequence_model(path: Path, *, equal_shapes: bool) -> Path:
    """Conv -> BN -> Relu, whose output goes out in a sequence with the input (unequal shapes: 4 and 3
    channels) or with itself (equal shapes)."""
    rng = np.random.default_rng(0)
    initializers = [numpy_helper.from_array(rng.normal(size=(4, 3, 3, 3)).astype(np.float32), "W")]
    initializers += [numpy_helper.from_array(v.astype(np.float32), n) for v, n in zip(
        [rng.uniform(0.5, 1.5, 4), rng.normal(size=4), rng.normal(size=4), rng.uniform(0.5, 2, 4)],
        ["g", "b", "m", "v"], strict=True)]
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["bn"]),
             helper.make_node("Relu", ["bn"], ["r"]),
             helper.make_node("SequenceConstruct", ["r", "r" if equal_shapes else "x"], ["seq"])]
    graph = helper.make_graph(nodes, "seq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_sequence_value_info("seq", TensorProto.FLOAT, None)],
                              initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, path)
    return path


def test_sequence_outputs_are_compared_or_refused_never_exit_3(tmp_path: Path):
    def fold(source: Path, *extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "bnfold", "fold", source, "-o", tmp_path / "out.onnx", *extra],
                              capture_output=True, text=True, timeout=120, check=False)

    equal = fold(sequence_model(tmp_path / "equal.onnx", equal_shapes=True))
    assert equal.returncode == 0 and "PASSED" in equal.stdout, equal.stderr
    unequal = sequence_model(tmp_path / "unequal.onnx", equal_shapes=False)
    refused = fold(unequal)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1 and "sequence" in refused.stderr
    unverified = fold(unequal, "--no-verify")
    assert unverified.returncode == 0, unverified.stderr
    assert "BatchNormalization" not in {n.op_type for n in onnx.load(tmp_path / "out.onnx").graph.node}
