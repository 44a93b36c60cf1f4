"""Calibrate the synthetic benchmark: is the signal learnable, and is there headroom for personalisation?

Generates a population, runs it through the real pipeline pieces (release reader, `prism_pairs` pairs and LoRe split,
the same cached embedder), and prints per-user mean pair accuracies (strict > 0):
  oracle            true basis, true w, all pairs of every user (the ceiling; target ~0.83-0.88)
  oracle test       the same on seen-test / unseen-test pairs
  true A* + fit w   true basis, w fitted on the user's train pairs (simplex EG; unseen = few-shot)
  true A* + mean w  true basis, population-mean true w (a shared reward that knows the basis)
  single BT head    one shared linear reward fitted on all seen-train pairs (best L2 on seen-test: optimistic)
Headroom = (true A* + fit w) - (single BT head) on unseen test.

    python -m simulations.calibrate_benchmark --users 300 --max-turns 3
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import replace

import numpy as np

from simulations.prism_population import DEMO_CONFIG, generate_benchmark
from lore_core.prism_pairs import SplitConfig, build_pairs, split_users
from lore_core.prism_schema import load_release
from lore_core.reward_math import bt_loss, bt_loss_grad, mean_user_accuracy
from lore_core.simplex_fit import fit_user_weights


def pair_table(benchmark, embedder, min_conversations: int) -> dict:
    """Pairs exactly as `lore-fed prepare` builds them, with diffs from the (cached) embedder and the LoRe split."""
    with tempfile.TemporaryDirectory() as tmp:
        benchmark.write(tmp)
        release = load_release(tmp)
    pairs, drops = build_pairs(release.conversations)
    with_pairs: dict[str, set] = {}
    for p in pairs:
        with_pairs.setdefault(p["user"], set()).add(p["conversation"])
    users = sorted({c.user_id for c in release.conversations})
    split = split_users(users, {u: sorted(c) for u, c in with_pairs.items()}, SplitConfig(min_conversations))
    histories = [p["history"] for p in pairs]
    diff = embedder.embed(histories, [p["chosen"] for p in pairs]) - embedder.embed(
        histories, [p["rejected"] for p in pairs]
    )
    position = {u: i for i, u in enumerate(benchmark.truth.user_id.tolist())}
    user = np.array([position[p["user"]] for p in pairs], dtype=np.int64)
    kept = np.array([p["user"] in split.seen for p in pairs])
    seen = np.array([split.seen.get(p["user"], False) for p in pairs])
    train = np.array([split.conversation_split.get(p["conversation"]) == "train" for p in pairs])
    return {"diff": diff.astype(np.float64), "user": user, "kept": kept, "seen": seen, "train": train, "drops": drops}


def fit_shared_head(diff: np.ndarray, l2: float) -> np.ndarray:
    """One linear BT reward v (D,): min mean softplus(-diff v) + l2/2 |v|^2 (L-BFGS)."""
    from scipy.optimize import minimize

    def objective(v):
        z = diff @ v
        return bt_loss(z).mean() + 0.5 * l2 * v @ v, diff.T @ bt_loss_grad(z) / len(z) + l2 * v

    return minimize(objective, np.zeros(diff.shape[1]), jac=True, method="L-BFGS-B", options={"maxiter": 500}).x


def accuracy(logits: np.ndarray, user: np.ndarray) -> float:
    ids, idx = np.unique(user, return_inverse=True)
    return mean_user_accuracy(logits, idx, ids.size)


def calibrate(config, embedder, *, min_conversations: int) -> dict:
    started = time.perf_counter()
    bench = generate_benchmark(config, embedder)
    seconds = time.perf_counter() - started
    t = pair_table(bench, embedder, min_conversations)
    truth = bench.truth
    scores = truth.logit_scale * t["diff"] @ truth.basis.T.astype(np.float64)  # (n, K) calibrated basis logits
    w = truth.user_weights
    true_logit = np.einsum("nk,nk->n", scores, w[t["user"]])
    kept, seen, train, user = t["kept"], t["seen"], t["train"], t["user"]
    groups = {
        "seen test": kept & seen & ~train,
        "unseen test": kept & ~seen & ~train,
    }
    out = {
        "seconds_generate": seconds,
        "stats": bench.stats,
        "pairs": int(user.size),
        "kept_users": int(np.unique(user[kept]).size),
        "train_pairs_per_user_median": float(np.median(np.bincount(user[kept & train]))),
        "drops": t["drops"],
        "oracle_all_pairs": accuracy(true_logit, user),
    }
    fitted = fit_user_weights(scores[kept & train], user[kept & train], w.shape[0]).weights
    mean_w = np.broadcast_to(w[np.unique(user[kept & seen])].mean(axis=0), w.shape)
    l2_grid = (1e-4, 1e-3, 1e-2)
    heads = {l2: fit_shared_head(t["diff"][kept & seen & train], l2) for l2 in l2_grid}
    validation = groups["seen test"]
    best_l2 = max(l2_grid, key=lambda l2: accuracy(t["diff"][validation] @ heads[l2], user[validation]))
    for name, mask in groups.items():
        out[f"oracle {name}"] = accuracy(true_logit[mask], user[mask])
        out[f"true A* + fit w {name}"] = accuracy(np.einsum("nk,nk->n", scores, fitted[user])[mask], user[mask])
        out[f"true A* + mean w {name}"] = accuracy(np.einsum("nk,nk->n", scores, mean_w[user])[mask], user[mask])
        out[f"single BT head {name}"] = accuracy(t["diff"][mask] @ heads[best_l2], user[mask])
    out["single BT l2"] = best_l2
    out["headroom unseen test"] = out["true A* + fit w unseen test"] - out["single BT head unseen test"]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--users", type=int, default=DEMO_CONFIG.users)
    parser.add_argument("--rank", type=int, default=DEMO_CONFIG.rank)
    parser.add_argument("--noise", type=float, nargs="+", default=[DEMO_CONFIG.noise])
    parser.add_argument("--heterogeneity", type=float, nargs="+", default=[DEMO_CONFIG.heterogeneity])
    parser.add_argument("--max-turns", type=int, default=DEMO_CONFIG.max_turns)
    parser.add_argument("--seed", type=int, nargs="+", default=[0])
    parser.add_argument("--min-conversations", type=int, default=SplitConfig().min_conversations)
    parser.add_argument("--cache-dir", default=None)
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    from lore_core.embeddings import load_embedder

    embedder = load_embedder(cache_dir=args.cache_dir)
    for seed in args.seed:
        for noise in args.noise:
            for alpha in args.heterogeneity:
                config = replace(
                    DEMO_CONFIG, users=args.users, rank=args.rank, noise=noise, heterogeneity=alpha,
                    max_turns=args.max_turns, seed=seed,
                )  # fmt: skip
                result = calibrate(config, embedder, min_conversations=args.min_conversations)
                print(f"\n== users {args.users} rank {args.rank} noise {noise} heterogeneity {alpha} seed {seed} "
                      f"(generated in {result.pop('seconds_generate'):.1f} s)")  # fmt: skip
                for key, value in result.items():
                    print(f"  {key:32s} {value:.3f}" if isinstance(value, float) else f"  {key:32s} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
