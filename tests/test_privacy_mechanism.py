"""The DP-FedAvg mechanism (clip, noise on the sum, fixed denominator, secret RNG, Poisson sampling) and
record-level DP-SGD with persisted Opacus accounting (docs/privacy.md §2, §5, §11.1)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from scipy import stats

from lore_core.privacy import (
    add_noise_to_sum,
    aggregate_user_dp,
    clip_updates,
    make_private_rng,
    noisy_sum,
    poisson_sample,
)
from lore_core.privacy.accounting import PrivacyBudgetExhausted, history_epsilon
from lore_core.privacy.privacy_settings import PrivacyConfigError, PrivacySettings, validate
from lore_core.privacy.record_dp import RecordDpState, dp_sgd_update, record_epsilon, steps_per_epoch

B, D = 4, 6
DELTA = 1e-5


def updates_with_norms(norms, seed=0):
    rng = np.random.default_rng(seed)
    u = rng.normal(size=(len(norms), B, D))
    return u / np.linalg.norm(u.reshape(len(norms), -1), axis=1)[:, None, None] * np.asarray(norms)[:, None, None]


# -- user-level mechanism --------------------------------------------------------------------------------------------
def test_clip_bounds_every_norm_and_leaves_small_updates_unchanged():
    norms = np.array([0.0, 0.1, 0.99, 1.0, 2.5, 40.0])
    updates = updates_with_norms(norms)
    clipped, measured = clip_updates(updates, clip_norm=1.0)
    assert measured == pytest.approx(norms)
    after = np.linalg.norm(clipped.reshape(len(norms), -1), axis=1)
    assert np.all(after <= 1.0 + 1e-12)
    np.testing.assert_array_equal(clipped[:4], updates[:4])
    np.testing.assert_allclose(clipped[4:], updates[4:] / norms[4:, None, None])  # same direction, norm C


def test_a_finite_but_huge_update_is_clipped_like_any_other():
    """Found by a privacy reviewer: an update of 1e200 (finite) overflowed its squared norm, the clip raised "NaN or
    inf", and one node failed the whole round. Its norm is now computed scaled, and it is clipped to C."""
    updates = updates_with_norms([0.5, 3.0])
    huge = np.concatenate([updates, np.full((1, B, D), 1e200), np.full((1, B, D), -1e-300)])
    clipped, norms = clip_updates(huge, clip_norm=1.0)
    assert np.all(np.isfinite(norms)) and norms[2] == pytest.approx(1e200 * np.sqrt(B * D))
    np.testing.assert_allclose(np.linalg.norm(clipped[2]), 1.0)
    np.testing.assert_array_equal(clipped[3], huge[3])  # a tiny one is left as it is
    edge, _ = clip_updates(np.full((1, B, D), 1.7e308), clip_norm=1.0)  # its norm overflows; its clip must not
    np.testing.assert_allclose(np.linalg.norm(edge[0]), 1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a subnormal update is left as it is, without an overflow warning
        tiny, _ = clip_updates(np.full((1, B, D), 1e-320), clip_norm=1.0)
    np.testing.assert_array_equal(tiny, np.full((1, B, D), 1e-320))
    np.testing.assert_allclose(clipped[:2], clip_updates(updates, clip_norm=1.0)[0])
    with pytest.raises(ValueError, match="NaN or inf"):
        clip_updates(np.concatenate([updates, np.full((1, B, D), np.inf)]), clip_norm=1.0)


def test_aggregate_divides_noisy_sum_by_fixed_q_times_n():
    updates = updates_with_norms([0.5, 3.0, 1.5])
    q, population, z, c = 0.01, 500, 1.0, 1.0
    mean = aggregate_user_dp(updates, z, c, q, population, make_private_rng(11))
    expected_noise = make_private_rng(11).normal(0.0, z * c, size=(B, D))
    clipped, _ = clip_updates(updates, c)
    np.testing.assert_allclose(mean, (clipped.sum(axis=0) + expected_noise) / (q * population))
    # No sampled user: pure noise over the same denominator (not over the actual count 0).
    empty = aggregate_user_dp(np.zeros((0, B, D)), z, c, q, population, make_private_rng(11))
    np.testing.assert_allclose(empty, expected_noise / (q * population))


def test_noise_on_the_sum_has_std_z_times_c():
    z, c, draws = 1.3, 0.25, 400
    rng = make_private_rng(reproducible_seed=2024)  # debug RNG: a fixed, reproducible test
    noise = np.stack([add_noise_to_sum(np.zeros((B, D)), z, c, rng) for _ in range(draws)]).ravel()
    assert stats.kstest(noise, "norm", args=(0.0, z * c)).pvalue > 1e-3
    chi2 = np.sum(noise**2) / (z * c) ** 2  # ~ chi2(n) if the std is z*C
    assert stats.chi2.ppf(1e-4, noise.size) < chi2 < stats.chi2.ppf(1 - 1e-4, noise.size)
    # The same test rejects noise that is a third too small (a real bug would fail it).
    small = np.stack([add_noise_to_sum(np.zeros((B, D)), z / 1.5, c, rng) for _ in range(draws)]).ravel()
    assert np.sum(small**2) / (z * c) ** 2 < stats.chi2.ppf(1e-4, small.size)


def test_noisy_sum_refuses_to_skip_noise():
    with pytest.raises(ValueError, match="noise_multiplier"):
        noisy_sum(np.zeros((2, B, D)), 0.0, 1.0, make_private_rng())


def test_private_rng_is_secret_and_debug_rng_is_flagged():
    np.random.seed(0)
    a = make_private_rng().random(4)
    np.random.seed(0)  # the experiment seed does not reach the private RNG
    b = make_private_rng().random(4)
    assert not np.array_equal(a, b)
    assert not make_private_rng().reproducible
    debug = make_private_rng(reproducible_seed=5)
    assert debug.reproducible and "NOT PRIVATE" in debug.source
    assert np.array_equal(debug.random(3), make_private_rng(reproducible_seed=5).random(3))


def test_poisson_sampling_rate():
    n, q = 20_000, 0.05
    picked = poisson_sample(n, q, make_private_rng(reproducible_seed=3))
    assert np.all(np.diff(picked) > 0) and picked.min() >= 0 and picked.max() < n
    assert stats.binomtest(len(picked), n, q).pvalue > 1e-3
    sizes = [len(poisson_sample(100, 0.3, make_private_rng())) for _ in range(5)]
    assert len(set(sizes)) > 1  # the count varies: no fixed-size sampling


# -- record-level DP-SGD ---------------------------------------------------------------------------------------------
def small_client(n=10, seed=0):
    """basis (B, D), the user's logits (B,) (w = softmax), pair differences (n, D)."""
    rng = np.random.default_rng(seed)
    basis = rng.normal(size=(B, D)).astype(np.float32)
    logits = np.log(rng.dirichlet(np.ones(B)))
    diff = (rng.normal(size=(n, D)) * 2).astype(np.float32)
    return basis, logits, diff


def test_record_epsilon_over_persisted_rounds_equals_one_uninterrupted_run():
    basis, logits, diff = small_client()
    kwargs = dict(noise_multiplier=1.0, max_grad_norm=1.0, batch_size=2, sample_rate=0.2, epochs=1, lr=0.05,
                  delta=DELTA)
    state = RecordDpState()
    for _ in range(10):
        stored = RecordDpState.from_dict(state.to_dict())  # round trip through the Flower/disk form
        delta_basis, logits, state = dp_sgd_update(basis, logits, diff, state=stored, **kwargs)
        basis = basis + delta_basis
    steps_per_round = 5  # int(1 / q)
    assert state.history == [(1.0, 0.2, 10 * steps_per_round)]
    from opacus.accountants import PRVAccountant

    fresh = PRVAccountant()
    fresh.history = [(1.0, 0.2, 10 * steps_per_round)]
    assert record_epsilon(state, DELTA) == pytest.approx(fresh.get_epsilon(DELTA), rel=1e-9)
    # One uninterrupted Opacus run of the same steps reaches the same history.
    _, _, once = dp_sgd_update(basis, logits, diff, state=RecordDpState(), **{**kwargs, "epochs": 10})
    assert once.history == state.history
    assert record_epsilon(state, DELTA) > 2 * history_epsilon([(1.0, 0.2, steps_per_round)], DELTA)


def test_record_update_clips_each_pairs_gradient_over_weights_and_basis_together():
    basis, logits, diff = small_client(n=6, seed=1)
    c, lr, epochs = 0.5, 0.1, 3
    with pytest.warns(RuntimeWarning, match="no amplification"):  # batch = all pairs: every step sees every pair
        delta_basis, new_logits, state = dp_sgd_update(
            basis, logits, diff, noise_multiplier=1e-9, max_grad_norm=c, batch_size=6, sample_rate=1.0, epochs=epochs,
            lr=lr,
            state=RecordDpState(), reproducible_seed=0,
        )
    a, theta, d = basis.astype(np.float64), logits.astype(np.float64), diff.astype(np.float64)
    for _ in range(epochs):  # closed form of one full-batch DP-SGD step over (theta, A)
        w = np.exp(theta - theta.max())
        w /= w.sum()
        scores = d @ a.T  # (n, B): A d_j
        z = scores @ w
        g = -1.0 / (1.0 + np.exp(z))  # d softplus(-z) / dz
        grad_theta = g[:, None] * w * (scores - z[:, None])  # softmax Jacobian applied to A d_j
        norms = np.abs(g) * np.sqrt(np.linalg.norm(w) ** 2 * np.linalg.norm(d, axis=1) ** 2
                                    + np.linalg.norm(w * (scores - z[:, None]), axis=1) ** 2)
        scale = np.minimum(1.0, c / norms)
        assert np.any(scale < 1)  # the clip is exercised
        a = a - lr * np.outer(w, (scale * g) @ d) / len(d)  # divided by the public batch size, here n
        theta = theta - lr * (scale[:, None] * grad_theta).sum(axis=0) / len(d)
    np.testing.assert_allclose(delta_basis, a - basis, atol=2e-6)
    np.testing.assert_allclose(new_logits, theta, atol=2e-6)
    assert state.history == [(1e-9, 1.0, epochs)]


def test_removing_one_pair_moves_the_released_update_by_at_most_the_clip_norm():
    """Noise off, one full-batch step: the released sum of clipped gradients (dA * n / lr) changes by at most the
    clip norm when one pair is removed, because w is inside the private step. The control: a w fitted without
    privacy on the same pairs (the old record mode) moves it by more than the clip norm."""
    from federation.local_training import fit_weights
    from federation.user_block import RowGroup

    basis, logits, diff = small_client(n=20, seed=2)
    c, lr = 0.01, 1.0

    def released_sum(pairs: np.ndarray, start: np.ndarray) -> np.ndarray:
        with pytest.warns(RuntimeWarning, match="no amplification"):
            update, _, _ = dp_sgd_update(basis, start, pairs, noise_multiplier=1e-9, max_grad_norm=c,
                                         batch_size=len(diff), sample_rate=1.0, epochs=1, lr=lr,
                                         state=RecordDpState(), reproducible_seed=0)
        return update.astype(np.float64) * len(diff) / lr  # the public divisor, the same with a pair removed

    def fitted_logits(pairs: np.ndarray) -> np.ndarray:
        rows = RowGroup(diff=pairs.astype(np.float64), user_idx=np.zeros(len(pairs), dtype=np.int64),
                        logit_true=None)
        return np.log(fit_weights(basis.astype(np.float64), rows, 1, 0.02)[0])

    full = released_sum(diff, logits)
    moves = [np.linalg.norm(full - released_sum(np.delete(diff, j, axis=0), logits)) for j in range(len(diff))]
    assert max(moves) <= c * (1 + 1e-4)
    full = released_sum(diff, fitted_logits(diff))
    leaky = [np.linalg.norm(full - released_sum(np.delete(diff, j, 0), fitted_logits(np.delete(diff, j, 0))))
             for j in range(len(diff))]
    assert max(leaky) > 1.1 * c  # the accountant assumes c: a w fitted on the pairs breaks it


@pytest.mark.parametrize("n", [1, 8, 20])
def test_a_record_update_s_noise_and_history_do_not_follow_the_client_s_pair_count(n):
    """A privacy reviewer: Opacus' make_private takes the rate (1 / batches) and the divisor (rate x n) from the
    data, so the update of n pairs and of n - 1 carried noise of other scales (std 1.06-1.17 against 1.43-1.56 at
    n = 20, z = 4: told apart 200 times of 200, an epsilon of 4 certified against a claimed 0.47). Pairs whose
    gradients vanish (d = 0) make the update pure noise: its std must be the public lr z C sqrt(steps) / batch, with
    n pairs and with n - 1, and the accountant history the same; also for a user's only pair (n = 1: a user without
    pairs sent a zero update and no spending; a second reviewer)."""
    batch, q, z, c, lr, dim = 4, 0.25, 4.0, 1.0, 0.1, 2048
    basis, logits = np.zeros((2, dim), np.float32), np.zeros(2)
    expected = lr * z * c * np.sqrt(steps_per_epoch(q)) / batch
    for size in (n, n - 1):
        update, _, state = dp_sgd_update(basis, logits, np.zeros((size, dim), np.float32), noise_multiplier=z,
                                         max_grad_norm=c, batch_size=batch, sample_rate=q, epochs=1, lr=lr,
                                         state=RecordDpState(), reproducible_seed=size)
        assert float(update.std()) == pytest.approx(expected, rel=0.05), size
        assert state.history == [(z, q, steps_per_epoch(q))]


def test_record_mode_checks_delta_and_budget_before_training():
    basis, logits, diff = small_client()
    kwargs = dict(noise_multiplier=1.0, max_grad_norm=1.0, batch_size=2, sample_rate=0.2, epochs=1, lr=0.05,
                  state=RecordDpState())
    with pytest.raises(ValueError, match="delta must be in"):
        dp_sgd_update(basis, logits, diff, delta=1.0, **kwargs)
    # delta >= 1/n is said on the device only: a refusal told a server n_i by bisection on delta (a reviewer)
    with pytest.warns(RuntimeWarning, match="weak guarantee"):
        dp_sgd_update(basis, logits, diff, delta=0.2, **kwargs)
    with pytest.raises(ValueError, match="10,000"):  # a server's tiny rate asked 1e9 steps (a reviewer)
        dp_sgd_update(basis, logits, diff, delta=DELTA, **{**kwargs, "sample_rate": 1e-9})
    with pytest.raises(PrivacyConfigError, match="DP-SGD steps per round"):
        validate(PrivacySettings(mode="record", rounds=5, noise_multiplier=1.0, record_sample_rate=1e-3,
                                 record_epochs=20))
    # a round's cost is public, so a budget below it is refused up front (a tester: every round ran with every user
    # sending a zero update, exit 0); one that one round fits in is taken (one round: 4.216)
    with pytest.raises(PrivacyConfigError, match="costs a client epsilon 4.216.*not even one round fits"):
        validate(PrivacySettings(mode="record", rounds=5, noise_multiplier=1.0, max_epsilon=3.0))
    assert validate(PrivacySettings(mode="record", rounds=5, noise_multiplier=1.0, max_epsilon=5.0)).max_epsilon == 5
    with pytest.raises(PrivacyConfigError, match="at least 1 / 10,000"):
        validate(PrivacySettings(mode="record", rounds=5, noise_multiplier=1.0, record_sample_rate=5e-324))
    with pytest.raises(PrivacyBudgetExhausted):
        dp_sgd_update(basis, logits, diff, delta=DELTA, max_epsilon=0.5, **kwargs)
