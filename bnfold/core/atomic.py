"""Atomic writes: the destination holds its old content or the complete new one, never a partial file."""

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
    """A temporary path beside ``destination``; renamed over it only if the block succeeds."""
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
        with temporary.open("rb") as written:
            os.fsync(written.fileno())
        os.replace(temporary, destination)
    except OSError as error:
        if temporary is not None:
            temporary.unlink(missing_ok=True)
        raise OutputError(f"cannot write {destination}: {error.strerror or error}") from None
    except BaseException:
        if temporary is not None:
            temporary.unlink(missing_ok=True)
        raise
    with contextlib.suppress(OSError):
        directory = os.open(destination.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
