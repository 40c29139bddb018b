"""Input files as people have them: ``.npz`` archives (np.savez), ONNX test-data ``.pb`` files (one
TensorProto each) and ``test_data_set_N`` directories, whose ``output_N.pb`` files are expected outputs.

Nothing is decompressed or loaded before it is known to be wanted: an ``.npz`` is checked name by name and
shape by shape against the model from the headers of its ``.npy`` members, and a file that is not a regular
file or a directory (a FIFO, a device) is refused before it is opened.
"""

from __future__ import annotations

import os
import re
import stat
import zipfile
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bnfold.errors import InputError, first_line
from bnfold.onnx.verify.interface import TensorSpec

_INPUT_FILE = re.compile(r"input_(\d+)\.pb")
_OUTPUT_FILE = re.compile(r"output_(\d+)\.pb")
_DATA_SET = re.compile(r"test_data_set_(\d+)")


@dataclass
class Sample:
    """One set of inputs (not yet checked against the model), where it came from, and the outputs expected
    of it if the files say (ONNX test data)."""

    feeds: dict[str, Any]
    source: str
    expected: dict[str, np.ndarray] | None = None


def read_samples(path: str | os.PathLike[str], specs: list[TensorSpec], output_names: list[str]) -> list[Sample]:
    """The samples at ``path``: an ``.npz``, a ``.pb`` (one input), a ``test_data_set_N`` directory or a
    directory of such directories (one sample each, in numeric order)."""
    shown = os.fspath(path)
    try:
        mode = os.stat(path).st_mode
    except OSError as error:
        raise InputError(f"cannot read inputs {shown}: {error.strerror or error}") from None
    if stat.S_ISDIR(mode):
        return _directory(Path(path), specs, output_names)
    if not stat.S_ISREG(mode):
        raise InputError(f"{shown}: not a regular file or directory; give an .npz, .pb or test_data_set directory")
    if shown.endswith(".pb"):
        index = _INPUT_FILE.fullmatch(Path(path).name)
        return [Sample(_tensor_files([Path(path)], [spec.name for spec in specs], "input", index is None), shown)]
    return [Sample(_read_npz(path, specs), shown)]


def _directory(path: Path, specs: list[TensorSpec], output_names: list[str]) -> list[Sample]:
    entries = sorted(path.iterdir())
    inputs = sorted((p for p in entries if _INPUT_FILE.fullmatch(p.name)), key=_number)
    if inputs:
        outputs = sorted((p for p in entries if _OUTPUT_FILE.fullmatch(p.name)), key=_number)
        expected = _tensor_files(outputs, output_names, "output", False) if outputs else None
        return [Sample(_tensor_files(inputs, [spec.name for spec in specs], "input", False), str(path), expected)]
    sets = sorted((p for p in entries if _DATA_SET.fullmatch(p.name) and p.is_dir()), key=_number)
    if not sets:
        raise InputError(f"{path}: a directory of inputs holds input_N.pb files or test_data_set_N directories; "
                         f"found neither")
    return [sample for data_set in sets for sample in _directory(data_set, specs, output_names)]


def _number(path: Path) -> int:
    return int(re.findall(r"\d+", path.name)[-1])


def _tensor_files(paths: Sequence[Path], names: list[str], kind: str, by_name_only: bool) -> dict[str, np.ndarray]:
    """``{name: array}`` of ``input_N.pb``/``output_N.pb`` files: by the tensor's name where it is one of
    ``names``, else by ``N`` as a position among ``names``."""
    from onnx import TensorProto, numpy_helper

    arrays: dict[str, np.ndarray] = {}
    for path in paths:
        tensor = TensorProto()
        try:
            tensor.ParseFromString(path.read_bytes())
            array = numpy_helper.to_array(tensor)
        except Exception as error:  # noqa: BLE001 - not a TensorProto: the user's file to fix
            raise InputError(f"cannot read {kind} {path}: not an ONNX TensorProto ({first_line(error)})") from None
        name = tensor.name
        if name not in names:
            position = None if by_name_only else _number(path)
            if position is None or position >= len(names):
                raise InputError(f"{path}: {kind} tensor '{name}' is none of the model's {kind}s "
                                 f"({', '.join(names) or 'none'})")
            name = names[position]
        if name in arrays:
            raise InputError(f"{path}: a second {kind} for '{name}'")
        arrays[name] = array
    return arrays


def _read_npz(path: str | os.PathLike[str], specs: list[TensorSpec]) -> dict[str, Any]:
    shown = os.fspath(path)
    try:
        with open(path, "rb") as handle:
            is_zip = handle.read(2) == b"PK"  # every zip, the empty archive included
            if not is_zip:  # np.load would try it as a pickle, and refuse it with a message about pickles
                raise InputError(f"{shown}: expected a .npz archive of named arrays (np.savez), "
                                 f"an input_N.pb file or a test_data_set directory")
            handle.seek(0)
            with zipfile.ZipFile(handle) as archive:
                return _npz_arrays(archive, shown, specs)
    except InputError:
        raise
    except OSError as error:
        raise InputError(f"cannot read inputs {shown}: {error.strerror or error}") from None
    except Exception as error:  # noqa: BLE001 - unreadable or not numpy data: the user's file to fix
        raise InputError(f"cannot read inputs {shown}: {first_line(error)}") from None


def check_input_names(names: Collection[str], specs: list[TensorSpec], where: str) -> None:
    """``names`` are the model's inputs, all of them and nothing else; ``where`` names the arrays."""
    wanted = [spec.name for spec in specs]
    missing = [name for name in wanted if name not in names]
    if missing:
        raise InputError(f"{where} lack model input(s) {', '.join(missing)}")
    extra = sorted(set(names) - set(wanted))
    if extra:
        raise InputError(f"{where} have array(s) {', '.join(extra)} that are not model inputs ({', '.join(wanted)})")


def _npz_arrays(archive: zipfile.ZipFile, shown: str, specs: list[TensorSpec]) -> dict[str, Any]:
    """The arrays of ``archive`` the model takes, each read only once every header has been checked."""
    members = {info.filename.removesuffix(".npy"): info for info in archive.infolist()}
    check_input_names(members, specs, f"the arrays in {shown}")
    wanted = {spec.name: spec for spec in specs}
    for name, info in members.items():
        with archive.open(info) as member:
            shape, dtype = _npy_header(member, f"{shown}: array '{name}'")
        check_array_header(wanted[name], shape, dtype, shown)
    arrays = {}
    for name, info in members.items():
        with archive.open(info) as member:
            arrays[name] = np.lib.format.read_array(member, allow_pickle=False)
    return arrays


def _npy_header(member: Any, where: str) -> tuple[tuple[int, ...], np.dtype]:
    try:
        version = np.lib.format.read_magic(member)
        read: Callable[..., Any] = {(1, 0): np.lib.format.read_array_header_1_0,
                                    (2, 0): np.lib.format.read_array_header_2_0}.get(version)  # type: ignore[assignment]
        if read is None:
            raise ValueError(f"unsupported .npy version {version}")
        shape, _, dtype = read(member)
    except Exception as error:  # noqa: BLE001 - not a .npy member
        raise InputError(f"{where} is not a .npy array ({first_line(error)})") from None
    return tuple(shape), dtype


def check_array_header(spec: TensorSpec, shape: tuple[int, ...], dtype: np.dtype, where: str) -> None:
    """Refuse an array of another dtype (byte order aside) or shape than ``spec`` before it is read."""
    if dtype.hasobject:
        raise InputError(f"{where}: input '{spec.name}' holds Python objects; only numeric arrays are read")
    native = dtype.newbyteorder("=")
    raw_match = native.kind == "V" and spec.dtype.kind == "V" and native.itemsize == spec.dtype.itemsize
    if native != spec.dtype and not raw_match:
        raise InputError(f"{where}: input '{spec.name}' has dtype {native.name}, the model expects {spec.type_name}")
    if spec.dims is not None and (len(shape) != len(spec.dims) or any(
            isinstance(d, int) and d >= 0 and d != size for d, size in zip(spec.dims, shape, strict=True))):
        raise InputError(f"{where}: got shape [{', '.join(map(str, shape))}] for input '{spec.name}', "
                         f"which the model declares as {spec.describe_shape()}")
