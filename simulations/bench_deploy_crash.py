"""Does `lore-fed deploy local` resume when it is run again right after a crash? The real CLI, two crashes.

    python -m simulations.bench_deploy_crash [--before REV] [--out bench_results/deploy_crash.md]

A small synthetic population (9 seen users, 3 new, D = 16, true rank 2) on 3 SuperNodes with TLS and node
authentication, 8 rounds, `-c "rank=2 clients-per-round=9"`. With the code of this checkout and, with `--before`, of
that commit (a temporary git worktree), one after the other:
- `cli-killed`: `deploy local` is SIGKILLed after round 1; its SuperLink and SuperNodes live on (own sessions). The
  same command again: its exit code and last line. Then every process naming the run directory is SIGKILLed.
- `all-killed`: a fresh run directory; after round 1 every process naming it is SIGKILLed (a machine crash), and the
  same command runs again at once: exit code, seconds, the SuperNodes' `[code: 2004]` refusals (their logs), the
  run's status line, the rounds in `rounds.jsonl`.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

from lore_cli.local_deployment import NODE_REFUSED_LOG_LINE, processes_matching
from lore_core.atomic_io import atomic_write_json, atomic_write_text
from simulations.revisions import ROOT, checkout_label, code_env, worktree
from simulations.synthetic_pairs import SyntheticPairsConfig, write_synthetic_dataset

POPULATION = SyntheticPairsConfig(dim=16, true_rank=2, seen_users=9, unseen_users=3, train_pairs=(10, 12),
                                  test_pairs=5)
FLAGS = ["--nodes", "3", "--rounds", "8", "-c", "rank=2 clients-per-round=9"]


def deploy(root: Path, pairs: Path, run_dir: Path, log: Path) -> subprocess.Popen:
    """`lore-fed deploy local` with the code under `root`."""
    with open(log, "a") as handle:
        return subprocess.Popen([sys.executable, "-m", "lore_cli.main", "deploy", "local", "--pairs", str(pairs),
                                 "--run-dir", str(run_dir), *FLAGS], cwd=root, env=code_env(root), stdout=handle,
                                stderr=subprocess.STDOUT)


def rounds(run_dir: Path) -> list[int]:
    file = run_dir / "rounds.jsonl"
    return [json.loads(line)["round"] for line in file.read_text().splitlines()] if file.exists() else []


def wait_for_round(run_dir: Path, process: subprocess.Popen, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while not rounds(run_dir):
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"no round in {run_dir} (exit {process.poll()})")
        time.sleep(0.2)


def kill_everything_naming(path: Path) -> int:
    """SIGKILL every process whose command line names `path` (the CLI, `flwr run`, SuperLink, SuperNodes)."""
    needle = str(path).encode()
    pids = processes_matching(lambda args: any(needle in arg for arg in args))
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    time.sleep(1.0)
    return len(pids)


def last_line(log: Path, start: int) -> str:
    lines = [line for line in log.read_text(errors="replace")[start:].splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def scenario(root: Path, pairs: Path, run_dir: Path, everything: bool) -> dict:
    log = run_dir.with_suffix(".log")
    first = deploy(root, pairs, run_dir, log)
    wait_for_round(run_dir, first)
    if everything:
        kill_everything_naming(run_dir)
    else:
        first.kill()
    first.wait()
    start = log.stat().st_size
    node_logs = {path: path.stat().st_size for path in run_dir.glob("node*/supernode.log")}
    started = time.monotonic()
    again = deploy(root, pairs, run_dir, log)
    code = again.wait(timeout=900)
    seconds = time.monotonic() - started
    text = log.read_text(errors="replace")[start:]
    status = next((line for line in text.splitlines() if line.startswith("run ")), "")
    refusals = sum(path.read_bytes()[size:].count(NODE_REFUSED_LOG_LINE.encode()) for path, size in node_logs.items())
    row = {"exit": code, "seconds": round(seconds, 1), "refusals": refusals,
           "status": status[:200], "last_line": last_line(log, start), "rounds": rounds(run_dir)}
    row["left_running"] = kill_everything_naming(run_dir)
    return row


def markdown(results: dict, config: dict) -> str:
    lines = ["# `lore-fed deploy local` run again right after a crash", "",
             "`python -m simulations.bench_deploy_crash" + (f" --before {config['before']}" if config["before"]
                                                              else "") + "`", "",
             f"Population: {config['population']}; flags: `{' '.join(config['flags'])}`.", "",
             "| code | crash | exit | seconds | refusals `[code: 2004]` | rounds in rounds.jsonl | what it said |",
             "|---|---|---|---|---|---|---|"]
    for arm, rows in results.items():
        for crash, row in rows.items():
            said = (row["status"] or row["last_line"]).replace("|", "/")
            lines.append(f"| {arm} | {crash} | {row['exit']} | {row['seconds']:.0f} | {row['refusals']} | "
                         f"{row['rounds']} | {said} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", default=None, help="git revision of earlier code to run the same crashes on")
    parser.add_argument("--out", default=str(ROOT / "bench_results" / "deploy_crash.md"))
    args = parser.parse_args(argv)
    after = checkout_label()
    results = {}
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as trees:
        pairs = write_synthetic_dataset(Path(tmp) / "data", POPULATION)
        arms = [(f"this checkout ({after})", ROOT)]
        if args.before:
            before = trees.enter_context(worktree(args.before, Path(tmp) / "before"))
            arms.insert(0, (f"--before {args.before}", before))
        for index, (arm, root) in enumerate(arms):
            results[arm] = {crash: scenario(root, pairs, Path(tmp) / f"run{index}-{crash}", crash == "all-killed")
                            for crash in ("cli-killed", "all-killed")}
            print(arm, json.dumps(results[arm], indent=1), flush=True)
    config = {"population": "9 seen users, 3 new, D = 16, true rank 2", "flags": FLAGS, "before": args.before,
              "after": after}
    out = Path(args.out)
    atomic_write_json(out.with_suffix(".json"), {"config": config, "results": results})
    atomic_write_text(out, markdown(results, config))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
