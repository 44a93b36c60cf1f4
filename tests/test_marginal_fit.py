"""The marginal objective (w integrated out): its client gradient, its place in selection, and federated runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.common.config import get_fused_config_from_dir

from federation.local_training import train_sampled_users
from federation.user_block import RowGroup
from lore_core.joint_trainer import MarginalObjective, TrainConfig, train_joint
from lore_core.marginal_fit import marginal_user_gradients, prior_samples
from lore_core.pairs import save_pairs
from lore_cli.main import main
from server.run_settings import RunConfigError, ServerSettings
from simulations.synthetic_pairs import SyntheticPairsConfig, make_synthetic_pairs

ROOT = Path(__file__).resolve().parents[1]


def _thin_users(seed=0, users=40, dim=12, rank=3):
    rng = np.random.default_rng(seed)
    n = users * 6
    return rng.normal(size=(n, dim)), rng.integers(0, users, n), 0.4 * rng.normal(size=(rank, dim))


def test_prior_samples_are_fixed_points_of_the_simplex():
    samples = prior_samples(4)
    np.testing.assert_allclose(samples.sum(axis=1), 1.0)
    assert (samples >= 0).all() and samples.shape[1] == 4
    np.testing.assert_array_equal(samples, prior_samples(4))  # server, clients and reruns share them
    assert any(np.allclose(row, np.eye(4)[0]) for row in samples)  # corners included


def test_client_gradient_is_the_gradient_of_each_users_marginal_loss():
    diff, user_idx, basis = _thin_users()
    grads = marginal_user_gradients(basis, diff, user_idx, 40)
    for user in (0, 7, 31):
        mine = user_idx == user
        a = torch.tensor(basis, requires_grad=True)
        MarginalObjective(torch.tensor(diff[mine]), torch.zeros(int(mine.sum()), dtype=torch.long), 1,
                          basis.shape[0], 0.0)(a).backward()
        np.testing.assert_allclose(grads[user], a.grad.numpy(), atol=1e-10)
    # The mean over users is the gradient of the centralized objective (every user weighs the same).
    a = torch.tensor(basis, requires_grad=True)
    MarginalObjective(torch.tensor(diff), torch.tensor(user_idx), 40, basis.shape[0], 0.0)(a).backward()
    np.testing.assert_allclose(grads.mean(axis=0), a.grad.numpy(), atol=1e-10)


def test_marginal_client_update_is_one_step_and_keeps_the_stored_weights():
    from federation.user_block import UserBlock

    diff, user_idx, basis = _thin_users(seed=1, users=10)
    empty = RowGroup(diff=np.zeros((0, diff.shape[1])), user_idx=np.zeros(0, int), logit_true=None)
    block = UserBlock(seen_users=np.arange(10), unseen_users=np.zeros(0, int),
                      seen_train=RowGroup(diff=diff, user_idx=user_idx, logit_true=None), seen_test=empty,
                      unseen_train=empty, unseen_test=empty)
    weights = np.full((10, 3), 1 / 3)
    sampled = np.array([2, 5, 9])
    new_weights, updates = train_sampled_users(basis, block, weights, sampled, prior_pairs=3.0, steps=5, lr=0.5,
                                               objective="marginal")
    np.testing.assert_array_equal(new_weights, weights)
    for k, user in enumerate(sampled):
        mine = user_idx == user
        expected = -0.5 * marginal_user_gradients(basis, diff[mine], np.zeros(int(mine.sum()), int), 1)[0]
        np.testing.assert_allclose(updates[k], expected, atol=1e-12)
    with pytest.raises(ValueError, match="objective"):
        train_sampled_users(basis, block, weights, sampled, prior_pairs=3.0, steps=5, lr=0.5, objective="em")


def test_selection_offers_both_objectives_and_reports_the_choice(tmp_path):
    pairs, _ = make_synthetic_pairs(SyntheticPairsConfig(dim=16, true_rank=2, seen_users=60, unseen_users=10,
                                                         train_pairs=(6, 12), seed=5))
    save_pairs(pairs, tmp_path / "pairs.npz")
    assert main(["train", str(tmp_path), "--rank-grid", "1,2", "--l2", "1e-3", "--prior-pairs", "3",
                 "--out", str(tmp_path / "run")]) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    objectives = {(row["rank"], row["objective"]) for row in metrics["selection"]}
    assert objectives == {(1, "joint"), (2, "joint"), (2, "marginal")}
    chosen = [row for row in metrics["selection"] if row["chosen"]]
    assert len(chosen) == 1 and metrics["objective"] == (chosen[0]["objective"] if metrics["rank"] > 1 else "joint")
    train = pairs.select(seen=True, split="train")
    only_joint = train_joint(train.diff, train.user, TrainConfig(rank_grid=(1, 2), l2=1e-3, prior_pairs=3.0,
                                                                 objective="joint"))
    assert {row["objective"] for row in only_joint.selection} == {"joint"}
    marginal = train_joint(train.diff, train.user, TrainConfig(rank=2, l2=1e-3, prior_pairs=3.0,
                                                               objective="marginal"))
    joint = train_joint(train.diff, train.user, TrainConfig(rank=2, l2=1e-3, prior_pairs=3.0, objective="joint"))
    assert marginal.objective == "marginal" and not np.allclose(marginal.basis, joint.basis)


def test_marginal_candidates_run_only_next_to_the_best_joint_l2():
    """With both objectives, the joint fits walk the l2 grid and the marginal fits run at each rank's best joint
    l2 and its neighbours on the walk; asked for alone, the marginal fit walks the grid itself."""
    pairs, _ = make_synthetic_pairs(SyntheticPairsConfig(dim=16, true_rank=2, seen_users=60, unseen_users=10,
                                                         train_pairs=(6, 12), seed=5))
    train = pairs.select(seen=True, split="train")
    grid = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
    fit = train_joint(train.diff, train.user, TrainConfig(rank_grid=(1, 2), l2_grid=grid, prior_pairs=3.0))
    rows = [row for row in fit.selection if row["rank"] == 2]
    walked = sorted({row["l2"] for row in rows if row["objective"] == "joint"}, reverse=True)
    best = max((row for row in rows if row["objective"] == "joint"), key=lambda r: r["seen_acc"] + r["new_acc"])
    at = walked.index(best["l2"])
    expected = set(walked[max(at - 1, 0):at + 2])
    assert len(expected) < len(walked)  # some walked l2s get no marginal fit
    assert {row["l2"] for row in rows if row["objective"] == "marginal"} == expected
    only = train_joint(train.diff, train.user, TrainConfig(rank_grid=(1, 2), l2_grid=grid, prior_pairs=3.0,
                                                           objective="marginal"))
    by_rank = {rank: {row["objective"] for row in only.selection if row["rank"] == rank} for rank in (1, 2)}
    assert by_rank == {1: {"joint"}, 2: {"marginal"}}  # rank 1 is one shared reward, fitted once


def test_a_warm_started_fit_leaves_its_starting_point_alone():
    """The selection keeps each l2's joint fit for the marginal fits that start from it after the walk moved on."""
    from lore_core.joint_trainer import fit_basis_and_weights

    diff, user_idx, _ = _thin_users()
    first = fit_basis_and_weights(diff, user_idx, 40, rank=3, l2=1e-3, prior_strength=0.1, max_iter=20, seed=0)
    kept = (first[0].copy(), first[1].copy())
    fit_basis_and_weights(diff, user_idx, 40, rank=3, l2=1e-5, prior_strength=0.1, max_iter=20, seed=0, init=first)
    np.testing.assert_array_equal(first[0], kept[0])
    np.testing.assert_array_equal(first[1], kept[1])


def test_a_warm_start_in_any_numpy_layout_fits():
    # compare_basis_methods' moment start is a Fortran-ordered array; L-BFGS views each gradient flat, which failed
    # on a non-contiguous parameter.
    from lore_core.joint_trainer import fit_basis_and_weights

    diff, user_idx, _ = _thin_users()
    first = fit_basis_and_weights(diff, user_idx, 40, rank=3, l2=1e-3, prior_strength=0.1, max_iter=5, seed=0)
    fortran = (np.asfortranarray(first[0]), np.asfortranarray(first[1]))
    basis, weights = fit_basis_and_weights(diff, user_idx, 40, rank=3, l2=1e-3, prior_strength=0.1, max_iter=5,
                                           seed=0, init=fortran)
    assert np.isfinite(basis).all() and np.allclose(weights.sum(axis=1), 1.0, atol=1e-5)


def _server_settings(**overrides) -> ServerSettings:
    cfg = get_fused_config_from_dir(ROOT, {"run-dir": "unused", "privacy-mode": "none", **overrides})
    return ServerSettings.from_run_config(cfg)


def test_marginal_runs_take_one_local_step_and_refuse_dp():
    assert _server_settings(objective="marginal").local_steps == 1
    assert _server_settings(objective="joint").local_steps == 5  # user weighting (the run config's default)
    with pytest.raises(RunConfigError, match="marginal"):
        _server_settings(**{"objective": "marginal", "privacy-mode": "user"})
    with pytest.raises(RunConfigError, match="objective"):
        _server_settings(objective="em")


def test_federated_marginal_run_learns(tmp_path):
    from client.client_app import app as client_app
    from server.server_app import run_federated
    from simulations.in_process_grid import LocalGrid

    pairs, _ = make_synthetic_pairs(SyntheticPairsConfig(dim=24, true_rank=3, seen_users=24, unseen_users=6,
                                                         train_pairs=(20, 30), seed=3))
    path = save_pairs(pairs, tmp_path / "pairs.npz")
    cfg = get_fused_config_from_dir(ROOT, {"pairs-path": str(path), "run-dir": str(tmp_path / "run"), "rank": 3,
                                           "num-server-rounds": 12, "clients-per-round": 8, "eval-every": 1,
                                           "server-lr": 0.1, "privacy-mode": "none", "objective": "marginal"})
    grid = LocalGrid(client_app, [{"partition-id": i, "num-partitions": 4} for i in range(4)], cfg)
    state = run_federated(grid, ServerSettings.from_run_config(cfg))
    evals = [r for r in state.history if "seen_test_acc" in r]
    assert evals[-1]["seen_test_acc"] > evals[0]["seen_test_acc"] + 0.05
    assert evals[-1]["unseen_test_acc"] > evals[0]["unseen_test_acc"] + 0.05


def test_auto_offers_the_marginal_fit_only_to_thin_populations():
    from lore_core.joint_trainer import MARGINAL_MAX_MEDIAN_PAIRS, candidate_objectives

    thin, thick = np.full(50, 12), np.full(50, MARGINAL_MAX_MEDIAN_PAIRS + 50)
    assert candidate_objectives("auto", thin) == ("joint", "marginal")
    assert candidate_objectives("auto", thick) == ("joint",)
    assert candidate_objectives("marginal", thick) == ("marginal",)
    assert candidate_objectives("joint", thin) == ("joint",)


def test_the_client_side_of_the_marginal_update_needs_no_torch():
    """Devices run numpy only: the ClientApp and its training code import neither torch nor the trainer."""
    import subprocess
    import sys

    code = ("import sys, client.client_app, federation.local_training; "
            "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))[:5]")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_a_walk_restarts_cold_after_a_fit_that_lost_rows():
    """A row at zero that no user weighs stays dead in every warm-started fit after it (the matrix's iso-150-250
    seed 1 kept two dead rows of four to its final fit, 10 points under its held-out estimate); the walk restarts
    from the seeded random start instead (fails if warm_start hands the dead fit on)."""
    from lore_core.joint_trainer import fit_basis_and_weights, warm_start

    diff, user_idx, _ = _thin_users()
    alive = fit_basis_and_weights(diff, user_idx, 40, rank=3, l2=1e-5, prior_strength=0.1, max_iter=50, seed=0)
    assert warm_start(*alive) is not None
    basis, weights = alive[0].copy(), alive[1].copy()
    basis[0] = 0.0
    weights[:, 0] = 1e-9
    weights /= weights.sum(axis=1, keepdims=True)
    again = fit_basis_and_weights(diff, user_idx, 40, rank=3, l2=1e-5, prior_strength=0.1, max_iter=50, seed=0,
                                  init=(basis, weights))
    assert np.linalg.norm(again[0][0]) < 0.01 * np.linalg.norm(again[0], axis=1).max()  # absorbing
    assert warm_start(basis, weights) is None and warm_start(*again) is None
    for broken in (0, 1):  # a fit that is not finite restarts too (NaN norms passed the row checks)
        nan = [alive[0].copy(), alive[1].copy()]
        nan[broken][0, 0] = np.nan
        assert warm_start(*nan) is None
