"""Signals as exceptions, for every command (lore_cli's and the device app's, which ships without lore_cli): kill
-TERM raises `Terminated` where the main thread stands, as Ctrl-C raises KeyboardInterrupt, so a command ends
through its `finally` blocks; and a block of writes that belong together can hold both until it is done."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the main thread stands, as SIGINT raises KeyboardInterrupt."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


@contextmanager
def terminated_as_interrupt() -> Iterator[None]:
    """SIGTERM raises Terminated in the main thread for the duration (elsewhere Python cannot set a handler)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    except ImportError as exc:  # a signal during an extension's import (onnxruntime) comes wrapped in ImportError:
        inner = _interruption_behind(exc)  # a tester's `kill -TERM` got its traceback and exit 1
        if inner is None:
            raise
        raise inner from None
    finally:
        signal.signal(signal.SIGTERM, previous)


def _interruption_behind(exc: BaseException) -> BaseException | None:
    """The interruption that caused `exc` through its chain of causes (`raise ... from`, as an extension's failed
    initialization raises it; not a suppressed context): Ctrl-C, Terminated, or Ray's sys.exit(15); else None."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt) or isinstance(exc, SystemExit) and exc.code == signal.SIGTERM:
            return exc
        seen.add(id(exc))
        exc = exc.__cause__
    return None


@contextmanager
def interruptions_deferred() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM while the block writes files that belong together (an audit's result, plot, ledger
    entry and reports), then act on them: an interruption lands before the writes or after all of them."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    previous = {sig: signal.getsignal(sig) or signal.SIG_DFL for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        for sig in previous:
            signal.signal(sig, lambda signum, frame: held.append(signum))
        yield
    finally:  # each restored whatever arrives meanwhile (SIGINT last: until then it is held)
        try:
            signal.signal(signal.SIGTERM, previous[signal.SIGTERM])
        finally:
            signal.signal(signal.SIGINT, previous[signal.SIGINT])
    if held:  # the block ended without an error of its own (that one would have propagated above instead)
        signal.raise_signal(signal.SIGTERM if signal.SIGTERM in held else held[0])  # KeyboardInterrupt or Terminated


def interruption_kind(exc: BaseException) -> tuple[str, int]:
    """How an interruption is told, and its exit code: SIGTERM (Terminated, or Ray's sys.exit(15)) 143, Ctrl-C 130."""
    return ("terminated (SIGTERM)", 143) if isinstance(exc, (Terminated, SystemExit)) else ("interrupted", 130)

