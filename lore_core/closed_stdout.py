"""`... | head`: the reader of stdout went away. The commands end quietly then, as other command-line tools do, and
only then: a BrokenPipeError from anything else (a socket, a subprocess) is a real failure and keeps its traceback."""

from __future__ import annotations

import os
import select
import sys


def stdout_closed() -> bool:
    """True when stdout is a pipe whose reader has gone (poll reports an error on its write end); it then points
    stdout at /dev/null, so the interpreter's flush at exit does not raise again."""
    try:
        fd = sys.stdout.fileno()
        poller = select.poll()
        poller.register(fd, select.POLLOUT)
        gone = any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no real stdout (captured, closed) or no poll on this system
        return False
    if gone:
        os.dup2(os.open(os.devnull, os.O_WRONLY), fd)
    return gone
