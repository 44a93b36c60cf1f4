"""Run the code of another git commit beside this checkout's: the benchmarks that compare two commits share this.

`worktree` checks a commit out into a temporary directory and always removes it; `code_env` makes a subprocess
import from that directory; `check_imports` proves it does (an editable install of this checkout would otherwise
fill in any module the older commit lacks); `checkout_label` names this checkout in a report, dirty or not.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _git(*args: str, check: bool = True) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=check).stdout.strip()


def code_env(root: Path) -> dict:
    """The environment of a subprocess that runs the code under `root`, one thread (benchmarks share 2 cores)."""
    return {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def check_imports(root: Path) -> None:
    """The trainer and the command must load from `root`, not from the editable install of this checkout."""
    code = ("import lore_core.joint_trainer as t, lore_cli.train_command as c, lore_cli.main as m; "
            "print(t.__file__); print(c.__file__); print(m.__file__)")
    files = subprocess.run([sys.executable, "-c", code], cwd=root, env=code_env(root), capture_output=True, text=True,
                           check=True).stdout.split()
    stray = [f for f in files if not Path(f).resolve().is_relative_to(root.resolve())]
    if stray:
        raise RuntimeError(f"code under {root} imports {stray} from elsewhere")


def short_revision(revision: str = "HEAD") -> str:
    return _git("rev-parse", "--short", revision)


def checkout_label() -> str:
    """This checkout's short commit, with "+ uncommitted changes" when tracked files differ from it."""
    label = short_revision()
    if _git("status", "--porcelain", "--untracked-files=no"):
        label += " + uncommitted changes"
    return label


@contextmanager
def worktree(revision: str, path: Path) -> Iterator[Path]:
    """`revision` checked out (detached) at `path` for the block; removed and pruned after, whatever happens."""
    subprocess.run(["git", "worktree", "add", "--detach", str(path), revision], cwd=ROOT, check=True,
                   capture_output=True)
    try:
        yield path
    finally:
        _git("worktree", "remove", "--force", str(path), check=False)
        _git("worktree", "prune", check=False)


@contextmanager
def checked_worktrees(revisions: dict[str, str]) -> Iterator[tuple[Path, dict[str, Path]]]:
    """A temporary directory and, inside it, a worktree per arm of `revisions` ({arm: revision}), each proven to
    import its own code; all removed after the block."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp, ExitStack() as trees:
        roots = {arm: trees.enter_context(worktree(revision, Path(tmp) / arm)) for arm, revision in revisions.items()}
        for root in roots.values():
            check_imports(root)
        yield Path(tmp), roots
