"""Exceptions bnfold raises on purpose. Anything else escaping the API is a bug."""

from __future__ import annotations


class BnfoldError(Exception):
    """Base class of every error bnfold raises deliberately; its message is one line for the user."""


class InputError(BnfoldError):
    """The input (file, model, option or data) cannot be used; nothing was written."""


class OutputError(BnfoldError):
    """The result could not be written; any previous file at the destination is intact."""


class MissingDependencyError(BnfoldError):
    """An optional dependency (e.g. torch) is needed for this operation and is not installed."""


def first_line(error: BaseException, limit: int | None = None) -> str:
    """The first line of ``error``'s message (its type's name if it has none), for a one-line error; at most
    ``limit`` characters."""
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0][:limit]


class InternalError(BnfoldError):
    """A bug in bnfold, caught before anything was written; its message starts with "internal error"."""
