"""kill -TERM (a scheduler, `timeout`, systemd, docker) ends a command as Ctrl-C does: through its `finally` blocks
and cleanups, then exit 143 with a sentence that says what running the same command again does. Without this,
SIGTERM killed the process where it stood: a failed `train` left its new directory and lock file behind, and
`embed` lost the embeddings computed since its last cache flush (two testers)."""

from __future__ import annotations

import signal

from lore_core.termination import interruption_kind


# What the same command does when run again after an interruption; the others start over, and write nothing
# partial (each output is written atomically, the run's record last).
RERUN = {
    "simulate": "resumes after the last round its checkpoint holds",
    "demo": "skips its finished stages and resumes the unfinished one",
    "embed": "reuses the embeddings already computed (the embedding cache)",
    "synth": "reuses the embeddings already computed (the embedding cache)",
    "deploy local": "resumes after the last round its run directory's checkpoint holds (the SuperLink and "
                    "SuperNodes it started were stopped)",
    "deploy certs": "writes them all again (the CA certificate is written last, so an interrupted one left none; a "
                    "tester's left 125 files and a CA every rerun refused)",
    "audit": "runs the audit again (its result, plot, ledger entry and reports are written together, so they are "
             "this run's or the previous one's)",
    "device": "finds the device state as the last completed command left it (`forget --all` may already have "
              "deleted some of its files)",
}


def is_interruption(exc: BaseException) -> bool:
    """Ctrl-C, kill -TERM, or kill -TERM once `ray.init` (simulate, demo) has replaced lore_core.termination's
    handler with its own, which calls sys.exit(15)."""
    return isinstance(exc, KeyboardInterrupt) or isinstance(exc, SystemExit) and exc.code == signal.SIGTERM


def interrupted(command: str | None, exc: BaseException) -> tuple[str, int]:
    """The message and exit code of an interrupted command (`is_interruption`): 143 for SIGTERM, 130 for Ctrl-C."""
    how, code = interruption_kind(exc)
    rerun = RERUN.get(command or "", "starts over; nothing partial was kept")
    return f"lore-fed {command or ''}: {how}; the same command run again {rerun}", code
