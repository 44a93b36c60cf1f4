"""The stress matrix's harness: a federated row follows the choice of the `train` (or `bt`) row it was run with;
two result files compared."""

from __future__ import annotations

import json
from pathlib import Path

from server.optimizer import default_server_lr
from simulations.bench_matrix import due_after_source, other_rate, other_steps, source_choice

ROOT = Path(__file__).resolve().parents[1]


def test_a_federated_row_reruns_only_when_its_source_chose_otherwise():
    train = {"rank": 4, "l2": 1e-5, "prior_pairs": 3.0, "objective": "marginal", "seen_test_acc": 0.7}
    assert not due_after_source("simulate", {})  # nothing to follow yet
    assert due_after_source("simulate", {"train": train})  # missing
    done = {"train": train, "simulate": {"source_choice": source_choice("simulate", {"train": train}),
                                         "server_lr": default_server_lr("none")}}
    assert not due_after_source("simulate", done)
    assert not due_after_source("simulate", {**done, "train": {**train, "seen_test_acc": 0.8}})  # same choice
    assert due_after_source("simulate", {**done, "train": {**train, "objective": "joint"}})
    assert due_after_source("simulate", {**done, "simulate": {"seen_test_acc": 0.7}})  # cached before the rule
    dp = {"train": train, "simulate_dp": {"source_choice": {"rank": 4, "l2": 1e-5}}}
    assert not due_after_source("simulate_dp", {**dp, "train": {**train, "prior_pairs": 10.0}})  # DP keeps its prior
    assert due_after_source("simulate_dp", {**dp, "train": {**train, "rank": 3}})


def test_a_cached_federated_row_reruns_when_it_ran_other_users_per_round_than_the_plan():
    """A `simulate` row cached under 0.2.4's default (a fifth of the users) is not reported as 0.2.5's (every user)."""
    train = {"rank": 4, "l2": 1e-5, "prior_pairs": 3.0, "objective": "marginal"}
    row = {"source_choice": source_choice("simulate", {"train": train}), "server_lr": default_server_lr("none"),
           "rounds": 600, "clients_per_round": 60}
    done = {"train": train, "simulate": row}
    assert due_after_source("simulate", done, {"rounds": 600, "clients_per_round": 300})
    assert due_after_source("simulate", done, {"rounds": 1200, "clients_per_round": 60})
    assert not due_after_source("simulate", done, {"rounds": 600, "clients_per_round": 60})


def test_a_cached_federated_row_reruns_when_it_ran_other_local_steps_than_the_default():
    """A pair-weighted joint row run with 0.2.0's five steps (recorded, or not recorded) is stale; a user-weighted
    joint row with five, or a marginal row (always one step), is not."""
    pair, user = {"objective": "joint", "weight_by": "pair"}, {"objective": "joint", "weight_by": "user"}
    assert other_steps({"local_steps": 5}, pair) and other_steps({}, pair)
    assert not other_steps({"local_steps": 1}, pair)
    assert not other_steps({}, user) and other_steps({"local_steps": 1}, user)
    assert not other_steps({}, {"objective": "marginal", "weight_by": "pair"})


def test_a_cached_federated_row_reruns_when_it_ran_another_server_rate_than_the_default():
    """A row without privacy run at another rate than today's default (a pilot's rate written into the cache) is
    stale, one that does not record its rate ran the default of its time; a DP row, whose rate is the DP default, is
    not judged by the rate without privacy."""
    today = default_server_lr("none")
    assert other_rate({"server_lr": today / 3}) and not other_rate({"server_lr": today}) and not other_rate({})
    train = {"rank": 4, "l2": 1e-5, "prior_pairs": 3.0, "objective": "marginal"}
    chosen = source_choice("simulate", {"train": train})
    assert due_after_source("simulate", {"train": train, "simulate": {"source_choice": chosen, "server_lr": 0.3}})
    dp = {"source_choice": source_choice("simulate_dp", {"train": train}), "server_lr": default_server_lr("user")}
    assert not due_after_source("simulate_dp", {"train": train, "simulate_dp": dp})


def test_compare_matrix_files_reports_each_populations_change_and_failed_criteria(tmp_path):
    import copy

    from simulations.compare_matrix_files import main as compare

    before = json.loads((ROOT / "bench_results" / "matrix_today_user.json").read_text())
    after = copy.deepcopy(before)
    moved = after["populations"][0]
    moved["rows"]["train"]["seen"]["mean"] += 0.012
    moved["checks"]["unseen"]["within_2se_of_bt_or_above"] = False
    for name, data in (("before", before), ("after", after)):
        (tmp_path / f"{name}.json").write_text(json.dumps(data))
    out = tmp_path / "cmp.md"
    assert compare(["--before", str(tmp_path / "before.json"), "--after", str(tmp_path / "after.json"),
                    "--out", str(out)]) == 0
    row = next(line for line in out.read_text().splitlines() if line.startswith(f"| {moved['population']} |"))
    assert "| +1.2 / +0.0 |" in row and row.endswith("| 2 SE (n) |")


def test_simulate_without_privacy_defaults_to_the_matrix_s_federated_row():
    """The federated criterion is stated for default settings: `simulate --privacy none` without --rounds or
    --clients-per-round runs what the matrix's `simulate` row runs on every matrix population (every seen user, at
    most 1,000 a round), while DP keeps its plan's 200 rounds of 50 users."""
    import argparse

    from lore_cli.simulate_command import configure, run_overrides
    from simulations.bench_matrix import POPULATIONS, federated_settings

    parser = argparse.ArgumentParser()
    configure(parser)

    def defaults(privacy: str, seen: int) -> tuple[int, int]:
        args = parser.parse_args(["pairs.npz", "--out", "/nonexistent/run", "--privacy", privacy])
        overrides = run_overrides(args, seen, 10 * seen)
        return overrides["num-server-rounds"], overrides["clients-per-round"]

    for seen, every in ((300, 300), (1400, 1000), (1920, 1000)):
        fed = federated_settings(POPULATIONS[0], seen, quick=False)
        assert defaults("none", seen) == (fed["rounds"], fed["clients_per_round"]) == (600, every)
    assert defaults("none", 100) == (600, 100) and defaults("none", 30) == (600, 30)
    assert defaults("none", 100_000) == (600, 1000)  # a round's work stays bounded at scale
    assert defaults("user", 1400) == (200, 50) and defaults("user", 30) == (200, 30)
