"""`train` keeps the per-user held-out figures it chose on (selection_heldout.npz), and a replay on them gives the
recorded selection exactly, or, under another rule, that rule's choice."""

import json
import math

import numpy as np
import pytest

from lore_core import model_selection
from lore_core.pairs import save_pairs
from lore_core.selection_record import FILENAME, load_record, matches_table, replay, save_record
from lore_cli.main import main
from simulations.synthetic_pairs import SyntheticPairsConfig, make_synthetic_pairs


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 30-user population: scored on several folds, so the nested check is enforced and bootstrapped (a seed
    other than the default, so a record that stored the wrong one fails)."""
    pairs, _ = make_synthetic_pairs(SyntheticPairsConfig(dim=24, true_rank=2, seen_users=30, unseen_users=8, seed=4))
    root = tmp_path_factory.mktemp("selection")
    path = save_pairs(pairs, root / "data" / "pairs.npz")
    assert main(["train", str(path), "--rank-grid", "1,2,3", "--objective", "joint", "--seed", "3",
                 "--out", str(root / "run")]) == 0
    return path, root / "run"


def _same(a, b) -> bool:
    """A table figure against its JSON copy (null where it was NaN)."""
    if isinstance(a, float) and math.isnan(a):
        return b is None
    return a == b


def _replays_exactly(run_dir) -> dict:
    """Asserts the replay of the run's record gives its table, choice and nested check; returns the record."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    record = load_record(run_dir / FILENAME)
    assert record["seen"].shape[0] == len(metrics["selection"]) > 1
    chosen, rows, check = replay(record)
    assert [row["chosen"] for row in metrics["selection"]].index(True) == chosen
    for row, recorded in zip(rows, metrics["selection"]):
        assert set(row) == set(recorded)
        assert all(_same(row[key], recorded[key]) for key in row), (row, recorded)
    assert matches_table(rows, metrics["selection"])
    for key in ("gain", "se", "seen_gain", "new_gain", "users", "enforced"):
        assert _same(check[key], metrics["held_out"]["nested_check"][key])
    return record


def test_a_replay_on_the_record_gives_the_recorded_table_check_and_choice(run):
    record = _replays_exactly(run[1])
    assert bool(record["nested"]) and int(record["seed"]) == 3


def test_a_population_scored_on_one_fold_is_replayed_without_the_nested_check(tmp_path):
    """8 seen users: too few to treat any as new, one fold, no nested check; the replay must not add one."""
    pairs, _ = make_synthetic_pairs(SyntheticPairsConfig(dim=24, true_rank=2, seen_users=8, unseen_users=4, seed=5))
    path = save_pairs(pairs, tmp_path / "data" / "pairs.npz")
    with pytest.warns(UserWarning):
        assert main(["train", str(path), "--rank-grid", "1,2", "--objective", "joint", "--seed", "5",
                     "--out", str(tmp_path / "run")]) == 0
    record = _replays_exactly(tmp_path / "run")
    assert not bool(record["nested"]) and int(record["seed"]) == 5


def test_a_replay_runs_todays_rule(run, monkeypatch):
    """The replay is the rule as the code now has it: a nested check that no gain passes keeps rank 1."""
    _, run_dir = run
    record = load_record(run_dir / FILENAME)
    monkeypatch.setattr(model_selection, "NESTED_SE", math.inf)
    chosen, rows, _ = replay(record)
    assert record["rank"][chosen] == 1 and rows[chosen]["chosen"]


def test_a_rerun_with_nothing_to_select_removes_the_earlier_record(run, tmp_path):
    import shutil

    path, run_dir = run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    assert main(["train", str(path), "--rank", "2", "--l2", "0.001", "--prior-pairs", "3", "--objective", "joint",
                 "--out", str(copy)]) == 0
    assert not (copy / FILENAME).exists()
    assert json.loads((copy / "metrics.json").read_text())["rank"] == 2


def test_a_record_whose_arrays_do_not_fit_together_is_refused_naming_the_file(run, tmp_path):
    _, run_dir = run
    record = load_record(run_dir / FILENAME)
    bad = tmp_path / FILENAME
    save_record(bad, {**record, "rank": record["rank"][:-1]})
    with pytest.raises(ValueError, match=f"{bad}.*do not fit together"):
        load_record(bad)
    save_record(bad, {**record, "nested": record["nested"].astype(str)})
    with pytest.raises(ValueError, match="dtypes"):
        load_record(bad)
    save_record(bad, {key: value for key, value in record.items() if key != "new"})
    with pytest.raises(ValueError, match=r"missing \['new'\]"):
        load_record(bad)
    bad.write_text("not an archive")
    with pytest.raises(ValueError, match=f"{bad}"):
        load_record(bad)


def test_a_file_of_that_name_that_is_not_a_runs_is_not_overwritten(run, tmp_path, capsys):
    path, _ = run
    out = tmp_path / "out"
    out.mkdir()
    (out / FILENAME).write_bytes(b"mine")
    assert main(["train", str(path), "--rank", "1", "--out", str(out)]) == 2
    assert (out / FILENAME).read_bytes() == b"mine"
    assert FILENAME in capsys.readouterr().err


def test_the_rule_replay_benchmark_replays_a_run_on_its_record(run):
    """simulations.bench_rule_replay reads the record where a run has one: the same choice, no retraining."""
    from simulations.bench_rule_replay import replay as replay_run

    _, run_dir = run
    cell = replay_run(run_dir, json.loads((run_dir / "metrics.json").read_text()))
    assert cell["replayed_on"] == "per-user figures" and not cell["changed"]


def test_a_record_beside_another_runs_metrics_is_not_replayed_on(run, tmp_path):
    """A rerun by code that wrote no record leaves the old one beside a new metrics.json: the benchmark replays that
    run on its table instead."""
    import shutil

    from simulations.bench_rule_replay import replay as replay_run

    _, run_dir = run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    metrics = json.loads((copy / "metrics.json").read_text())
    metrics["selection"][0]["l2"] *= 1.5  # another selection's candidates (the choice stays: nothing retrains)
    cell = replay_run(copy, metrics)
    assert cell["replayed_on"] == "table" and not cell["changed"]


@pytest.mark.parametrize("killed_at", ["basis.npz", "user_weights.npz", FILENAME])
def test_a_first_train_killed_at_any_rename_can_be_rerun(run, tmp_path, monkeypatch, killed_at):
    """A reviewer: with basis.npz renamed last, a first run killed among the renames left the weights and the record
    without a basis, and its rerun was refused as another's files. basis.npz is renamed first now."""
    import os

    path, _ = run
    flags = ["train", str(path), "--rank-grid", "1,2", "--objective", "joint", "--l2", "0.001", "--prior-pairs", "3",
             "--out", str(tmp_path / "run")]

    class Killed(BaseException):
        pass

    real_replace = os.replace

    def killed(source, target):
        if str(target).endswith(killed_at):
            raise Killed
        real_replace(source, target)

    with monkeypatch.context() as patch:
        patch.setattr(os, "replace", killed)
        with pytest.raises(Killed):
            main(flags)
    assert not (tmp_path / "run" / "metrics.json").exists()
    assert main(flags) == 0
    assert (tmp_path / "run" / FILENAME).exists()


def test_the_rule_before_85dcd0b_replays_on_the_record_with_independent_sides(run):
    """--sides independent on a record: the gain SE the rule reads (the table's and the nested check's choices)
    from the two sides as if independent, the seen side's alone without new users; today's again after."""
    from simulations.bench_rule_replay import independent_gain_rows

    record = load_record(run[1] / FILENAME)
    correlated = model_selection._gain_rows
    today = replay(record)[1]
    with independent_gain_rows():
        _, before, _ = replay(record)
        table_choice = model_selection.choose_from_table(before)[0]
        arrays_choice = model_selection.choose_on_arrays(record["seen"], record["new"], record["rank"])[0]
        seen_only = model_selection._gain_rows(record["seen"][:2], np.full_like(record["new"][:2], np.nan))
    assert model_selection._gain_rows is correlated
    assert table_choice == arrays_choice  # the nested check's choices read the same SE as the table
    for now, then in zip(today, before):
        assert then["gain_vs_rank1"] == now["gain_vs_rank1"]
        if then["new_gain_se"] is not None and not math.isnan(then["new_gain_se"]):
            # the rule before's formula, written out (its `_combine`): the root sum of squares of the sides' SEs
            assert then["gain_se"] == pytest.approx(math.sqrt(then["seen_gain_se"] ** 2 + then["new_gain_se"] ** 2)
                                                    / 2)
    assert any(then["gain_se"] != now["gain_se"] for now, then in zip(today, before))
    assert np.array_equal(seen_only["se"], seen_only["seen_gain_se"], equal_nan=True)
