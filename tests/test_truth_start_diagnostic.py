"""The detectable-signal check of simulations.truth_start_diagnostic: it must see a personal signal that is there,
and none where every user has the same w, even when pairs share responses (their correlation is not personal)."""

from dataclasses import replace

import pytest

from simulations.bench_matrix import BASE
from simulations.synthetic_pairs import make_synthetic_pairs
from simulations.truth_start_diagnostic import signal_check


def check(**changes) -> dict:
    pairs, _ = make_synthetic_pairs(replace(BASE, seed=7, unseen_users=20, **changes))
    return signal_check(pairs, seed=7)


def test_a_personal_signal_stands_above_shuffled_users():
    signal = check()
    assert signal["ratio"] > 1.2 and signal["above"] >= 2


@pytest.mark.parametrize("changes", [{}, {"responses_per_turn": 4}], ids=["own-pairs", "shared-responses"])
def test_no_personal_signal_reads_as_none(changes):
    signal = check(personalization=0.0, **changes)
    assert signal["ratio"] < 1.1 and signal["above"] == 0
