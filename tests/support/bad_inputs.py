"""The catalog of bad inputs bnfold must survive: each builds its files in a scratch directory and says
how the command line and the Python API must react.

A refused input gets one line on stderr (``bnfold: error: ...``), exit code 2, no traceback, and nothing
is written or changed; the API raises the documented :class:`~bnfold.errors.InputError` or
:class:`~bnfold.errors.OutputError`. A valid model with unusable batch-norm statistics is not refused:
those batch norms stay, with a reason code, and everything else folds (exit 0).

``tests/reliability/test_bad_input.py`` runs every case through both; :mod:`tests.support.fuzz`
runs them through the installed command, in subprocesses, for the table in ``docs/reliability.md``.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from bnfold.errors import BnfoldError, InputError, OutputError

EXIT_OK, EXIT_BAD_INPUT = 0, 2
ERROR_LINE = re.compile(r"^bnfold: error: \S.*\n$")


@dataclass
class Setup:
    """What one case built: the command line, the same through the API, and what must stay untouched."""

    args: list[str]
    api: Callable[[], Any] | None  # None: the rule belongs to the command line only
    # Must hold after the run, whatever it printed (e.g. a payload in a pickle never ran).
    after: Callable[[], str | None] = lambda: None


@dataclass(frozen=True)
class BadInput:
    key: str
    category: str
    what: str
    build: Callable[[Path], Setup]
    exit_code: int = EXIT_BAD_INPUT
    # A regular expression the error line (exit 2) or the printed report (exit 0) must match.
    says: str = ""
    # The API's exception (exit 2), or None when the API returns (exit 0).
    error: type[BnfoldError] | None = InputError
    # Extra conditions on where the case can run: "torch"; "tmpfs" (a small file system, root only);
    # "unprivileged" (file permissions in force: root runs it with its DAC capabilities dropped); "own process"
    # (what goes wrong reaches only a real process's stderr: onnxruntime's C++ log, Python warnings).
    needs: tuple[str, ...] = ()
    # Files a successful run (exit 0) writes; any other change to the scratch directory is a failure.
    writes: tuple[str, ...] = ()


@dataclass
class Outcome:
    exit_code: int
    stdout: str
    stderr: str
    changed: list[str] = field(default_factory=list)  # scratch files created, changed or removed
    problems: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.problems


# --- models ----------------------------------------------------------------------------------------

def conv_bn(channels: int = 4, *, params: list[np.ndarray] | None = None, epsilon: float = 1e-5,
            opset: int = 17, seed: int = 0) -> onnx.ModelProto:
    """x[1,3,8,8] -> Conv(3x3, pad 1) -> BatchNormalization -> Relu -> y; ``params`` replaces the BN's
    gamma, beta, mean, var (any dtype or length; the model is not checked)."""
    rng = np.random.default_rng(seed)
    weight = rng.normal(scale=0.5, size=(channels, 3, 3, 3)).astype(np.float32)
    if params is None:
        params = [rng.uniform(0.5, 1.5, channels), rng.normal(size=channels), rng.normal(size=channels),
                  rng.uniform(0.5, 2.0, channels)]
        params = [p.astype(np.float32) for p in params]
    names = ["gamma", "beta", "mean", "var"]
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["conv"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["conv", *names], ["bn"], name="bn", epsilon=epsilon),
        helper.make_node("Relu", ["bn"], ["y"], name="relu"),
    ]
    initializers = [numpy_helper.from_array(weight, "W")]
    initializers += [numpy_helper.from_array(np.asarray(p), n) for n, p in zip(names, params, strict=True)]
    graph = helper.make_graph(
        nodes, "conv_bn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, channels, 8, 8])], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def _save(model: onnx.ModelProto, path: Path) -> Path:
    path.write_bytes(model.SerializeToString())
    return path


def _good(directory: Path, name: str = "model.onnx") -> Path:
    return _save(conv_bn(), directory / name)


def _with_external_weight(directory: Path, **entries: str) -> Path:
    """model.onnx whose Conv weight ``W`` is stored in ``weights.bin``, its entries then overridden."""
    from bnfold.onnx.store.io import write_model

    path = directory / "model.onnx"
    write_model(conv_bn(channels=16), path, external_data="weights.bin", external_threshold=0)
    model = onnx.load(path, load_external_data=False)
    weight = next(t for t in model.graph.initializer if t.name == "W")
    current = {e.key: e.value for e in weight.external_data} | entries
    del weight.external_data[:]
    for key, value in current.items():
        entry = weight.external_data.add()
        entry.key, entry.value = key, value
    return _save(model, path)


# --- the cases ---------------------------------------------------------------------------------------

def _fold_onnx(path: Path, **options: Any) -> Callable[[], Any]:
    def call() -> Any:
        from bnfold import fold_onnx

        return fold_onnx(path, **options)
    return call


def _write(path: Path, output: Path) -> Callable[[], Any]:
    def call() -> Any:
        from bnfold import fold_onnx

        return fold_onnx(path, verify=False).write(output)
    return call


def _fold_case(model: Callable[[Path], Path]) -> Callable[[Path], Setup]:
    def build(directory: Path) -> Setup:
        path = model(directory)
        return Setup(["fold", str(path), "-o", str(directory / "out.onnx")], _fold_onnx(path))
    return build


def _bytes_case(content: Callable[[], bytes], name: str = "model.onnx") -> Callable[[Path], Setup]:
    def make(directory: Path) -> Path:
        path = directory / name
        path.write_bytes(content())
        return path
    return _fold_case(make)


def _sample_bytes() -> bytes:
    return conv_bn(channels=8).SerializeToString()


def _truncated() -> bytes:
    data = _sample_bytes()
    return data[: len(data) * 2 // 3]


def _corrupt() -> bytes:
    data = bytearray(_sample_bytes())
    data[: 16] = bytes(range(0xF0, 0x100))  # invalid wire types and tags where the graph starts
    return bytes(data)


_PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x02\x00\x00\x00\x90wS\xde"


def _torch_pickle() -> bytes:
    """What ``torch.save(module)`` writes: a zip archive with a pickle inside (built without torch)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("model/data.pkl", b"\x80\x02}q\x00.")
        archive.writestr("model/version", b"3\n")
    return buffer.getvalue()


def _not_a_model() -> bytes:
    return numpy_helper.from_array(np.arange(64, dtype=np.float32), "t").SerializeToString()


def _fails_checker(directory: Path) -> Path:
    model = conv_bn()
    model.graph.node[2].input[0] = "undefined_value"
    return _save(model, directory / "model.onnx")


def _fifo(directory: Path) -> Path:
    path = directory / "model.onnx"
    os.mkfifo(path)
    return path


def _unknown_op(directory: Path) -> Path:
    model = conv_bn()
    model.graph.node[2].op_type, model.graph.node[2].domain = "Frobnicate", "com.example"
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    return _save(model, directory / "model.onnx")


def _short_raw_data(tensor_name: str) -> Callable[[Path], Path]:
    """The tensor's raw data cut to a third: onnx.checker passes such a model, so bnfold must say it."""
    def build(directory: Path) -> Path:
        model = conv_bn()
        tensor = next(t for t in model.graph.initializer if t.name == tensor_name)
        tensor.raw_data = tensor.raw_data[: len(tensor.raw_data) // 3]
        return _save(model, directory / "model.onnx")
    return build


def _verify_huge(directory: Path) -> Setup:
    model = conv_bn()
    for value, channels in ((model.graph.input[0], 3), (model.graph.output[0], 4)):
        dims = (2**20, channels, 2**10, 2**10)
        for dim, size in zip(value.type.tensor_type.shape.dim, dims, strict=True):
            dim.dim_value = size
    path = _save(model, directory / "model.onnx")

    def api() -> Any:
        from bnfold import verify_onnx

        return verify_onnx(path, path)
    return Setup(["verify", str(path), str(path)], api)


def _future_opset(directory: Path) -> Path:
    model = conv_bn()
    model.opset_import[0].version = 99
    return _save(model, directory / "model.onnx")


def _future_ir(directory: Path) -> Path:
    model = conv_bn()
    model.ir_version = 99
    return _save(model, directory / "model.onnx")


def _bn_params(mutate: Callable[[list[np.ndarray]], list[np.ndarray]], epsilon: float = 1e-5
               ) -> Callable[[Path], Path]:
    def make(directory: Path) -> Path:
        rng = np.random.default_rng(1)
        params = [rng.uniform(0.5, 1.5, 4), rng.normal(size=4), rng.normal(size=4), rng.uniform(0.5, 2.0, 4)]
        params = mutate([p.astype(np.float32) for p in params])
        return _save(conv_bn(params=params, epsilon=epsilon), directory / "model.onnx")
    return make


def _set(position: int, channel: int, value: float) -> Callable[[list[np.ndarray]], list[np.ndarray]]:
    def mutate(params: list[np.ndarray]) -> list[np.ndarray]:
        params[position][channel] = value
        return params
    return mutate


def _set_bits(position: int, channel: int, bits: int) -> Callable[[list[np.ndarray]], list[np.ndarray]]:
    def mutate(params: list[np.ndarray]) -> list[np.ndarray]:
        params[position].view(np.uint32)[channel] = bits
        return params
    return mutate


def _runtime_channel_mismatch(directory: Path) -> Path:
    """The input's channel count is symbolic, so the checker passes; verification's generated input has 1
    channel, and onnxruntime fails while running the original (and used to log that itself too)."""
    model = conv_bn()
    model.graph.input[0].type.tensor_type.shape.dim[1].dim_param = "C"
    return _save(model, directory / "model.onnx")


def _zero_channels(directory: Path) -> Path:
    model = conv_bn(channels=0, params=[np.zeros(0, np.float32)] * 4)
    return _save(model, directory / "model.onnx")


def _overflowing_dims(directory: Path) -> Path:
    model = conv_bn()
    weight = next(t for t in model.graph.initializer if t.name == "W")
    del weight.dims[:]
    weight.dims.extend([2**40, 2**40, 2**20, 3])
    return _save(model, directory / "model.onnx")


def _int_bn(directory: Path) -> Path:
    params = [np.array([1, 2, 3, 4], np.int64), np.zeros(4, np.int64), np.zeros(4, np.int64), np.ones(4, np.int64)]
    return _save(conv_bn(params=params), directory / "model.onnx")


def _external(**entries: str) -> Callable[[Path], Setup]:
    def build(directory: Path) -> Setup:
        model_dir = directory / "model"
        model_dir.mkdir()
        (directory / "secret.bin").write_bytes(b"\x01" * (16 * 3 * 3 * 3 * 4))
        values = {key: value.replace("{scratch}", str(directory)) for key, value in entries.items()}
        path = _with_external_weight(model_dir, **values)
        return Setup(["fold", str(path), "-o", str(directory / "out.onnx")], _fold_onnx(path))
    return build


def _external_truncated(directory: Path) -> Setup:
    setup = _external()(directory)
    data = directory / "model" / "weights.bin"
    data.write_bytes(data.read_bytes()[:100])
    return setup


def _external_missing(directory: Path) -> Setup:
    setup = _external()(directory)
    (directory / "model" / "weights.bin").unlink()
    return setup


def _external_symlink(directory: Path) -> Setup:
    setup = _external(location="link.bin")(directory)
    (directory / "model" / "link.bin").symlink_to(directory / "secret.bin")
    return setup


def _verify_external_escape(directory: Path) -> Setup:
    setup = _external(location="../secret.bin")(directory)
    original = _good(directory, "original.onnx")
    candidate = directory / "model" / "model.onnx"

    def api() -> Any:
        from bnfold import verify_onnx

        return verify_onnx(original, candidate)
    return Setup(["verify", str(original), str(candidate)], api, after=setup.after)


def _output_missing_dir(directory: Path) -> Setup:
    path = _good(directory)
    output = directory / "no" / "such" / "dir" / "out.onnx"
    return Setup(["fold", str(path), "-o", str(output)], _write(path, output))


def _output_is_dir(directory: Path) -> Setup:
    path = _good(directory)
    (directory / "out.onnx").mkdir()
    return Setup(["fold", str(path), "-o", str(directory / "out.onnx")], _write(path, directory / "out.onnx"))


def _output_read_only(directory: Path) -> Setup:
    path = _good(directory)
    locked = directory / "locked"
    locked.mkdir()
    (locked / "out.onnx").write_bytes(b"previous")
    locked.chmod(0o555)
    return Setup(["fold", str(path), "-o", str(locked / "out.onnx")], _write(path, locked / "out.onnx"))


def _output_is_input(directory: Path) -> Setup:
    path = _good(directory)
    # The API writes where it is told (FoldResult.write); refusing to replace the input is the command's rule.
    return Setup(["fold", str(path), "-o", str(path)], None)


def _output_replaces_input_data(directory: Path) -> Setup:
    """The output's external data file is the one the input keeps its weights in."""
    path = _with_external_weight(directory)
    out = directory / "out.onnx"

    def api() -> Any:
        from bnfold import fold_onnx

        return fold_onnx(path, verify=False).write(out, external_data="weights.bin", external_threshold=0)
    return Setup(["fold", str(path), "-o", str(out), "--external-data", "weights.bin", "--external-threshold",
                  "0"], api)


def _output_fifo(directory: Path) -> Setup:
    path = _good(directory)
    out = directory / "out.onnx"
    os.mkfifo(out)
    return Setup(["fold", str(path), "-o", str(out)], _write(path, out))


def _negative_seed(directory: Path) -> Setup:
    path = _good(directory)
    return Setup(["fold", str(path), "-o", str(directory / "out.onnx"), "--seed", "-1"], None)


LONGEST_NAME = "o" * 250 + ".onnx"  # 255 bytes: the most a Linux file system takes


def _longest_output_name(directory: Path) -> Setup:
    path = _good(directory)
    return Setup(["fold", str(path), "-o", str(directory / LONGEST_NAME)], _write(path, directory / LONGEST_NAME))


def _windows_like_name(directory: Path) -> Setup:
    path = _good(directory, "C:model.onnx")
    return Setup(["fold", str(path), "-o", str(directory / "C:out.onnx")], _write(path, directory / "C:out.onnx"))


def _unreadable(directory: Path) -> Setup:
    path = _good(directory)
    path.chmod(0)
    return Setup(["fold", str(path), "-o", str(directory / "out.onnx")], _fold_onnx(path))


def _disk_full(directory: Path) -> Setup:
    """The output goes to a 64 KiB file system that holds a previous output; the new one (~110 KiB) cannot
    fit. ``directory / "small"`` must be such a file system (see :func:`small_filesystem`)."""
    path = _save(conv_bn(channels=1024), directory / "model.onnx")
    output = directory / "small" / "out.onnx"
    output.write_bytes(b"previous")
    return Setup(["fold", str(path), "-o", str(output), "--no-verify"], _write(path, output))


def _verify_pair(change: Callable[[onnx.ModelProto], None], inputs: Callable[[Path], Path] | None = None
                 ) -> Callable[[Path], Setup]:
    def build(directory: Path) -> Setup:
        original = _good(directory, "original.onnx")
        model = conv_bn()
        change(model)
        candidate = _save(model, directory / "candidate.onnx")
        args = ["verify", str(original), str(candidate)]
        arrays = inputs(directory) if inputs is not None else None
        if arrays is not None:
            args += ["--inputs", str(arrays)]

        def api() -> Any:
            from bnfold import verify_onnx

            return verify_onnx(original, candidate, inputs=arrays)
        return Setup(args, api)
    return build


def _rename_input(model: onnx.ModelProto) -> None:
    model.graph.input[0].name = "image"
    model.graph.node[0].input[0] = "image"


def _rename_output(model: onnx.ModelProto) -> None:
    model.graph.output[0].name = "z"
    model.graph.node[2].output[0] = "z"


def _resize_input(model: onnx.ModelProto) -> None:
    model.graph.input[0].type.tensor_type.shape.dim[2].dim_value = 16
    model.graph.input[0].type.tensor_type.shape.dim[3].dim_value = 16
    model.graph.output[0].type.tensor_type.shape.dim[2].dim_value = 16
    model.graph.output[0].type.tensor_type.shape.dim[3].dim_value = 16


def _resize_output(model: onnx.ModelProto) -> None:
    model.graph.output[0].type.tensor_type.shape.dim[1].dim_value = 5


def _npz(**arrays: Any) -> Callable[[Path], Path]:
    def make(directory: Path) -> Path:
        path = directory / "inputs.npz"
        np.savez(path, **arrays)
        return path
    return make


def _raw_inputs(content: bytes) -> Callable[[Path], Path]:
    def make(directory: Path) -> Path:
        path = directory / "inputs.npz"
        path.write_bytes(content)
        return path
    return make


def _pickled_npz(directory: Path) -> Path:
    path = directory / "inputs.npz"
    np.savez(path, x=np.array([_Marker(directory)], dtype=object))
    return path


class _Marker:
    """Unpickling it creates a file: proof that pickled data was loaded (it must never be)."""

    def __init__(self, directory: Path) -> None:
        self.path = str(directory / "PICKLE_RAN")

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "w"))


def _no_marker(directory: Path) -> Callable[[], str | None]:
    return lambda: "a pickle ran: PICKLE_RAN exists" if (directory / "PICKLE_RAN").exists() else None


_INPUT = np.zeros((1, 3, 8, 8), np.float32)


def _torch_module(directory: Path) -> Setup:
    import torch

    path = directory / "model.pt"
    torch.save(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).eval(), path)
    return _torch_setup(path, directory)


def _torch_payload(directory: Path) -> Setup:
    import pickle

    path = directory / "model.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("model/data.pkl", pickle.dumps(_Marker(directory), protocol=2))
        archive.writestr("model/version", b"3\n")
    setup = _torch_setup(path, directory)
    setup.after = _no_marker(directory)
    return setup


def _torch_setup(path: Path, directory: Path, *extra: str) -> Setup:
    output = directory / f"out{path.suffix}"

    def api() -> Any:
        from bnfold import fold_torch_file

        return fold_torch_file(path).write(output)
    return Setup(["fold", str(path), "-o", str(output), *extra], api)


def _torch_corrupt(suffix: str) -> Callable[[Path], Setup]:
    def build(directory: Path) -> Setup:
        import torch

        path = directory / f"model{suffix}"
        module = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).eval()
        if suffix == ".pt2":
            torch.export.save(torch.export.export(module, (torch.zeros(1, 3, 8, 8),)), path)
        else:
            torch.jit.save(torch.jit.script(module), path)
        data = bytearray(path.read_bytes())
        # Damage every stored member but keep the zip directory readable, so the loader itself must fail.
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
                for position in range(start, min(start + info.compress_size, start + 64)):
                    data[position] ^= 0x5A
        path.write_bytes(bytes(data))
        return _torch_setup(path, directory, "--trust-pickle")
    return build


def _torch_truncated(directory: Path) -> Setup:
    import torch

    path = directory / "model.pt2"
    module = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).eval()
    torch.export.save(torch.export.export(module, (torch.zeros(1, 3, 8, 8),)), path)
    path.write_bytes(path.read_bytes()[:300])
    return _torch_setup(path, directory)


def _torch_read_only_output(directory: Path) -> Setup:
    import torch

    path = directory / "model.ts"
    torch.jit.save(torch.jit.script(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).eval()),
                   path)
    locked = directory / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    output = locked / "out.ts"

    def api() -> Any:
        from bnfold import fold_torch_file

        return fold_torch_file(path, input_shapes=[[1, 3, 8, 8]]).write(output)
    return Setup(["fold", str(path), "-o", str(output), "--input-shape", "1x3x8x8"], api)


def _torch_state_dict(directory: Path) -> Setup:
    import torch

    path = directory / "weights.pt"
    torch.save(torch.nn.Conv2d(3, 4, 3).state_dict(), path)
    return _torch_setup(path, directory, "--trust-pickle")


CASES: tuple[BadInput, ...] = (
    # files
    BadInput("missing-file", "file", "the model file does not exist",
             _fold_case(lambda d: d / "missing.onnx"), says="no such file"),
    BadInput("directory", "file", "a directory instead of a file",
             _fold_case(lambda d: (d / "model.onnx").mkdir() or d / "model.onnx"), says="is a directory"),
    BadInput("unreadable", "file", "a file without read permission", _unreadable, says="not readable|cannot read",
             needs=("unprivileged",)),
    BadInput("fifo", "file", "a named pipe (FIFO) instead of a file (reading it would block)", _fold_case(_fifo),
             says="not a regular file"),
    BadInput("empty", "file", "an empty file", _bytes_case(lambda: b""), says="empty"),
    BadInput("truncated", "file", "a model cut to two thirds of its bytes", _bytes_case(_truncated),
             says="not an ONNX model"),
    BadInput("corrupt", "file", "16 bytes of the protobuf overwritten", _bytes_case(_corrupt),
             says="not an ONNX model"),
    BadInput("png", "file", "a PNG image named model.onnx", _bytes_case(lambda: _PNG), says="not an ONNX model"),
    # The command reads the content, not the name: it takes the zip for the PyTorch file it is.
    BadInput("pt-as-onnx", "file", "a torch.save zip given to the ONNX API (CLI: inspect)",
             lambda d: Setup(["inspect", str(_bytes_case(_torch_pickle)(d).args[1])],
                             _fold_onnx(d / "model.onnx")), says="not an ONNX model|unpickling runs arbitrary code"),
    BadInput("tensor-not-model", "file", "a serialized TensorProto, not a ModelProto", _bytes_case(_not_a_model),
             says="not an ONNX model"),
    # models
    BadInput("checker", "model", "a node reads a value nothing defines (fails onnx.checker)",
             _fold_case(_fails_checker), says="fails onnx.checker"),
    BadInput("future-opset", "model", "default-domain opset 99, newer than the installed onnx knows",
             _fold_case(_future_opset), says="opset 99 is newer"),
    BadInput("future-ir", "model", "IR version 99", _fold_case(_future_ir), says="IR version 99 is newer"),
    BadInput("short-raw-weight", "model", "the conv weight's raw data is a third of what its dims need",
             _fold_case(_short_raw_data("W")), says="the input model is damaged"),
    BadInput("short-raw-bn", "model", "a batch norm's variance has a third of the raw data its dims need",
             _fold_case(_short_raw_data("var")), says="the input model is damaged"),
    BadInput("unknown-op", "model", "a node of an op no runtime knows (custom domain)", _fold_case(_unknown_op),
             says="onnxruntime cannot load the original model"),
    BadInput("runtime-failure", "model", "the original fails while onnxruntime runs it (a symbolic input channel "
             "count that does not fit the weight)", _fold_case(_runtime_channel_mismatch),
             says="onnxruntime failed to run the original model", needs=("own process",)),
    # batch-norm parameters
    BadInput("bn-nan", "batch norm", "gamma contains NaN (a valid model)", _fold_case(_bn_params(_set(0, 2, np.nan))),
             exit_code=EXIT_OK, says="non_finite_params", error=None, writes=("out.onnx",)),
    BadInput("bn-signalling-nan", "batch norm", "gamma contains a signalling NaN (numpy warns as it widens one)",
             _fold_case(_bn_params(_set_bits(0, 1, 0x7FA00000))), exit_code=EXIT_OK, says="non_finite_params",
             error=None, writes=("out.onnx",), needs=("own process",)),
    BadInput("bn-inf", "batch norm", "running mean contains +inf",
             _fold_case(_bn_params(_set(2, 0, np.inf))), exit_code=EXIT_OK, says="non_finite_params",
             error=None, writes=("out.onnx",)),
    BadInput("bn-negative-var", "batch norm", "a negative running variance", _fold_case(_bn_params(_set(3, 1, -1.0))),
             exit_code=EXIT_OK, says="nonpositive_variance", error=None, writes=("out.onnx",)),
    BadInput("bn-zero-denominator", "batch norm", "var + epsilon = 0 (var 0, epsilon 0)",
             _fold_case(_bn_params(_set(3, 3, 0.0), epsilon=0.0)), exit_code=EXIT_OK,
             says="nonpositive_variance", error=None, writes=("out.onnx",)),
    BadInput("bn-lengths", "batch norm", "gamma has 3 values for 4 channels",
             _fold_case(_bn_params(lambda p: [p[0][:3], *p[1:]])), says="fails onnx.checker.*mismatch"),
    BadInput("bn-zero-size", "batch norm", "a zero-channel Conv + BN (zero-size tensors; a valid model)",
             _fold_case(_zero_channels), exit_code=EXIT_OK, says="param_shape", error=None, writes=("out.onnx",)),
    BadInput("dims-overflow", "batch norm", "weight dims 2^40 x 2^40 x 2^20 x 3 (product overflows int64)",
             _fold_case(_overflowing_dims), says="overflow"),
    BadInput("bn-int", "batch norm", "int64 BN parameters", _fold_case(_int_bn), says="fails onnx.checker"),
    # external data
    BadInput("external-missing", "external data", "the external data file is missing", _external_missing,
             says="missing"),
    BadInput("external-truncated", "external data", "the external data file is truncated", _external_truncated,
             says="truncated"),
    BadInput("external-absolute", "external data", "location is an absolute path (to a file that exists)",
             _external(location="{scratch}/secret.bin"), says="absolute path"),
    BadInput("external-dotdot", "external data", "location is ../secret.bin", _external(location="../secret.bin"),
             says="outside the model's directory"),
    BadInput("external-symlink", "external data", "location is a symlink to a file outside", _external_symlink,
             says="outside the model's directory"),
    BadInput("external-verify", "external data", "verify given a candidate whose location is ../secret.bin",
             _verify_external_escape, says="outside the model's directory"),
    # output
    BadInput("output-missing-dir", "output", "-o in a directory that does not exist", _output_missing_dir,
             says="does not exist", error=OutputError),
    BadInput("output-read-only", "output", "-o in a read-only directory holding a previous output",
             _output_read_only, says="Permission denied", error=OutputError, needs=("unprivileged",)),
    BadInput("output-is-input", "output", "-o names the input", _output_is_input, says="refusing to overwrite"),
    BadInput("output-is-dir", "output", "-o names a directory", _output_is_dir, says="is a directory",
             error=OutputError),
    BadInput("output-replaces-input-data", "output", "--external-data names the input's own external data file",
             _output_replaces_input_data, says="a file of the input model", error=OutputError),
    BadInput("output-fifo", "output", "-o names a FIFO (a rename would replace it with a regular file)",
             _output_fifo, says="special file", error=OutputError),
    BadInput("output-longest-name", "output", "-o names a file of 255 bytes, the longest the file system takes",
             _longest_output_name, exit_code=EXIT_OK, says="wrote", error=None, writes=(LONGEST_NAME,)),
    BadInput("output-windows-name", "output", "file names that look like Windows paths (C:model.onnx)",
             _windows_like_name, exit_code=EXIT_OK, says="wrote", error=None, writes=("C:out.onnx",)),
    BadInput("seed-negative", "verify", "--seed -1", _negative_seed, says="--seed", error=None),
    BadInput("disk-full", "output", "the disk fills up during the write (64 KiB tmpfs, previous output kept)",
             _disk_full, says="No space left", error=OutputError, needs=("tmpfs",)),
    # verify
    BadInput("verify-input-names", "verify", "the models' inputs have different names",
             _verify_pair(_rename_input), says="different inputs"),
    BadInput("verify-output-names", "verify", "the models' outputs have different names",
             _verify_pair(_rename_output), says="different outputs"),
    BadInput("verify-input-shapes", "verify", "the models declare different input shapes",
             _verify_pair(_resize_input), says="shape .* in the candidate"),
    BadInput("verify-output-shapes", "verify", "the models declare different output shapes",
             _verify_pair(_resize_output), says="output 'y' has shape .* in the candidate"),
    BadInput("verify-huge-input", "verify", "an input declared 2^20 x 2^20 floats (4 TiB of random values)",
             _verify_huge, says="GiB of random values"),
    BadInput("inputs-missing", "verify", "--inputs lacks an array the model needs",
             _verify_pair(lambda m: None, _npz(other=_INPUT)), says="lack model input"),
    BadInput("inputs-extra", "verify", "--inputs has an extra array",
             _verify_pair(lambda m: None, _npz(x=_INPUT, other=_INPUT)), says="not model inputs"),
    BadInput("inputs-dtype", "verify", "--inputs array of the wrong dtype (float64)",
             _verify_pair(lambda m: None, _npz(x=_INPUT.astype(np.float64))), says="dtype float64"),
    BadInput("inputs-shape", "verify", "--inputs array of the wrong shape",
             _verify_pair(lambda m: None, _npz(x=np.zeros((1, 3, 9, 8), np.float32))), says="shape"),
    BadInput("inputs-garbage", "verify", "--inputs is not a .npz archive",
             _verify_pair(lambda m: None, _raw_inputs(b"not an archive at all")), says="expected a .npz"),
    BadInput("inputs-pickle", "verify", "--inputs holds a pickled object array (its payload never runs)",
             lambda d: _with_after(_verify_pair(lambda m: None, _pickled_npz)(d), _no_marker(d)),
             says="cannot read inputs|pickle"),
    # PyTorch files
    BadInput("pickle-untrusted", "pytorch", "a pickled module without --trust-pickle", _torch_module,
             says="--trust-pickle", needs=("torch",)),
    BadInput("pickle-payload", "pytorch", "a pickle whose unpickling would create a file, without --trust-pickle",
             _torch_payload, says="--trust-pickle", needs=("torch",)),
    BadInput("pt2-corrupt", "pytorch", "a .pt2 program with damaged members", _torch_corrupt(".pt2"),
             says="cannot load|not a .pt2", needs=("torch",)),
    BadInput("pt2-truncated", "pytorch", "a .pt2 program cut to 300 bytes", _torch_truncated,
             says="cannot|not a .pt2", needs=("torch",)),
    BadInput("torchscript-corrupt", "pytorch", "a TorchScript file with damaged members", _torch_corrupt(".ts"),
             says="cannot load|not a .pt2", needs=("torch",)),
    BadInput("pt-output-read-only", "pytorch", "a TorchScript fold whose -o is in a read-only directory",
             _torch_read_only_output, says="Permission denied", error=OutputError, needs=("torch", "unprivileged")),
    BadInput("state-dict", "pytorch", "a state dict (no module) with --trust-pickle", _torch_state_dict,
             says="state dict", needs=("torch",)),
)


def _with_after(setup: Setup, after: Callable[[], str | None]) -> Setup:
    setup.after = after
    return setup


# --- running a case ----------------------------------------------------------------------------------

def snapshot(directory: Path) -> dict[str, str]:
    """Every entry under ``directory`` (symlinks not followed) -> a digest of what it is."""
    entries: dict[str, str] = {}
    for root, dirs, files in os.walk(directory):
        for name in dirs + files:
            path = Path(root) / name
            relative = str(path.relative_to(directory))
            if path.is_symlink():
                entries[relative] = f"link:{os.readlink(path)}"
            elif path.is_dir():
                entries[relative] = "dir"
            elif not path.is_file():
                entries[relative] = "special"
            else:
                try:
                    entries[relative] = hashlib.sha256(path.read_bytes()).hexdigest()
                except OSError:
                    entries[relative] = "unreadable"
    return entries


def judge(case: BadInput, outcome: Outcome, before: dict[str, str], after: dict[str, str],
          setup: Setup) -> Outcome:
    """``outcome`` with every way it falls short of the case's contract in ``problems``."""
    problems = outcome.problems
    outcome.changed = sorted(name for name in before.keys() | after.keys() if before.get(name) != after.get(name))
    if outcome.exit_code != case.exit_code:
        problems.append(f"exit code {outcome.exit_code}, expected {case.exit_code}")
    if "Traceback" in outcome.stderr + outcome.stdout:
        problems.append("a traceback was printed")
    if case.exit_code == EXIT_BAD_INPUT:
        if not ERROR_LINE.match(outcome.stderr):
            problems.append(f"stderr is not one 'bnfold: error:' line: {outcome.stderr!r}")
        elif not re.search(case.says, outcome.stderr):
            problems.append(f"the error does not say /{case.says}/: {outcome.stderr.strip()!r}")
    elif not re.search(case.says, outcome.stdout):
        problems.append(f"the report does not say /{case.says}/")
    if case.exit_code == EXIT_OK and outcome.stderr.strip():
        problems.append(f"a successful run printed to stderr: {outcome.stderr.strip()!r}")
    unexpected = [name for name in outcome.changed if name not in case.writes]
    if unexpected:
        problems.append(f"files changed: {', '.join(unexpected)}")
    broken = setup.after()
    if broken:
        problems.append(broken)
    return outcome


def error_line(outcome: Outcome) -> str:
    lines = outcome.stderr.strip().splitlines()
    return lines[-1] if lines else ""


def run_api(case: BadInput, setup: Setup) -> list[str]:
    """How the API falls short on ``case``: it must raise ``case.error`` (one line), or return."""
    if setup.api is None:
        return []
    try:
        setup.api()
    except BnfoldError as error:
        if case.error is None or not isinstance(error, case.error):
            return [f"API raised {type(error).__name__}: {error}; expected {_name(case.error)}"]
        if not str(error).strip() or "\n" in str(error).strip():
            return [f"API error is not one line: {str(error)!r}"]
        return []
    except Exception as error:  # noqa: BLE001 - exactly what this check is looking for
        return [f"API raised {type(error).__name__} (not a bnfold error): {error}"]
    return [] if case.error is None else [f"API returned; expected {_name(case.error)}"]


def _name(error: type[BaseException] | None) -> str:
    return "no exception" if error is None else error.__name__


def unprivileged_prefix() -> list[str] | None:
    """A command prefix under which permission bits apply ([] for a normal user); None if impossible."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return None
    return [setpriv, "--bounding-set=-dac_override,-dac_read_search"]


def run_cli_subprocess(case: BadInput, setup: Setup, cwd: Path, timeout: float = 300) -> Outcome:
    """The case through the real command, ``python -m bnfold``, in its own process."""
    prefix = _prefix(case)
    completed = subprocess.run(
        [*prefix, sys.executable, "-m", "bnfold", *setup.args], cwd=cwd, capture_output=True, text=True,
        timeout=timeout, env={**os.environ, "BNFOLD_DEBUG": ""}, check=False,
    )
    return Outcome(completed.returncode, completed.stdout, completed.stderr)


@contextlib.contextmanager
def small_filesystem(directory: Path, size: str = "64k") -> Iterator[bool]:
    """Mount a ``size`` tmpfs on ``directory`` (root only); yields whether it is mounted."""
    directory.mkdir(exist_ok=True)
    mount, umount = shutil.which("mount"), shutil.which("umount")
    mounted = False
    if os.geteuid() == 0 and mount and umount:
        mounted = subprocess.run([mount, "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(directory)],
                                 capture_output=True, check=False).returncode == 0
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run([umount, str(directory)], capture_output=True, check=False)


def available(case: BadInput) -> str | None:
    """Why ``case`` cannot run here, or None."""
    if "torch" in case.needs:
        try:
            import torch  # noqa: F401
        except ImportError:
            return "torch is not installed"
    if "unprivileged" in case.needs and unprivileged_prefix() is None:
        return "running as root without setpriv: permission bits cannot be put in force"
    return None


@contextlib.contextmanager
def scratch(case: BadInput) -> Iterator[Path | None]:
    """A scratch directory for ``case`` (with its small file system if it needs one); None if impossible."""
    with tempfile.TemporaryDirectory(prefix=f"bnfold-{case.key}-") as name:
        directory = Path(name)
        try:
            if "tmpfs" in case.needs:
                with small_filesystem(directory / "small") as mounted:
                    yield directory if mounted else None
            else:
                yield directory
        finally:
            for root, dirs, files in os.walk(directory):  # give back what a case locked, so it can be removed
                for entry in dirs + files:
                    path = Path(root) / entry
                    if not path.is_symlink():
                        with contextlib.suppress(OSError):
                            path.chmod(0o755)


def run_api_subprocess(case: BadInput, timeout: float = 300) -> list[str]:
    """:func:`run_api` in a child process that builds the case itself (with permission checks in force when
    the case needs them); its problems."""
    prefix = _prefix(case)
    completed = subprocess.run([*prefix, sys.executable, "-m", "tests.support.bad_inputs", case.key],
                               capture_output=True, text=True, timeout=timeout, check=False,
                               cwd=Path(__file__).resolve().parents[2])  # the checkout, whatever the cwd
    if completed.returncode != 0:
        return [f"the API check died (exit {completed.returncode}): {completed.stderr.strip()[-300:]}"]
    return json.loads(completed.stdout)


def _prefix(case: BadInput) -> list[str]:
    if "unprivileged" not in case.needs:
        return []
    prefix = unprivileged_prefix()
    assert prefix is not None, "available() says whether the case can run"
    return prefix


def _api_in_this_process(key: str) -> list[str]:
    case = next(case for case in CASES if case.key == key)
    with scratch(case) as directory:
        if directory is None:
            return ["no scratch directory for this case"]
        return run_api(case, case.build(directory))


if __name__ == "__main__":
    print(json.dumps(_api_in_this_process(sys.argv[1])))
