"""SIGINT and SIGTERM: both stop bnfold the same clean way, never in the middle of a commit.

Python runs signal handlers in the main thread only, whichever thread the kernel delivers the signal to, so
swapping the handlers (unlike blocking the signal in one thread, which onnxruntime's worker threads would
not do) defers a signal reliably. Off the main thread handlers cannot be changed, and nothing is deferred.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType
from typing import Any

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """A stop signal arrived; ``signum`` says which."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


# Holds the first stop signal that raised Interrupted: the process is on its way out, and a second stop
# signal must not cut its cleanup short. A plain set, changed in one step: not SIG_IGN (changing a handler
# inside a handler runs the next pending one), nor a threading.Event (a second handler run while the first
# holds the Event's lock would wait for it forever).
_stopping: set[int] = set()


def _raise_interrupted(signum: int, _frame: FrameType | None) -> None:
    if _stopping:
        return
    _stopping.add(signum)
    raise Interrupted(signum)


def _swap_handlers(handler: Any) -> dict[int, Any] | None:
    if threading.current_thread() is not threading.main_thread():
        return None
    return {signum: signal.signal(signum, handler) for signum in STOP_SIGNALS}


def _restore(previous: dict[int, Any]) -> None:
    for signum, handler in previous.items():
        signal.signal(signum, signal.SIG_DFL if handler is None else handler)


@contextlib.contextmanager
def interrupt_on_stop_signals() -> Iterator[None]:
    """Inside the block, SIGTERM raises :class:`Interrupted` just as SIGINT does, so ``finally`` clauses
    run (by default SIGTERM kills the process on the spot and leaves temporary files behind). Once one has,
    further stop signals are ignored, also after the block: the caller is ending the process, and its
    cleanup and its one line must not be cut short by a second signal (an impatient Ctrl-C, a SIGTERM)."""
    _stopping.clear()
    previous = _swap_handlers(_raise_interrupted)
    try:
        yield
    except KeyboardInterrupt:
        previous = None  # keep the handler, which now ignores stop signals
        raise
    finally:
        if previous is not None:
            _restore(previous)


@contextlib.contextmanager
def deferred_interrupts() -> Iterator[None]:
    """A stop signal arriving inside the block takes effect (through the handler it would have met) as
    the block ends, so the block runs to completion: a temporary file is created *and* recorded for
    cleanup, or a group of renames is done entirely."""
    received: list[int] = []
    previous = _swap_handlers(lambda signum, _frame: received.append(signum))
    try:
        yield
    finally:
        if previous is not None:
            _restore_then_deliver(previous, received)


def _restore_then_deliver(previous: dict[int, Any], received: list[int]) -> None:
    """Put the handlers back, then deliver the first signal received meanwhile to its handler. Stop signals
    are blocked while the handlers go back: one arriving in between would run a handler already restored
    and leave the others (and the signal that came first) behind."""
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    handler: Any = None
    try:
        _restore(previous)
        if received:
            handler = signal.getsignal(received[0])
            if callable(handler):
                handler(received[0], None)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    if received and not callable(handler):
        signal.raise_signal(received[0])  # SIG_DFL: what the signal does by default (SIG_IGN: nothing)
