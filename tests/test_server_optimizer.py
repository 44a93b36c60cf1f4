"""The server step: cosine or constant rate over the planned rounds, the tail-averaged reported basis, the
privacy mode's defaults."""

import numpy as np
import pytest

from server.optimizer import AVERAGE_FROM, make_optimizer


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_learning_rate_follows_a_cosine_to_zero_over_the_planned_rounds(name):
    opt = make_optimizer(name, 0.4, total_rounds=8)
    rates = []
    basis = np.zeros((2, 3))
    for _ in range(8):
        rates.append(opt.lr)
        basis = opt.step(basis, np.ones((2, 3)))
    np.testing.assert_allclose(rates[0], 0.4)
    np.testing.assert_allclose(rates[4], 0.2)
    assert rates == sorted(rates, reverse=True) and opt.lr == pytest.approx(0.0)
    assert make_optimizer(name, 0.4).lr == 0.4  # without planned rounds: constant, as before


def test_reported_basis_is_the_mean_of_the_last_quarter_of_released_bases():
    opt = make_optimizer("sgd", 1.0, total_rounds=8)
    rng = np.random.default_rng(0)
    basis, released = np.zeros((2, 3)), []
    for step in range(1, 9):
        basis = opt.step(basis, rng.standard_normal((2, 3)))
        released.append(basis)
        if step <= AVERAGE_FROM * 8:
            assert opt.reported(basis) is basis  # before the tail: the current basis
    np.testing.assert_allclose(opt.reported(basis), np.mean(released[6:], axis=0))
    assert not np.allclose(opt.reported(basis), basis)


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_a_resumed_optimizer_continues_exactly(name):
    rng = np.random.default_rng(1)
    grads = rng.standard_normal((10, 2, 3))
    whole = make_optimizer(name, 0.3, total_rounds=10)
    basis = np.zeros((2, 3))
    for g in grads:
        basis = whole.step(basis, g)
    first = make_optimizer(name, 0.3, total_rounds=10)
    resumed_basis = np.zeros((2, 3))
    for g in grads[:9]:
        resumed_basis = first.step(resumed_basis, g)
    second = make_optimizer(name, 0.3, total_rounds=10)
    second.load_state_dict(first.state_dict())  # what the checkpoint carries
    resumed_basis = second.step(resumed_basis, grads[9])
    np.testing.assert_allclose(resumed_basis, basis)
    np.testing.assert_allclose(second.reported(resumed_basis), whole.reported(basis))


def test_schedule_and_initial_scale_follow_the_privacy_mode_unless_given():
    from pathlib import Path

    from flwr.common.config import get_fused_config_from_dir

    from server.run_settings import RunConfigError, ServerSettings

    root = Path(__file__).resolve().parents[1]

    def settings(**overrides):
        return ServerSettings.from_run_config(get_fused_config_from_dir(root, {"pairs-path": "x", **overrides}))

    private, plain = settings(**{"privacy-mode": "user"}), settings(**{"privacy-mode": "none"})
    assert (private.server_lr_schedule, private.init_scale, private.server_lr) == ("constant", 1.0, 0.05)
    assert (plain.server_lr_schedule, plain.init_scale, plain.server_lr) == ("cosine", 5.0, 1.0)
    given = settings(**{"privacy-mode": "user", "server-lr-schedule": "cosine", "init-scale": 2.0})
    assert (given.server_lr_schedule, given.init_scale) == ("cosine", 2.0)
    assert make_optimizer("sgd", 0.4, 8, "constant").lr == 0.4
    with pytest.raises(RunConfigError, match="server-lr-schedule"):
        settings(**{"server-lr-schedule": "linear"})


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_a_step_that_is_not_finite_leaves_the_optimizer_as_it_was(name):
    """The server skips a non-finite step (training_round.release); the next finite step must be the one an
    optimizer that never saw it takes. Adam's moments kept the inf, so every later step was skipped as well."""
    rng = np.random.default_rng(2)
    grads = rng.standard_normal((6, 2, 3))
    clean, hit = make_optimizer(name, 0.1, total_rounds=6), make_optimizer(name, 0.1, total_rounds=6)
    basis_clean = basis_hit = np.zeros((2, 3))
    for step, grad in enumerate(grads):
        if step == 3:
            bad = grad.copy()
            bad[0, 0] = np.inf
            assert not np.isfinite(hit.step(basis_hit, bad)).all()
        basis_clean, basis_hit = clean.step(basis_clean, grad), hit.step(basis_hit, grad)
    np.testing.assert_array_equal(basis_hit, basis_clean)
    np.testing.assert_array_equal(hit.reported(basis_hit), clean.reported(basis_clean))


def test_an_adam_step_whose_moments_overflow_is_skipped_though_its_basis_is_finite():
    """Found by a review: with grad**2 overflowing, v became inf, the step m / inf moved nothing and the basis stayed
    finite, so the step was taken and every later step moved nothing (--client-lr 1e-160 under DP)."""
    clean, hit = make_optimizer("adam", 0.1, total_rounds=4), make_optimizer("adam", 0.1, total_rounds=4)
    huge = np.full((2, 3), 1e200)  # finite, but its square is not
    assert np.isnan(hit.step(np.zeros((2, 3)), huge)).all()
    grad = np.random.default_rng(3).standard_normal((2, 3))
    np.testing.assert_array_equal(hit.step(np.zeros((2, 3)), grad), clean.step(np.zeros((2, 3)), grad))
