"""One run per run directory: an exclusive lock on `RUN_DIR/.lock`, held for as long as a run writes there.

Two runs writing the same checkpoint and ledger would corrupt both (the ledger could end with less spent budget
than one run alone released). `flock` is released by the kernel when the holder dies, so a crashed run never blocks
its own resume. Inside one process the lock is re-entrant: the `lore-fed simulate` command takes it before the
Flower engine starts and its ServerApp, in the same process, takes it again.
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
import threading
import time
from pathlib import Path

LOCK_FILENAME = ".lock"

_held: dict[str, tuple[int, int]] = {}  # resolved run dir -> (fd, depth), this process
_guard = threading.Lock()


class RunDirBusy(RuntimeError):
    """Another process holds the run directory."""


class RunDirLock:
    """`wait` seconds to keep trying while another process holds the directory: a ServerApp restarted with its
    SuperLink may start before its predecessor has exited. The command line does not wait."""

    def __init__(self, run_dir: str | os.PathLike, wait: float = 0.0) -> None:
        self.run_dir = Path(run_dir)
        self.key = str(self.run_dir.resolve())
        self.wait = wait

    def __enter__(self) -> "RunDirLock":
        with _guard:
            if self.key in _held:
                fd, depth = _held[self.key]
                _held[self.key] = (fd, depth + 1)
                return self
            self.run_dir.mkdir(parents=True, exist_ok=True)
            path = self.run_dir / LOCK_FILENAME
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            deadline = time.monotonic() + self.wait
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() < deadline:
                        time.sleep(0.5)
                        continue
                    holder = _describe(fd)
                    os.close(fd)
                    raise RunDirBusy(f"{self.run_dir} is in use by another run ({holder}); wait for it to finish or "
                                     "use another --out directory") from None
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps({"pid": os.getpid(), "command": " ".join(sys.argv),
                                     "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
            _held[self.key] = (fd, 1)
        return self

    def __exit__(self, *exc) -> None:
        with _guard:
            fd, depth = _held[self.key]
            if depth > 1:
                _held[self.key] = (fd, depth - 1)
                return
            del _held[self.key]
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


def _describe(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"pid {info['pid']}, `{info['command']}`, since {info['since']}"
    except (OSError, ValueError, KeyError):
        return "holder unknown"
