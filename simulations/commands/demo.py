"""`lore-fed demo`: the main job on the bundled benchmark, end to end, in about ten minutes on two cores.

benchmark population (PRISM schema, hidden truth) -> PRISM pipeline -> MiniLM pair embeddings (cached)
-> centralized reference (`lore-fed train`, which also picks the rank) -> federated training through Flower's
simulation engine (`lore-fed simulate`, user-level DP by default) -> few-shot adaptation of unseen users on their
devices -> one report. Every stage is the real command with its own files; a stage whose output already exists is
skipped, so an interrupted demo resumes where it stopped (the federated run resumes from its checkpoint).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from lore_core.atomic_io import atomic_write_text

PRIVACY_FLAGS = ("privacy", "noise_multiplier", "target_epsilon", "max_epsilon", "clip_norm", "delta")


def configure(parser: argparse.ArgumentParser) -> None:
    from lore_core.benchmark import DEMO_CONFIG

    parser.add_argument("--out", default="runs/demo", help="demo directory (default %(default)s)")
    parser.add_argument("--users", type=int, default=DEMO_CONFIG.users, help="benchmark participants")
    parser.add_argument("--rounds", type=int, default=150, help="federated rounds")
    parser.add_argument("--clients-per-round", type=int, default=40, help="expected users per round")
    parser.add_argument("--rank", default="auto", help="basis size, or 'auto' (chosen by the centralized run)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", default=None, help="embedding cache (default: $LORE_CACHE_DIR or ~/.cache)")
    parser.add_argument("--privacy", default=None, help="none|user|user+secagg|record (default: simulate's, user)")
    parser.add_argument("--noise-multiplier", default=None)
    parser.add_argument("--target-epsilon", default=None)
    parser.add_argument("--max-epsilon", default=None)
    parser.add_argument("--clip-norm", default=None)
    parser.add_argument("--delta", default=None)


def _stage(name: str, done: bool, argv: list[str]) -> None:
    from simulations.cli import main

    if done:
        print(f"== {name}: already done, skipped", flush=True)
        return
    print(f"== {name}: lore-fed {' '.join(argv)}", flush=True)
    started = time.perf_counter()
    code = main(argv)
    if code != 0:
        raise RuntimeError(f"stage {name!r} failed (exit {code}); rerun `lore-fed demo` to resume after fixing it")
    print(f"== {name}: {time.perf_counter() - started:.1f} s", flush=True)


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    out = Path(args.out)
    prism, dataset, central, federated = out / "prism", out / "dataset", out / "centralized", out / "federated"
    cache = ["--cache-dir", args.cache_dir] if args.cache_dir else []

    _stage("benchmark population", (prism / "ground_truth.npz").exists(),
           ["synth", "--users", str(args.users), "--max-turns", "3", "--seed", str(args.seed), "--out", str(prism)]
           + cache)
    _stage("PRISM pipeline", (dataset / "summary.json").exists(), ["prepare", str(prism), "--out", str(dataset)])
    _stage("pair embeddings", (dataset / "pairs.npz").exists(), ["embed", str(dataset)] + cache)
    _stage("centralized reference", (central / "metrics.json").exists(),
           ["train", str(dataset), "--rank", str(args.rank), "--seed", str(args.seed), "--out", str(central)])
    reference = json.loads((central / "metrics.json").read_text())
    rank = reference["rank"] if args.rank == "auto" else int(args.rank)
    privacy = []
    for flag in PRIVACY_FLAGS:
        value = getattr(args, flag)
        if value is not None:
            privacy += [f"--{flag.replace('_', '-')}", str(value)]
    _stage("federated training (Flower simulation engine)", (federated / "metrics.json").exists(),
           ["simulate", str(dataset), "--rounds", str(args.rounds), "--clients-per-round", str(args.clients_per_round),
            "--rank", str(rank), "--seed", str(args.seed), "--reference", str(central), "--out", str(federated)]
           + privacy)
    report = write_demo_report(out, dataset, reference, json.loads((federated / "metrics.json").read_text()),
                               time.perf_counter() - started)
    print(f"\ndemo finished in {time.perf_counter() - started:.0f} s; report: {report}")
    return 0


def write_demo_report(out: Path, dataset: Path, central: dict, federated: dict, seconds: float) -> Path:
    summary = json.loads((dataset / "summary.json").read_text())
    rows = [("centralized (`lore-fed train`)", central), ("federated (Flower)", federated)]
    lines = [
        "# lore-fed demo",
        "",
        f"Benchmark population -> PRISM pipeline -> MiniLM embeddings -> centralized reference and federated "
        f"training -> few-shot adaptation of unseen users. Total {seconds:.0f} s.",
        "",
        "## Data",
        "",
        "```json",
        json.dumps({k: v for k, v in summary.items() if not isinstance(v, (dict, list))}, indent=2),
        "```",
        "",
        "## Accuracy (per-user pair accuracy, mean over users)",
        "",
        "| model | rank | seen users (test) | unseen users, few-shot (test) |",
        "|---|---|---|---|",
    ]
    for name, metrics in rows:
        lines.append(f"| {name} | {metrics.get('rank')} | {metrics.get('seen_test_acc', float('nan')):.4f} | "
                     f"{metrics.get('unseen_test_acc', float('nan')):.4f} |")
    if "oracle_seen_test_acc" in central:
        lines.append(f"| oracle (true basis and weights) | - | {central['oracle_seen_test_acc']:.4f} | "
                     f"{central['oracle_unseen_test_acc']:.4f} |")
    lines += ["", "## Privacy", ""]
    mode = federated.get("privacy_mode", "none")
    if "epsilon" in federated:
        lines.append(f"Mode `{mode}`: user-level (epsilon, delta) = ({federated['epsilon']:.3f}, "
                     f"{federated.get('delta')}) from the Opacus PRV accountant; see `federated/ledger.json`.")
    else:
        lines.append(f"Mode `{mode}`: no differential-privacy guarantee for this run.")
    lines += ["", "Details: [federated run report](federated/report.md)", ""]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path
