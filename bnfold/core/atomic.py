"""Atomic writes: a destination holds its old content or the complete new one, never a partial file.

The new content goes to a temporary file beside the destination (same file system, so the rename is
atomic), is synced, and is renamed over the destination; on any error or interrupt the temporary file is
removed and the destination is left as it was.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from bnfold.core.interrupts import deferred_interrupts
from bnfold.errors import OutputError


@contextlib.contextmanager
def atomic_destination(destination: Path) -> Iterator[Path]:
    """A temporary path beside ``destination`` for the block to write; renamed over it only if the block
    succeeds. An ``OSError`` becomes a one-line :class:`OutputError`."""
    temporary: Path | None = None
    try:
        # Deferred, so an interrupt cannot fall between creating the file and knowing to remove it.
        with deferred_interrupts():
            handle, name = tempfile.mkstemp(
                prefix=f".{destination.name}.", suffix=destination.suffix or ".tmp", dir=destination.parent
            )
            os.close(handle)
            temporary = Path(name)
        yield temporary
        fsync_file(temporary)
        os.replace(temporary, destination)
    except OSError as error:
        if temporary is not None:
            temporary.unlink(missing_ok=True)
        raise OutputError(f"cannot write {destination}: {error.strerror or error}") from None
    except BaseException:
        if temporary is not None:
            temporary.unlink(missing_ok=True)
        raise
    fsync_directory(destination.parent)


def fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def fsync_directory(directory: Path) -> None:
    """Make a rename in ``directory`` durable; a file system that cannot sync directories is left be."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def same_file(a: Path, b: Path) -> bool:
    """Whether writing ``b`` would replace ``a`` (the same file, under any name)."""
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return a.resolve() == b.resolve()
