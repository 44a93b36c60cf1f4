"""Benchmark of the centralized engine against the published LoRe recipe, on pair files with a known truth.

    python -m simulations.bench_lore_core [--out bench_results/lore_core.json]

Two settings of the lore_core issue: 200 seen users with 30-50 training pairs (D = 384, true rank 5, 50 unseen
users with 10 few-shot pairs, 20 test pairs per user, oracle about 0.83), and the same with 150-250 pairs.
Prints accuracy (seen / unseen test, per-user mean), the oracle, and seconds per rank.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from lore_core.evaluation import evaluate_model, weights_for
from lore_core.joint_trainer import TrainConfig, train_joint
from lore_core.reward_math import mean_user_accuracy
from simulations.published_baseline import published_few_shot, published_fit
from simulations.synthetic_pairs import SyntheticPairsConfig, make_synthetic_pairs


def _acc(part, basis, ids, weights):
    w = weights_for(part.user, ids, weights)
    u_ids, u_idx = np.unique(part.user, return_inverse=True)
    return mean_user_accuracy(np.einsum("nb,nb->n", part.diff @ basis.T, w), u_idx, u_ids.size)


def published_row(pairs, rank):
    t0 = time.perf_counter()
    train = pairs.select(seen=True, split="train")
    basis, ids, weights = published_fit(train.diff, train.user, rank)
    few = pairs.select(seen=False, split="train")
    u_ids, u_w = published_few_shot(basis, few.diff, few.user)
    return {
        "method": f"published recipe B={rank}",
        "seen_test_acc": _acc(pairs.select(seen=True, split="test"), basis, ids, weights),
        "unseen_test_acc": _acc(pairs.select(seen=False, split="test"), basis, u_ids, u_w),
        "seconds": time.perf_counter() - t0,
    }


def lore_row(pairs, rank):
    train = pairs.select(seen=True, split="train")
    fit = train_joint(train.diff, train.user, TrainConfig(rank=rank))
    metrics = evaluate_model(pairs, fit.basis, prior_pairs=fit.prior_pairs,
                             joint_weights=(fit.user_ids, fit.user_weights))
    per_rank = {}
    for row in fit.selection:
        per_rank[row["rank"]] = per_rank.get(row["rank"], 0.0) + row["seconds"]
    return {
        "method": f"lore_core rank={rank} (chose {fit.rank}, l2 {fit.l2:g})",
        "seen_test_acc": metrics["seen_test_acc"],
        "unseen_test_acc": metrics["unseen_test_acc"],
        "seconds": fit.train_seconds,
        "max_seconds_per_rank": max(per_rank.values()),
        "oracle_seen_test_acc": metrics["oracle_seen_test_acc"],
        "oracle_unseen_test_acc": metrics["oracle_unseen_test_acc"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench_results/lore_core.json")
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    settings = {"30-50 pairs/user": (30, 50), "150-250 pairs/user": (150, 250)}
    results = []
    for name, train_pairs in settings.items():
        for seed in range(args.seeds):
            pairs, _ = make_synthetic_pairs(SyntheticPairsConfig(train_pairs=train_pairs, seed=seed))
            for row in (published_row(pairs, 1), published_row(pairs, 5), lore_row(pairs, 1), lore_row(pairs, "auto")):
                row.update(setting=name, seed=seed)
                results.append(row)
                print(f"{name} seed {seed} | {row['method']:<45} seen {row['seen_test_acc']:.3f} "
                      f"unseen {row['unseen_test_acc']:.3f} | {row['seconds']:.1f}s", flush=True)
    print("\nmedian over seeds:")
    for name in settings:
        methods = dict.fromkeys(r["method"].split(" (")[0] for r in results if r["setting"] == name)
        for method in methods:
            rows = [r for r in results if r["setting"] == name and r["method"].startswith(method)]
            med = {k: float(np.median([r[k] for r in rows])) for k in ("seen_test_acc", "unseen_test_acc", "seconds")}
            print(f"{name:<20} {method:<28} seen {med['seen_test_acc']:.3f} unseen {med['unseen_test_acc']:.3f} "
                  f"time {med['seconds']:.1f}s")
        oracle = [r for r in results if r["setting"] == name and "oracle_seen_test_acc" in r]
        print(f"{name:<20} {'oracle':<28} seen {np.median([r['oracle_seen_test_acc'] for r in oracle]):.3f} "
              f"unseen {np.median([r['oracle_unseen_test_acc'] for r in oracle]):.3f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
