"""`train` keeps the per-user held-out figures it chose on (selection_heldout.npz), and a replay on them gives the
recorded selection exactly, or, under another rule, that rule's choice."""

import json
import math

import pytest

from lore_core import model_selection
from lore_core.pairs import save_pairs
from lore_core.selection_record import FILENAME, load_record, replay, save_record
from lore_cli.main import main
from simulations.synthetic_pairs import SyntheticPairsConfig, make_synthetic_pairs


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 30-user population: scored on several folds, so the nested check is enforced and bootstrapped."""
    pairs, _ = make_synthetic_pairs(SyntheticPairsConfig(dim=24, true_rank=2, seen_users=30, unseen_users=8, seed=4))
    root = tmp_path_factory.mktemp("selection")
    path = save_pairs(pairs, root / "data" / "pairs.npz")
    assert main(["train", str(path), "--rank-grid", "1,2,3", "--objective", "joint", "--out", str(root / "run")]) == 0
    return path, root / "run"


def _same(a, b) -> bool:
    """A table figure against its JSON copy (null where it was NaN)."""
    if isinstance(a, float) and math.isnan(a):
        return b is None
    return a == b


def test_a_replay_on_the_record_gives_the_recorded_table_check_and_choice(run):
    _, run_dir = run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    record = load_record(run_dir / FILENAME)
    assert record["seen"].shape[0] == len(metrics["selection"]) > 1
    assert bool(record["nested"]) and metrics["held_out"]["nested_check"]["enforced"]
    chosen, rows, check = replay(record)
    assert [row["chosen"] for row in metrics["selection"]].index(True) == chosen
    for row, recorded in zip(rows, metrics["selection"]):
        assert set(row) == set(recorded)
        assert all(_same(row[key], recorded[key]) for key in row), (row, recorded)
    for key in ("gain", "se", "seen_gain", "new_gain", "users"):
        assert _same(check[key], metrics["held_out"]["nested_check"][key])


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
