"""Where audit results go: `RUN_DIR/audits/<name>.json` (atomic), a summary entry in the run ledger's `audits`
list (via PrivacyLedger.record_audit, when the run has a ledger), one plot per audit (`<name>.png`) and
`audits.md`, a markdown section per audit that the run report can include."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from lore_core.atomic_io import atomic_write_json, atomic_write_text

AUDITS_DIR = "audits"
SUMMARY_KEYS = ("verdict", "passed", "epsilon_lb", "epsilon_claimed", "mode", "level", "seed", "trials", "alpha",
                "delta")


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, (np.bool_,)):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return None if not np.isfinite(value) else float(value)
    return value


def audit_name(result: dict) -> str:
    """File stem: the audit kind, plus the level for membership (record / user)."""
    return result["audit"] + (f"-{result['level']}" if result.get("level") else "")


def write_audit(out_dir: str | Path, result: dict, *, ledger_dir: str | Path | None = None) -> Path:
    """Write OUT/audits/<name>.json and .png, append to the ledger in `ledger_dir` if it holds one, refresh
    OUT/audits/audits.md. Returns the JSON path."""
    folder = Path(out_dir) / AUDITS_DIR
    name = audit_name(result)
    clean = _jsonable(result)
    path = folder / f"{name}.json"
    atomic_write_json(path, clean)
    plot_audit(clean, folder / f"{name}.png")
    if ledger_dir is not None and (Path(ledger_dir) / "ledger.json").exists():
        from lore_core.privacy.ledger import PrivacyLedger

        entry = {"kind": name, "file": str(path)} | {k: clean[k] for k in SUMMARY_KEYS if k in clean}
        if isinstance(clean.get("epsilon_lb"), dict):
            entry["epsilon_lb"] = clean["epsilon_lb"].get("epsilon_lb")
        PrivacyLedger.load(ledger_dir).record_audit(entry)
    write_markdown(folder)
    return path


def write_markdown(folder: str | Path) -> Path:
    """audits.md from every <name>.json in the folder (sorted), one section each with its plot."""
    folder = Path(folder)
    sections = ["# Privacy audits\n", "| audit | verdict | finding |", "|---|---|---|"]
    results = []
    for file in sorted(folder.glob("*.json")):
        try:
            results.append((file.stem, json.loads(file.read_text())))
        except json.JSONDecodeError:
            continue
    for stem, r in results:
        sections.append(f"| [{stem}](#{stem}) | **{r.get('verdict')}** | {r.get('summary', '').split(':')[0]} |")
    for stem, r in results:
        sections += [f"\n## {stem}\n", f"**{r.get('verdict')}**: {r.get('summary', '')}\n",
                     *(_details(r)), f"\nMethod: {r.get('method', '')}; seed {r.get('seed')}, trials "
                     f"{r.get('trials')}.\n"]
        if (folder / f"{stem}.png").exists():
            sections.append(f"![{stem}]({stem}.png)\n")
    path = folder / "audits.md"
    atomic_write_text(path, "\n".join(sections) + "\n")
    return path


def _fmt_ci(ci) -> str:
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci and ci[0] is not None else "n/a"


def _details(r: dict) -> list[str]:
    """A small table of the audit's headline figures."""
    kind = r.get("audit")
    rows: list[str] = []
    if kind == "update-leakage":
        rows += ["| view | mean cos(w_hat, w) | 95% CI | gain over chance (CI) | pair AUC (CI) |", "|---|---|---|---|---|"]
        for view, v in r["views"].items():
            rows.append(f"| {view} | {v['cosine_mean']:.3f} | {_fmt_ci(v['cosine_ci'])} | {v['gain_over_chance']:+.3f} "
                        f"{_fmt_ci(v['gain_ci'])} | {v['pair_membership_auc']:.3f} {_fmt_ci(v['pair_membership_auc_ci'])} |")
        rows += [f"\nChance (no per-user information): " + ", ".join(
            f"{k} {c['mean']:.3f} {_fmt_ci(c['ci'])}" for k, c in r["chance"].items())]
    elif kind == "attribute":
        rows += ["| attribute | view | AUC | 95% CI | bal. acc (majority) | p | p (Holm) |", "|---|---|---|---|---|---|---|"]
        for x in r["results"]:
            rows.append(f"| {x['attribute']} | {x['view']} | {x['auc']:.3f} | {_fmt_ci(x['auc_ci'])} | "
                        f"{x['balanced_accuracy']:.3f} ({x['majority_baseline']:.3f}) | {x['p_value']:.3g} | "
                        f"{x['p_holm']:.3g} |")
    elif kind == "membership":
        rows += ["| attack | AUC | 95% CI | TPR@1% | TPR@0.1% | eps LB |", "|---|---|---|---|---|---|"]
        for name, a in r["attacks"].items():
            rows.append(f"| {name} | {a['auc']:.3f} | {_fmt_ci(a['auc_ci'])} | {a['tpr_at_1pct_fpr']:.3f} | "
                        f"{a['tpr_at_0.1pct_fpr']:.3f} | {a['epsilon_lb']['epsilon_lb']:.2f} |")
    elif kind in ("mechanism", "canary"):
        rows += ["| eps lower bound | Gaussian estimate | claimed eps |", "|---|---|---|",
                 f"| {r['epsilon_lb']:.3f} | {r['gaussian_estimate']['epsilon']:.3f} | {r['epsilon_claimed']:.3f} |"]
    elif kind == "accounting":
        rows += ["| stored PRV | PRV | RDP | PLD |", "|---|---|---|---|",
                 f"| {r['epsilon_stored_prv']} | {r['epsilon_prv']:.4f} | {r['epsilon_rdp']:.4f} | {r['epsilon_pld']} |"]
    elif kind == "extraction":
        rows += [f"Queries needed: {r['queries_needed']}; max |w_hat - w| = {r['max_abs_error']:.2e}."]
        for x in r.get("noisy", []):
            rows.append(f"- noise {r['noise_std']}: {x['queries']} queries -> max error {x['max_abs_error']:.3f}, "
                        f"mean cos {x['mean_cosine']:.3f}")
    elif kind == "fairness":
        m = r["minority_preferences"]
        rows += [f"Overall LoRe {r['overall']['acc_lore']:.3f} vs population reward {r['overall']['acc_population']:.3f}.",
                 f"Minority-preference users: LoRe {m['acc_lore_minority']:.3f}, population {m['acc_population_minority']:.3f}; "
                 f"others: LoRe {m['acc_lore_majority']:.3f}, population {m['acc_population_majority']:.3f}."]
        for attr, parts in r["groups"].items():
            for part, t in parts.items():
                gap = t["worst_group_gap"]
                if gap:
                    rows.append(f"- {attr} ({part}): worst-group gap {gap['gap']:.3f} {_fmt_ci(gap['ci'])} "
                                f"({gap['worst']} vs {gap['best']})")
    return rows


def plot_audit(r: dict, path: str | Path) -> Path | None:
    """One figure per audit (matplotlib, Agg); returns None for audits without a picture."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kind = r.get("audit")
    fig, ax = plt.subplots(figsize=(6, 4))
    try:
        if kind == "update-leakage":
            names = list(r["views"])
            means = [r["views"][v]["cosine_mean"] for v in names]
            errs = np.array([[m - r["views"][v]["cosine_ci"][0], r["views"][v]["cosine_ci"][1] - m]
                             for v, m in zip(names, means)]).T
            ax.bar(names, means, yerr=errs, capsize=4, color="tab:red")
            for k, c in r["chance"].items():
                ax.axhline(c["mean"], ls="--", lw=1, label=f"chance: {k}")
            ax.set_ylabel("mean cos(w_hat, w)"), ax.set_ylim(0, 1.05), ax.legend(fontsize=7)
        elif kind == "attribute":
            labels = [f"{x['attribute']}\n{x['view']}" for x in r["results"]]
            aucs = [x["auc"] for x in r["results"]]
            errs = np.array([[x["auc"] - x["auc_ci"][0], x["auc_ci"][1] - x["auc"]] for x in r["results"]]).T
            colors = ["tab:red" if x["significant"] else "tab:gray" for x in r["results"]]
            ax.bar(range(len(aucs)), aucs, yerr=errs, color=colors, capsize=3)
            ax.set_xticks(range(len(aucs)), labels, fontsize=6, rotation=60)
            ax.axhline(0.5, ls="--", color="k", lw=1), ax.set_ylabel("out-of-fold AUC")
        elif kind == "membership":
            for name, a in r["attacks"].items():
                ax.loglog(np.maximum(a["roc"]["fpr"], 1e-4), np.maximum(a["roc"]["tpr"], 1e-4),
                          label=f"{name} AUC {a['auc']:.3f}")
            ax.plot([1e-4, 1], [1e-4, 1], "k--", lw=1), ax.set_xlabel("FPR"), ax.set_ylabel("TPR"), ax.legend()
        elif kind == "mechanism":
            h = r["histogram"]
            centers = (np.array(h["edges"][1:]) + np.array(h["edges"][:-1])) / 2
            ax.plot(centers, h["out"], label="canary out"), ax.plot(centers, h["in"], label="canary in")
            ax.set_xlabel("<u, noisy sum>"), ax.set_title(f"eps LB {r['epsilon_lb']:.2f} vs claim "
                                                          f"{r['epsilon_claimed']:.2f}"), ax.legend()
        elif kind == "canary":
            ax.hist(r["score_out"], bins=40, alpha=0.6, label="canary out")
            ax.hist(r["score_in"], bins=40, alpha=0.6, label="canary in")
            ax.set_xlabel("llr score"), ax.set_title(f"one-run LB {r['epsilon_lb']:.2f}, estimate "
                                                     f"{r['gaussian_estimate']['epsilon']:.2f}, claim "
                                                     f"{r['epsilon_claimed']:.2f}", fontsize=9), ax.legend()
        elif kind == "accounting":
            names = ["stored PRV", "PRV", "RDP", "PLD"]
            vals = [r["epsilon_stored_prv"] or 0, r["epsilon_prv"], r["epsilon_rdp"], r["epsilon_pld"] or 0]
            ax.bar(names, vals), ax.set_ylabel("epsilon")
        elif kind == "extraction":
            if r.get("noisy"):
                ax.semilogx([x["queries"] for x in r["noisy"]], [x["mean_cosine"] for x in r["noisy"]], "o-")
                ax.set_xlabel("queries"), ax.set_ylabel("mean cos(w_hat, w)")
            ax.set_title(f"{r['queries_needed']} exact queries: max error {r['max_abs_error']:.1e}")
        elif kind == "fairness":
            m = r["minority_preferences"]
            x = np.arange(2)
            ax.bar(x - 0.2, [m["acc_population_majority"], m["acc_population_minority"]], 0.4, label="population")
            ax.bar(x + 0.2, [m["acc_lore_majority"], m["acc_lore_minority"]], 0.4, label="LoRe")
            ax.set_xticks(x, ["majority preferences", "minority preferences"]), ax.set_ylabel("test accuracy")
            ax.legend()
        else:
            return None
        fig.tight_layout()
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100)
        return Path(path)
    finally:
        plt.close(fig)
