"""Embeddings at unusual scales (two testers): does `train` fit them as at the usual scale, and does `simulate` run
them or refuse them with a remedy that works?

    python -m simulations.bench_embedding_scale [--before REV] [--out bench_results/embedding_scale.md]

One population (seed 0: D = 16, true rank 2 with coordinate 0 carrying no preference, 40 seen users x 30 training
pairs and 10 new users x 10 few-shot pairs, 30 test pairs each, noiseless labels) is written four ways: as drawn;
every embedding times 1e-4; coordinate 0 times 1024 (as LLM hidden states' massive activations); and that file with
coordinate 0 divided by the power of two `simulate`'s refusal names. `lore-fed train` (default flags, and `--rank 2
--objective joint`) and `lore-fed simulate --privacy none --rank 2 --rounds 30` run on each file, one at a time, one
thread each, with this checkout's code and, with `--before`, a commit's (a temporary git worktree).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from lore_core.atomic_io import atomic_write_json, atomic_write_text
from lore_core.pairs import PairSet, save_pairs
from simulations.revisions import ROOT, check_imports, checkout_label, code_env, worktree

DIM, SEEN, NEW, TRAIN, FEW_SHOT, TEST = 16, 40, 10, 30, 10, 30
COMMANDS = {
    "train": ["train"],
    "train --rank 2": ["train", "--rank", "2", "--objective", "joint"],
    "simulate --rank 2": ["simulate", "--privacy", "none", "--rank", "2", "--rounds", "30"],
}


def population(seed: int = 0) -> PairSet:
    """Noiseless Bradley-Terry labels of w_u . A d, A (2, D) with column 0 zero, w_u ~ Dirichlet(0.3, 0.3)."""
    rng = np.random.default_rng(seed)
    truth = rng.normal(size=(2, DIM))
    truth[:, 0] = 0.0
    per_user = np.r_[np.full(SEEN, TRAIN + TEST), np.full(NEW, FEW_SHOT + TEST)]
    owner = np.repeat(np.arange(SEEN + NEW), per_user)
    diff = rng.normal(size=(owner.size, DIM))
    weights = rng.dirichlet([0.3, 0.3], size=SEEN + NEW)
    diff *= np.sign(np.einsum("nd,nd->n", diff, (weights @ truth)[owner]))[:, None]
    position = np.arange(owner.size) - np.repeat(np.r_[0, np.cumsum(per_user)[:-1]], per_user)
    train_size = np.where(owner < SEEN, TRAIN, FEW_SHOT)
    return PairSet(diff=diff.astype(np.float32), user=np.char.add("u", owner.astype(str)),
                   split=np.where(position < train_size, "train", "test"), seen=owner < SEEN)


def variants(pairs: PairSet) -> dict[str, PairSet]:
    scaled = pairs.diff.copy()
    scaled[:, 0] *= 1024
    advised = scaled.copy()
    advised[:, 0] /= 2.0**10  # what simulate's refusal names for this file (checked in `run`)
    return {"as drawn": pairs, "all x 1e-4": PairSet(**{**vars(pairs), "diff": pairs.diff * np.float32(1e-4)}),
            "coordinate 0 x 1024": PairSet(**{**vars(pairs), "diff": scaled}),
            "coordinate 0 x 1024, divided as advised": PairSet(**{**vars(pairs), "diff": advised})}


def run_command(root: Path, argv: list[str], pairs: Path, out: Path) -> dict:
    done = subprocess.run([sys.executable, "-m", "lore_cli.main", argv[0], str(pairs), "--out", str(out), *argv[1:]],
                          cwd=root, env=code_env(root), capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        message = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else ""
        return {"exit": done.returncode, "message": message}
    metrics = json.loads((out / "metrics.json").read_text())
    return {"exit": 0, "seen": metrics["seen_test_acc"], "new": metrics["unseen_test_acc"], "rank": metrics["rank"]}


def measure(root: Path, files: dict[str, Path], work: Path) -> dict:
    results = {}
    for name, pairs in files.items():
        for label, argv in COMMANDS.items():
            out = work / re.sub(r"\W+", "_", f"{name}_{label}")
            results[f"{name} | {label}"] = run_command(root, argv, pairs, out)
            print(f"  {name} | {label}: {results[f'{name} | {label}']}", flush=True)
    return results


def cell(result: dict | None) -> str:
    if result is None:
        return "-"
    if result["exit"] != 0:
        return f"refused (exit {result['exit']})" if result["exit"] == 2 else f"failed (exit {result['exit']})"
    return f"{result['seen']:.3f} / {result['new']:.3f} (rank {result['rank']})"


def render(codes: dict[str, dict], command: str) -> str:
    labels = list(codes)
    lines = [f"# Embeddings at unusual scales (`{command}`)", "", __doc__.split("\n\n", 2)[2].strip(), "",
             "Seen / new-user test accuracy (the rank used); `refused` is exit 2 with the message below.", "",
             "| pairs | command | " + " | ".join(labels) + " |", "|---|---|" + "---|" * len(labels)]
    keys = list(next(iter(codes.values())))
    for key in keys:
        name, label = key.split(" | ")
        lines.append(f"| {name} | `{label}` | " + " | ".join(cell(codes[c].get(key)) for c in labels) + " |")
    messages = {(c, k): r["message"] for c in labels for k, r in codes[c].items() if r["exit"] != 0}
    if messages:
        lines += ["", "Messages:", ""] + [f"- {c}, {k}: {m}" for (c, k), m in messages.items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--before", help="a commit to run beside this checkout")
    parser.add_argument("--out", default="bench_results/embedding_scale.md")
    args = parser.parse_args(argv)
    command = "python -m simulations.bench_embedding_scale" + (f" --before {args.before}" if args.before else "")
    with tempfile.TemporaryDirectory() as tmp:
        files = {name: save_pairs(pairs, Path(tmp) / re.sub(r"\W+", "_", name) / "pairs.npz")
                 for name, pairs in variants(population()).items()}
        codes = {}
        if args.before:
            with worktree(args.before, Path(tmp) / "before") as root:
                check_imports(root)
                print(f"code of {args.before}", flush=True)
                codes[f"`{args.before}`"] = measure(root, files, Path(tmp) / "runs-before")
        print(f"code of {checkout_label()}", flush=True)
        codes[f"`{checkout_label()}`"] = measure(ROOT, files, Path(tmp) / "runs-now")
    now = codes[f"`{checkout_label()}`"]
    advice = now["coordinate 0 x 1024 | simulate --rank 2"].get("message", "")
    if "divide coordinate 0 by 2^10" not in advice:  # the fourth file follows this message
        raise SystemExit(f"simulate's refusal no longer names what `variants` divides by: {advice!r}")
    out = Path(args.out)
    atomic_write_text(out, render(codes, command))
    atomic_write_json(out.with_suffix(".json"), {"command": command, "results": codes})
    print(f"wrote {out} and {out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
