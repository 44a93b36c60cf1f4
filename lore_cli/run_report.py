"""The federated run's report: `report.md` with a per-round table and plots (PNG beside it).

What a run may show depends on its privacy mode. Accuracy per round needs federated evaluation, which under DP runs
only after the last round (its sums are not covered by the accountant), so a DP run's accuracy plot would be a
single point; instead it shows what is free to show: the epsilon spent after each round (from the ledger's events)
and the size of each released basis step (a function of released bases only: post-processing, no privacy cost)."""

from __future__ import annotations

import math
from pathlib import Path

from lore_core.atomic_io import atomic_save_figure, atomic_write_text
from lore_core.text_file import json_loads, not_a_file

PLOT_FILENAME = "accuracy_per_round.png"
DP_PLOT_FILENAME = "privacy_per_round.png"
TABLE_ROWS = 12  # rows of the per-round table in report.md; rounds.jsonl has them all


def load_reference(path: str | Path | None) -> dict | None:
    """A centralized run's metrics: its run directory or its metrics.json."""
    if not path:
        return None
    path = Path(path)
    file = path / "metrics.json" if path.is_dir() else path
    if not file.exists():
        raise FileNotFoundError(f"reference {path}: no metrics.json (expected a `lore-fed train --out` directory)")
    if not file.is_file():  # a FIFO would be read for ever (a reviewer)
        raise ValueError(f"{not_a_file('reference', file)}; expected a `lore-fed train --out` directory")
    expected = "expected the metrics.json of a `lore-fed train --out` directory"
    try:
        reference = json_loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"reference {file}: not JSON ({exc}); {expected}") from exc
    if not isinstance(reference, dict):
        raise ValueError(f"reference {file}: a JSON {type(reference).__name__}; {expected}")
    for key in ("seen_test_acc", "unseen_test_acc"):
        value = reference.get(key)
        if value is None:
            continue  # a population without new users, or without seen users' test pairs: shown as "–"
        if not (isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value <= 1.0):
            raise ValueError(f"reference {file}: {key} is {value!r}, not an accuracy in [0, 1]; {expected}")
    return reference


def check_reference_run(path: str | Path, reference: dict, pairs_path: str | Path) -> None:
    """A reference the report may show as the centralized run of `pairs_path`: not a federated run, and, where it
    recorded its pair file's fingerprint, trained on this file (a tester's federated run, and a `train` run on other
    embeddings, showed in the centralized column without a word). ValueError naming what it is."""
    from lore_cli.run_data import fingerprint_problem, same_pair_file

    path = Path(path) / "metrics.json" if Path(path).is_dir() else Path(path)
    if "privacy_mode" in reference:
        raise ValueError(f"reference {path}: the metrics of a federated run (it names a privacy mode); expected a "
                         "`lore-fed train --out` directory")
    recorded = reference.get("pairs_fingerprint")
    if recorded is not None and (problem := fingerprint_problem(recorded)):  # damaged: it must not pass for a match
        raise ValueError(f"reference {path}: pairs_fingerprint {problem}; expected the metrics.json of a "
                         "`lore-fed train --out` directory")
    if recorded is not None and not same_pair_file(recorded, pairs_path):
        raise ValueError(f"reference {path}: trained on another pair file than {pairs_path} (its pairs_fingerprint "
                         "differs); give the `lore-fed train --out` directory of this pair file")


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
    _save(fig, out)


def plot_privacy(history: list[dict], epsilons: list[float], out: Path) -> None:
    """Epsilon spent after each released round, and the norm of each released basis step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    left.plot(range(1, len(epsilons) + 1), epsilons, color="tab:red")
    left.set_xlabel("released round (ledger)")
    left.set_ylabel("epsilon spent (PRV)")
    left.grid(alpha=0.3)
    steps = [(r["round"], r["update_norm"]) for r in history if "update_norm" in r]
    right.plot([t for t, _ in steps], [n for _, n in steps], color="tab:purple", lw=1)
    right.set_xlabel("round")
    right.set_ylabel("||A_t - A_{t-1}||_F of the released basis")
    right.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, out)


def _save(fig, out: Path) -> None:
    import matplotlib.pyplot as plt

    try:
        atomic_save_figure(fig, out, dpi=110)
    finally:
        plt.close(fig)


def round_table(history: list[dict]) -> list[str]:
    """A few evenly spaced rounds (always the last) as a markdown table."""
    every = max(1, -(-len(history) // TABLE_ROWS))
    rows = [r for i, r in enumerate(history) if i % every == 0 or i == len(history) - 1]
    columns = [("round", "round", "{}"), ("users", "accepted_users", "{}"), ("sampled", "sampled_users", "{}"),
               ("step norm", "update_norm", "{:.4f}"), ("epsilon", "epsilon", "{:.3f}"),
               ("seen acc", "seen_test_acc", "{:.4f}"), ("unseen acc", "unseen_test_acc", "{:.4f}"),
               ("seconds", "seconds", "{:.2f}")]
    columns = [c for c in columns if any(_figure(r, c[1]) is not None for r in rows)]
    lines = ["| " + " | ".join(c[0] for c in columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join("–" if _figure(r, key) is None else form.format(r[key])
                                        for _, key, form in columns) + " |")
    return lines


def _figure(record: dict, key: str):
    """A round's figure, None where it has none (not evaluated that round; NaN: no unseen users to evaluate)."""
    value = record.get(key)
    return None if isinstance(value, float) and math.isnan(value) else value


def privacy_section(run_dir: Path) -> list[str]:
    """Mode, what is protected against whom, epsilon, what is not covered: read from the run's ledger."""
    file = run_dir / "ledger.json"
    if not file.exists():
        return ["", "## Privacy", "", "No privacy ledger in this run directory: no guarantee is claimed."]
    from lore_core.privacy.ledger import PrivacyLedger

    ledger = json_loads(file.read_text())
    # The claims recomputed from its config and events, never the file's own, which an edit can change (a tester's
    # forged headline reached report.md); the descriptions (evaluation policy, not covered) are the file's.
    claims = PrivacyLedger.load(run_dir).rendered()
    ledger.update({key: claims[key] for key in ("mode", "guarantee", "epsilon", "delta", "rounds", "not_private")})
    lines = ["", "## Privacy", ""]
    if ledger["not_private"]["flag"] and ledger["mode"] != "none":
        lines += [f"**NOT PRIVATE**: {ledger['not_private']['reason']}", ""]
    lines += [f"- mode: `{ledger['mode']}`; privacy unit: {ledger['privacy_unit']}; adjacency: {ledger['adjacency']}",
              f"- guarantee: {ledger['guarantee']}",
              f"- threat model (who is trusted): {ledger['threat_model']}"]
    if ledger["mode"] != "none":
        noise, rounds, budget = ledger["noise"], ledger["rounds"], ledger["budget"]
        at_least = "at least " if "std_on_sum_is" in noise else ""
        # record mode's noise is DP-SGD's, on each batch's clipped per-pair gradients (a tester read "on the sum")
        where = "on each DP-SGD batch's clipped gradient sum" if ledger["mode"] == "record" else "on the sum"
        lines += [f"- noise multiplier {noise['multiplier']:.4g}, noise std {where} {at_least}"
                  f"{noise['std_on_sum']:.4g}, rounds released {rounds['released']} of {rounds['planned']} planned"
                  + (" (a round run again after a crash counts again: its first release may have left)"
                     if rounds["released"] > rounds["planned"] else "")  # a tester read 31 of 30 as an error
                  + f", delta {ledger['delta']:g}"
                  + (" - **stopped early: max epsilon reached**" if budget["stopped_early"] else "")]
        if ledger["mode"] == "record" and (ledger.get("sampling") or {}).get("rate") is not None:
            # epsilon follows the rate, which the report did not name (a tester)
            lines.append(f"- per-pair DP-SGD: Poisson rate {ledger['sampling']['rate']:g} per step (public); "
                         f"{noise['aggregation']}")
        if ledger["epsilon"]:
            eps = ledger["epsilon"]
            if eps["accountant"] == "ddg-rdp":
                lines.append(f"- epsilon: {eps['headline']:.3f} (accountant ddg-rdp: {ledger['accountants']['method']})")
            else:
                lines.append(f"- epsilon: {eps['prv']:.3f} (PRV, headline), {eps['rdp']:.3f} (RDP upper bound)"
                             + (f", {eps['over']}" if "over" in eps else ""))
        lines.append(f"- evaluation: {ledger['evaluation']['policy']} (not covered by the accountant)")
    lines += ["- covered (post-processing of the noisy releases): " + "; ".join(ledger.get("covered", [])),
              "- not covered: " + "; ".join(ledger["not_covered"]), "", "Full ledger: `ledger.json`."]
    return lines


def update_steps(privacy_mode: str, local_steps: int | None, record_epochs: int | None) -> str:
    """What a client's update is, in words: its local steps, or in record mode its epochs of DP-SGD (whose server
    scaling, federation.protocol.RECORD_UPDATE_STEPS, is not a setting)."""
    if privacy_mode == "record":
        return f"{record_epochs} record-epoch{'s' if record_epochs != 1 else ''} of DP-SGD"
    return f"{local_steps} local step{'s' if local_steps != 1 else ''}"


def write_report(run_dir: str | Path, history: list[dict], metrics: dict, reference: dict | None,
                 command: str) -> Path:
    run_dir = Path(run_dir)
    evaluated = sum("seen_test_acc" in r for r in history)
    dp_plot = None
    if (run_dir / "ledger.json").exists():
        from lore_core.privacy.ledger import PrivacyLedger

        epsilons = PrivacyLedger.load(run_dir).epsilon_by_round()
        if epsilons:
            dp_plot = run_dir / DP_PLOT_FILENAME
            plot_privacy(history, epsilons, dp_plot)
    accuracy_plot = evaluated > 1 or dp_plot is None  # under DP one final evaluation is a point: not drawn (a tester)
    if accuracy_plot:
        plot_accuracy(history, metrics, reference, run_dir / PLOT_FILENAME)
    else:
        (run_dir / PLOT_FILENAME).unlink(missing_ok=True)  # an earlier version's, which no report links
    rows = [("seen users", "seen_test_acc", "oracle_seen_test_acc"),
            ("unseen users (few-shot)", "unseen_test_acc", "oracle_unseen_test_acc")]

    def cell(source: dict | None, key: str) -> str:
        value = None if source is None else source.get(key)
        return "–" if value is None else f"{value:.4f}"

    rate = ("" if "server_lr" not in metrics  # (a run recorded before 0.2.2 does not say)
            else f", server {metrics['server_optimizer']} at rate {metrics['server_lr']:.10g}")
    # (a run recorded before 0.2.1 says neither)
    steps = "" if {"local_steps", "record_epochs"}.isdisjoint(metrics) else \
        f", {update_steps(metrics['privacy_mode'], metrics.get('local_steps'), metrics.get('record_epochs'))}"
    lines = [
        "# Federated LoRe run",
        "",
        f"`{command}`",
        "",
        f"{metrics['rounds']} rounds, rank {metrics['rank']}, privacy mode `{metrics['privacy_mode']}`, "
        f"weight-by `{metrics.get('weight_by', 'user')}`{steps}{rate}, {metrics['users_per_round']} users per round, "
        f"{metrics['nodes']} {metrics.get('node_kind', 'virtual')} nodes, "
        f"wall time {metrics['wall_seconds']:.1f} s.",
        "",
        "| held-out pair accuracy | federated | centralized (`lore-fed train`) | oracle |",
        "|---|---|---|---|",
    ]
    for label, key, oracle_key in rows:
        lines.append(f"| {label} | {cell(metrics, key)} | {cell(reference, key)} | {cell(metrics, oracle_key)} |")
    if reference and reference.get("path"):
        lines += ["", f"Centralized reference: `{reference['path']}` (recorded in `metrics.json`, `reference`)."]
    lines += ["", "Per-user accuracy (strict `> 0`), unweighted mean over users. Seen users use their private weights "
              "refit on their own training pairs; unseen users fit weights on their few-shot pairs with the basis "
              "frozen.", ""]
    if dp_plot is not None:
        lines += [f"![epsilon and released step per round]({DP_PLOT_FILENAME})", "",
                  f"Under DP, accuracy is evaluated {'only after the last round' if evaluated <= 1 else 'as opted in'}"
                  " (evaluation sums are not covered by the accountant); the plot shows what is free to show: the "
                  "epsilon spent after each round and the size of each released basis step.", ""]
    if accuracy_plot:
        lines += [f"![accuracy per round]({PLOT_FILENAME})", ""]
    lines += ["## Rounds", ""] + round_table(history) + ["", "Every round: `rounds.jsonl`."]
    lines += privacy_section(run_dir)
    text = "\n".join(lines) + "\n"
    from lore_core.audits.audit_report import AUDITS_DIR, with_audits_section

    if any((run_dir / AUDITS_DIR).glob("*.json")):  # audits of this run (`lore-fed audit`): their section stays
        text = with_audits_section(text, run_dir)
    report = run_dir / "report.md"
    atomic_write_text(report, text)  # once, whole: a crash leaves the previous report, never one without its audits
    return report
