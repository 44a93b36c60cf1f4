"""The privacy side of a federated run, shared by every mode (none, user, user+secagg, record):
the run's ledger, what the clients are told, and how many rounds the budget allows (docs/privacy.md §7-§9).

Order in a round (lore_core/privacy/__init__.py): ledger.check_next_round() -> sample -> train -> aggregate (noise)
-> ledger.record_round(...) -> only then the new basis is released (evaluation messages, checkpoint).
The ledger counts noisy releases: a round whose checkpoint was lost in a crash after its ledger entry is run again
and counted again (spent budget is never lost), so ledger rounds may exceed training rounds.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

from federation import protocol as p
from lore_core.privacy.accounting import PrivacyBudgetExhausted
from lore_core.privacy.ledger import PrivacyLedger
from lore_core.privacy.privacy_settings import PrivacySettings

# Everything else a federated run writes for the analyst, and why the accountant does not cover it (issue 13).
EVAL_NOT_COVERED = ("federated evaluation metrics (per-node accuracy sums; metrics.json, rounds.jsonl, report) and, "
                    "in `lore-fed simulate` on a benchmark, the true-basis ceiling (metrics.json "
                    "true_basis_seen_test_acc, true_basis_unseen_test_acc: the command fits w on the hidden basis "
                    "from the pair file after the last round): computed from users' held-out pairs and w fits "
                    "without noise; the server chooses the basis each evaluation scores, so one that sends bases of "
                    "its own making can query each node's held-out pairs (unmasked under user+secagg too); a device "
                    "that must not answer sets node config allow-evaluate=false")
COUNTS_NOT_COVERED = ("per-round counts (ledger `sampled`; rounds.jsonl sampled_users, accepted_users, "
                      "rejected_replies (each with its node id and reason: that node's users were in the round's "
                      "sample), missing_replies, non_finite_users, record_budget_exhausted_users, "
                      "secagg_nodes, unasked_nodes, eval_failed_nodes, eval_missing_nodes; metrics.json's totals of "
                      "them; user+secagg also tells the sampled users k (its bases' noise variance, n (zC)^2 / "
                      "n_min for the n users whose shares arrive, moves with k too), and the ledger the rounds of the "
                      "most-sampled user, most_user_rounds): exact; under add/remove adjacency a user's "
                      "presence shifts the sampled count's distribution (Bin(N, q) against Bin(N - 1, q)), and "
                      "accepted/rejected counts tell which replies failed; covered only under zero-out adjacency (the "
                      "user present but sending nothing)")
TIMINGS_NOT_COVERED = ("timings (rounds.jsonl seconds, metrics.json train_seconds and wall_seconds; each node's "
                       "reply time, seen by the SuperLink and the server in every mode): a round's wall time depends "
                       "on how many users were sampled and how many pairs they hold")
AUDITS_NOT_COVERED = ("audit results that read raw data (update-leakage, attribute, membership, fairness, "
                      "extraction; RUN/audits/ and the ledger's audits list) are released without noise")
RECORD_HISTORY_NOT_COVERED = ("record mode: which clients took part in each round, by id (events.rounds[].clients, "
                              "events.clients), and what each sampled client spent in the round (z, q, steps), sent "
                              "to the server for this ledger: the run's public rate and steps, alike for every client "
                              "whatever its pairs (a client whose max-epsilon is spent sends a zero update and no "
                              "spending, which follows from how often it was sampled); record-level DP protects "
                              "pairs, not whether a user took part")
RUN_FILES_NOT_COVERED = ("lore-fed simulate: the pair file's fingerprint (DIR/data.json, metrics.json "
                         "pairs_fingerprint: its size in bytes and a digest that confirms a guessed file) and the "
                         "--reference run's centralized accuracies copied into metrics.json (a fit without noise, "
                         "possibly on the same pairs)")


class FederatedLedger(PrivacyLedger):
    """lore_core's ledger plus what a federated run releases beyond the bases: its evaluation policy and the
    per-round records, listed as not covered with the reason."""

    evaluation: str = "after the last round only"

    def set_evaluation(self, policy: str) -> None:
        self.evaluation = policy
        self._write()

    def _render(self) -> dict[str, Any]:
        data = super()._render()
        if self.settings.is_dp:
            extra = [EVAL_NOT_COVERED, COUNTS_NOT_COVERED, TIMINGS_NOT_COVERED, AUDITS_NOT_COVERED,
                     RUN_FILES_NOT_COVERED]
            if self.settings.mode == "record":
                extra.append(RECORD_HISTORY_NOT_COVERED)
            data["not_covered"] = list(data["not_covered"]) + extra
        data["evaluation"] = {"policy": self.evaluation, "covered_by_accountant": False}
        return data


def stop_for_budget(ledger: PrivacyLedger, state, run_dir, evaluate: Callable[[int], dict]) -> None:
    """max_epsilon allows no further round: mark `stopped_early` in the ledger (check_next_round raises after
    writing it) and on the last round, whose metrics come from `evaluate(round)` (the last released basis) if that
    round did not evaluate; then checkpoint. Shared by the Message-API and the SecAgg+ paths."""
    from server.checkpoint import save_checkpoint

    try:
        ledger.check_next_round()
    except PrivacyBudgetExhausted as exc:
        logging.getLogger("lore_fed.server").warning("privacy budget: %s", exc)
    if not state.history:
        return
    last = state.history[-1]
    last["stopped_early"] = True
    if "seen_test_acc" not in last:
        last.update(evaluate(last["round"]))
    save_checkpoint(run_dir, state)


def open_ledger(run_dir: str | os.PathLike, settings: PrivacySettings, checkpoint_round: int = 0) -> FederatedLedger:
    """Create RUN_DIR/ledger.json, or continue it on resume (other privacy settings are refused: LedgerError).
    `checkpoint_round`: the round the run resumes after (check_ledger_covers). The caller sets the evaluation
    policy once the resume is accepted: a refused one must leave the ledger as the run wrote it (a reviewer)."""
    check_ledger_covers(run_dir, checkpoint_round)
    return FederatedLedger.open(run_dir, settings)


def check_ledger_covers(run_dir: str | os.PathLike, checkpoint_round: int) -> None:
    """A run resuming after round R needs a ledger of at least R rounds (it is written before each release). Without
    one (deleted, or an older copy put back) a new ledger counted from round 1: a finished 300-round run rerun
    reported epsilon 0.000 in its ledger, metrics and report. LedgerError names the file."""
    from pathlib import Path

    from lore_core.privacy.ledger import LEDGER_FILENAME, LedgerError, read_ledger

    path = Path(run_dir) / LEDGER_FILENAME
    if not checkpoint_round:
        return
    released = len(read_ledger(path)["events"]["rounds"]) if path.exists() else None
    if released is None or released < checkpoint_round:
        found = "is missing" if released is None else f"holds {released} rounds"
        raise LedgerError(f"{path} {found}, but the run's checkpoint is after round {checkpoint_round}: the privacy "
                          "those rounds spent would not be counted; put the run's ledger.json back, or start afresh "
                          "in a new run directory")


def evaluation_policy(eval_every: int, is_dp: bool) -> str:
    if not eval_every:
        return "after the last round only"
    opted_in = " (opted in: allow-uncovered-eval)" if is_dp else ""
    return f"every {eval_every} rounds and after the last round{opted_in}"


def rounds_that_fit(ledger: PrivacyLedger, remaining: int) -> int:
    """How many of the `remaining` planned rounds the ledger's max_epsilon still allows (bisection on the ledger's
    own prediction; one accountant call when all fit, the usual case: validate refused plans that do not)."""
    if remaining <= 0 or not ledger.would_exceed(rounds=remaining):
        return max(remaining, 0)
    low, high = 0, remaining  # low fits, high does not
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (low, mid) if ledger.would_exceed(rounds=mid) else (mid, high)
    return low


def train_config(settings: PrivacySettings) -> dict[str, Any]:
    """What the clients must know of the privacy settings (train message config; protocol.py)."""
    config: dict[str, Any] = {p.PRIVACY_MODE: settings.mode}
    if settings.mode in ("user", "user+secagg"):
        config[p.CLIP_NORM] = float(settings.clip_norm)
    if settings.mode == "user+secagg":  # each user's noise share depends on these and the round's sampled count
        config.update({p.NOISE_MULTIPLIER: float(settings.noise_multiplier),
                       p.DROPOUT_TOLERANCE: float(settings.dropout_tolerance)})
    elif settings.mode == "record":
        config.update({p.NOISE_MULTIPLIER: float(settings.noise_multiplier),
                       p.MAX_GRAD_NORM: float(settings.max_grad_norm),
                       p.RECORD_BATCH_SIZE: int(settings.record_batch_size),
                       p.RECORD_SAMPLE_RATE: float(settings.record_sample_rate),
                       p.RECORD_EPOCHS: int(settings.record_epochs), p.DELTA: float(settings.delta)})
        if settings.max_epsilon is not None:
            config[p.MAX_EPSILON] = float(settings.max_epsilon)
    if settings.mode in ("record", "user+secagg") and settings.reproducible_noise:  # clients draw the noise
        config[p.NOISE_SEED] = int(settings.noise_seed)
    return config
