"""Fairness audit: who is served well by the personalised reward, and who is not.

Per user (seen: w fitted on its training pairs; unseen: on its few-shot pairs; basis frozen, the evaluation's own
solver): test pair accuracy with its own w (LoRe) and with the population reward (everyone the mean w of the seen
users: what a single shared reward model gives). Figures:
- per demographic group, seen and unseen users: mean accuracy with a bootstrap CI, and the worst-group gap
  (best minus worst group mean, groups of at least `min_group` users) with a bootstrap CI;
- the few-shot regime: users in the lowest quartile of training pairs vs the others;
- minority preferences: users whose w lies farthest from the population mean (top quartile of |w - mean w|) vs the
  rest, and the gain of personalisation (LoRe minus population reward) in each.
Fails when a gap's CI lies wholly above `tolerance`, or personalisation makes minority-preference users worse off.
At rank 1 (B = 1) every user's w is 1: LoRe is the population reward and no user lies farther from the mean than
another, so the minority-preference comparison is not applicable (`applicable` False); the group and few-pairs
comparisons, about who the reward serves, still run.
"""

from __future__ import annotations

import numpy as np

from lore_core.audits.not_applicable import RANK_ONE_REASON, is_rank_one
from lore_core.audits.statistics import AuditInputError, bootstrap_mean_ci
from lore_core.pairs import PairSet
from lore_core.reward_math import per_user_accuracy
from lore_core.simplex_fit import DEFAULT_PRIOR_PAIRS, fit_user_weights, prior_from_pairs

TOLERANCE = 0.05  # accuracy points: a gap whose CI lies above this is a finding


def per_user_accuracies(pairs: PairSet, basis: np.ndarray, prior_pairs: float = DEFAULT_PRIOR_PAIRS) -> dict:
    """Per user (sorted ids): seen, training pairs, fitted w (the evaluation's personal prior), LoRe and
    population-reward test accuracy."""
    ids, idx = np.unique(pairs.user, return_inverse=True)
    n = ids.size
    basis = np.asarray(basis, dtype=np.float64)
    scores = pairs.diff.astype(np.float64) @ basis.T
    train = pairs.split == "train"
    lam = prior_from_pairs(idx[train], n, prior_pairs)
    w = fit_user_weights(scores[train], idx[train], n, prior_strength=lam).weights
    seen = np.zeros(n, bool)
    seen[idx[pairs.seen]] = True
    population_w = w[seen].mean(axis=0) if seen.any() else w.mean(axis=0)
    test = ~train
    logits = np.einsum("nb,nb->n", scores[test], w[idx[test]])
    shared = scores[test] @ population_w
    return {
        "user_ids": ids, "seen": seen, "train_pairs": np.bincount(idx[train], minlength=n), "weights": w,
        "acc_lore": per_user_accuracy(logits, idx[test], n), "acc_population": per_user_accuracy(shared, idx[test], n),
        "distance_from_mean": np.linalg.norm(w - population_w, axis=1), "prior_pairs": float(prior_pairs),
    }


def _group_table(acc: np.ndarray, groups: np.ndarray, min_group: int, n_boot: int, alpha: float,
                 rng: np.random.Generator) -> dict:
    ok = ~np.isnan(acc)
    acc, groups = acc[ok], groups[ok]
    names, counts = np.unique(groups, return_counts=True)
    table, boots = [], []
    for name, count in zip(names, counts):
        values = acc[groups == name]
        entry = {"group": str(name), "users": int(count), "accuracy": float(values.mean())}
        if count >= min_group:
            entry["ci"] = bootstrap_mean_ci(values, n_boot=n_boot, alpha=alpha, rng=rng)
            boots.append(values[rng.integers(0, count, (n_boot, count))].mean(axis=1))
        table.append(entry)
    gap = None
    if len(boots) >= 2:
        b = np.stack(boots)
        means = [e["accuracy"] for e in table if "ci" in e]
        gap = {"gap": float(max(means) - min(means)),
               "ci": [float(v) for v in np.quantile(b.max(axis=0) - b.min(axis=0), [alpha / 2, 1 - alpha / 2])],
               "best": max((e for e in table if "ci" in e), key=lambda e: e["accuracy"])["group"],
               "worst": min((e for e in table if "ci" in e), key=lambda e: e["accuracy"])["group"]}
    return {"groups": table, "worst_group_gap": gap}


def _difference(a: np.ndarray, b: np.ndarray, n_boot: int, alpha: float, rng: np.random.Generator) -> dict:
    """mean(a) - mean(b) with an independent-samples bootstrap CI."""
    a, b = a[~np.isnan(a)], b[~np.isnan(b)]
    if a.size < 2 or b.size < 2:
        return {"difference": None, "ci": None, "n": [int(a.size), int(b.size)]}
    boot = (a[rng.integers(0, a.size, (n_boot, a.size))].mean(axis=1)
            - b[rng.integers(0, b.size, (n_boot, b.size))].mean(axis=1))
    return {"difference": float(a.mean() - b.mean()),
            "ci": [float(v) for v in np.quantile(boot, [alpha / 2, 1 - alpha / 2])], "n": [int(a.size), int(b.size)]}


def fairness_audit(per_user: dict, demographics: dict[str, np.ndarray] | None = None, *, min_group: int = 10,
                   tolerance: float = TOLERANCE, n_boot: int = 1000, alpha: float = 0.05, seed: int = 0) -> dict:
    """per_user: `per_user_accuracies` output; demographics: attribute -> labels (U,) aligned with its user_ids."""
    rng = np.random.default_rng(seed)
    acc, pop = per_user["acc_lore"], per_user["acc_population"]
    seen, n_train = per_user["seen"], per_user["train_pairs"]
    if np.all(np.isnan(acc)):
        raise AuditInputError("no user has test pairs: nothing to audit")
    groups = {}
    for attr, labels in (demographics or {}).items():
        labels = np.asarray(labels).astype(str)
        groups[attr] = {part: _group_table(acc[mask], labels[mask], min_group, n_boot, alpha, rng)
                        for part, mask in (("seen", seen), ("unseen", ~seen)) if mask.any()}
    low = n_train <= np.quantile(n_train, 0.25)
    few = _difference(acc[~low], acc[low], n_boot, alpha, rng)
    few["threshold_pairs"] = int(np.quantile(n_train, 0.25))
    rank = int(np.shape(per_user["weights"])[1])
    if is_rank_one(rank):
        minority = {"applicable": False, "reason": f"{RANK_ONE_REASON}: LoRe is the population reward, and no "
                                                   "user's preferences lie farther from the mean than another's"}
    else:
        far = per_user["distance_from_mean"] >= np.quantile(per_user["distance_from_mean"], 0.75)
        gain = acc - pop
        minority = {
            "applicable": True,
            "gain_minority": {"difference": float(np.nanmean(gain[far])),
                              "ci": list(bootstrap_mean_ci(gain[far & ~np.isnan(gain)], n_boot=n_boot, alpha=alpha,
                                                           rng=rng))},
            "gain_majority": {"difference": float(np.nanmean(gain[~far])),
                              "ci": list(bootstrap_mean_ci(gain[~far & ~np.isnan(gain)], n_boot=n_boot, alpha=alpha,
                                                           rng=rng))},
            "acc_lore_minority": float(np.nanmean(acc[far])), "acc_lore_majority": float(np.nanmean(acc[~far])),
            "acc_population_minority": float(np.nanmean(pop[far])),
            "acc_population_majority": float(np.nanmean(pop[~far])),
            "minority_users": int(far.sum()),
        }
    findings = []
    for attr, parts in groups.items():
        for part, table in parts.items():
            gap = table["worst_group_gap"]
            if gap and gap["ci"][0] > tolerance:
                findings.append(f"{attr} ({part}): {gap['worst']} is served {gap['gap']:.3f} worse than {gap['best']}")
    if few["ci"] and few["ci"][0] > tolerance:
        findings.append(f"users with <= {few['threshold_pairs']} training pairs are served {few['difference']:.3f} worse")
    if minority["applicable"] and minority["gain_minority"]["ci"][1] < 0:
        findings.append("personalisation makes minority-preference users worse off than the population reward")
    passed = not findings
    if minority["applicable"]:
        g_min, g_maj = minority["gain_minority"], minority["gain_majority"]
        gains = (f"minority-preference users {g_min['difference']:+.3f} [{g_min['ci'][0]:+.3f}, "
                 f"{g_min['ci'][1]:+.3f}], others {g_maj['difference']:+.3f}")
    else:
        gains = "not applicable (the basis has rank 1: every user has w = 1, so LoRe is the population reward)"
    sentence = (("PASS: " if passed else "FAIL: " + "; ".join(findings) + ". ")
                + f"Personalisation gain over the population reward: {gains}; few-pairs gap "
                f"{few['difference'] if few['difference'] is None else round(few['difference'], 3)}"
                + ("." if passed else " Collect more pairs from under-served groups or raise their weight in training."))
    return {
        "audit": "fairness", "verdict": "pass" if passed else "fail", "passed": passed, "summary": sentence,
        "findings": findings, "groups": groups, "few_pairs": few, "minority_preferences": minority,
        "overall": {"acc_lore": float(np.nanmean(acc)), "acc_population": float(np.nanmean(pop)),
                    "seen_users": int(seen.sum()), "unseen_users": int((~seen).sum())},
        "tolerance": tolerance, "min_group": min_group, "basis_rank": rank,
        **({"prior_pairs": per_user["prior_pairs"]} if "prior_pairs" in per_user else {}),
        "method": "per-user test accuracy (strict > 0) with w fitted on the user's training / few-shot pairs "
                  "(the personal prior of the run's basis file); "
                  "population reward = mean w of the seen users; percentile bootstrap over users; minority "
                  "preferences = top quartile of |w - mean w|",
        "seed": seed, "trials": int(acc.size), "alpha": alpha,
    }
