"""Does `lore-fed train` ever lose to one shared reward on populations the matrix's generator cannot make?

    python -m simulations.bench_hostile_populations [--seeds 0,1,2] [--populations NAME,...]
                                                    [--work runs/bench_hostile] [--out bench_results]

`simulations.bench_matrix` varies one knob of one generator (`simulations.synthetic_pairs`): every user there is a
point of a simplex over a low-rank basis, each user's pairs are fresh draws, and the file names its groups. This
benchmark breaks those assumptions one at a time, with its own small generator (isotropic D = 384, 300 seen users,
100 new users with 10 few-shot pairs, 20 test pairs each, true logits of standard deviation about 3):
  full-rank        each user's reward is a shared direction plus a private direction of the same size drawn
                   isotropically: personal preferences with no low-rank structure for a basis to find
  heavy-tail       simplex users (rank 4), training pairs per seen user log-normal (median 12, 2 to 400)
  clickers         simplex users (rank 4); 30 % of users (seen and new) answer at random
  minority         90 % of users share one w; 10 % have their own (rank 4)
  repeats-no-group each seen user compares the same 6 item pairs over and over (20-40 times) and is tested on fresh
                   items; the file has no `group` array, so held-out estimates split single pairs (the case the
                   issue's group split exists for, with the fallback it warns about)
  shared-pool      every user draws its pairs from one pool of 400 item pairs (users compare the same items, as in
                   a fixed survey); `group` names the item pair, and a user's test items are not among its training
                   items
  shifted-new      simplex users (rank 4), but seen users mix basis rewards 0-2 and new users mix 1-3: new users
                   differ from everyone the basis and the personal prior were fit on, and the selection's pretend-new
                   users (a fold of seen users) cannot show it
  nonlinear        each user's reward of an item is w . tanh(2 A e), a saturating function of the embedding e, so no
                   linear basis is the truth (A rank 4, w on the simplex); the file gives only e_a - e_b, as always
  thin-new         simplex users (rank 4), but each new user has answered only 3 questions (few-shot pairs), as at
                   the start of onboarding
  repeats-reembedded  repeats-no-group with each repeat embedded again: equal to its first copy up to relative float
                   noise 1e-4, as another batch or machine writes it (a tester's population)
  thin-majority    260 of the 300 seen users have one training pair and share one w with every new user; the other
                   40 have 20-40 pairs and their own w (rank 4): few users a held-out fold can score (a tester's)
  weak-few         40 seen users, each w 0.3 its own Dirichlet draw and 0.7 one shared w (rank 4): a small pilot
                   study with weak personalization, where one side's held-out gain can look large by chance while
                   the other is negative (a tester's; it set the one-SE rule's side condition, `SIDE_SE`)
Rows: `bt` (`lore-fed train --rank 1`) and `train` (default flags), through the CLI as a user runs them, plus the
oracle (true logits) and, where a low-rank truth exists, the true-basis ceiling (only w fit); with `--rows` also
`simulate`: the matrix's federated row (`bench_matrix.simulate_row`: the real ServerApp and ClientApp,
`simulate --privacy none`'s defaults: 600 rounds of every seen user since 0.2.5, a fifth before; `train`'s choice
of the same seed). This benchmark chooses nothing: it
checks the matrix's first and last criteria (`train` within 2 SE of BT or above, seen and new users; the federated
run within 1 point of `train`) on populations no default was chosen on. `--weight-by user` runs BT and `train` with
every seen user's mean loss counted once in the basis fit (and `simulate` likewise), the default before pair
weighting, and writes hostile_populations_user.*.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np

from lore_core.atomic_io import atomic_save_npz, atomic_write_json, atomic_write_text
from lore_core.marginal_fit import DEFAULT_WEIGHTING
from lore_core.pairs import PAIRS_FILENAME, PairSet, save_pairs
from lore_core.prism_schema import GROUND_TRUTH_FILE
from simulations.bench_matrix import _fresh, _mean_se, ceiling_rows, simulate_row, stale, train_choice, train_row

DIM, SEEN, NEW, FEW_SHOT, TEST, RANK = 384, 300, 100, 10, 20, 4
LOGIT_STD = 3.0
POPULATIONS = ("full-rank", "heavy-tail", "clickers", "minority", "repeats-no-group", "shared-pool", "shifted-new",
               "nonlinear", "thin-new", "repeats-reembedded", "thin-majority", "weak-few")
THIN_MAJORITY = 260  # thin-majority: seen users with a single training pair (the other 40 have 20-40)
REEMBEDDING_NOISE = 1e-4  # repeats-reembedded: relative float noise of a text embedded again (a tester's population)
THIN_FEW_SHOT = 3  # thin-new's few-shot pairs per new user
FEW_SEEN, WEAK_MIX = 40, 0.3  # weak-few: seen users, and each w's share of its own draw


def seen_users(name: str) -> int:
    return FEW_SEEN if name == "weak-few" else SEEN


def _unit_diffs(rng: np.random.Generator, n: int) -> np.ndarray:
    """Isotropic pair diffs of norm sqrt(2) (two unit embeddings apart on average)."""
    g = rng.standard_normal((n, DIM))
    return g / np.linalg.norm(g, axis=1, keepdims=True) * np.sqrt(2.0)


def _counts(rng: np.random.Generator, name: str) -> np.ndarray:
    """Training pairs per user (seen users, then new users' few-shot pairs)."""
    if name == "heavy-tail":
        seen = np.clip(np.round(np.exp(rng.normal(np.log(12.0), 1.2, SEEN))), 2, 400).astype(int)
    elif name == "thin-majority":
        seen = np.r_[np.ones(THIN_MAJORITY, int), rng.integers(20, 41, SEEN - THIN_MAJORITY)]
    else:
        seen = rng.integers(20, 41, seen_users(name))
    return np.r_[seen, np.full(NEW, THIN_FEW_SHOT if name == "thin-new" else FEW_SHOT)]


def _rewards(rng: np.random.Generator, name: str) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Each user's reward vector (U, D) before scaling, the low-rank basis (K, D) and the users' weights (U, K) where
    a basis exists."""
    users = seen_users(name) + NEW
    if name == "full-rank":
        shared = _unit_diffs(rng, 1)[0]
        return shared + _unit_diffs(rng, users), None, None
    basis = rng.standard_normal((RANK, DIM))
    weights = rng.dirichlet(np.full(RANK, 0.5), size=users)
    if name == "shifted-new":  # seen users on the face {0, 1, 2}, new users on the face {1, 2, 3}
        face = rng.dirichlet(np.full(RANK - 1, 0.5), size=users)
        weights = np.zeros((users, RANK))
        weights[:SEEN, :RANK - 1], weights[SEEN:, 1:] = face[:SEEN], face[SEEN:]
    if name == "minority":
        everyone = rng.dirichlet(np.full(RANK, 0.5))
        weights = np.where((rng.random(users) < 0.9)[:, None], everyone, weights)
    if name == "thin-majority":  # the one-pair seen users and every new user share one w
        weights[np.r_[:THIN_MAJORITY, SEEN:users]] = rng.dirichlet(np.full(RANK, 0.5))
    if name == "weak-few":
        weights = WEAK_MIX * weights + (1.0 - WEAK_MIX) * rng.dirichlet(np.full(RANK, 0.5))
    return weights @ basis, basis, weights


def hostile_population(name: str, seed: int) -> tuple[PairSet, np.ndarray | None]:
    """The population's pairs and its true basis in logit units (None without a low-rank truth)."""
    rng = np.random.default_rng([seed, POPULATIONS.index(name), 20261202])
    seen = seen_users(name)
    users = seen + NEW
    rewards, basis, weights = _rewards(rng, name)
    train_counts = _counts(rng, name)
    counts = train_counts + TEST
    user_idx = np.repeat(np.arange(users), counts)
    is_test = np.arange(user_idx.size) >= np.repeat(np.cumsum(counts) - TEST, counts)
    n = user_idx.size
    group = None
    if name in ("repeats-no-group", "repeats-reembedded"):  # training rows repeat one of the user's 6 item pairs
        pool = _unit_diffs(rng, users * 6).reshape(users, 6, DIM)  # (test rows are fresh)
        diff = _unit_diffs(rng, n)
        train = ~is_test & (user_idx < seen)
        diff[train] = pool[user_idx[train], rng.integers(0, 6, int(train.sum()))]
        if name == "repeats-reembedded":  # each repeat embedded again: equal to its first copy up to float noise
            diff[train] += REEMBEDDING_NOISE * np.sqrt(2.0 / DIM) * rng.standard_normal((int(train.sum()), DIM))
    elif name == "shared-pool":  # one pool for everyone; a user's test items are outside its training items
        pool = _unit_diffs(rng, 400)
        order = np.argsort(rng.random((users, 400)), axis=1)  # each user's own shuffle of the pool
        within = np.arange(n) - np.repeat(np.cumsum(counts) - counts, counts)  # row's position within its user
        item = order[user_idx, within]  # distinct items per user: train and test never share one
        diff, group = pool[item], np.char.add("item", item.astype(str))
    elif name == "nonlinear":  # items first: the reward saturates in each basis direction of the item itself
        items = _unit_diffs(rng, 2 * n).reshape(2, n, DIM) / np.sqrt(2.0)
        diff = items[0] - items[1]
    else:
        diff = _unit_diffs(rng, n)
    if name == "nonlinear":
        saturated = np.tanh(2.0 * np.einsum("kd,snd->snk", basis, items))  # (2, n, K): A e scaled, saturated
        raw = np.einsum("nk,nk->n", weights[user_idx], saturated[0] - saturated[1])
        basis = None  # no linear basis is the truth
    else:
        raw = np.einsum("nd,nd->n", diff, rewards[user_idx])
    scale = LOGIT_STD / raw.std()
    logit = scale * raw
    chosen_first = rng.random(n) < 1.0 / (1.0 + np.exp(-logit))
    if name == "clickers":
        random_users = rng.random(users) < 0.3
        chosen_first = np.where(random_users[user_idx], rng.random(n) < 0.5, chosen_first)
    sign = np.where(chosen_first, 1.0, -1.0)
    ids = np.array([f"user{i:05d}" for i in range(users)])
    pairs = PairSet(diff=(diff * sign[:, None]).astype(np.float32), user=ids[user_idx],
                    split=np.where(is_test, "test", "train"), seen=user_idx < seen,
                    logit_true=(logit * sign).astype(np.float32), group=group, source=name)
    return pairs, None if basis is None else basis * scale


def population_file(name: str, seed: int, work: Path) -> Path:
    """The population's pair file (built once, cached), with ground_truth.npz beside it where a basis exists, so
    `lore-fed train` reports the true-basis ceiling."""
    path = work / "data" / name / f"seed{seed}" / PAIRS_FILENAME
    if not path.exists():
        pairs, basis = hostile_population(name, seed)
        if basis is not None:
            atomic_save_npz(path.parent / GROUND_TRUTH_FILE, basis=basis, logit_scale=np.float64(1.0))
        save_pairs(pairs, path)
    return path


ROWS = ("bt", "train", "simulate")


def federated(name: str) -> dict:
    """The federated row of the hostile benchmark: `simulate --privacy none`'s defaults (600 rounds of every seen
    user, at most 1,000, since lore-fed 0.2.5)."""
    from lore_cli.simulate_command import NONPRIVATE_ROUNDS, default_users_per_round

    return {"rounds": NONPRIVATE_ROUNDS, "clients_per_round": default_users_per_round("none", seen_users(name))}


def federated_a_fifth(name: str) -> dict:
    """What this benchmark's federated row ran before 0.2.5, and what the federated pilots on hostile cells ran
    (`pilot_federated_steps`, `bench_pair_weighting`): 600 rounds of a fifth of the seen users, at least 10 (weak-few's
    40 seen users, 10 a round), so that their cached rows stay what they were."""
    return {"rounds": 600, "clients_per_round": max(10, seen_users(name) // 5)}


def run_cell(name: str, seed: int, work: Path, rows: tuple[str, ...] = ("bt", "train"),
             weight_by: str = DEFAULT_WEIGHTING, rerun: tuple[str, ...] = ()) -> dict:
    """The `rows` of one population and seed (cached as JSON under work/results; a rerun adds missing rows and
    recomputes the `rerun` ones), BT and `train` with `--weight-by weight_by` (keep one --work per weighting); the
    `simulate` row reruns when `train` now chooses otherwise than when it ran (as `bench_matrix.FOLLOWS`)."""
    weighting = ["--weight-by", weight_by]
    cache = work / "results" / name / f"seed{seed}.json"
    cell = json.loads(cache.read_text()) if cache.exists() else {}
    for row in ("bt", "train"):
        recorded = cell.get(row, {}).get("weight_by")  # (rows cached before it was recorded do not say)
        if recorded not in (None, weight_by):
            raise SystemExit(f"{cache} holds rows weighted by {recorded}, not {weight_by}: give each weighting its "
                             "own --work")
    path = population_file(name, seed, work)
    runs = work / "runs" / name / f"seed{seed}"
    for row, flags in (("bt", ["--rank", "1"]), ("train", [])):
        if (row not in cell or row in rerun) and (row in rows or "simulate" in rows):
            cell[row] = train_row(path, runs / row, [*flags, *weighting])
            atomic_write_json(cache, cell)
    if "ceiling" not in cell:  # the true basis with the matrix's prior (`bench_matrix.ceiling_rows`), not train's
        _, basis = hostile_population(name, seed)
        cell["ceiling"] = {} if basis is None else {
            f"true_basis_{group}": value for group, value in ceiling_rows(path, basis)["true_basis"].items()}
        atomic_write_json(cache, cell)
    chosen = train_choice(cell.get("train", {}), weight_by)
    outdated = "simulate" in cell and stale(cell["simulate"], chosen, fed=federated(name))
    if "simulate" in rows and ("simulate" in rerun or outdated or "simulate" not in cell):
        cell["simulate"] = {**simulate_row(path, _fresh(runs / "simulate"), chosen, federated(name),
                                           ["--privacy", "none"]), "source_choice": chosen}
        atomic_write_json(cache, cell)
    elif outdated:  # a federated row of another choice is not reported beside this `train` (a reviewer)
        del cell["simulate"]
        atomic_write_json(cache, cell)
    return cell


def summarize(name: str, cells: dict[int, dict]) -> dict:
    out = {"population": name, "seeds": sorted(cells), "rows": {}, "checks": {}}
    for row, key in (("bt", "bt"), ("train", "train"), ("simulate", "simulate"), ("true_basis", "ceiling"),
                     ("oracle", "train")):
        prefix = "" if row in ROWS else f"{row}_"
        entry = {}
        for group in ("seen", "unseen"):
            values = [c.get(key, {}).get(f"{prefix}{group}_test_acc") for c in cells.values()]
            if all(v is not None for v in values):
                mean, se = _mean_se(values)
                entry[group] = {"mean": mean, "se": se}
        if entry:
            out["rows"][row] = entry
    out["rows"]["train"]["choices"] = [{k: cells[s]["train"].get(k) for k in ("rank", "l2", "prior_pairs",
                                                                            "objective")} for s in sorted(cells)]
    out["rows"]["train"]["median_seconds"] = float(np.median([cells[s]["train"]["seconds"] for s in cells]))
    for group in ("seen", "unseen"):
        diffs = [cells[s]["train"][f"{group}_test_acc"] - cells[s]["bt"][f"{group}_test_acc"] for s in sorted(cells)]
        gain, se = _mean_se(diffs)
        out["checks"][group] = {"train_minus_bt": gain, "se": se, "by_seed": diffs,
                                "within_2se_of_bt_or_above": bool(gain >= 0 or gain >= -2 * (se or 0))}
        if all("simulate" in c for c in cells.values()):
            fed = [cells[s]["simulate"][f"{group}_test_acc"] - cells[s]["train"][f"{group}_test_acc"]
                   for s in sorted(cells)]
            gap, gap_se = _mean_se(fed)
            out["checks"][group].update({"simulate_minus_train": gap, "simulate_minus_train_se": gap_se,
                                         "federated_within_1_point": bool(gap >= -0.01)})
    return out


def markdown(summaries: list[dict], seeds: list[int], rows: tuple[str, ...] = ("bt", "train"),
             weight_by: str = DEFAULT_WEIGHTING) -> str:
    flag = "" if "simulate" not in rows else f" --rows {','.join(rows)}"
    flag += "" if weight_by == DEFAULT_WEIGHTING else f" --weight-by {weight_by}"
    lines = [f"# Hostile populations (`python -m simulations.bench_hostile_populations --seeds "
             f"{','.join(map(str, seeds))}{flag}`)", "",
             "Populations the matrix's generator cannot make (module docstring of "
             "`simulations/bench_hostile_populations.py`). Seen / new-user test accuracy, mean ± SE over seeds; "
             "`train` - BT is paired by seed. This benchmark chooses nothing.", "",
             "| population | bt | train | train - BT (points) | by seed | within 2 SE or above | true basis | oracle "
             "| train chose (rank, l2, prior, objective) | simulate | simulate - train (points) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]

    def pair(entry):
        if not entry or "seen" not in entry:
            return "-"
        return " / ".join(f"{entry[g]['mean']:.3f} ± {entry[g]['se']:.3f}" for g in ("seen", "unseen"))

    for s in summaries:
        rows, checks = s["rows"], s["checks"]
        gain = " / ".join(f"{100 * checks[g]['train_minus_bt']:+.1f} ± {100 * checks[g]['se']:.1f}"
                          for g in ("seen", "unseen"))
        by_seed = "; ".join(f"{100 * a:+.1f} / {100 * b:+.1f}" for a, b in zip(checks["seen"]["by_seed"],
                                                                            checks["unseen"]["by_seed"]))
        ok = " / ".join(str(checks[g]["within_2se_of_bt_or_above"]) for g in ("seen", "unseen"))
        chose = "; ".join(f"{c['rank']}, {c['l2']:.1e}, {c['prior_pairs']:g}, {c.get('objective', 'joint')}"
                          for c in rows["train"]["choices"])
        fed = "-"
        if "simulate_minus_train" in checks["seen"]:
            fed = " / ".join(f"{100 * checks[g]['simulate_minus_train']:+.1f} ± "
                             f"{100 * checks[g]['simulate_minus_train_se']:.1f}" for g in ("seen", "unseen"))
        lines.append(f"| {s['population']} | {pair(rows.get('bt'))} | {pair(rows.get('train'))} | {gain} | {by_seed} "
                     f"| {ok} | {pair(rows.get('true_basis'))} | {pair(rows.get('oracle'))} | {chose} "
                     f"| {pair(rows.get('simulate'))} | {fed} |")
    failing = [s["population"] for s in summaries
               if not all(s["checks"][g]["within_2se_of_bt_or_above"] for g in ("seen", "unseen"))]
    lines += ["", f"Populations where `train` is more than 2 SE below BT: {', '.join(failing) or 'none'}."]
    federated = [s for s in summaries if "federated_within_1_point" in s["checks"]["seen"]]
    if federated:
        behind = [s["population"] for s in federated
                  if not all(s["checks"][g]["federated_within_1_point"] for g in ("seen", "unseen"))]
        lines.append(f"Populations where the federated run (`simulate --privacy none` at its defaults: 600 rounds of "
                     f"every seen user) is more than 1 point below `train` (of {len(federated)} run): "
                     f"{', '.join(behind) or 'none'}.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--populations", default=",".join(POPULATIONS))
    parser.add_argument("--rows", default="bt,train", help=f"rows to run, of {','.join(ROWS)} (simulate: the "
                        "federated row, about 2 minutes per population and seed)")
    parser.add_argument("--weight-by", default=DEFAULT_WEIGHTING, choices=("user", "pair"),
                        help="`train`'s and BT's --weight-by (default pair, as theirs; user writes "
                             "hostile_populations_user.*; give each its own --work)")
    parser.add_argument("--rerun", default="", help="comma-separated rows to recompute although cached")
    parser.add_argument("--work", default="runs/bench_hostile")
    parser.add_argument("--out", default="bench_results")
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    names = args.populations.split(",")
    unknown = sorted(set(names) - set(POPULATIONS))
    if unknown:
        parser.error(f"unknown populations {unknown}; choose from {list(POPULATIONS)}")
    rows, rerun = tuple(args.rows.split(",")), tuple(filter(None, args.rerun.split(",")))
    if set(rows + rerun) - set(ROWS):
        parser.error(f"unknown rows {sorted(set(rows + rerun) - set(ROWS))}; choose from {list(ROWS)}")
    rows += tuple(r for r in rerun if r not in rows)  # a row to recompute is a row to run (as bench_matrix)
    work = Path(args.work)
    summaries = []
    for name in names:
        cells = {}
        for seed in seeds:
            started = time.perf_counter()
            cells[seed] = run_cell(name, seed, work, rows, args.weight_by, rerun)
            print(f"{name} seed {seed}: bt {cells[seed]['bt']['seen_test_acc']:.4f} / "
                  f"{cells[seed]['bt']['unseen_test_acc']:.4f}, train {cells[seed]['train']['seen_test_acc']:.4f} / "
                  f"{cells[seed]['train']['unseen_test_acc']:.4f} ({time.perf_counter() - started:.0f} s)",
                  flush=True)
        summaries.append(summarize(name, cells))
    out = Path(args.out)
    stem = "hostile_populations" + ("" if args.weight_by == DEFAULT_WEIGHTING else f"_{args.weight_by}")
    atomic_write_json(out / f"{stem}.json", {"seeds": seeds, "weight_by": args.weight_by, "populations": summaries})
    text = markdown(summaries, seeds, rows, args.weight_by)
    atomic_write_text(out / f"{stem}.md", text)
    print(text)
    return 0 if not any(math.isnan(s["checks"]["seen"]["train_minus_bt"]) for s in summaries) else 1


if __name__ == "__main__":
    raise SystemExit(main())
