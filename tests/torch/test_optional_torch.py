"""The PyTorch side is optional: without torch, importing works and calls explain the extra, and the test
suite collects, the tests that need torch skipping."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = """
import sys
sys.modules["torch"] = None  # makes `import torch` raise ImportError
import bnfold.torch as front
from bnfold.errors import MissingDependencyError
assert "torch" not in [m for m in sys.modules if sys.modules[m] is not None]
for call in (lambda: front.fold_module(object()), lambda: front.fold_torch_file("a")):
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


COLLECT_WITHOUT_TORCH = """
import sys
sys.modules["torch"] = None
import pytest
sys.exit(pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", "tests"]))
"""


def test_the_suite_collects_without_torch_and_what_needs_torch_skips() -> None:
    checkout = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", COLLECT_WITHOUT_TORCH], capture_output=True, text=True,
                          timeout=300, cwd=checkout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "could not import 'torch'" in done.stdout
