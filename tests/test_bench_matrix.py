"""The stress matrix's cache: a federated row follows the choice of the `train` (or `bt`) row it was run with."""

from __future__ import annotations

from simulations.bench_matrix import due_after_source, source_choice


def test_a_federated_row_reruns_only_when_its_source_chose_otherwise():
    train = {"rank": 4, "l2": 1e-5, "prior_pairs": 3.0, "objective": "marginal", "seen_test_acc": 0.7}
    assert not due_after_source("simulate", {})  # nothing to follow yet
    assert due_after_source("simulate", {"train": train})  # missing
    done = {"train": train, "simulate": {"source_choice": source_choice("simulate", {"train": train})}}
    assert not due_after_source("simulate", done)
    assert not due_after_source("simulate", {**done, "train": {**train, "seen_test_acc": 0.8}})  # same choice
    assert due_after_source("simulate", {**done, "train": {**train, "objective": "joint"}})
    assert due_after_source("simulate", {**done, "simulate": {"seen_test_acc": 0.7}})  # cached before the rule
    dp = {"train": train, "simulate_dp": {"source_choice": {"rank": 4, "l2": 1e-5}}}
    assert not due_after_source("simulate_dp", {**dp, "train": {**train, "prior_pairs": 10.0}})  # DP keeps its prior
    assert due_after_source("simulate_dp", {**dp, "train": {**train, "rank": 3}})
