"""Turning an exception from a library into the one line bnfold reports."""

from __future__ import annotations


def first_line(error: BaseException, limit: int | None = None) -> str:
    """The first line of ``error``'s message (at most ``limit`` characters), or its type's name when the
    message is empty."""
    text = str(error).strip()
    return text.splitlines()[0][:limit] if text else type(error).__name__
