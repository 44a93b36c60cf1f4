"""Memory and time of the device's question choice (`next-question`) on large pools, two commits side by side.

    python -m simulations.bench_next_question --before REV [--after REV] [--pools 500,5000,50000] [--k 5]
                                              [--repeats 3] [--out bench_results/next_question.md]

`next-question` scores every pool pair under every posterior sample of w (512 by default): at 50,000 pool pairs the
(samples x pairs) array alone is 200 MB, and its temporaries multiplied that. Each measurement is one fresh process
running `client.device.questions.choose_batch` (the code of the commit's worktree) on a synthetic posterior (rank 6,
512 samples) and pool (standard normal scores), and reports its peak RSS above the process's state before the call
and the call's seconds; the two commits alternate, `--repeats` times each, and the medians are reported with the
picks (the same seed). While the batch's outcomes are enumerated (up to 8 picks) both commits must pick the same
pairs; past that the greedy follows sampled outcomes, and the picks are compared by their joint information
I(y_1..y_K; w), estimated here independently of either commit's code (Monte Carlo over 40,000 drawn answer vectors).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np

from lore_core.atomic_io import atomic_write_json, atomic_write_text
from simulations.revisions import checked_worktrees, code_env, short_revision

ARMS = ("before", "after")
SETUP = """
import numpy as np
def synthetic(pool):
    rng = np.random.default_rng(0)
    w = rng.dirichlet(np.ones(6), size=(1, 512))
    return w, np.full((1, 512), 1 / 512), rng.normal(0.0, 2.0, (1, pool, 6))
"""
MEASURE = SETUP + """
import json, resource, sys, time
from client.device import questions
from client.device.posterior import PosteriorSamples
pool, k = int(sys.argv[1]), int(sys.argv[2])
w, probability, scores = synthetic(pool)
samples = PosteriorSamples(w=w, probability=probability)
start_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
started = time.perf_counter()
picked, info = questions.choose_batch(samples, scores, np.ones(pool, bool), k)
seconds = time.perf_counter() - started
peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - start_rss) / 1024
print(json.dumps({"seconds": seconds, "peak_mib": peak, "picked": picked.tolist(), "bits": info.round(6).tolist()}))
"""


def measure(root: Path, pool: int, k: int) -> dict:
    env = {**code_env(root), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", MEASURE, str(pool), str(k)], env=env, cwd=root,
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def joint_information(pool: int, picked: list[int], draws: int = 40_000) -> tuple[float, float]:
    """I(y_picked; w) in bits, and its standard error, for the benchmark's synthetic posterior and pool: H(y) by Monte
    Carlo (w drawn from the samples, then the answers; log P(y) summed over every sample) minus E_w H(y | w)."""
    namespace: dict = {}
    exec(SETUP, namespace)
    w, probability, scores = namespace["synthetic"](pool)
    prob = probability[0]
    p = 1.0 / (1.0 + np.exp(-(w[0] @ scores[0, picked].T)))  # (S, K): P(first response | w_s)
    rng = np.random.default_rng(5)
    drawn = rng.choice(prob.size, size=draws, p=prob)
    answers = rng.random((draws, len(picked))) < p[drawn]
    # log P(y) = logsumexp_s (log prob_s + sum_j log P(y_j | w_s)), 1,000 draws at a time: (draws, S, K) whole is GBs
    log_p = np.concatenate([np.logaddexp.reduce(np.log(prob)[None] + np.where(
        block[:, None, :], np.log(p)[None], np.log1p(-p)[None]).sum(axis=-1), axis=1)
        for block in np.array_split(answers, max(1, draws // 1000))]) / np.log(2.0)
    conditional = -(prob @ (p * np.log2(p) + (1.0 - p) * np.log2(1.0 - p))).sum()
    return float(-log_p.mean() - conditional), float(log_p.std() / np.sqrt(draws))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--before", required=True)
    parser.add_argument("--after", default="HEAD")
    parser.add_argument("--pools", default="500,5000,50000")
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="bench_results/next_question.md")
    args = parser.parse_args(argv)
    pools = [int(p) for p in args.pools.split(",")]
    revisions = {"before": short_revision(args.before), "after": short_revision(args.after)}
    rows = []
    with checked_worktrees(revisions) as (_, roots):
        for pool in pools:
            runs = {arm: [] for arm in ARMS}
            for _ in range(args.repeats):
                for arm in ARMS:
                    runs[arm].append(measure(roots[arm], pool, args.k))
            row = {"pool": pool, "same_picks": all(r["picked"] == runs["before"][0]["picked"]
                                                   for arm in ARMS for r in runs[arm])}
            for arm in ARMS:
                row[arm] = {"peak_mib": statistics.median(r["peak_mib"] for r in runs[arm]),
                            "seconds": statistics.median(r["seconds"] for r in runs[arm]),
                            "bits": runs[arm][0]["bits"], "picked": runs[arm][0]["picked"]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    for row in rows:  # after every measurement: a child process's peak RSS starts from its parent's
        for arm in ARMS:
            row[arm]["joint_bits"] = joint_information(row["pool"], row[arm]["picked"])
    lines = [f"# `next-question` on large pools: {revisions['after']} against {revisions['before']}", "",
             f"`python -m simulations.bench_next_question --before {revisions['before']} --after "
             f"{revisions['after']} --pools {args.pools} --k {args.k} --repeats {args.repeats}`. One fresh process "
             "per measurement, the commits alternating; medians. Peak RSS is above the process's own before the "
             "call (numpy, the pool and the samples already loaded). Joint bits: the picks' I(y; w), Monte Carlo "
             "± its SE, the same estimator for both.", "",
             "| pool pairs | peak MiB before | peak MiB after | seconds before | seconds after | same picks "
             "| joint bits before | joint bits after |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['pool']:,} | {row['before']['peak_mib']:.0f} | {row['after']['peak_mib']:.0f} | "
                     f"{row['before']['seconds']:.2f} | {row['after']['seconds']:.2f} | "
                     f"{'yes' if row['same_picks'] else 'no'} | "
                     + " | ".join("{:.3f} ± {:.3f}".format(*row[arm]["joint_bits"]) for arm in ARMS) + " |")
    out = Path(args.out)
    atomic_write_json(out.with_suffix(".json"), {"revisions": revisions, "k": args.k, "rows": rows})
    atomic_write_text(out, "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
