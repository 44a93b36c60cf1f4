"""How much each seen user pulls the basis (`--weight-by user|pair`): shares, their effect, and the CLI record."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lore_core.joint_trainer import MarginalObjective, _Objective, fit_basis_and_weights, user_shares
from lore_core.minibatch_trainer import MinibatchConfig, _batch_objective
from lore_core.pairs import save_pairs
from lore_cli.main import main
from simulations.synthetic_pairs import SyntheticPairsConfig, make_synthetic_pairs


def test_shares_are_equal_per_user_or_proportional_to_pairs_with_mean_one():
    counts = torch.tensor([2.0, 0.0, 6.0, 4.0])
    np.testing.assert_allclose(user_shares(counts, "user").numpy(), [1.0, 0.0, 1.0, 1.0])
    np.testing.assert_allclose(user_shares(counts, "pair").numpy(), [0.5, 0.0, 1.5, 1.0])


def _rich_and_thin(seed=0, dim=20):
    """2 users with 200 pairs each who share one reward, beside 100 users with 2 pairs each answering at random."""
    rng = np.random.default_rng(seed)
    reward = rng.normal(size=dim)
    reward *= 3.0 / np.linalg.norm(reward)
    rich = rng.normal(size=(400, dim)) / np.sqrt(dim) * 2
    rich *= np.where(rng.random(400) < 1 / (1 + np.exp(-rich @ reward)), 1.0, -1.0)[:, None]
    thin = rng.normal(size=(200, dim)) / np.sqrt(dim) * 2
    diff = np.vstack([rich, thin]).astype(np.float32)
    user = np.r_[np.repeat([0, 1], 200), 2 + np.repeat(np.arange(100), 2)]
    return diff, user, reward


def test_pair_weighting_lets_the_rich_users_signal_shape_the_basis():
    """Equal shares give 100 random two-pair users 50 times the rich users' pull; every pair counted once lets the
    200-pair users' shared reward through. Fails if the weighting is ignored (both fits would be one)."""
    diff, user, reward = _rich_and_thin()
    cosines = {}
    for weighting in ("user", "pair"):
        basis, _ = fit_basis_and_weights(diff, user, 102, rank=1, l2=1e-3, prior_strength=0.02, max_iter=200,
                                         seed=0, weight_by=weighting)
        cosines[weighting] = float(basis[0] @ reward / np.linalg.norm(basis[0]) / np.linalg.norm(reward))
    assert cosines["pair"] > 0.8 and cosines["pair"] > cosines["user"] + 0.2, cosines


@pytest.mark.parametrize("objective", ["joint", "marginal", "minibatch"])
def test_pair_weighting_is_the_sum_over_pairs_and_equal_counts_change_nothing(objective):
    rng = np.random.default_rng(1)
    diff = torch.tensor(rng.normal(size=(30, 5)), dtype=torch.float32)
    basis = torch.tensor(rng.normal(size=(2, 5)), dtype=torch.float32)
    theta = torch.tensor(rng.normal(size=(3, 2)), dtype=torch.float32)

    def value(user_idx, weighting):
        idx = torch.as_tensor(user_idx)
        if objective == "joint":
            return float(_Objective(diff, idx, 3, 0.0, 0.0, weighting).data_loss(basis, theta))
        if objective == "marginal":
            return float(MarginalObjective(diff, idx, 3, 2, 0.0, weighting)(basis))
        config = MinibatchConfig(rank=2, l2=0.0, prior_pairs=0.0, weight_by=weighting)
        return float(_batch_objective(diff, idx, 3, basis, torch.softmax(theta, 1), config))

    equal = np.repeat(np.arange(3), 10)
    assert value(equal, "pair") == pytest.approx(value(equal, "user"), rel=1e-6)
    unequal = np.r_[np.zeros(2, int), np.ones(3, int), np.full(25, 2)]
    assert value(unequal, "pair") != pytest.approx(value(unequal, "user"), rel=1e-3)
    if objective == "joint":  # every pair once: the mean of the per-pair losses
        w = torch.softmax(theta, 1)[torch.as_tensor(unequal)]
        per_pair = torch.nn.functional.softplus(-((diff @ basis.T) * w).sum(1))
        assert value(unequal, "pair") == pytest.approx(float(per_pair.mean()), rel=1e-5)


def test_train_records_the_weighting_and_refuses_an_unknown_one(tmp_path, capsys):
    pairs, _ = make_synthetic_pairs(SyntheticPairsConfig(dim=16, seen_users=20, unseen_users=4, seed=2))
    save_pairs(pairs, tmp_path / "pairs.npz")
    assert main(["train", str(tmp_path / "pairs.npz"), "--rank", "2", "--l2", "1e-3", "--prior-pairs", "3",
                 "--weight-by", "pair", "--out", str(tmp_path / "run")]) == 0
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["weight_by"] == "pair"
    with pytest.raises(SystemExit) as exc:
        main(["train", str(tmp_path / "pairs.npz"), "--weight-by", "pairs", "--out", str(tmp_path / "other")])
    assert exc.value.code == 2 and "--weight-by" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()
