"""A mapped input file that shrinks while bnfold reads it: one line and an exit code, not a silent death.

bnfold maps large input files into memory, so the kernel reads them only as they are used. If such a file is
truncated meanwhile (another process rewriting it), touching a page past its new end raises SIGBUS, which by
default kills the process without a word, and which Python cannot turn into an exception: its own handler
would return to the faulting instruction, which would fault again. :func:`exit_on_bus_error` installs a
C-level handler (through ctypes) that removes the named temporary files still registered in
:data:`NAMED_TEMPORARIES`, writes one line and ends the process at once. Outputs being written are unnamed
files (:mod:`bnfold.core.atomic`), which the kernel frees with the process, so nothing is left beside them.

For the command line only: a library must not end its caller's process.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal

# Named temporary files being written (the fallback where unnamed ones cannot be made): removed on SIGBUS.
NAMED_TEMPORARIES: set[str] = set()

_HANDLER = ctypes.CFUNCTYPE(None, ctypes.c_int)
_installed: list[object] = []  # the handler, kept alive: the C side holds only a pointer to it


def exit_on_bus_error(code: int) -> None:
    """From now on a SIGBUS ends the process with exit ``code`` and one line on stderr (see the module
    docstring). Does nothing where there is no SIGBUS or no C library to install the handler with."""
    signum = getattr(signal, "SIGBUS", None)
    if signum is None or _installed:
        return
    message = (b"bnfold: error: an input file shrank or vanished while bnfold read it (SIGBUS); "
               b"nothing was written\n")

    def on_bus_error(_signum: int) -> None:
        for name in list(NAMED_TEMPORARIES):
            with contextlib.suppress(OSError):
                os.unlink(name)
        with contextlib.suppress(OSError):
            os.write(2, message)
        os._exit(code)

    handler = _HANDLER(on_bus_error)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        install = libc.signal
    except (OSError, AttributeError):
        return
    install.restype = ctypes.c_void_p
    install.argtypes = [ctypes.c_int, _HANDLER]
    install(signum, handler)
    _installed.append(handler)
