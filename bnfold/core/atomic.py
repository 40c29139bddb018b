"""Atomic writes: each destination holds its old content or the complete new one, never a partial file, and
nothing is left beside it, whatever stops the process.

New content is written to an *unnamed* file in the destination's directory (``O_TMPFILE``, Linux): a kill
at any moment of the write leaves nothing, since the kernel frees an unnamed file with its last descriptor.
Once every file of a write is complete and synced, each is given a name and renamed over its destination,
with stop signals deferred, so a group (a model and its data file) is replaced together. A new destination
is linked in place directly; an existing one through a short-lived temporary name (``link`` cannot replace).
Where the file system has no ``O_TMPFILE``, the file is a named temporary ``.bnfold-XXXXXXXX.tmp`` beside the
destination, removed on any error or signal (a SIGKILL alone can leave it). Temporary names are short, so a
destination name at the file system's length limit can be written.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from bnfold.core.faults import NAMED_TEMPORARIES
from bnfold.core.interrupts import deferred_interrupts
from bnfold.errors import OutputError

_PREFIX, _SUFFIX = ".bnfold-", ".tmp"


class _Staged:
    """One file being written for ``destination``: unnamed (``name`` None) or at a temporary ``name``."""

    def __init__(self, destination: Path, handle: BinaryIO, name: Path | None) -> None:
        self.destination, self.handle, self.name = destination, handle, name


class AtomicFiles:
    """A group of files written into one directory and put in place together by :meth:`commit`.

    ``create`` hands out a binary file to write; anything not committed is discarded when the block ends (or
    :meth:`discard` is called), with stop signals deferred so a second signal cannot cut the cleanup short.
    ``OSError`` in ``create`` or ``commit`` becomes a one-line :class:`OutputError`."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._staged: list[_Staged] = []
        self._directory_fd: int | None = None

    def __enter__(self) -> AtomicFiles:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.discard()

    def create(self, destination: Path) -> BinaryIO:
        """A new, empty file that will replace ``destination`` (in :attr:`directory`) on :meth:`commit`."""
        with deferred_interrupts():  # a file is created *and* recorded for cleanup, or neither
            try:
                staged = self._unnamed(destination) or self._named(destination)
            except OSError as error:
                raise OutputError(f"{destination}: cannot write to {self.directory} "
                                  f"({error.strerror or error})") from None
            self._staged.append(staged)
        return staged.handle

    def _dir_fd(self) -> int:
        if self._directory_fd is None:
            self._directory_fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
        return self._directory_fd

    def _unnamed(self, destination: Path) -> _Staged | None:
        flag = getattr(os, "O_TMPFILE", 0)
        if not flag or not os.path.isdir("/proc/self/fd"):  # linking it in place needs /proc
            return None
        try:
            fd = os.open(".", flag | os.O_RDWR, 0o666, dir_fd=self._dir_fd())
        except OSError as error:
            if error.errno in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOENT):
                return None  # the file system (or an old kernel) has no O_TMPFILE
            raise
        return _Staged(destination, os.fdopen(fd, "w+b"), None)

    def _named(self, destination: Path) -> _Staged:
        fd, name = _named_temporary(self.directory, _SUFFIX)
        return _Staged(destination, os.fdopen(fd, "w+b"), name)

    def drop(self, handle: BinaryIO) -> None:
        """Give up the file ``handle`` (say, a data file nothing was written to)."""
        with deferred_interrupts():
            for staged in [s for s in self._staged if s.handle is handle]:
                self._staged.remove(staged)
                _remove(staged)

    def commit(self) -> list[Path]:
        """Sync every file, then put each in place over its destination, together; the destinations."""
        try:
            for staged in self._staged:
                staged.handle.flush()
                os.fsync(staged.handle.fileno())
            with deferred_interrupts():  # a group of files is replaced together or not at all
                for staged in self._staged:
                    self._put_in_place(staged)
        except OSError as error:
            names = ", ".join(str(s.destination) for s in self._staged)
            raise OutputError(f"{names}: write failed ({error.strerror or error}); nothing was replaced") from None
        placed = [staged.destination for staged in self._staged]
        self.discard()
        fsync_directory(self.directory)
        return placed

    def _put_in_place(self, staged: _Staged) -> None:
        if staged.name is None:
            source = f"/proc/self/fd/{staged.handle.fileno()}"
            fd = self._dir_fd()
            # Given directory descriptors, os.link calls linkat with AT_SYMLINK_FOLLOW, which links the file
            # the /proc entry stands for (plain link() would refuse it).
            try:
                os.link(source, staged.destination.name, src_dir_fd=fd, dst_dir_fd=fd, follow_symlinks=True)
                return
            except OSError:
                pass  # it exists (replaced through a temporary name), or the file system will not link it
            staged.name = self._name_unnamed(staged, source, fd)
        os.replace(staged.name, staged.destination)
        NAMED_TEMPORARIES.discard(os.fspath(staged.name))
        staged.name = None

    def _name_unnamed(self, staged: _Staged, source: str, fd: int) -> Path:
        """A short temporary name for the unnamed file: a link to it, or, where the file system refuses to
        link through /proc, a synced copy of it."""
        name = f"{_PREFIX}{os.urandom(6).hex()}{_SUFFIX}"
        NAMED_TEMPORARIES.add(os.fspath(self.directory / name))
        try:
            os.link(source, name, src_dir_fd=fd, dst_dir_fd=fd, follow_symlinks=True)
            return self.directory / name
        except OSError:
            NAMED_TEMPORARIES.discard(os.fspath(self.directory / name))
        copy_fd, copy = _named_temporary(self.directory, _SUFFIX)
        with os.fdopen(copy_fd, "wb") as out:
            staged.handle.seek(0)
            shutil.copyfileobj(staged.handle, out, 1 << 20)
            out.flush()
            os.fsync(out.fileno())
        return copy

    def discard(self) -> None:
        """Remove every file not yet in place; signals wait until it is done."""
        with deferred_interrupts():
            for staged in self._staged:
                _remove(staged)
            self._staged.clear()
            if self._directory_fd is not None:
                os.close(self._directory_fd)
                self._directory_fd = None


def _remove(staged: _Staged) -> None:
    with contextlib.suppress(OSError):
        staged.handle.close()
    if staged.name is not None:
        _forget(staged.name)


def _named_temporary(directory: Path, suffix: str) -> tuple[int, Path]:
    """A new temporary file (call with signals deferred), registered for removal should the process die of
    SIGBUS (:mod:`bnfold.core.faults`) until :func:`_forget` removes it."""
    fd, name = tempfile.mkstemp(prefix=_PREFIX, suffix=suffix if len(suffix) <= 16 else _SUFFIX, dir=directory)
    NAMED_TEMPORARIES.add(name)
    os.fchmod(fd, 0o666 & ~_umask())  # as an ordinary new file, not mkstemp's 0600
    return fd, Path(name)


def _forget(name: Path) -> None:
    """``name`` removed (if it is still there) and no longer registered."""
    with contextlib.suppress(OSError):
        name.unlink()
    NAMED_TEMPORARIES.discard(os.fspath(name))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_destination(destination: Path) -> Iterator[Path]:
    """A temporary path beside ``destination`` for a writer that takes a path (torch's), renamed over it only
    if the block succeeds; removed otherwise (with signals deferred). A path needs a name, so this is the
    named fallback of :class:`AtomicFiles`: only a SIGKILL can leave it. ``OSError`` becomes
    :class:`OutputError`."""
    check_destination(destination)
    with deferred_interrupts():  # a file is created *and* recorded for cleanup, or neither
        try:
            # The destination's suffix: a writer may choose the format by it.
            fd, temporary = _named_temporary(destination.parent, destination.suffix or _SUFFIX)
        except OSError as error:
            raise OutputError(f"cannot write {destination}: {error.strerror or error}") from None
        os.close(fd)
    try:
        yield temporary
        fsync_file(temporary)
        os.replace(temporary, destination)
    except OSError as error:
        raise OutputError(f"cannot write {destination}: {error.strerror or error}") from None
    finally:
        with deferred_interrupts():
            _forget(temporary)
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


def check_destination(destination: Path) -> None:
    """Refuse, before any work, a destination that cannot be written or must not be replaced: in a directory
    that does not exist or cannot be written, a directory itself, or a special file (a FIFO, a device, a
    socket), which a rename would replace by a regular file. Raises :class:`OutputError`."""
    directory = destination.parent
    if not directory.is_dir():
        raise OutputError(f"{destination}: directory {directory} does not exist")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise OutputError(f"{destination}: directory {directory} is not writable ({os.strerror(errno.EACCES)})")
    try:
        mode = os.stat(destination).st_mode
    except FileNotFoundError:
        return
    except OSError as error:
        raise OutputError(f"{destination}: cannot write ({error.strerror or error})") from None
    if stat.S_ISDIR(mode):
        raise OutputError(f"{destination}: is a directory")
    if not stat.S_ISREG(mode):
        raise OutputError(f"{destination}: is a special file (FIFO, device or socket), not replaced by a model")


def same_file(a: Path, b: Path) -> bool:
    """Whether writing ``b`` would replace ``a`` (the same file, under any name)."""
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return a.resolve() == b.resolve()


def replaces_any(destinations: list[Path], inputs: list[Path]) -> Path | None:
    """The first of ``inputs`` that writing ``destinations`` would replace (same file under any name:
    through symlinks and hard links too), or None."""
    for destination in destinations:
        for source in inputs:
            if same_file(source, destination):
                return source
    return None
