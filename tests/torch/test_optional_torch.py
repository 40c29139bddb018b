"""The PyTorch side is optional: without torch, importing works and calls explain the extra."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import sys
sys.modules["torch"] = None  # makes `import torch` raise ImportError
import bnfold.torch as front
from bnfold.errors import MissingDependencyError
assert "torch" not in [m for m in sys.modules if sys.modules[m] is not None]
for call in (lambda: front.fold_module(object()), lambda: front.fold_torch_file("a", "b")):
    try:
        call()
    except MissingDependencyError as error:
        assert "pip install 'bnfold[torch]'" in str(error), error
    else:
        raise AssertionError("no MissingDependencyError")
print("ok")
"""


def test_torch_front_imports_and_explains_without_torch() -> None:
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
