"""kill -TERM (a scheduler, `timeout`, systemd, docker) ends a command as Ctrl-C does: through its `finally` blocks
and cleanups, then exit 143 with a sentence that says what running the same command again does. Without this,
SIGTERM killed the process where it stood: a failed `train` left its new directory and lock file behind, and
`embed` lost the embeddings computed since its last cache flush (two testers)."""

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
    finally:
        signal.signal(signal.SIGTERM, previous)


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


# What the same command does when run again after an interruption; the others start over, and write nothing
# partial (each output is written atomically, the run's record last).
RERUN = {
    "simulate": "resumes after the last round its checkpoint holds",
    "demo": "skips its finished stages and resumes the unfinished one",
    "embed": "reuses the embeddings already computed (the embedding cache)",
    "synth": "reuses the embeddings already computed (the embedding cache)",
    "deploy": "resumes after the last round its run directory's checkpoint holds (the SuperLink and SuperNodes it "
              "started were stopped)",
    "audit": "runs the audit again (its result, plot, ledger entry and reports are written together, so they are "
             "this run's or the previous one's)",
    "device": "finds the device state as the last completed command left it (`forget --all` may already have "
              "deleted some of its files)",
}


def is_interruption(exc: BaseException) -> bool:
    """Ctrl-C, kill -TERM, or kill -TERM once `ray.init` (simulate, demo) has replaced the handler above with its
    own, which calls sys.exit(15)."""
    return isinstance(exc, KeyboardInterrupt) or isinstance(exc, SystemExit) and exc.code == signal.SIGTERM


def interrupted(command: str | None, exc: BaseException) -> tuple[str, int]:
    """The message and exit code of an interrupted command (`is_interruption`): 143 for SIGTERM, 130 for Ctrl-C."""
    sigterm = isinstance(exc, (Terminated, SystemExit))
    how, code = ("terminated (SIGTERM)", 143) if sigterm else ("interrupted", 130)
    rerun = RERUN.get(command or "", "starts over; nothing partial was kept")
    return f"lore-fed {command or ''}: {how}; the same command run again {rerun}", code
