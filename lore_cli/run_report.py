"""The federated run's report: `report.md` with an accuracy-per-round plot (PNG beside it)."""

from __future__ import annotations

import json
from pathlib import Path

from lore_core.atomic_io import atomic_write_text

PLOT_FILENAME = "accuracy_per_round.png"


def load_reference(path: str | Path | None) -> dict | None:
    """A centralized run's metrics: its run directory or its metrics.json."""
    if not path:
        return None
    path = Path(path)
    file = path / "metrics.json" if path.is_dir() else path
    if not file.exists():
        raise FileNotFoundError(f"reference {path}: no metrics.json (expected a `lore-fed train --out` directory)")
    return json.loads(file.read_text())


def plot_accuracy(history: list[dict], metrics: dict, reference: dict | None, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evals = [r for r in history if "seen_test_acc" in r]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for group, color in (("seen", "tab:blue"), ("unseen", "tab:orange")):
        ax.plot([r["round"] for r in evals], [r[f"{group}_test_acc"] for r in evals], marker="o", ms=3,
                color=color, label=f"federated, {group} users")
        if reference and f"{group}_test_acc" in reference:
            ax.axhline(reference[f"{group}_test_acc"], color=color, ls="--", lw=1,
                       label=f"centralized, {group} users")
        oracle = metrics.get(f"oracle_{group}_test_acc")
        if oracle is not None:
            ax.axhline(oracle, color=color, ls=":", lw=1, label=f"oracle, {group} users")
    ax.set_xlabel("round")
    ax.set_ylabel("held-out pair accuracy (mean over users)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(out)


def privacy_section(run_dir: Path) -> list[str]:
    """Mode, what is protected against whom, epsilon, what is not covered: read from the run's ledger."""
    file = run_dir / "ledger.json"
    if not file.exists():
        return ["", "## Privacy", "", "No privacy ledger in this run directory: no guarantee is claimed."]
    ledger = json.loads(file.read_text())
    lines = ["", "## Privacy", ""]
    if ledger["not_private"]["flag"] and ledger["mode"] != "none":
        lines += [f"**NOT PRIVATE**: {ledger['not_private']['reason']}", ""]
    lines += [f"- mode: `{ledger['mode']}`; privacy unit: {ledger['privacy_unit']}; adjacency: {ledger['adjacency']}",
              f"- guarantee: {ledger['guarantee']}",
              f"- threat model (who is trusted): {ledger['threat_model']}"]
    if ledger["mode"] != "none":
        noise, rounds, budget = ledger["noise"], ledger["rounds"], ledger["budget"]
        lines += [f"- noise multiplier {noise['multiplier']:.4g}, noise std on the sum {noise['std_on_sum']:.4g}, "
                  f"rounds released {rounds['released']} of {rounds['planned']} planned, delta {ledger['delta']:g}"
                  + (" - **stopped early: max epsilon reached**" if budget["stopped_early"] else "")]
        if ledger["epsilon"]:
            eps = ledger["epsilon"]
            lines.append(f"- epsilon: {eps['prv']:.3f} (PRV, headline), {eps['rdp']:.3f} (RDP upper bound)"
                         + (f", {eps['over']}" if "over" in eps else ""))
        lines.append(f"- evaluation: {ledger['evaluation']['policy']} (not covered by the accountant)")
    lines += ["- not covered: " + "; ".join(ledger["not_covered"]), "", "Full ledger: `ledger.json`."]
    return lines


def write_report(run_dir: str | Path, history: list[dict], metrics: dict, reference: dict | None,
                 command: str) -> Path:
    run_dir = Path(run_dir)
    plot_accuracy(history, metrics, reference, run_dir / PLOT_FILENAME)
    rows = [("seen users", "seen_test_acc", "oracle_seen_test_acc"),
            ("unseen users (few-shot)", "unseen_test_acc", "oracle_unseen_test_acc")]

    def cell(source: dict | None, key: str) -> str:
        value = None if source is None else source.get(key)
        return "–" if value is None else f"{value:.4f}"

    lines = [
        "# Federated LoRe run",
        "",
        f"`{command}`",
        "",
        f"{metrics['rounds']} rounds, rank {metrics['rank']}, privacy mode `{metrics['privacy_mode']}`, "
        f"{metrics['users_per_round']} users per round, {metrics['nodes']} virtual nodes, "
        f"wall time {metrics['wall_seconds']:.1f} s.",
        "",
        "| held-out pair accuracy | federated | centralized (`lore-fed train`) | oracle |",
        "|---|---|---|---|",
    ]
    for label, key, oracle_key in rows:
        lines.append(f"| {label} | {cell(metrics, key)} | {cell(reference, key)} | {cell(metrics, oracle_key)} |")
    lines += ["", f"![accuracy per round]({PLOT_FILENAME})", "",
              "Per-user accuracy (strict `> 0`), unweighted mean over users. Seen users use their private weights "
              "refit on their own training pairs; unseen users fit weights on their few-shot pairs with the basis "
              "frozen. Per-round figures: `rounds.jsonl`."]
    lines += privacy_section(run_dir)
    report = run_dir / "report.md"
    atomic_write_text(report, "\n".join(lines) + "\n")
    return report
