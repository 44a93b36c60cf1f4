"""Onboarding on the device: w's posterior (exactness, coverage), the next question, the stop rule, cold start and
declared-attribute priors. Small and fast: toy bases, precomputed pair diffs, no encoder."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from client.device import attribute_prior, posterior, questions
from client.device.state import load_state
from client.device.user_posterior import DEVICE_PRIOR_PAIRS
from lore_core.basis_file import load_basis, save_basis
from simulations.posterior_ess import bt_answers, prior_draws

REPO = Path(__file__).resolve().parents[1]


def run_device(state: Path, *args) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "client.device", "--state", str(state), *map(str, args)],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=120)


# --- the posterior ------------------------------------------------------------------------------------------------


def test_sampled_posterior_matches_an_exact_grid_and_the_laplace_is_close():
    rng = np.random.default_rng(0)
    answers = bt_answers(rng, np.array([[0.7, 0.2, 0.1]]), 6, 3)
    # The exact posterior on a fine grid of the 2-simplex (Lebesgue), its mean and one predictive probability.
    a, b = np.meshgrid(np.linspace(0, 1, 801), np.linspace(0, 1, 801))
    keep = a + b <= 1
    grid = np.stack([a[keep], b[keep], 1 - a[keep] - b[keep]], axis=1)
    log_p = posterior.log_density(grid[None], answers, np.log(np.full((1, 3), 1 / 3)), DEVICE_PRIOR_PAIRS)[0]
    p = np.exp(log_p - log_p.max())
    p /= p.sum()
    pair = np.array([[[1.5, -2.0, 0.5]]])
    exact_mean, exact_prob = p @ grid, p @ (1 / (1 + np.exp(-grid @ pair[0, 0])))

    drawn = posterior.posterior(answers, DEVICE_PRIOR_PAIRS, n_samples=4000)
    assert np.abs(drawn.mean()[0] - exact_mean).max() < 0.01
    assert abs(posterior.preference_probability(drawn, pair)[0, 0] - exact_prob) < 0.01
    # The Laplace alone (its Gaussian, unweighted) is an approximation: close, and the weights make it exact.
    fit = posterior.laplace(answers, DEVICE_PRIOR_PAIRS)
    chol = np.linalg.cholesky(fit.cov[0])
    gauss = posterior.to_simplex(fit.mode[:, None] + rng.standard_normal((1, 4000, 2)) @ chol.T)
    assert np.abs(gauss[0].mean(axis=0) - exact_mean).max() < 0.08


def exact_simplex_mean(answers: np.ndarray, prior_mean: np.ndarray, prior_pairs: float, size: int = 801) -> np.ndarray:
    """The exact posterior mean of w (3,) on a fine grid of the 2-simplex (Lebesgue)."""
    a, b = np.meshgrid(np.linspace(0, 1, size), np.linspace(0, 1, size))
    keep = a + b <= 1
    grid = np.stack([a[keep], b[keep], 1 - a[keep] - b[keep]], axis=1)
    log_p = posterior.log_density(grid[None], answers, np.log(prior_mean), prior_pairs)[0]
    p = np.exp(log_p - log_p.max())
    return (p / p.sum()) @ grid


def test_a_posterior_of_nearly_hard_constraints_matches_an_exact_grid():
    # Basis scores of 1e6: each answer is a half-plane, the posterior the prior cut to a polygon, far from both of
    # the mixture's families. The mixture alone kept 5 effective samples and missed the mean by 0.047; tempering
    # takes over below 10 % of the samples.
    rng = np.random.default_rng(2)
    answers = bt_answers(rng, np.array([[0.6, 0.3, 0.1]]), 30, 3, 1e6)
    exact = exact_simplex_mean(answers, np.full((1, 3), 1 / 3), DEVICE_PRIOR_PAIRS, size=1201)
    drawn = posterior.posterior(answers, DEVICE_PRIOR_PAIRS)
    assert np.abs(drawn.mean()[0] - exact).max() < 0.01
    assert drawn.effective_size[0] > 100


def test_tempered_posterior_is_unbiased_near_a_face_of_the_simplex():
    # A reviewer's case: a group prior and 200 near-hard answers put w_1 at 0.012 +- 0.007. With 20 moves at
    # beta = 1, the reviewer's 30 replicate users' posterior means were biased by 0.00056 in w_1 (5.6 SE): the
    # particles lagged the tail toward w_1 = 0. Moves now go on until the median particle has moved 20 times.
    rng = np.random.default_rng(7)
    answers = bt_answers(rng, np.array([[0.001, 0.499, 0.5]]), 200, 3, 1e6)
    group = np.array([[0.6, 0.3, 0.1]])
    a, b = np.meshgrid(np.linspace(0.0, 0.1, 801), np.linspace(0.42, 0.56, 801))  # the posterior's +- 12 sd
    grid = np.stack([a.ravel(), b.ravel(), 1 - a.ravel() - b.ravel()], axis=1)
    log_p = posterior.log_density(grid[None], answers, np.log(group), 6.0)[0]
    p = np.exp(log_p - log_p.max())
    exact = (p / p.sum()) @ grid
    replicates = 16
    drawn = posterior.posterior(np.repeat(answers, replicates, axis=0), 6.0, np.repeat(group, replicates, axis=0),
                                temper_below=1.1, rng=np.random.default_rng(1))
    assert abs((drawn.mean()[:, 0] - exact[0]).mean()) < 0.00025


def test_90_percent_regions_hold_where_answers_are_nearly_hard_constraints():
    # Scores of 1e3 at B = 4: the mixture alone covered the true w of 0.73 of users drawn from the prior.
    rng = np.random.default_rng(2)
    truth = prior_draws(rng, 100, 4, DEVICE_PRIOR_PAIRS)
    answers = bt_answers(rng, truth, 30, 4, 1e3)
    drawn = posterior.posterior(answers, DEVICE_PRIOR_PAIRS)
    assert 0.82 <= posterior.in_credible_region(drawn, truth, answers, DEVICE_PRIOR_PAIRS).mean() <= 0.97


def test_laplace_survives_weights_that_underflow():
    # Scores of 1e6 push a coordinate of the mode to w_k = 0 in floating point: the prior's 1/w in the Hessian
    # overflowed and eigh failed ("Eigenvalues did not converge").
    rng = np.random.default_rng(0)
    answers = bt_answers(rng, rng.dirichlet(np.ones(4), size=1), 30, 4, 1e6)
    fit = posterior.laplace(answers, DEVICE_PRIOR_PAIRS)
    assert np.isfinite(fit.mode).all() and np.isfinite(fit.cov).all()


def test_posterior_of_near_hard_constraints_at_larger_bases_does_not_fail():
    # A reviewer's reproducer: scores of 1e6 at B = 8 gave the Laplace a covariance with eigenvalues 1e8 and -6e-10
    # ("Matrix is not positive definite" in its Cholesky); 9 of 24 such users failed at B >= 8.
    for seed, n_basis in ((101, 8), (0, 16)):
        rng = np.random.default_rng(seed)
        answers = bt_answers(rng, rng.dirichlet(np.ones(n_basis), size=1), 30, n_basis, 1e6)
        drawn = posterior.posterior(answers, DEVICE_PRIOR_PAIRS)
        assert np.isfinite(drawn.w).all() and np.isclose(drawn.probability.sum(), 1.0)


def test_tempering_out_of_steps_shows_its_collapsed_weights(monkeypatch):
    # When the steps run out, the last one jumps to beta = 1. Resampling and moving there turned one surviving
    # particle into 512 distinct ones, and the effective size said 512: now its weights are returned as they are.
    from client.device import tempering

    monkeypatch.setattr(tempering, "MAX_STEPS", 1)
    rng = np.random.default_rng(2)
    answers = bt_answers(rng, np.array([[0.6, 0.3, 0.1]]), 30, 3, 1e6)
    assert posterior.posterior(answers, DEVICE_PRIOR_PAIRS).effective_size[0] < 20


def test_a_user_out_of_tempering_steps_leaves_the_others_of_the_call_alone(monkeypatch):
    # A reviewer's finding: the user who ran out of steps ended tempering for the whole call, and the users already
    # at the posterior missed their final moves (in batched calls: the benchmarks, never a device).
    from client.device import tempering

    monkeypatch.setattr(tempering, "MAX_STEPS", 2)
    real_metropolis, final_moves = tempering._metropolis, []

    def recording(eta, log_start, log_p, beta, moves, *rest):
        final_moves.append(np.where(beta >= 1.0, moves, 0))
        return real_metropolis(eta, log_start, log_p, beta, moves, *rest)

    monkeypatch.setattr(tempering, "_metropolis", recording)
    rng = np.random.default_rng(2)
    hard = bt_answers(rng, np.array([[0.6, 0.3, 0.1]]), 30, 3, 1e6)
    easy = bt_answers(rng, np.array([[0.6, 0.3, 0.1]]), 30, 3, 0.05)  # weak answers: near the prior
    drawn = posterior.posterior(np.concatenate([hard, easy]), DEVICE_PRIOR_PAIRS, temper_below=1.1)
    assert drawn.effective_size[0] < 50  # the hard user ran out of steps (tempered to the end: 512)
    assert sum(m[1] for m in final_moves) >= tempering.FINAL_ACCEPTED  # the easy one was moved to the end


def test_systematic_resampling_never_picks_a_particle_of_weight_zero():
    from client.device import tempering

    class Zero:  # the resampling's random offset at its lowest, 0
        def random(self, shape):
            return np.zeros(shape)

    probability = np.array([[0.0, 0.0, 0.5, 0.5], [0.0, 1.0, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25]])
    index = tempering._systematic_resample(probability, Zero())
    assert index.tolist() == [[2, 2, 3, 3], [1, 1, 1, 1], [0, 1, 2, 3]]


def test_sampled_posterior_is_exact_under_a_declared_group_prior():
    # A strong prior toward a group mean m (c = 6 pairs): the first proposal's Dirichlet(1 + c m) and the refitted
    # components all enter the weights; a wrong mixture density would bias the mean.
    rng = np.random.default_rng(7)
    answers = bt_answers(rng, np.array([[0.1, 0.2, 0.7]]), 4, 3)
    group_mean = np.array([[0.6, 0.3, 0.1]])
    a, b = np.meshgrid(np.linspace(0, 1, 801), np.linspace(0, 1, 801))
    keep = a + b <= 1
    grid = np.stack([a[keep], b[keep], 1 - a[keep] - b[keep]], axis=1)
    log_p = posterior.log_density(grid[None], answers, np.log(group_mean), 6.0)[0]
    p = np.exp(log_p - log_p.max())
    exact_mean = (p / p.sum()) @ grid
    drawn = posterior.posterior(answers, 6.0, group_mean, n_samples=4000)
    assert np.abs(drawn.mean()[0] - exact_mean).max() < 0.01


@pytest.mark.parametrize("n_basis", [16, 40])
def test_most_posterior_samples_count_at_a_large_basis(n_basis):
    # The Laplace alone is too narrow in every direction of the chart: at B = 16 it kept about 110 of 512 samples
    # after 5 answers, at B = 40 about 26 (bench_results/posterior_ess.md).
    rng = np.random.default_rng(8)
    truth = rng.dirichlet(np.full(n_basis, 0.5), size=10)
    drawn = posterior.posterior(bt_answers(rng, truth, 5, n_basis), DEVICE_PRIOR_PAIRS)
    assert np.median(drawn.effective_size) > 0.35 * posterior.DEFAULT_SAMPLES


def test_90_percent_regions_cover_the_true_w_of_users_drawn_from_the_prior():
    rng = np.random.default_rng(1)
    truth = prior_draws(rng, 400, 3, DEVICE_PRIOR_PAIRS)
    answers = bt_answers(rng, truth, 8, 3)
    drawn = posterior.posterior(answers, DEVICE_PRIOR_PAIRS, n_samples=1000)
    covered = posterior.in_credible_region(drawn, truth, answers, DEVICE_PRIOR_PAIRS).mean()
    assert 0.85 <= covered <= 0.95, covered
    # A region of the wrong size is caught by the same check.
    narrow = posterior.in_credible_region(drawn, truth, answers, DEVICE_PRIOR_PAIRS, level=0.5).mean()
    assert narrow < 0.6


def test_calibrated_probabilities_are_less_sure_than_the_point_estimate_with_few_answers():
    rng = np.random.default_rng(2)
    answers = bt_answers(rng, np.array([[0.5, 0.3, 0.2, 0.0]]), 2, 4)
    pair = np.array([[[4.0, -4.0, 1.0, 0.0]]])
    drawn = posterior.posterior(answers, DEVICE_PRIOR_PAIRS)
    integrated = posterior.preference_probability(drawn, pair)[0, 0]
    point = 1 / (1 + np.exp(-drawn.mean()[0] @ pair[0, 0]))
    assert abs(integrated - 0.5) < abs(point - 0.5)


def test_spread_shrinks_as_answers_come_in():
    rng = np.random.default_rng(6)
    before = posterior.spread(posterior.posterior(np.zeros((1, 0, 4)), DEVICE_PRIOR_PAIRS))
    answers = bt_answers(rng, np.array([[0.6, 0.2, 0.1, 0.1]]), 200, 4)
    after = posterior.spread(posterior.posterior(answers, DEVICE_PRIOR_PAIRS))
    assert 0.2 < before[0] and after[0] < 0.5 * before[0]


# --- next question and stop rule --------------------------------------------------------------------------------


def test_expected_information_prefers_informative_pairs():
    rng = np.random.default_rng(3)
    drawn = posterior.posterior(bt_answers(rng, np.array([[0.4, 0.3, 0.3]]), 3, 3), DEVICE_PRIOR_PAIRS)
    pool = np.array([[[0.0, 0.0, 0.0],      # no difference between the responses: nothing to learn
                      [30.0, 30.0, 30.0],   # every w agrees on the answer
                      [3.0, -3.0, 0.0]]])   # the answer depends on w
    gain = questions.expected_information(drawn, pool)[0]
    assert gain[2] > 0.1 and gain[0] < 1e-9 and gain[1] < 1e-6
    index, bits = questions.choose_next(drawn, pool, np.ones((1, 3), bool))
    assert index[0] == 2 and bits[0] == pytest.approx(gain[2])


def test_a_batch_maximises_joint_information_without_repeating_itself():
    rng = np.random.default_rng(4)
    drawn = posterior.posterior(bt_answers(rng, np.array([[0.4, 0.3, 0.3]]), 2, 3), DEVICE_PRIOR_PAIRS)
    # Near-deterministic answers given w: the twin of a pair repeats its answer and teaches nothing new.
    informative = np.array([30.0, -30.0, 0.0])
    pool = np.stack([informative, informative, np.array([0.0, 30.0, -30.0])])[None]
    picked, joint = questions.choose_batch(drawn, pool, np.ones(3, bool), 2)
    assert sorted(picked.tolist()) in ([0, 2], [1, 2])
    p = questions.answer_probabilities(drawn, pool)[0][:, picked]  # brute-force joint information of the pair
    outcomes = [(y1, y2) for y1 in (0, 1) for y2 in (0, 1)]
    marginal = [drawn.probability[0] @ (np.where(y1, p[:, 0], 1 - p[:, 0]) * np.where(y2, p[:, 1], 1 - p[:, 1]))
                for y1, y2 in outcomes]
    conditional = drawn.probability[0] @ questions._entropy_bits(p).sum(axis=1)
    assert joint[-1] == pytest.approx(-sum(m * np.log2(m) for m in marginal) - conditional, abs=1e-9)


def test_stop_rule_fires_when_no_pair_teaches_enough_or_none_is_left():
    assert questions.should_stop(questions.STOP_BITS / 2, 10)
    assert questions.should_stop(0.9, 0)
    assert not questions.should_stop(2 * questions.STOP_BITS, 10)


# --- the device commands -----------------------------------------------------------------------------------------


@pytest.fixture()
def toy_device(tmp_path):
    """A device state with a rank-4 basis over 16-d embeddings, a 200-pair .npz pool and a hidden user."""
    rng = np.random.default_rng(5)
    basis = save_basis(tmp_path / "basis.npz", rng.standard_normal((4, 16)), version=1, embedder="toy")
    pool = rng.standard_normal((200, 16))
    pool[:20] = 0.0  # twenty pairs whose responses do not differ
    np.savez(tmp_path / "pool.npz", diff=pool)
    state = tmp_path / "state"
    assert run_device(state, "init", "--basis", basis).returncode == 0
    return state, tmp_path, pool, load_basis(basis).basis.astype(np.float64)


def test_cold_start_status_says_population_reward(toy_device):
    state, *_ = toy_device
    status = json.loads(run_device(state, "status").stdout)
    assert status["answers"] == 0 and "population reward" in status["personalization"]
    assert status["user_weights"] == [0.25] * 4 and status["spread"] > 0.2


def test_next_question_respects_k_skips_answered_pairs_and_adapt_updates_the_posterior(toy_device):
    state, tmp, pool, basis = toy_device
    out = json.loads(run_device(state, "next-question", "--candidates", tmp / "pool.npz", "--k", "3").stdout)
    picked = [q["index"] for q in out["questions"]]
    assert len(set(picked)) == 3 and min(picked) >= 20 and not out["stop"]
    w_user = np.array([0.85, 0.05, 0.05, 0.05])
    answer = pool[picked[:1]] * np.sign(pool[picked[:1]] @ basis.T @ w_user)[:, None]
    np.savez(tmp / "answer.npz", diff=answer)
    before = json.loads(run_device(state, "status").stdout)["spread"]
    assert run_device(state, "adapt", "--choices", tmp / "answer.npz").returncode == 0
    saved = load_state(state)
    assert saved.posterior_mode.shape == (3,) and saved.posterior_cov.shape == (3, 3)
    status = json.loads(run_device(state, "status").stdout)
    assert status["answers"] == 1 and "personal" in status["personalization"]
    assert status["spread"] != before
    again = json.loads(run_device(state, "next-question", "--candidates", tmp / "pool.npz").stdout)
    # 200 - 1 answered - 20 zero rows, which are never asked (`adapt` refuses them)
    assert again["unanswered"] == 179 and again["questions"][0]["index"] != picked[0]


def test_next_question_never_prints_negative_information(toy_device, monkeypatch, capsys):
    # A hostile-input test saw "information_bits": -0.0: a sampled estimate of nothing to learn is -1e-17.
    from client.device import device_cli

    state, tmp, *_ = toy_device
    monkeypatch.setattr(questions, "choose_batch", lambda *a: (np.array([0, 1]), np.array([-1e-17, -2e-17])))
    assert device_cli.main(["--state", str(state), "next-question", "--candidates", str(tmp / "pool.npz"),
                            "--k", "2"]) == 0
    out = capsys.readouterr().out
    assert "-0.0" not in out and [q["information_bits"] for q in json.loads(out)["questions"]] == [0.0, 0.0]


def test_status_on_a_basis_of_near_hard_constraints_tempers_and_says_when_samples_are_thin(tmp_path):
    # A hostile-input test: a basis scaled to 1e6 left 3 effective samples after 30 answers, and `status` printed
    # point intervals without a word. The device now tempers there; where even that leaves a handful (shown here
    # by turning tempering off in the real path), every command that reads the posterior says so.
    rng = np.random.default_rng(5)
    raw = rng.standard_normal((5, 16))
    basis = save_basis(tmp_path / "basis.npz", raw / np.abs(raw).max() * 1e6, version=1, embedder="toy")
    state = tmp_path / "state"
    assert run_device(state, "init", "--basis", basis).returncode == 0
    assert "effective samples" not in run_device(state, "status").stderr
    diff = rng.standard_normal((30, 16))
    np.savez(tmp_path / "answers.npz", diff=diff * np.sign(diff @ load_basis(basis).basis.T[:, 0])[:, None])
    assert run_device(state, "adapt", "--choices", tmp_path / "answers.npz").returncode == 0
    proc = run_device(state, "status")
    status = json.loads(proc.stdout)
    assert status["effective_samples"] > 100 and "effective samples" not in proc.stderr
    assert all(high > low for low, high in status["weights_interval_90"])

    untempered = subprocess.run(
        [sys.executable, "-c", "import sys; from client.device import device_cli, posterior; "
         "posterior.TEMPER_BELOW = 0.0; sys.exit(device_cli.main(sys.argv[1:]))", "--state", str(state), "status"],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO, timeout=120)
    size = json.loads(untempered.stdout)["effective_samples"]
    assert size < 20 and f"note: w's posterior rests on {size:.1f} effective samples of 512" in untempered.stderr


def test_next_question_says_stop_when_the_pool_is_used_up(toy_device):
    state, tmp, pool, basis = toy_device
    np.savez(tmp / "small.npz", diff=pool[20:22])
    np.savez(tmp / "both.npz", diff=-pool[20:22])  # answered: the same pairs up to orientation
    run_device(state, "adapt", "--choices", tmp / "both.npz")
    out = json.loads(run_device(state, "next-question", "--candidates", tmp / "small.npz").stdout)
    assert out["stop"] and out["unanswered"] == 0 and out["questions"] == []


def test_next_question_refuses_a_batch_beyond_its_bound(toy_device):
    """A review: --k had no upper bound; 10**30 asked the whole pool, a pass over the pool per pick (163 s on 2,000
    pairs, its information turning to NaN). A batch is at most questions.MAX_BATCH pairs."""
    state, tmp, *_ = toy_device

    def ask(k):
        return run_device(state, "next-question", "--candidates", tmp / "pool.npz", "--k", k)

    for k in (10**9, 10**30):
        proc = ask(k)
        assert proc.returncode == 2 and f"--k must be between 1 and {questions.MAX_BATCH}" in proc.stderr
        assert str(k) in proc.stderr and proc.stdout == "" and "Traceback" not in proc.stderr
    assert ask(questions.MAX_BATCH + 1).returncode == 2
    assert len(json.loads(ask(questions.MAX_BATCH).stdout)["questions"]) == questions.MAX_BATCH


@pytest.mark.parametrize("content", ['{"prompt": "hi", "chosen": "a", "rejected": "b"}', "not json", ""])
def test_bad_pool_file_exits_2_naming_the_file(toy_device, content):
    state, tmp, *_ = toy_device
    bad = tmp / "bad_pool.jsonl"
    bad.write_text(content)
    proc = run_device(state, "next-question", "--candidates", bad)
    assert proc.returncode == 2 and "bad_pool.jsonl" in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stdout == ""
    proc = run_device(state, "next-question", "--candidates", tmp / "missing.npz")
    assert proc.returncode == 2 and "missing.npz" in proc.stderr


def test_declared_attributes_set_the_cold_start_prior_and_forget_removes_them(toy_device):
    state, tmp, *_ = toy_device
    basis = load_state(state).basis
    mean = [0.7, 0.1, 0.1, 0.1]
    table = {"format": attribute_prior.FORMAT, "basis_sha256": basis.sha256, "rank": 4,
             "groups": {"age": {"18-24": {"users": 30, "mean": mean}}}}
    (tmp / "priors.json").write_text(json.dumps(table))
    proc = run_device(state, "declare", "age=18-24", "--priors", tmp / "priors.json")
    assert proc.returncode == 0 and "declared attributes" in proc.stdout
    status = json.loads(run_device(state, "status").stdout)
    assert status["answers"] == 0 and status["user_weights"] == pytest.approx(mean)
    assert status["attributes_declared"] == {"age": "18-24"}
    # A declaration with no row at all (a typo, say) is refused and changes nothing: it exited 0 and dropped the
    # earlier declaration (a tester).
    proc = run_device(state, "declare", "age=65+", "--priors", tmp / "priors.json")
    assert proc.returncode == 2 and "has no prior for age=65+: nothing changed" in proc.stderr
    assert "the earlier declarations stay" in proc.stderr and "priors.json" in proc.stderr
    assert "The table has age: 18-24 (groups smaller than its min_users" in proc.stderr  # a typo shows (a tester)
    assert json.loads(run_device(state, "status").stdout)["attributes_declared"] == {"age": "18-24"}
    proc = run_device(state, "declare", "age=18-24", "region=mars", "--priors", tmp / "priors.json")
    assert "region=mars: ignored; the rest are used" in proc.stderr and "The table has no field region" in proc.stderr
    assert json.loads(run_device(state, "status").stdout)["attributes_declared"] == {"age": "18-24"}  # (a review)
    wrong = {**table, "basis_sha256": "0" * 64}
    (tmp / "wrong.json").write_text(json.dumps(wrong))
    proc = run_device(state, "declare", "age=18-24", "--priors", tmp / "wrong.json")
    assert proc.returncode == 2 and "wrong.json" in proc.stderr
    assert "deleted all personal data" in run_device(state, "forget").stdout
    status = json.loads(run_device(state, "status").stdout)
    assert status["attributes_declared"] == {} and "population reward" in status["personalization"]
    assert "no personal data" in run_device(state, "forget").stdout  # not "deleted" again (a tester)
    manifest = (state / "manifest.json").read_bytes()
    proc = run_device(state, "declare", "--clear")  # it said nothing at all (a tester)
    assert proc.returncode == 0 and "nothing to clear: no attribute is declared" in proc.stderr
    assert (state / "manifest.json").read_bytes() == manifest  # not written again (a tester saw its generation move)


@pytest.mark.parametrize("groups", [[], "age", {"age": [1, 2]}, {"age": {"18-24": None}}, {"age": {"x": "row"}},
                                    {"age": {"x": {"mean": ["a", "b"]}}}, {"age": {"x": {"mean": [[1], [2, 3]]}}}])
def test_a_malformed_prior_table_is_refused_by_name(tmp_path, groups):
    """Found by a hostile-input test: list or string groups or rows gave AttributeError tracebacks, and text means
    an error without the file's name."""
    basis = load_basis(save_basis(tmp_path / "b.npz", np.eye(2, 4), version=1, embedder="toy"))
    table = {"format": attribute_prior.FORMAT, "basis_sha256": basis.sha256, "rank": 2, "groups": groups}
    (tmp_path / "T.json").write_text(json.dumps(table))
    with pytest.raises(attribute_prior.AttributePriorError, match="T.json"):
        attribute_prior.read_table(tmp_path / "T.json", basis)
    (tmp_path / "T.json").write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(attribute_prior.AttributePriorError, match="T.json"):
        attribute_prior.read_table(tmp_path / "T.json", basis)
    for text, found in (("{}", "found keys []"), ("[]", "found a JSON list")):  # not "('groups')" (a tester)
        (tmp_path / "T.json").write_text(text)
        with pytest.raises(attribute_prior.AttributePriorError, match=re.escape(f"['format', 'basis_sha256', 'rank', "
                                                                                f"'groups'], {found}")):
            attribute_prior.read_table(tmp_path / "T.json", basis)


@pytest.mark.parametrize("tiny", [1e-300, 1e-100, 1e-7])
def test_a_prior_table_with_a_vanishing_group_weight_is_refused_by_name(tmp_path, tiny):
    # A hostile-input test: a mean of 1e-300 made `declare` fail with "Eigenvalues did not converge", and 1e-100
    # left the posterior 1.4 effective samples of 512.
    basis = load_basis(save_basis(tmp_path / "b.npz", np.eye(3, 4), version=1, embedder="toy"))
    table = {"format": attribute_prior.FORMAT, "basis_sha256": basis.sha256, "rank": 3,
             "groups": {"g": {"tiny": {"mean": [1 - 2 * tiny, tiny, tiny]}}}}
    (tmp_path / "T.json").write_text(json.dumps(table))
    with pytest.raises(attribute_prior.AttributePriorError, match="T.json.*at least 1e-06"):
        attribute_prior.read_table(tmp_path / "T.json", basis)
    # What a builder writes from such a mean passes.
    table["groups"]["g"]["tiny"]["mean"] = attribute_prior.publishable_mean(np.array([1 - 2 * tiny, tiny, tiny]))
    (tmp_path / "T.json").write_text(json.dumps(table))
    attribute_prior.read_table(tmp_path / "T.json", basis)


def test_several_attributes_combine_as_a_geometric_mean():
    table = {"groups": {"age": {"a": {"mean": [0.8, 0.2]}}, "lang": {"x": {"mean": [0.2, 0.8]}}}}
    mean, missing = attribute_prior.prior_mean(table, {"age": "a", "lang": "x", "gender": "g"})
    assert mean == pytest.approx([0.5, 0.5]) and missing == ["gender=g"]


def test_basis_temperature_refuses_an_unwritable_out_before_the_fit(tmp_path, capsys, monkeypatch):
    """Found by a tester: `--out` naming a directory ran the whole fit, then ended in an IsADirectoryError
    traceback (exit 1); `--prior-pairs nan` read "Eigenvalues did not converge"."""
    from lore_core.pairs import save_pairs
    from simulations.basis_temperature import main
    from simulations.synthetic_pairs import SyntheticPairsConfig, make_synthetic_pairs

    pairs, _ = make_synthetic_pairs(SyntheticPairsConfig(dim=8, true_rank=2, seen_users=6, unseen_users=2,
                                                         train_pairs=(6, 8), few_shot_pairs=3, test_pairs=4, seed=1))
    save_pairs(pairs, tmp_path / "pairs.npz")
    save_basis(tmp_path / "basis.npz", np.random.default_rng(0).standard_normal((2, 8)), version=1, embedder="e")
    (tmp_path / "out").mkdir()
    before = sorted(p.name for p in tmp_path.iterdir())
    code = main([str(tmp_path / "pairs.npz"), "--basis", str(tmp_path / "basis.npz"), "--out", str(tmp_path / "out")])
    assert code == 2 and "--out" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == before and not any((tmp_path / "out").iterdir())
    import simulations.basis_temperature as module

    def denied(*args, **kwargs):  # as on a path os.access calls writable but the kernel refuses (root on /sys)
        raise PermissionError(13, "Permission denied", str(tmp_path / ".cal.npz.x.tmp"))

    monkeypatch.setattr(module, "save_basis", denied)
    code = main([str(tmp_path / "pairs.npz"), "--basis", str(tmp_path / "basis.npz"), "--out",
                 str(tmp_path / "cal.npz")])
    assert code == 2 and "Permission denied" in capsys.readouterr().err  # was a traceback, exit 1
    monkeypatch.undo()
    for bad in ("nan", "inf", "-1", "0"):  # were "Eigenvalues did not converge" and "prior_strength must be ..."
        code = main([str(tmp_path / "pairs.npz"), "--basis", str(tmp_path / "basis.npz"), "--out",
                     str(tmp_path / "cal.npz"), "--prior-pairs", bad])
        assert code == 2 and "--prior-pairs" in capsys.readouterr().err and not (tmp_path / "cal.npz").exists()


def test_basis_temperature_undoes_a_compressed_basis():
    from simulations.basis_temperature import fit_temperature, seen_user_arrays
    from simulations.synthetic_pairs import SyntheticPairsConfig, make_synthetic_pairs

    pairs, truth = make_synthetic_pairs(SyntheticPairsConfig(dim=16, true_rank=3, seen_users=80, unseen_users=0,
                                                             train_pairs=(30, 30), test_pairs=30, seed=3))
    arrays = seen_user_arrays(pairs, 0.5 * truth.basis)  # the true basis with its logits halved
    temperature = fit_temperature(*arrays, DEVICE_PRIOR_PAIRS, iterations=10)
    assert 1.6 < temperature < 2.6, temperature


def test_benchmark_test_pairs_never_repeat_a_pool_pair_of_the_same_user():
    from simulations.onboarding_simulation import _test_repeats_pool

    diff = np.random.default_rng(7).standard_normal((6, 5)).astype(np.float32)
    diff[3], diff[4], diff[5] = -diff[0], diff[1], diff[2]  # a flipped repeat, another user's pair, a repeat
    user, train = np.array([0, 0, 1, 0, 1, 1]), np.array([1, 1, 1, 0, 0, 0], bool)
    assert _test_repeats_pool(diff, user, train).tolist() == [False, False, False, True, False, True]


def test_benchmark_finds_every_repeat_wherever_it_sits_in_a_large_pair_file():
    # Keys from a matrix product missed 1 of 1,384 repeats in the PRISM-shaped population: BLAS sums the last rows of
    # a large matrix in another order, and a copy's key differed in the last bit.
    from simulations.onboarding_simulation import _test_repeats_pool

    rng = np.random.default_rng(0)
    diff = rng.standard_normal((4099, 384)).astype(np.float32)
    user, train = rng.integers(0, 50, diff.shape[0]), np.ones(diff.shape[0], bool)
    repeats = np.unique(np.r_[np.arange(100, diff.shape[0], 7), np.arange(diff.shape[0] - 60, diff.shape[0])])
    for row in repeats:  # each repeats (up to sign) an earlier train row, as the same user
        source = row - 1 - rng.integers(0, 50)
        while not train[source]:
            source -= 1
        diff[row], user[row], train[row] = diff[source] * rng.choice([-1, 1]), user[source], False
    found = _test_repeats_pool(diff, user, train)
    assert found[repeats].all() and not found[train].any()


def test_a_field_declared_twice_is_refused_and_bracketed_text_candidates_are_text(tmp_path):
    """Found by a hostile-input test: `declare age=a age=b` kept the last silently, and a text candidates file
    whose first line starts with "[" was parsed as JSON and refused."""
    from client.device.device_cli import _read_candidates

    with pytest.raises(attribute_prior.AttributePriorError, match="age is declared twice"):
        attribute_prior.parse_declarations(["age=18-24", "age=25-34"])
    (tmp_path / "c.txt").write_text("[1] Save ten percent.\n[2] Spend it.\n")
    assert _read_candidates(tmp_path / "c.txt") == ["[1] Save ten percent.", "[2] Spend it."]
    (tmp_path / "c.json").write_text('["a", "b"]')
    assert _read_candidates(tmp_path / "c.json") == ["a", "b"]


def test_a_text_pool_is_read_as_adapt_reads_choices(tmp_path):
    """Found by a tester: a pool with a byte that is not UTF-8 exited 2 with Python's bare codec message (no file
    named), and a pool saved with a UTF-8 byte-order mark was refused although `adapt` accepts one."""
    from client.device.pool import PoolError, read_pool

    line = b'{"prompt": "q", "responses": ["a", "b"]}\n'
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + line + line.replace(b"q", b"r"))
    assert read_pool(tmp_path / "bom.jsonl", 4).size == 2
    (tmp_path / "bad.jsonl").write_bytes(line + b'{"prompt": "q\xff", "responses": ["a", "b"]}\n')
    with pytest.raises(PoolError, match=r"bad.jsonl line 2: not valid UTF-8"):
        read_pool(tmp_path / "bad.jsonl", 4)
    (tmp_path / "cut.jsonl").write_bytes(line + line[:20])
    with pytest.raises(PoolError, match=r"cut.jsonl line 2: not valid JSON"):
        read_pool(tmp_path / "cut.jsonl", 4)


@pytest.mark.parametrize("pair", [
    r'{"prompt": "q", "responses": ["a", "b"], "id": "caf\udce9"}',
    r'{"history": [{"role": "user", "content": "q", "id": "\ud83d"}], "responses": ["a", "b"]}',
    r'{"prompt": "q", "responses": ["a", "b"], "meta": {"tag\udc00": 1}}'])
def test_a_pool_pair_with_text_that_is_not_unicode_anywhere_is_refused(toy_device, pair):
    """A review: the pool reader accepted a lone surrogate (half an emoji) in a key it did not check, such as an
    app's "id"; next-question prints the pool pair whole, so it reached the output (as a byte that is not UTF-8 where
    stdout escapes surrogates, or as an encoding error naming no file)."""
    state, tmp, *_ = toy_device
    (tmp / "pool.jsonl").write_text(pair + "\n")
    proc = run_device(state, "next-question", "--candidates", tmp / "pool.jsonl")
    assert proc.returncode == 2 and "pool.jsonl: line 1: a key or value is not valid Unicode" in proc.stderr
    assert proc.stdout == "" and "Traceback" not in proc.stderr


@pytest.mark.parametrize("pair, why", [
    ('{"prompt": "q", "responses": ["a", "b"], "index": 7}', r"the keys \['index'\] are next-question's own"),
    ('{"prompt": "q", "responses": ["a", "b"], "information_bits": 1}', r"the keys \['information_bits'\] are"),
    ('{"prompt": "q", "responses": ["a", "b"], "score": NaN}', "a number is NaN or infinite"),
    ('{"prompt": "q", "responses": ["a", "b"], "meta": [Infinity]}', "a number is NaN or infinite")])
def test_a_pool_pair_that_next_question_could_not_print_as_given_is_refused(tmp_path, pair, why):
    """A review: a pool key "index" or "information_bits" replaced the figures next-question computes for the
    question, and NaN or Infinity, which Python's JSON reader accepts, was printed back as JSON that strict parsers
    refuse."""
    from client.device.pool import PoolError, read_pool

    (tmp_path / "pool.jsonl").write_text(pair + "\n")
    with pytest.raises(PoolError, match="pool.jsonl: line 1: " + why):
        read_pool(tmp_path / "pool.jsonl", 4)


def test_a_batch_is_bounded_where_it_is_chosen():
    """A review: the bound on a batch (`next-question --k`) was checked only by the command line."""
    drawn = posterior.posterior(bt_answers(np.random.default_rng(4), np.array([[0.4, 0.3, 0.3]]), 2, 3),
                                DEVICE_PRIOR_PAIRS)
    pool = np.zeros((1, questions.MAX_BATCH + 1, 3))
    for k in (0, questions.MAX_BATCH + 1):
        with pytest.raises(ValueError, match=f"a batch is 1 to {questions.MAX_BATCH} pairs"):
            questions.choose_batch(drawn, pool, np.ones(pool.shape[1], bool), k)
    assert questions.choose_batch(drawn, pool, np.ones(pool.shape[1], bool), questions.MAX_BATCH)[0].size == 32


def test_next_question_and_adapt_agree_on_which_pairs_are_answered(tmp_path):
    """A review found `next-question` asking again a pool pair that `adapt` skips as already learned: a choice
    stored with a bare prompt did not match the same pair written as a one-message history (a possible endless
    onboarding loop). Both now use `personalize.choice_identity`."""
    from client.device.pool import answered, read_pool

    pool = tmp_path / "pool.jsonl"
    pool.write_text("\n".join(json.dumps(r) for r in [
        {"history": [{"role": "user", "content": "Which?", "id": 7}], "responses": ["A", "B"]},
        {"prompt": "Which?", "responses": ["C", "D"]},
        {"prompt": "Other?", "responses": ["B", "A"]}]) + "\n")
    stored = (json.dumps({"prompt": "Which?", "chosen": "B", "rejected": "A"}),  # answered the first, either way
              json.dumps({"history": [{"role": "user", "content": "Which?"}], "chosen": "C", "rejected": "D"}),
              json.dumps({"precomputed": True}))
    assert answered(read_pool(pool, 4), stored, np.zeros((0, 4))).tolist() == [True, True, False]


def test_text_pool_pairs_the_encoder_reads_alike_are_one_question_and_answered_by_their_difference(tmp_path):
    """A tester: pool pairs differing only in case (which the encoder does not see) were asked three times in one
    batch, and one was asked again after the other's answer, which `adapt` then skipped as already learned. A text
    pool is now also matched by its embedded differences, as `adapt` matches choices."""
    from client.device.pool import answered, read_pool, repeated

    pool = tmp_path / "pool.jsonl"
    pool.write_text("\n".join(json.dumps({"prompt": "Dinner?", "responses": [a, "No."]})
                              for a in ("Try a stir-fry.", "try a stir-fry. ", "TRY A STIR-FRY", "Soup.")) + "\n")
    row = np.array([0.5, -1.0, 0.0, 2.0])
    diff = np.stack([row, row, -row, np.array([1.0, 0.0, 0.0, 0.0])])  # as embedded: 1 alike, 2 the other way
    questions_pool = read_pool(pool, 4)
    assert repeated(questions_pool, diff).tolist() == [False, True, True, False]
    assert repeated(questions_pool).tolist() == [False] * 4  # by text alone, four questions
    answers = (json.dumps({"prompt": "Dinner?", "chosen": "Try a stir-fry.", "rejected": "No."}),)
    assert answered(questions_pool, answers, row[None], diff).tolist() == [True, True, True, False]
    assert answered(questions_pool, answers, row[None]).tolist() == [True, False, False, False]


def test_an_npz_pool_is_checked_as_adapt_checks_choices(tmp_path):
    """Found by a hostile-input test: next-question scored pairs of 1e9 (0.764 bits) and whole pair files that
    `adapt` refuses. Zero rows stay valid in a pool: pairs with nothing to learn, which the questions skip."""
    from client.device.pool import PoolError, read_pool

    diff = np.random.default_rng(0).standard_normal((6, 4))
    diff[0] = 0.0
    np.savez(tmp_path / "ok.npz", diff=diff)
    assert read_pool(tmp_path / "ok.npz", 4).size == 6
    np.savez(tmp_path / "huge.npz", diff=diff * 1e9)
    with pytest.raises(PoolError, match="huge.npz: diff has values beyond"):
        read_pool(tmp_path / "huge.npz", 4)
    np.savez(tmp_path / "many.npz", diff=diff, user=np.array(["a", "a", "b", "b", "c", "c"]))
    with pytest.raises(PoolError, match="many.npz: a pair file of 3 users"):
        read_pool(tmp_path / "many.npz", 4)


@pytest.mark.parametrize("seed", range(6))
def test_a_lazy_batch_picks_what_scoring_the_whole_pool_every_time_picks(seed, monkeypatch):
    """The greedy scores pairs in order of their last added information, block by block (`LAZY_BLOCK`); with a
    block as large as the pool it scores every pair at every pick. Both must pick the same pairs, with the same
    bits, while the batch's outcomes are enumerated (8 picks). A reviewer found the first lazy version bounding by
    the batch's whole information, which grows: it scored one block per pick, and 300 copies of one question beside
    a better one took a copy second."""
    rng = np.random.default_rng(seed)
    rank, size = int(rng.integers(2, 7)), int(rng.choice([300, 700, 1500]))
    drawn = posterior.PosteriorSamples(w=rng.dirichlet(np.ones(rank), size=(1, 256)),
                                       probability=np.full((1, 256), 1 / 256))
    pool = rng.normal(0.0, float(rng.choice([0.5, 2.0, 5.0])), (1, size, rank))
    if seed % 2:  # 300 copies of the most informative question: after the first pick they lead every block
        pool[0, :300] = pool[0, questions.expected_information(drawn, pool)[0].argmax()]
    available = rng.random(size) < 0.9
    lazy = questions.choose_batch(drawn, pool, available, 8)
    monkeypatch.setattr(questions, "LAZY_BLOCK", 10**9)
    whole = questions.choose_batch(drawn, pool, available, 8)
    assert lazy[0].tolist() == whole[0].tolist()
    np.testing.assert_allclose(lazy[1], whole[1], atol=1e-9)
