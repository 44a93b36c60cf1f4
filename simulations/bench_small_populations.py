"""Does `lore-fed train` lose to one shared reward when the population is small? Two commits side by side.

    python -m simulations.bench_small_populations --before REV [--after REV] [--sizes 20,50,100]
                                                  [--seeds 0,1,2,3,4,5] [--train-pairs 20,40] [--few-shot 10]
                                                  [--out bench_results/small_populations.md]

A pilot study has tens of users, not hundreds. Each population is the stress matrix's base (`bench_matrix.BASE`:
isotropic D = 384, true rank 4, 20-40 training pairs per seen user, 100 new users with 10 few-shot pairs, 20 test
pairs each) with `--sizes` seen users (`--train-pairs` and `--few-shot` change the pairs per user). On each,
`lore-fed train --rank 1` (BT) and `lore-fed train` (default flags) run from the `--before` commit (a temporary git
worktree) and from this checkout, the two commits at the same time
(`bench_train_ab`). Reports `train` - BT per seed and its mean and SE over seeds, for both commits, on the test
pairs and in expectation over their labels (each run's saved basis scored by this checkout's `evaluate_model`, so
that a few hundred test labels do not decide between two choices). Seeds 101-106
are the pilot on which the held-out folds of small populations (`model_selection.fold_count`) were chosen; report
other seeds.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import replace
from pathlib import Path

import numpy as np

from lore_core.atomic_io import atomic_write_json, atomic_write_text
from simulations.bench_matrix import BASE
from simulations.bench_train_ab import result, start_train, wait_all
from simulations.revisions import checked_worktrees, short_revision
from simulations.synthetic_pairs import write_synthetic_dataset

ARMS = ("before", "after")
ROWS = {"bt": ["--rank", "1"], "train": []}


def run_population(roots: dict[str, Path], pairs: Path, work: Path) -> dict:
    """BT and `train` from each commit, the commits side by side: {arm: {row: train_row}}."""
    out = {arm: {} for arm in ARMS}
    for row, flags in ROWS.items():
        runs = {arm: start_train(roots[arm], pairs, work / f"{row}-{arm}", flags) for arm in ARMS}
        seconds = wait_all(runs)
        for arm in ARMS:
            recorded = result(runs[arm][0], seconds[arm], work / f"{row}-{arm}")
            out[arm][row] = {**recorded, **expected_accuracies(work / f"{row}-{arm}", pairs, recorded)}
    return out


EXPECTED = ("seen_test_expected_acc", "unseen_test_expected_acc")


def expected_accuracies(run_dir: Path, pairs: Path, recorded: dict) -> dict:
    """The run's basis (and the personal prior it chose) scored by this checkout's `evaluate_model`, in expectation
    over the test labels (`evaluation.expected_accuracy`): a commit older than that metric is scored the same way.
    The rescoring must give the run's own recorded test accuracies, or it is not the run's model."""
    from lore_core.evaluation import evaluate_model
    from lore_core.pairs import load_pairs

    with np.load(run_dir / "basis.npz") as saved:
        basis, prior_pairs = saved["basis"], float(saved["prior_pairs"])
    metrics = evaluate_model(load_pairs(pairs), basis, prior_pairs=prior_pairs)
    for key in ("seen_test_acc", "unseen_test_acc"):
        if abs(metrics[key] - recorded[key]) > 1e-9:
            raise RuntimeError(f"{run_dir}: rescored {key} {metrics[key]} is not the recorded {recorded[key]}")
    return {key: metrics[key] for key in EXPECTED}


def _gain(cell: dict, i: int, truth: bool = False) -> float:
    key = (EXPECTED if truth else ("seen_test_acc", "unseen_test_acc"))[i]
    return 100.0 * (cell["train"][key] - cell["bt"][key])


def summary(rows: list[dict], size: int, arm: str, truth: bool = False) -> dict:
    """Mean, SE over seeds and the worst seed of `train` - BT in points, seen and new (on the test labels, or where
    `truth` in expectation over them)."""
    cells = [r[arm] for r in rows if r["size"] == size]
    out = {}
    for i, who in enumerate(("seen", "new")):
        gains = np.array([_gain(c, i, truth) for c in cells])
        se = float(gains.std(ddof=1) / math.sqrt(gains.size)) if gains.size > 1 else math.nan
        out[who] = {"mean": float(gains.mean()), "se": se, "worst": float(gains.min()),
                    "seeds_below_minus_1": int((gains < -1.0).sum())}
    return out


def markdown(rows: list[dict], config: dict) -> str:
    low, high = config.get("train_pairs", BASE.train_pairs)
    shots = config.get("few_shot", BASE.few_shot_pairs)
    shape = "" if (low, high, shots) == (*BASE.train_pairs, BASE.few_shot_pairs) else \
        f" --train-pairs {low},{high} --few-shot {shots}"
    lines = [f"# Small populations: `lore-fed train` - BT, {config['after']} against {config['before']}", "",
             f"`python -m simulations.bench_small_populations --before {config['before']} --after {config['after']} "
             f"--sizes {','.join(map(str, config['sizes']))} --seeds {','.join(map(str, config['seeds']))}{shape}`. "
             f"The stress matrix's base population (isotropic D = 384, true rank 4, {low}-{high} training pairs per "
             f"seen user, 100 new users with {shots} few-shot pairs) with few seen users. Points, seen / new users; BT "
             "is `lore-fed train --rank 1` of the same commit. Both commits ran side by side on one shared 2-core "
             "machine."]
    for truth, title in ((False, "On the test pairs"),
                         (True, "In expectation over the test pairs' labels (`evaluation.expected_accuracy`, "
                                "each run's basis scored by the `after` checkout)")):
        lines += ["", f"## {title}", "",
                  "| seen users | commit | mean ± SE over seeds | worst seed | seeds below -1 point | ranks |",
                  "|---|---|---|---|---|---|"]
        for size in config["sizes"]:
            for arm in ARMS:
                s = summary(rows, size, arm, truth)
                ranks = [r[arm]["train"]["rank"] for r in rows if r["size"] == size]
                lines.append(f"| {size} | {arm} ({config[arm]}) | {s['seen']['mean']:+.1f} ± {s['seen']['se']:.1f} / "
                             f"{s['new']['mean']:+.1f} ± {s['new']['se']:.1f} | {s['seen']['worst']:+.1f} / "
                             f"{s['new']['worst']:+.1f} | {s['seen']['seeds_below_minus_1']} / "
                             f"{s['new']['seeds_below_minus_1']} | {ranks} |")
    lines += ["", "By seed (seen / new points on the test pairs [in expectation over their labels]; rank chosen; "
              "held-out folds of `after`):", ""]
    for r in rows:
        parts = [f"{arm} {_gain(r[arm], 0):+.1f} / {_gain(r[arm], 1):+.1f} [{_gain(r[arm], 0, True):+.1f} / "
                 f"{_gain(r[arm], 1, True):+.1f}] (rank {r[arm]['train']['rank']})" for arm in ARMS]
        lines.append(f"- {r['size']} users, seed {r['seed']}: {'; '.join(parts)}; "
                     f"folds {r['after']['train'].get('folds', '?')}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", required=True, help="git revision of the earlier code")
    parser.add_argument("--after", default="HEAD", help="git revision of the later code")
    parser.add_argument("--sizes", default="20,50,100")
    parser.add_argument("--seeds", default="0,1,2,3,4,5")
    parser.add_argument("--train-pairs", default=",".join(map(str, BASE.train_pairs)),
                        help="LOW,HIGH training pairs per seen user")
    parser.add_argument("--few-shot", type=int, default=BASE.few_shot_pairs, help="few-shot pairs per new user")
    parser.add_argument("--out", default="bench_results/small_populations.md")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    low, high = (int(n) for n in args.train_pairs.split(","))
    shape = {"train_pairs": (low, high), "few_shot_pairs": args.few_shot}
    revisions = {arm: short_revision(getattr(args, arm)) for arm in ARMS}
    rows = []
    with checked_worktrees({arm: revisions[arm] for arm in ARMS}) as (tmp, roots):
        for size in sizes:
            for seed in seeds:
                work = tmp / f"{size}-{seed}"
                pairs = write_synthetic_dataset(work, replace(BASE, seen_users=size, seed=seed, **shape))
                cell = run_population(roots, pairs, work)
                rows.append({"size": size, "seed": seed, **cell})
                print(f"{size} users, seed {seed}: " + "; ".join(
                    f"{arm} {_gain(cell[arm], 0):+.1f} / {_gain(cell[arm], 1):+.1f}" for arm in ARMS), flush=True)
    config = {"sizes": sizes, "seeds": seeds, "train_pairs": [low, high], "few_shot": args.few_shot, **revisions}
    summaries = {f"{size}-{arm}{'-truth' if truth else ''}": summary(rows, size, arm, truth)
                 for size in sizes for arm in ARMS for truth in (False, True)}
    out = Path(args.out)
    atomic_write_json(out.with_suffix(".json"), {"config": config, "summary": summaries, "rows": rows})
    atomic_write_text(out, markdown(rows, config))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
