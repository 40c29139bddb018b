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


def _raise_interrupted(signum: int, _frame: FrameType | None) -> None:
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
    run (by default SIGTERM kills the process on the spot and leaves temporary files behind)."""
    previous = _swap_handlers(_raise_interrupted)
    try:
        yield
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
            _restore(previous)
            if received:
                signal.raise_signal(received[0])
