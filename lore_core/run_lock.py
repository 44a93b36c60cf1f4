"""One run per run directory: an exclusive lock on `RUN_DIR/.lock`, held for as long as a run writes there.

Two runs writing the same checkpoint and ledger would corrupt both (the ledger could end with less spent budget
than one run alone released). `flock` is released by the kernel when the holder dies, so a crashed run never blocks
its own resume. Inside one process the lock is re-entrant: the `lore-fed simulate` command takes it before the
Flower engine starts and its ServerApp, in the same process, takes it again.

The lock file names its holder (pid, command, since), written when the holder announces itself: at once by default,
or, with `announce=False`, only once the caller's checks under the lock have passed (`announce()`). A holder that
never announced leaves the directory as it found it: the file keeps the previous holder's record, and a lock file
that holds no record is removed before the lock is released, whoever created it (a process that opened the removed
file meanwhile notices and retries on the path's current file). Which run created the file says nothing: between
its creation and its creator's lock another run may lock it first, and name itself in it or leave it empty.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import stat
import sys
import threading
import time
from pathlib import Path

from lore_core.atomic_io import remove_stale_temps
from lore_core.text_file import json_loads

LOCK_FILENAME = ".lock"

_held: dict[str, "_Holding"] = {}  # resolved run dir -> this process's holding
_guard = threading.Lock()


SECRET_FLAGS = ("--token",)  # flwr-serverapp's run token: a deployed ServerApp's command line carries it


def shown_command(argv: list[str]) -> str:
    """The holder's command line for the lock file, quoted as a shell would take it, with secrets masked (a tester
    found the ServerApp's `--token` in a deployed run's lock file)."""
    import shlex

    shown = list(argv)
    for i, arg in enumerate(argv):
        flag, eq, _ = arg.partition("=")
        if flag in SECRET_FLAGS:
            if eq:
                shown[i] = f"{flag}=***"
            elif i + 1 < len(argv):
                shown[i + 1] = "***"
    return shlex.join(shown)


class RunDirBusy(RuntimeError):
    """Another process holds the run directory."""


class LockFileError(ValueError):
    """`RUN_DIR/.lock` is not a file the lock can use (a symbolic link, a directory)."""


class _Holding:
    def __init__(self, fd: int) -> None:
        self.fd, self.depth, self.announced = fd, 1, False


class RunDirLock:
    """`wait` seconds to keep trying while another process holds the directory: a ServerApp restarted with its
    SuperLink may start before its predecessor has exited. The command line does not wait. `announce=False`: the
    lock file is written only by `announce()` (see the module docstring)."""

    def __init__(self, run_dir: str | os.PathLike, wait: float = 0.0, announce: bool = True,
                 remedy: str = "wait for it to finish or use another --out directory") -> None:
        self.run_dir = Path(run_dir)
        self.key = str(self.run_dir.resolve())
        self.wait = wait
        self.announce_on_enter = announce
        self.remedy = remedy  # what the refused caller can do: a reader (`audit`) has no other directory to use

    def __enter__(self) -> "RunDirLock":
        with _guard:
            if self.key in _held:
                _held[self.key].depth += 1
            else:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                _held[self.key] = self._acquire(self.run_dir / LOCK_FILENAME)
            if self.announce_on_enter:
                self._announce(_held[self.key], self.run_dir)
        return self

    def _acquire(self, path: Path) -> _Holding:
        deadline = time.monotonic() + self.wait
        while True:
            try:  # never through a link: the holder's record would overwrite the file it points to (a tester)
                fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o600)
            except OSError as exc:
                if path.is_symlink() or path.is_dir():
                    raise LockFileError(f"{path} is a {'symbolic link' if path.is_symlink() else 'directory'}, not "
                                        "the run's lock file (a plain file lore-fed writes): remove it and run the "
                                        "command again") from None
                if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):  # a tester: a raw "[Errno 30]"
                    raise LockFileError(f"{path}: the run's lock file cannot be created or opened ({exc.strerror}); "
                                        "every command that reads or writes a run directory locks it, so it must "
                                        "be writable: copy the run to a writable place") from None
                raise
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if time.monotonic() < deadline:
                    os.close(fd)
                    time.sleep(0.5)
                    continue
                holder = _describe(fd)
                os.close(fd)
                raise RunDirBusy(f"{self.run_dir} is in use by another run ({holder}); {self.remedy}") from None
            if _same_file(fd, path):
                with contextlib.suppress(OSError):  # another owner's file: its mode is theirs to set
                    os.fchmod(fd, 0o600)  # also a lock file an older lore-fed made 0644 (a reviewer)
                return _Holding(fd)
            os.close(fd)  # the file was removed by its holder before we got it: lock the path's current file

    def announce(self) -> None:
        """Write this process into the lock file (once; a no-op when already announced)."""
        with _guard:
            self._announce(_held[self.key], self.run_dir)

    @staticmethod
    def _announce(holding: _Holding, run_dir: Path) -> None:
        """Name this process in the lock file and, as it is about to write, clear what killed writers left (a
        tester: temp files survived every rerun)."""
        if holding.announced:
            return
        remove_stale_temps(run_dir)
        os.ftruncate(holding.fd, 0)
        os.pwrite(holding.fd, json.dumps({"pid": os.getpid(), "command": shown_command(sys.argv),
                                          "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode(), 0)
        holding.announced = True

    def __exit__(self, *exc) -> None:
        with _guard:
            holding = _held[self.key]
            if holding.depth > 1:
                holding.depth -= 1
                return
            del _held[self.key]
            path = self.run_dir / LOCK_FILENAME
            try:  # nothing was written and no record is kept: leave no lock file (only the one we hold)
                if not holding.announced and os.fstat(holding.fd).st_size == 0 and _same_file(holding.fd, path):
                    path.unlink(missing_ok=True)
            finally:
                fcntl.flock(holding.fd, fcntl.LOCK_UN)
                os.close(holding.fd)


def _same_file(fd: int, path: Path) -> bool:
    try:
        on_disk = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (on_disk.st_dev, on_disk.st_ino) == (held.st_dev, held.st_ino)


CHECKING = ("a run still checking its input (or, for `train`, fitting), which names itself only once it is about "
            "to write, or an audit of the run, which never names itself (a tester read only the ended run)")


def live_holder(run_dir: str | os.PathLike) -> int | None:
    """The pid that holds `run_dir`'s lock now, from the kernel's table of locks (Linux /proc/locks), without taking
    the lock (a probe would make a concurrent run's own attempt fail) and never from the lock file's record, which
    may name an ended run or a reused pid; None when no other process holds it, or where the table is not readable.
    (`deploy local` names the holder: a killed command's ServerApp lives on holding the lock, and failed the next
    run minutes after its start.)"""
    path = Path(run_dir) / LOCK_FILENAME
    try:
        info = os.lstat(path)
        table = Path("/proc/locks").read_text()
    except OSError:
        return None
    if not stat.S_ISREG(info.st_mode):
        return None
    where = f"{os.major(info.st_dev):02x}:{os.minor(info.st_dev):02x}:{info.st_ino}"
    for line in table.splitlines():
        fields = line.split()  # "1: FLOCK ADVISORY WRITE PID MAJ:MIN:INODE 0 EOF" (a waiter has "->" second)
        if len(fields) > 5 and fields[1] == "FLOCK" and fields[5] == where and fields[4].isdigit():
            if int(fields[4]) != os.getpid():
                return int(fields[4])
    return None


def _describe(fd: int) -> str:
    """The holder as its record names it. A run holds the lock while it checks its input but writes its record only
    after (a refused run leaves the file as it was), so the record can be an earlier, ended run's."""
    try:
        info = json_loads(os.pread(fd, 4096, 0) or b"{}")
        described = f"pid {info['pid']}, `{info['command']}`, since {info['since']}"
        pid = int(info["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return f"holder unknown: {CHECKING}"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return f"{CHECKING}; the file's record, {described}, is of an ended run"
    except OSError:  # exists, another user's
        pass
    return described
