"""The attribute prior table builder (`python -m simulations.attribute_priors`): what it publishes, and bad input
refused before anything is written (found by a tester: it replaced its own inputs with the table, exit 0)."""

import json

import numpy as np
import pytest

from client.device.attribute_prior import FORMAT
from lore_core.basis_file import save_basis
from lore_core.pairs import load_pairs, save_pairs
from simulations.attribute_priors import main
from simulations.synthetic_pairs import SyntheticPairsConfig, make_synthetic_pairs

DIM, RANK = 6, 2


@pytest.fixture()
def panel(tmp_path):
    """A prepared-dataset-like folder (pairs.npz, users.jsonl with one field) and a basis with a personal prior."""
    pairs, _ = make_synthetic_pairs(SyntheticPairsConfig(dim=DIM, true_rank=RANK, seen_users=24, unseen_users=2,
                                                         train_pairs=(5, 8), seed=4))
    dataset = tmp_path / "dataset"
    save_pairs(pairs, dataset / "pairs.npz")
    users = np.unique(pairs.user)
    (dataset / "users.jsonl").write_text("".join(
        json.dumps({"user": str(u), "demographics": {"age": "young" if i % 2 else "old"}}) + "\n"
        for i, u in enumerate(users)))
    basis = save_basis(tmp_path / "basis.npz", np.random.default_rng(0).normal(size=(RANK, DIM)), version=1,
                       embedder="test", prior_pairs=3.0)
    return dataset, basis


def build(dataset, basis, out, *extra) -> int:
    return main([str(dataset), "--basis", str(basis), "--fields", "age", "--min-users", "10", "--out", str(out),
                 *extra])


def test_the_table_holds_groups_of_enough_users_fitted_with_the_basis_prior(panel, tmp_path):
    dataset, basis = panel
    assert build(dataset, basis, tmp_path / "table.json") == 0
    table = json.loads((tmp_path / "table.json").read_text())
    assert table["format"] == FORMAT and table["prior_pairs"] == 3.0  # the basis file's prior, as the device fits
    assert sorted(table["groups"]["age"]) == ["old", "young"]
    assert all(group["users"] >= 10 for group in table["groups"]["age"].values())
    assert build(dataset, basis, tmp_path / "table.json") == 0  # its own earlier table may be replaced
    # a run directory holding basis.npz, as every lore-fed --basis takes (a tester's was refused as a directory)
    assert build(dataset, basis.parent, tmp_path / "table.json") == 0
    assert json.loads((tmp_path / "table.json").read_text()) == table


@pytest.mark.parametrize("case", ["out is the pairs", "out is the basis", "out is a directory", "min users 0",
                                  "unknown field", "basis of another width"])
def test_bad_input_is_refused_and_nothing_is_written(panel, tmp_path, capsys, case):
    dataset, basis = panel
    before = {path: path.read_bytes() for path in (dataset / "pairs.npz", dataset / "users.jsonl", basis)}
    wide = save_basis(tmp_path / "wide.npz", np.ones((RANK, DIM + 1)), version=1, embedder="test")
    out, extra, expected = tmp_path / "table.json", [], ""
    if case == "out is the pairs":
        out, expected = dataset / "pairs.npz", "is not an attribute prior table"
    elif case == "out is the basis":
        out, expected = basis, "is not an attribute prior table"
    elif case == "out is a directory":
        out, expected = dataset, "is a directory"
    elif case == "min users 0":
        extra, expected = ["--min-users", "0"], "--min-users must be at least 2"
    elif case == "unknown field":
        extra, expected = ["--fields", "colour"], "--fields: ['colour']: expected demographic fields"
    else:
        basis, expected = wide, f"--basis {wide} has width {DIM + 1}"
    assert build(dataset, basis, out, *extra) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err, err
    assert not (tmp_path / "table.json").exists()
    assert all(path.read_bytes() == data for path, data in before.items())
    assert load_pairs(dataset).n > 0
