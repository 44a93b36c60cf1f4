"""The JSON a run writes (metrics.json, rounds.jsonl, ledger.json) is strict JSON: a figure that does not exist is
null or left out, never Python's bare NaN, which JavaScript, jq and most other tools refuse."""

import json
import re

import numpy as np
import pytest

from lore_cli.main import main
from lore_core.atomic_io import atomic_write_json
from lore_core.model_selection import Candidate, choose_from_table, select_one_se
from lore_core.pairs import save_pairs
from simulations.synthetic_pairs import SyntheticPairsConfig, make_synthetic_pairs


def strict(text: str):
    """`json.loads` that refuses NaN and Infinity, as strict parsers do."""
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")
    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def seen_only(tmp_path_factory):
    """Seen users only: no unseen user to score, and a population small enough for one user per selection fold."""
    pairs, _ = make_synthetic_pairs(SyntheticPairsConfig(dim=8, true_rank=2, seen_users=4, unseen_users=0,
                                                         train_pairs=(6, 8), test_pairs=4, seed=3))
    return pairs


def test_train_on_one_user_writes_a_selection_table_without_nan(seen_only, tmp_path):
    """One user: the selection's standard errors and new-user figures do not exist (NaN in memory)."""
    one = seen_only.subset(seen_only.user == seen_only.user[0])
    assert main(["train", str(save_pairs(one, tmp_path / "one.npz")), "--objective", "joint", "--rank-grid", "1,2",
                 "--out", str(tmp_path / "run")]) == 0
    metrics = strict((tmp_path / "run" / "metrics.json").read_text())
    assert any(row["gain_se"] is None for row in metrics["selection"])
    assert "unseen_test_acc" not in metrics


def test_simulate_without_unseen_users_leaves_their_accuracy_out_as_train_does(seen_only, tmp_path):
    assert main(["simulate", str(save_pairs(seen_only, tmp_path / "seen.npz")), "--rounds", "2", "--rank", "2",
                 "--privacy", "none", "--out", str(tmp_path / "run")]) == 0
    metrics = strict((tmp_path / "run" / "metrics.json").read_text())
    assert "seen_test_acc" in metrics and "unseen_test_acc" not in metrics
    rounds = [strict(line) for line in (tmp_path / "run" / "rounds.jsonl").read_text().splitlines()]
    assert rounds[-1]["unseen_test_acc"] is None
    strict((tmp_path / "run" / "ledger.json").read_text())
    assert not re.search(r"\bnan\b", (tmp_path / "run" / "report.md").read_text())  # "–" where no figure


def test_a_selection_table_read_back_from_metrics_json_chooses_as_the_rule_did(tmp_path):
    """null in place of NaN: a pilot replaying the rule on a run's table (choose_from_table) gets the same choice."""
    one_user, no_new_user = np.array([0.7]), np.array([np.nan])  # every SE and every new-user figure is NaN
    candidates = [Candidate(rank, 0.01, 1.0, one_user + 0.01 * rank, no_new_user) for rank in (1, 2, 3)]
    chosen, table = select_one_se(candidates)
    atomic_write_json(tmp_path / "metrics.json", {"selection": table})
    read_back = strict((tmp_path / "metrics.json").read_text())["selection"]
    assert read_back[0]["gain_se"] is None
    assert choose_from_table(read_back) == choose_from_table(table)
    assert choose_from_table(read_back)[0] == candidates.index(chosen)
