"""onnxruntime sessions as bnfold opens them, for both fronts: CPU only, with every graph optimisation off
(``ORT_DISABLE_ALL``), so that onnxruntime's own fusions -- which fold batch norms too -- can neither hide a
difference nor cause one.

In core although it is not numpy-only: onnxruntime is a dependency of bnfold whatever the front, it does not
import onnx, and the ONNX guard, ONNX verification and the PyTorch front's ONNX export check must open their
sessions alike without the fronts importing each other. Import this module only where a session is needed:
onnxruntime's import alone costs a tenth of a second.
"""

from __future__ import annotations

import os

import onnxruntime as ort


def unoptimized_options() -> ort.SessionOptions:
    """Options for a session that runs a model as written, to which a caller may add (e.g. initializers)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    # Errors reach the user once, through bnfold: onnxruntime logging one too would break the one line.
    options.log_severity_level = 4
    # Sessions compared take turns: one's idle threads must not spin on the cores the other's run needs.
    options.add_session_config_entry("session.force_spinning_stop", "1")
    return options


def unoptimized_session(
    model: bytes | str | os.PathLike[str], options: ort.SessionOptions | None = None
) -> ort.InferenceSession:
    """A CPU session on ``model`` (serialized bytes, or a path, from which external data resolves) with
    ``options`` (default :func:`unoptimized_options`)."""
    source = model if isinstance(model, bytes) else os.fspath(model)
    if isinstance(source, str) and not _utf8(source):
        # onnxruntime takes only UTF-8 paths: read the bytes here (external data then cannot be found).
        with open(source, "rb") as handle:
            source = handle.read()
    return ort.InferenceSession(source, options or unoptimized_options(), providers=["CPUExecutionProvider"])


def _utf8(path: str) -> bool:
    """Whether ``path`` (a file system name, non-UTF-8 bytes as surrogates) is valid UTF-8."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
