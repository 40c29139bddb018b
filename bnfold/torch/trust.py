"""Whether loading and running a ``.pt2`` or TorchScript archive can run code the archive chooses.

``torch.export.load`` unpickles with ``weights_only=False`` whatever the archive marks as pickled (weights,
constants, sample inputs that the safe unpickler refuses, the legacy format) and resolves each graph node's
target by name from the ``torch`` module, so a crafted node can call ``torch.save`` or anything reachable
from there. ``torch.jit.load`` runs a TorchScript class's ``__setstate__``, and TorchScript code can call
``torch.from_file(..., shared=True)``, which writes files. bnfold reads the archive's contents first and
loads it only when they prove none of that can happen; otherwise it needs the same explicit trust as a
pickle (``--trust-pickle``). The check runs on bytes already in memory, and the load then reads those same
bytes, so the file cannot change between the check and the load.
"""

from __future__ import annotations

import io
import json
import tokenize
import zipfile
from collections.abc import Iterator
from typing import Any

from bnfold.errors import InputError

# aten/prim ops that read or write files (found by their schemas: a filename argument, or saving)
_FILE_OPS = frozenset({"from_file", "save"})
# Plain arithmetic and comparisons that torch.export writes for symbolic sizes
_OPERATORS = frozenset({
    "eq", "ne", "le", "ge", "lt", "gt", "neg", "pos", "mul", "add", "sub", "floordiv", "mod", "pow", "truediv",
    "and_", "or_", "lshift", "rshift", "getitem", "not_", "abs",
})
_SCRIPT_NAMESPACES = frozenset({"aten", "prim"})


class UntrustedArchive(Exception):
    """Why the archive could run code of its own when loaded or run."""


def require_safe(data: bytes, kind: str, name: str, trust: bool) -> None:
    """Raise :class:`InputError` unless ``trust`` or the archive provably runs no code of its own."""
    if trust:
        return
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            (_check_program if kind == "pt2" else _check_script)(archive)
    except UntrustedArchive as why:
        raise InputError(
            f"{name}: {why}, so loading or running it could run code of the file's choosing: refusing it "
            "without trust_pickle=True (--trust-pickle)"
        ) from None
    except Exception as error:  # parsing the file's own bytes: any failure means a damaged file
        raise InputError(f"cannot read {name}: {type(error).__name__}: {error}") from error


def _members(archive: zipfile.ZipFile) -> dict[str, str]:
    """Member names without the archive's top directory, mapped to their full names."""
    return {full.split("/", 1)[1] if "/" in full else full: full for full in archive.namelist()}


def _check_program(archive: zipfile.ZipFile) -> None:
    members = _members(archive)
    if "archive_format" not in members:
        raise UntrustedArchive("it is a .pt2 in torch's legacy format, whose weights and inputs are pickles")
    if any(m.startswith("data/aotinductor/") for m in members):
        raise UntrustedArchive("it holds AOTInductor-compiled code, which loading it runs")
    models = [m for m in members if m.startswith("models/") and m.endswith(".json")]
    for model in models:
        stem = model[len("models/"):-len(".json")]
        _check_graph(json.loads(archive.read(members[model])))
        for config in (f"data/weights/{stem}_weights_config.json", f"data/constants/{stem}_constants_config.json"):
            if config in members:
                _check_payloads(json.loads(archive.read(members[config])))
        inputs = f"data/sample_inputs/{stem}.pt"
        if inputs in members:
            _check_tensors_only(archive.read(members[inputs]))


def _check_payloads(config: dict[str, Any]) -> None:
    for fqn, meta in config.get("config", {}).items():
        if meta.get("use_pickle") or not str(meta.get("path_name", "")).startswith(("weight_", "tensor_")):
            raise UntrustedArchive(f"its tensor or object '{fqn}' is stored as a pickle")


def _check_tensors_only(data: bytes) -> None:
    """torch.export.load retries sample inputs with weights_only=False when the safe unpickler refuses them."""
    import torch

    try:
        torch.load(io.BytesIO(data), weights_only=True)
    except Exception as error:
        raise UntrustedArchive("its sample inputs are a pickle of more than tensors") from error


def _check_graph(program: Any) -> None:
    for target in _operator_names(program):
        if not _safe_target(target):
            raise UntrustedArchive(f"its graph calls {target[:80]}, which is not a known tensor operation")


def _operator_names(value: Any) -> Iterator[str]:
    """Every node target and operator argument anywhere in the serialized program (subgraphs too)."""
    if isinstance(value, dict):
        for key, item in value.items():
            if key in ("target", "as_operator") and isinstance(item, str):
                yield item
            else:
                yield from _operator_names(item)
    elif isinstance(value, list):
        for item in value:
            yield from _operator_names(item)


def _safe_target(target: str) -> bool:
    parts = target.split(".")
    if parts[:3] == ["torch", "ops", "aten"] and len(parts) in (4, 5):
        return parts[3] not in _FILE_OPS
    if parts[:3] == ["torch", "ops", "higher_order"] and len(parts) == 4:
        return True
    if parts[0] == "_operator" and len(parts) == 2:
        return parts[1] in _OPERATORS
    if parts[0] == "math" and len(parts) == 2:
        return True
    return len(parts) == 2 and parts[0] == "torch" and parts[1].startswith(("sym_", "_sym_"))


def _check_script(archive: zipfile.ZipFile) -> None:
    members = _members(archive)
    for member, full in members.items():
        if member.startswith("code/") and member.endswith(".py"):
            _check_source(archive.read(full).decode("utf-8"), member)


def _check_source(source: str, member: str) -> None:
    """TorchScript code can only call operators, so a file-touching one must appear by name (as a name or, in
    ``getattr``, a string literal), and an operator outside aten/prim must be named with its namespace."""
    tokens = [t for t in tokenize.generate_tokens(io.StringIO(source).readline) if t.type != tokenize.NL]
    for position, token in enumerate(tokens):
        text = token.string.lstrip("rbuRBU").strip("'\"") if token.type == tokenize.STRING else token.string
        if token.type in (tokenize.NAME, tokenize.STRING) and text in _FILE_OPS:
            raise UntrustedArchive(f"its TorchScript code ({member}, line {token.start[0]}) calls {text}, "
                                   "which reads or writes files")
        if token.type == tokenize.NAME and token.string in ("ops", "classes"):
            following = [t.string for t in tokens[position + 1:position + 3]]
            namespace = following[1] if following[:1] == ["."] and len(following) == 2 else ""
            if token.string == "classes" or namespace not in _SCRIPT_NAMESPACES:
                raise UntrustedArchive(f"its TorchScript code ({member}, line {token.start[0]}) calls "
                                       f"{token.string}.{namespace}, outside torch's own operators")
