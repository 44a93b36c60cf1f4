"""The LoRe math, the trainers and the few-shot solvers."""

import numpy as np
import pytest
import torch

from lore_core.evaluation import evaluate_model
from lore_core.joint_trainer import TrainConfig, fit_few_shot_torch, train_joint
from lore_core.reward_math import bt_loss, bt_loss_grad, per_user_accuracy, softmax, user_basis_directions
from lore_core.simplex_fit import few_shot_objective, fit_user_weights, prior_from_pairs
from simulations.synthetic_pairs import SyntheticPairsConfig, make_synthetic_pairs

SMALL = SyntheticPairsConfig(dim=32, true_rank=3, seen_users=40, unseen_users=10, train_pairs=(30, 40), seed=1)


@pytest.fixture(scope="module")
def small_pairs():
    return make_synthetic_pairs(SMALL)


def test_bt_loss_is_stable_softplus():
    z = np.array([-800.0, -3.0, 0.0, 2.5, 800.0])
    np.testing.assert_allclose(bt_loss(z), [800.0, 3.0 + np.log1p(np.exp(-3.0)), np.log(2.0), np.log1p(np.exp(-2.5)), 0.0], rtol=1e-12)
    assert np.isfinite(bt_loss(z)).all()
    np.testing.assert_allclose(bt_loss_grad(z), -1.0 / (1.0 + np.exp(np.clip(z, -700, 700))), atol=1e-15)


def test_basis_gradient_matches_autograd():
    rng = np.random.default_rng(0)
    n_users, b, d, n = 4, 3, 6, 30
    basis = rng.standard_normal((b, d))
    weights = softmax(rng.standard_normal((n_users, b)))
    diff = rng.standard_normal((n, d))
    user_idx = rng.integers(0, n_users, n)
    v = user_basis_directions(basis, weights, diff, user_idx, n_users)
    for u in range(n_users):
        A = torch.tensor(basis, requires_grad=True)
        mine = torch.tensor(diff[user_idx == u])
        loss = torch.nn.functional.softplus(-(mine @ A.T) @ torch.tensor(weights[u])).mean()
        loss.backward()
        np.testing.assert_allclose(np.outer(weights[u], v[u]), A.grad.numpy(), atol=1e-10)


def test_accuracy_is_strict_and_per_user():
    logits = np.array([1.0, 0.0, -1.0, 2.0])
    acc = per_user_accuracy(logits, np.array([0, 0, 1, 1]), 2)
    np.testing.assert_allclose(acc, [0.5, 0.5])  # a tie (0.0) counts as an error


def test_simplex_solver_stays_on_simplex_and_matches_torch():
    rng = np.random.default_rng(3)
    n_users, b = 25, 5
    scores = rng.standard_normal((250, b)) * 3
    user_idx = rng.integers(0, n_users, 250)
    fit = fit_user_weights(scores, user_idx, n_users, prior_strength=0.02)
    assert fit.converged
    assert (fit.weights > 0).all()
    np.testing.assert_allclose(fit.weights.sum(1), 1.0, atol=1e-12)
    # Same strictly convex objective solved by L-BFGS on softmax parameters in torch.
    torch_w = fit_few_shot_torch(np.eye(b), scores, user_idx, n_users, prior_strength=0.02, max_iter=500)
    f_np = few_shot_objective(fit.weights, scores, user_idx, 0.02)
    f_torch = few_shot_objective(torch_w, scores, user_idx, 0.02)
    assert np.all(f_np <= f_torch + 1e-7)
    np.testing.assert_allclose(fit.weights, torch_w, atol=2e-3)


def test_simplex_solver_reaches_the_optimum_from_any_start_whatever_the_scale():
    """Found by a tester: the device refits from its last w, and a start at a vertex (or any weight near 1e-12) was
    returned as converged after one step, because the KL term's curvature lam / w_k there made the Newton decrement
    vanish. Choices added one at a time then ended at [0, 1, 0] where all at once gave [0.61, 0.39, 0]. The fit now
    stops on the Frank-Wolfe gap, a bound on the objective's distance to its minimum, as well."""
    scores, user = np.array([[5.0, -3.0, 1.0]]), np.zeros(1, int)
    cold = fit_user_weights(scores, user, 1, prior_strength=1.0)
    for start in ([1.0, 0.0, 0.0], [1 - 1e-12, 5e-13, 5e-13], [0.0, 0.0, 1.0]):
        warm = fit_user_weights(scores, user, 1, prior_strength=1.0, init=np.array([start]))
        assert warm.converged
        np.testing.assert_allclose(warm.weights, cold.weights, atol=1e-8)
    rng = np.random.default_rng(0)
    for _ in range(200):  # one choice at a time, each fit from the last, as the device adapts (scores up to 1000)
        n = int(rng.integers(2, 12))
        scores = rng.normal(size=(n, 3)) * 10 ** rng.uniform(0, 3)
        weights = None
        for j in range(1, n + 1):
            fit = fit_user_weights(scores[:j], np.zeros(j, int), 1, prior_strength=1 / j, init=weights)
            assert fit.converged
            weights = fit.weights
        at_once = fit_user_weights(scores, np.zeros(n, int), 1, prior_strength=1 / n)
        np.testing.assert_allclose(weights, at_once.weights, atol=1e-6)


def test_simplex_solver_rejects_bad_prior():
    with pytest.raises(ValueError, match="prior_strength"):
        fit_user_weights(np.zeros((3, 2)), np.zeros(3, int), 1, prior_strength=0.0)


def test_joint_training_learns_personal_rewards(small_pairs):
    pairs, _ = small_pairs
    train = pairs.select(seen=True, split="train")
    bt = train_joint(train.diff, train.user, TrainConfig(rank=1, l2=1e-3, prior_pairs=3.0))
    lore = train_joint(train.diff, train.user, TrainConfig(rank=3, l2=1e-3, prior_pairs=3.0))
    m_bt = evaluate_model(pairs, bt.basis, joint_weights=(bt.user_ids, bt.user_weights))
    m_lore = evaluate_model(pairs, lore.basis, joint_weights=(lore.user_ids, lore.user_weights))
    assert lore.basis.shape == (3, 32)
    np.testing.assert_allclose(lore.user_weights.sum(1), 1.0, atol=1e-5)
    assert m_lore["seen_test_acc"] > m_bt["seen_test_acc"] + 0.02
    assert m_lore["seen_test_acc_joint_weights"] > m_bt["seen_test_acc_joint_weights"] + 0.02
    assert m_lore["seen_test_acc"] <= m_lore["oracle_seen_test_acc"] + 0.05


def test_rank_auto_reports_every_candidate_and_keeps_the_chosen_one(small_pairs):
    pairs, _ = small_pairs
    train = pairs.select(seen=True, split="train")
    fit = train_joint(train.diff, train.user, TrainConfig(rank="auto", rank_grid=(1, 3), l2=1e-3), group=train.group)
    assert {row["rank"] for row in fit.selection} == {1, 3}
    (chosen,) = [row for row in fit.selection if row["chosen"]]
    assert (fit.rank, fit.prior_pairs) == (chosen["rank"], chosen["prior_pairs"])
    for row in fit.selection:  # each candidate's honest estimate and its standard error
        assert 0 <= row["seen_acc"] <= 1 and 0 <= row["new_acc"] <= 1 and row["seen_se"] > 0 and row["new_se"] > 0
    assert fit.held_out["groups"] == "group array" and fit.held_out["folds"] == 5  # 40 users: 5 folds of 8 new
    assert fit.held_out["new_fold_users"] == 40


def test_training_is_seeded(small_pairs):
    pairs, _ = small_pairs
    train = pairs.select(seen=True, split="train")
    a = train_joint(train.diff, train.user, TrainConfig(rank=2, l2=1e-3, seed=5))
    b = train_joint(train.diff, train.user, TrainConfig(rank=2, l2=1e-3, seed=5))
    np.testing.assert_array_equal(a.basis, b.basis)


def test_config_validation():
    with pytest.raises(ValueError, match="rank"):
        TrainConfig(rank=0)
    with pytest.raises(ValueError, match="include 1"):
        TrainConfig(rank_grid=(2, 3))


def test_evaluation_refuses_a_basis_of_another_dimension(small_pairs):
    pairs, _ = small_pairs
    with pytest.raises(ValueError, match="dimension"):
        evaluate_model(pairs, np.zeros((2, 7)))


def test_per_user_prior_equals_fitting_each_user_alone():
    rng = np.random.default_rng(4)
    scores, user_idx = rng.standard_normal((40, 4)) * 2, np.repeat(np.arange(3), [4, 12, 24])
    lam = prior_from_pairs(user_idx, 3, prior_pairs=3.0)
    np.testing.assert_allclose(lam, [3 / 4, 3 / 12, 3 / 24])
    batched = fit_user_weights(scores, user_idx, 3, prior_strength=lam, tol=1e-12).weights
    for u in range(3):
        mine = user_idx == u
        alone = fit_user_weights(scores[mine], np.zeros(mine.sum(), int), 1, prior_strength=lam[u], tol=1e-12)
        np.testing.assert_allclose(batched[u], alone.weights[0], atol=1e-7)


def test_personal_prior_lets_users_with_more_pairs_move_further_from_the_population():
    """The same choices, repeated: with prior_pairs the evidence outweighs the prior as it grows; with one fixed
    strength (a mean loss) it never does."""
    rng = np.random.default_rng(5)
    scores = rng.standard_normal((6, 4)) + np.array([2.0, 0, 0, 0])
    for repeat in (1, 8):
        many = np.tile(scores, (repeat, 1))
        idx = np.zeros(len(many), int)
        personal = fit_user_weights(many, idx, 1, prior_strength=prior_from_pairs(idx, 1, 3.0)).weights[0]
        fixed = fit_user_weights(many, idx, 1, prior_strength=0.5).weights[0]
        if repeat == 1:
            first_personal, first_fixed = personal, fixed
    assert personal[0] > first_personal[0] + 0.05  # more pairs, further toward the preferred basis reward
    np.testing.assert_allclose(fixed, first_fixed, atol=1e-6)


def test_a_prior_of_more_than_a_million_pairs_is_refused():
    assert prior_from_pairs(np.zeros(2, int), 1, 1e6)[0] == 5e5
    with pytest.raises(ValueError, match="at most 1e"):
        prior_from_pairs(np.zeros(3, int), 1, 1e300)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_invalid_prior_is_refused(bad):
    with pytest.raises(ValueError, match="prior_pairs"):
        prior_from_pairs(np.zeros(3, int), 1, bad)
    with pytest.raises(ValueError, match="prior_strength"):
        fit_user_weights(np.ones((3, 2)), np.zeros(3, int), 1, prior_strength=bad)
    with pytest.raises(ValueError, match="one per user"):
        fit_user_weights(np.ones((3, 2)), np.zeros(3, int), 1, prior_strength=np.ones(2))


def test_true_logits_of_exactly_zero_are_named_when_the_oracle_is_scored(small_pairs):
    """Ties count as errors; a truth with no preference drives the oracle to 0, which is said, not left a puzzle."""
    import dataclasses
    import warnings

    from lore_core.evaluation import reference_metrics

    pairs, _ = small_pairs
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert reference_metrics(pairs)["oracle_seen_test_acc"] > 0.5  # a real truth: no warning
    flat = dataclasses.replace(pairs, logit_true=np.zeros_like(pairs.logit_true))
    with pytest.warns(UserWarning, match="100% of seen users' test pairs have a true logit of exactly 0"):
        assert reference_metrics(flat)["oracle_seen_test_acc"] == 0.0


def test_simplex_solver_judges_convergence_relative_to_the_scale_and_says_why_it_stopped():
    """A reviewer: at scores of 1e4 the gap's rounding exceeded an absolute tolerance, so a fit at its optimum ran to
    the federated client's 20,000-iteration cap; and a fit that stopped because no weight could move said "in
    20000 iterations". Now the tests are relative, and a stall says so."""
    import warnings

    from lore_core.simplex_fit import ConvergenceWarning

    rng = np.random.default_rng(1)
    user = np.repeat(np.arange(20), 15)
    scores = rng.standard_normal((user.size, 4)) * 1e4
    fit = fit_user_weights(scores, user, 20, prior_strength=prior_from_pairs(user, 20, 3.0), tol=1e-11,
                           max_iter=20000)
    assert fit.converged and fit.iterations < 200
    with warnings.catch_warnings(record=True) as caught:  # tol 0 can never be met: the fit stalls and says so
        warnings.simplefilter("always")
        stalled = fit_user_weights(scores[:30], user[:30], 2, prior_strength=1.0, tol=0.0, max_iter=20000)
    assert not stalled.converged and stalled.iterations < 20000
    assert any("stopped after" in str(w.message) and issubclass(w.category, ConvergenceWarning) for w in caught)


def test_evaluation_scores_the_few_shot_fit_of_a_file_without_test_pairs():
    """A tester: a dataset prepared with --train-fraction 1 (no test split) got seen_train_acc but no
    unseen_few_shot_train_acc, although its new users had few-shot pairs."""
    pairs, truth = make_synthetic_pairs(SyntheticPairsConfig(dim=8, true_rank=2, seen_users=6, unseen_users=3,
                                                             seed=5))
    no_test = pairs.subset(pairs.split == "train")
    metrics = evaluate_model(no_test, truth.basis, prior_pairs=3.0)
    assert "unseen_test_acc" not in metrics and "seen_test_acc" not in metrics
    assert 0.0 <= metrics["unseen_few_shot_train_acc"] <= 1.0 and 0.0 <= metrics["seen_train_acc"] <= 1.0
    assert evaluate_model(pairs, truth.basis, prior_pairs=3.0)["unseen_few_shot_train_acc"] == \
        metrics["unseen_few_shot_train_acc"]


def test_expected_accuracy_counts_the_true_probability_not_the_drawn_label(small_pairs):
    """Pilots compare choices on a few hundred test pairs, where the drawn labels decide as much as the model:
    `{seen,unseen}_test_expected_acc` scores each pair with the true probability of the preference the model
    predicts. Flipping the drawn labels of the test pairs (a new draw) moves accuracy, not the expected figure."""
    from dataclasses import replace

    from lore_core.evaluation import expected_accuracy

    logits, truth, user = np.array([2.0, -1.0, 0.0, 3.0]), np.array([0.0, 1.0, 5.0, -2.0]), np.array([7, 7, 7, 9])
    sigmoid = 1 / (1 + np.exp(-np.array([0.0, -1.0, 2.0])))  # user 7: 0.5, sigmoid(-1), a tie counts 0; user 9
    by_user = [(sigmoid[0] + sigmoid[1]) / 3, 1 - sigmoid[2]]
    assert expected_accuracy(logits, truth, user) == pytest.approx(np.mean(by_user))
    pairs, _ = small_pairs
    basis = np.random.default_rng(0).normal(size=(2, pairs.dim))
    metrics = evaluate_model(pairs, basis)
    flip = np.where((pairs.split == "test") & (np.arange(pairs.n) % 2 == 0), -1.0, 1.0)
    flipped = replace(pairs, diff=pairs.diff * flip[:, None], logit_true=pairs.logit_true * flip)
    again = evaluate_model(flipped, basis)
    for group in ("seen", "unseen"):
        assert again[f"{group}_test_expected_acc"] == pytest.approx(metrics[f"{group}_test_expected_acc"])
        assert again[f"{group}_test_acc"] != pytest.approx(metrics[f"{group}_test_acc"])
        assert 0.4 < metrics[f"{group}_test_expected_acc"] < metrics[f"oracle_{group}_test_acc"] + 0.05
    assert "seen_test_expected_acc" not in evaluate_model(replace(pairs, logit_true=None), basis)


def test_streamed_evaluation_combines_blocks_into_the_whole_files_figures(small_pairs, tmp_path, monkeypatch):
    """A population too large to load is evaluated in blocks of whole users; every per-user mean, the expected
    accuracy among them, must come out as `evaluate_model` gives it on the whole file."""
    from lore_core import streamed_training
    from lore_core.pairs import save_pairs

    pairs, _ = small_pairs
    path = save_pairs(pairs, tmp_path / "pairs")
    basis = np.random.default_rng(1).normal(size=(2, pairs.dim))
    monkeypatch.setattr(streamed_training, "EVAL_BLOCK_ROWS", 300)  # several blocks of whole users
    streamed, _ = streamed_training.evaluate_streamed(path, basis, prior_pairs=3.0)
    whole = evaluate_model(pairs, basis, prior_pairs=3.0)
    assert {"seen_test_expected_acc", "unseen_test_expected_acc"} <= set(streamed)
    for key, value in whole.items():
        assert streamed[key] == pytest.approx(value), key
