"""Fold pattern units, each *match -> check safety -> plan a rewrite*; the driver applies and records.

Unit names say where a batch norm folds (``conv-bn``: into the Conv before it, ``bn-conv``: into the
Conv after it). ``affine-chain`` lets Mul/Add/Sub/Div by per-channel constants join the runs the units
fold, and folds runs of them without a batch norm. Opt-in units run only when asked for by name.
"""

from bnfold.onnx.fold.patterns.backward import BACKWARD_PATTERNS
from bnfold.onnx.fold.patterns.base import AFFINE_CHAIN, Pattern
from bnfold.onnx.fold.patterns.branches import ParallelBranches
from bnfold.onnx.fold.patterns.forward import FORWARD_PATTERNS
from bnfold.onnx.fold.patterns.merges import MergePattern
from bnfold.onnx.fold.patterns.serial import SerialConv, SerialGemm
from bnfold.onnx.fold.patterns.standalone import STANDALONE_MODES, STANDALONE_PATTERNS

STANDALONE = tuple(STANDALONE_PATTERNS.values())
ALL_PATTERNS: tuple[Pattern, ...] = (*FORWARD_PATTERNS, *BACKWARD_PATTERNS, *STANDALONE)
# Structural re-parameterization: linear layers merged where they meet (see bnfold.onnx.fold.merging).
MERGE_PATTERNS: tuple[MergePattern, ...] = (ParallelBranches(), SerialConv(), SerialGemm())
PATTERN_NAMES = (*(p.name for p in FORWARD_PATTERNS + BACKWARD_PATTERNS), AFFINE_CHAIN,
                 *(p.name for p in MERGE_PATTERNS), *(p.name for p in STANDALONE))
OPT_IN_PATTERNS = tuple(p.name for p in STANDALONE)

__all__ = ["AFFINE_CHAIN", "ALL_PATTERNS", "MERGE_PATTERNS", "OPT_IN_PATTERNS", "PATTERN_NAMES", "STANDALONE_MODES",
           "STANDALONE_PATTERNS"]
