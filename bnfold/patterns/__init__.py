"""Fold pattern units, each *match -> check safety -> plan a rewrite*; the driver applies and records."""

from bnfold.patterns.forward import FORWARD_PATTERNS

ALL_PATTERNS = FORWARD_PATTERNS
PATTERN_NAMES = tuple(p.name for p in ALL_PATTERNS)

__all__ = ["ALL_PATTERNS", "PATTERN_NAMES"]
