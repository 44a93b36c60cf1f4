"""How much each seen user pulls the basis (`--weight-by user|pair`): shares, their effect, and the CLI record."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lore_core.joint_trainer import MarginalObjective, TrainConfig, _Objective, fit_basis_and_weights, user_shares
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
        share = user_shares(torch.bincount(idx, minlength=3).float(), weighting)
        return float(_batch_objective(diff, idx, 3, basis, torch.softmax(theta, 1), config, share))

    equal = np.repeat(np.arange(3), 10)
    assert value(equal, "pair") == pytest.approx(value(equal, "user"), rel=1e-6)
    unequal = np.r_[np.zeros(2, int), np.ones(3, int), np.full(25, 2)]
    assert value(unequal, "pair") != pytest.approx(value(unequal, "user"), rel=1e-3)
    if objective == "joint":  # every pair once: the mean of the per-pair losses
        w = torch.softmax(theta, 1)[torch.as_tensor(unequal)]
        per_pair = torch.nn.functional.softplus(-((diff @ basis.T) * w).sum(1))
        assert value(unequal, "pair") == pytest.approx(float(per_pair.mean()), rel=1e-5)


def test_a_users_share_scales_its_prior_with_its_loss_so_its_w_given_the_basis_is_unchanged():
    """Each user's terms (loss and prior) times its share: the gradient in that user's w is its share times the one
    of equal weights, so the w a user fits given the basis is the same under both weightings."""
    rng = np.random.default_rng(2)
    diff = torch.tensor(rng.normal(size=(40, 6)), dtype=torch.float32)
    user_idx = torch.as_tensor(np.r_[np.zeros(4, int), np.ones(10, int), np.full(26, 2)])
    basis = torch.tensor(rng.normal(size=(3, 6)), dtype=torch.float32)
    prior = torch.tensor([3 / 4, 3 / 10, 3 / 26])  # prior_from_pairs: 3 pairs' worth each
    grads = {}
    for weighting in ("user", "pair"):
        theta = torch.tensor(rng.normal(size=(3, 3)) if not grads else grads["theta"], dtype=torch.float32,
                             requires_grad=True)
        _Objective(diff, user_idx, 3, prior, 0.0, weighting)(basis, theta).backward()
        grads.setdefault("theta", theta.detach().numpy())
        grads[weighting] = theta.grad.numpy()
    share = user_shares(torch.tensor([4.0, 10.0, 26.0]), "pair").numpy()
    np.testing.assert_allclose(grads["pair"], grads["user"] * share[:, None], rtol=1e-4, atol=1e-7)


def test_minibatches_of_unequal_data_add_up_to_the_mean_over_all_pairs():
    """Shares come from the whole population, not the batch: batches of thin and of thick users, each weighed by its
    users, add up to the mean loss over every pair (a reviewer found batch-normalised shares weigh batches equally)."""
    rng = np.random.default_rng(3)
    counts = np.r_[np.full(3, 2), np.full(3, 100)]
    idx = np.repeat(np.arange(6), counts)
    diff = torch.tensor(rng.normal(size=(idx.size, 4)), dtype=torch.float32)
    basis = torch.tensor(rng.normal(size=(2, 4)), dtype=torch.float32)
    w = torch.softmax(torch.tensor(rng.normal(size=(6, 2)), dtype=torch.float32), 1)
    share = user_shares(torch.tensor(counts, dtype=torch.float32), "pair")
    config = MinibatchConfig(rank=2, l2=0.0, prior_pairs=0.0, weight_by="pair")
    total = 0.0
    for users in (np.arange(3), np.arange(3, 6)):  # a batch of thin users, then one of thick users
        rows = np.isin(idx, users)
        owner = torch.as_tensor(np.searchsorted(users, idx[rows]))
        total += 3 * float(_batch_objective(diff[rows], owner, 3, basis, w[users], config, share[users]))
    per_pair = torch.nn.functional.softplus(-((diff @ basis.T) * w[torch.as_tensor(idx)]).sum(1))
    assert total / 6 == pytest.approx(float(per_pair.mean()), rel=1e-5)


def test_train_weighs_by_pair_by_default_records_it_and_refuses_an_unknown_weighting(tmp_path, capsys):
    pairs, _ = make_synthetic_pairs(SyntheticPairsConfig(dim=16, seen_users=20, unseen_users=4, seed=2))
    save_pairs(pairs, tmp_path / "pairs.npz")
    assert TrainConfig().weight_by == MinibatchConfig(rank=1, l2=0.0).weight_by == "pair"  # the library's too
    for flags, recorded in (([], "pair"), (["--weight-by", "user"], "user")):
        run = tmp_path / f"run-{recorded}"
        assert main(["train", str(tmp_path / "pairs.npz"), "--rank", "2", "--l2", "1e-3", "--prior-pairs", "3",
                     *flags, "--out", str(run)]) == 0
        assert json.loads((run / "metrics.json").read_text())["weight_by"] == recorded
    with pytest.raises(SystemExit) as exc:
        main(["train", str(tmp_path / "pairs.npz"), "--weight-by", "pairs", "--out", str(tmp_path / "other")])
    assert exc.value.code == 2 and "--weight-by" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()


# --- the federated update: `simulate --weight-by pair` (privacy none) ------------------------------------------------
def _first_round_updates(pair_file, run_dir, **overrides) -> dict:
    """One round of the real ServerApp and ClientApp in-process on 2 nodes, every user sampled: {(node id, local
    user index): its update}."""
    from flwr.common.config import get_fused_config_from_dir

    from client.client_app import app as client_app
    from federation import protocol as p
    from server.run_settings import ServerSettings
    from server.server_app import run_federated
    from simulations.flower_run import ROOT
    from simulations.in_process_grid import LocalGrid

    cfg = get_fused_config_from_dir(ROOT, {"pairs-path": str(pair_file), "run-dir": str(run_dir), "rank": 2,
                                           "num-server-rounds": 1, "clients-per-round": 12, "privacy-mode": "none",
                                           "eval-every": 0, **overrides})
    grid = LocalGrid(client_app, [{"partition-id": i, "num-partitions": 2} for i in range(2)], cfg)
    run_federated(grid, ServerSettings.from_run_config(cfg))
    updates = {}
    for sent, reply in zip(grid.sent, grid.replies):  # LocalGrid answers each message as it sends it
        if sent.metadata.message_type != "train":
            continue
        local = list(sent.content[p.CONFIG][p.USER_INDICES])
        for k, user in enumerate(local):
            updates[(sent.metadata.dst_node_id, int(user))] = reply.content[p.ARRAYS][p.UPDATES].numpy()[k]
    return updates


def test_a_pair_weighted_client_scales_each_users_update_by_its_pairs(tmp_path):
    """The same round with weight-by user and pair: every user's update differs by n_u / pairs-per-user exactly,
    so the server's plain mean counts every pair once (fails if the clients ignore weight-by)."""
    from federation.user_block import load_partition_users

    pairs, _ = make_synthetic_pairs(SyntheticPairsConfig(dim=8, seen_users=12, unseen_users=2, train_pairs=(3, 30),
                                                         seed=4))
    path = save_pairs(pairs, tmp_path / "pairs.npz")
    equal = _first_round_updates(path, tmp_path / "user", **{"local-steps": 1})  # pair's default: one step
    weighted = _first_round_updates(path, tmp_path / "pair", **{"weight-by": "pair", "pairs-per-user": 10.0})
    assert equal.keys() == weighted.keys() and len(equal) == 12
    ratios = {key: float(np.linalg.norm(weighted[key]) / np.linalg.norm(equal[key])) for key in equal}
    counts = {}  # node id (LocalGrid: 1000 + 7 * (nodes - partition)) -> training pairs of each of its users
    for partition in range(2):
        node = load_partition_users(str(path), partition, 2)
        rows = node.training_block(np.arange(node.n_train_users)).seen_train.user_idx
        counts[1000 + 7 * (2 - partition)] = np.bincount(rows, minlength=node.n_train_users)
    for (node, user), ratio in ratios.items():
        assert ratio == pytest.approx(counts[node][user] / 10.0, rel=1e-6)
    assert len({round(r, 3) for r in ratios.values()}) > 3  # users of unequal data


def _settings(**overrides):
    from flwr.common.config import get_fused_config_from_dir

    from server.run_settings import ServerSettings
    from simulations.flower_run import ROOT

    return ServerSettings.from_run_config(get_fused_config_from_dir(ROOT, {"run-dir": "x", **overrides}))


@pytest.mark.parametrize("mode", ["user", "user+secagg", "record"])
def test_pair_weighting_is_refused_under_every_dp_mode(mode):
    from server.run_settings import RunConfigError

    with pytest.raises(RunConfigError, match="weight-by"):
        _settings(**{"weight-by": "pair", "pairs-per-user": 10.0, "privacy-mode": mode})
    with pytest.raises(RunConfigError, match="weight-by"):  # the refusal, not a missing pairs-per-user, comes first
        _settings(**{"weight-by": "pair", "privacy-mode": mode})


def test_pair_weighting_needs_pairs_per_user_and_a_known_value():
    from server.run_settings import RunConfigError

    with pytest.raises(ValueError, match="pairs-per-user"):
        _settings(**{"weight-by": "pair", "privacy-mode": "none"})
    for bad in (0.0, 0.5, 1e308, float("nan")):  # below any population's mean (1), or absurdly far above it
        with pytest.raises(ValueError, match="pairs-per-user"):
            _settings(**{"weight-by": "pair", "pairs-per-user": bad, "privacy-mode": "none"})
    with pytest.raises(RunConfigError, match="weight-by"):
        _settings(**{"weight-by": "pairs", "privacy-mode": "none"})
    for mode in ("none", "user"):  # given without pair weighting it would be ignored (a tester): it is refused
        with pytest.raises(RunConfigError, match="pairs-per-user.* is read only with .*weight-by"):
            _settings(**{"weight-by": "user", "pairs-per-user": 10.0, "privacy-mode": mode})


def test_a_resume_keeps_the_weighting_and_checkpoints_from_before_it_resume_as_user():
    """A reviewer: with the key left out of user-weighted fingerprints, a pair-weighted run resumed as user passed."""
    from server.checkpoint import CheckpointError, RunState, check_resumable

    def state(fingerprint):
        return RunState(round=1, basis=np.zeros((2, 2)), settings=fingerprint, population=[3, 2])

    user = _settings(**{"privacy-mode": "none"}).fingerprint()
    pair = _settings(**{"weight-by": "pair", "pairs-per-user": 10.0, "privacy-mode": "none"}).fingerprint()
    before = {k: v for k, v in user.items() if k not in ("weight_by", "pairs_per_user")}  # an older checkpoint
    check_resumable(state(before), user, [3, 2], "run")
    check_resumable(state(pair), pair, [3, 2], "run")
    for stored, today in ((pair, user), (before, pair), (user, pair)):
        with pytest.raises(CheckpointError, match=f"weight-by '{stored.get('weight_by', 'user')}' then, "
                                                  f"'{today['weight_by']}' now") as refused:
            check_resumable(state(stored), today, [3, 2], "run")
        assert "pairs-per-user" not in str(refused.value)  # it follows weight-by (a tester: a value never given)


def test_simulate_weight_by_pair_sets_pairs_per_user_to_the_files_mean(tmp_path):
    import argparse

    from lore_cli.simulate_command import check_run, configure, read_population, run_overrides

    pairs, _ = make_synthetic_pairs(SyntheticPairsConfig(dim=8, seen_users=10, unseen_users=2, train_pairs=(3, 30),
                                                         seed=5))
    path = save_pairs(pairs, tmp_path / "pairs.npz")
    parser = argparse.ArgumentParser()
    configure(parser)
    population = read_population(path)
    seen_train = pairs.seen & (pairs.split == "train")
    for privacy, refused in (("none", False), ("user", True)):
        args = parser.parse_args([str(path), "--out", str(tmp_path / "run"), "--weight-by", "pair",
                                  "--privacy", privacy])
        overrides = run_overrides(args, population["seen_users"], population["seen_train_pairs"])
        assert overrides["weight-by"] == "pair"
        assert overrides["pairs-per-user"] == pytest.approx(seen_train.sum() / 10)
        if refused:
            with pytest.raises(ValueError, match="weight-by"):
                check_run(population, {**overrides, "run-dir": str(tmp_path / "run")})
        else:
            assert check_run(population, {**overrides, "run-dir": str(tmp_path / "run")})[0].weight_by == "pair"


def test_simulate_weighs_by_pair_by_default_without_privacy_and_by_user_under_dp(tmp_path):
    """The default follows `train` where the server allows it: pair (with the file's pairs-per-user) under privacy
    none, user in every DP mode, whose run then passes the server's checks (fails if the default ignores privacy)."""
    import argparse

    from lore_cli.simulate_command import check_run, configure, read_population, run_overrides

    pairs, _ = make_synthetic_pairs(SyntheticPairsConfig(dim=8, seen_users=10, unseen_users=2, seed=6))
    path = save_pairs(pairs, tmp_path / "pairs.npz")
    parser = argparse.ArgumentParser()
    configure(parser)
    population = read_population(path)
    for privacy, expected in (("none", "pair"), ("user", "user"), ("user+secagg", "user"), ("record", "user")):
        dp = {"none": [], "record": ["--noise-multiplier", "1", "--max-grad-norm", "1", "--delta", "1e-3"]}.get(
            privacy, ["--target-epsilon", "3"])
        args = parser.parse_args([str(path), "--out", str(tmp_path / "run"), "--privacy", privacy, *dp,
                                  "--rounds", "5", "--clients-per-round", "5"])
        overrides = run_overrides(args, population["seen_users"], population["seen_train_pairs"])
        assert overrides["weight-by"] == expected
        assert ("pairs-per-user" in overrides) == (expected == "pair")
        assert check_run(population, {**overrides, "run-dir": str(tmp_path / "run")})[0].weight_by == expected


def test_simulate_resumes_a_run_with_its_own_weighting_when_none_is_given(tmp_path):
    """The same command resumes a run started when user was the default (its checkpoint holds no weighting, or
    user); a fresh --out takes pair (a reviewer: the default flip refused every such resume)."""
    import argparse

    from lore_cli.simulate_command import configure, weighting
    from server.checkpoint import RunState, save_checkpoint

    parser = argparse.ArgumentParser()
    configure(parser)

    def default_for(out):
        return weighting(parser.parse_args(["pairs.npz", "--out", str(out), "--privacy", "none"]))

    assert default_for(tmp_path / "fresh") == "pair"
    user = _settings(**{"privacy-mode": "none"}).fingerprint()
    for name, stored, expected in (("before", {k: v for k, v in user.items() if k != "weight_by"}, "user"),
                                   ("user", user, "user"), ("pair", {**user, "weight_by": "pair"}, "pair")):
        save_checkpoint(tmp_path / name, RunState(round=1, basis=np.zeros((2, 2)), settings=stored, population=[3]))
        assert default_for(tmp_path / name) == expected
    assert weighting(parser.parse_args(["pairs.npz", "--out", str(tmp_path / "user"), "--privacy", "none",
                                        "--weight-by", "pair"])) == "pair"  # a flag given is the flag


def test_a_pair_weighted_update_takes_one_local_step_by_default():
    """Scaling a user's update by its pairs gives the pair-weighted likelihood's gradient only for one step, so
    local-steps "" resolves to 1 under pair and 5 under user weighting, on the server and the clients alike; a value
    given is kept (fails if the default ignores the weighting, or the two sides disagree)."""
    from flwr.common.config import get_fused_config_from_dir

    from federation.protocol import ClientSettings
    from simulations.flower_run import ROOT

    pair = {"weight-by": "pair", "pairs-per-user": 10.0, "privacy-mode": "none"}
    for overrides, steps in ((pair, 1), ({"privacy-mode": "none"}, 5), ({"privacy-mode": "user"}, 5),
                             ({**pair, "local-steps": 5}, 5), ({"privacy-mode": "none", "local-steps": 2}, 2),
                             ({**pair, "objective": "marginal"}, 1),
                             ({**pair, "objective": "marginal", "local-steps": 1}, 1)):
        assert _settings(**overrides).local_steps == steps
        config = get_fused_config_from_dir(ROOT, {"run-dir": "x", **overrides})
        assert ClientSettings.from_run_config(config).local_steps == steps
    for steps in (7, 0):  # the marginal update is one step: another value is refused, not ignored (a tester)
        with pytest.raises(ValueError, match="local-steps.* with .*objective.*one exact gradient step"):
            _settings(**pair, **{"objective": "marginal", "local-steps": steps})


def test_a_record_mode_run_takes_no_local_steps():
    """Record mode's clients run record-epochs of DP-SGD and never read local-steps, so a value given is refused
    (the server divided by it while the clients ignored it: a tester), and both sides resolve the server's fixed
    scaling; the run reports its record-epochs, not "5 local steps" (fails if record mode reads local-steps)."""
    from flwr.common.config import get_fused_config_from_dir

    from federation.protocol import RECORD_UPDATE_STEPS, ClientSettings
    from lore_cli.run_report import update_steps
    from simulations.flower_run import ROOT

    record = {"privacy-mode": "record"}
    assert _settings(**record).local_steps == RECORD_UPDATE_STEPS
    assert ClientSettings.from_run_config(get_fused_config_from_dir(ROOT, {"run-dir": "x", **record})).local_steps \
        == RECORD_UPDATE_STEPS
    for steps in (1, 5):
        with pytest.raises(ValueError, match="local-steps.* with .*privacy-mode.*record-epochs of DP-SGD"):
            _settings(**record, **{"local-steps": steps})
    assert update_steps("record", None, 2) == "2 record-epochs of DP-SGD"
    assert update_steps("none", 1, None) == "1 local step"


def test_simulate_resumes_a_run_with_its_own_local_steps_when_none_are_given(tmp_path):
    """A pair-weighted run begun when five steps were the default resumes under the same command; a fresh --out
    leaves the run config's default, and a flag given is the flag."""
    import argparse

    from lore_cli.simulate_command import configure, local_steps
    from server.checkpoint import RunState, check_resumable, save_checkpoint

    parser = argparse.ArgumentParser()
    configure(parser)
    pair = {"weight-by": "pair", "pairs-per-user": 10.0, "privacy-mode": "none"}
    older = _settings(**pair, **{"local-steps": 5}).fingerprint()
    save_checkpoint(tmp_path / "older", RunState(round=1, basis=np.zeros((2, 2)), settings=older, population=[3]))

    def steps(out, *flags):
        return local_steps(parser.parse_args(["pairs.npz", "--out", str(out), "--privacy", "none", *flags]))

    assert steps(tmp_path / "fresh") is None
    assert steps(tmp_path / "older") == 5
    assert steps(tmp_path / "older", "--local-steps", "1") == 1
    # another objective takes none of the run's steps, so the resume is refused for the objective (a reviewer: its
    # five steps were refused first, as if the user had given them with --objective marginal)
    assert steps(tmp_path / "older", "--objective", "marginal") is None
    today = _settings(**pair, **{"local-steps": steps(tmp_path / "older")}).fingerprint()
    check_resumable(RunState(round=1, basis=np.zeros((2, 2)), settings=older, population=[3]), today, [3], "run")


def test_simulate_resumes_a_run_with_its_own_server_rate_when_none_is_given(tmp_path):
    """A run whose rate is not today's default (given then, or a default since changed) resumes under the same
    command without --server-lr; a fresh --out, or another privacy mode (refused for the mode, not the rate), leaves
    the mode's default; a flag given is the flag (fails if the resume is refused for a rate the user never set)."""
    import argparse

    from lore_cli.simulate_command import configure, server_rate
    from server.checkpoint import RunState, check_resumable, save_checkpoint

    parser = argparse.ArgumentParser()
    configure(parser)
    pair = {"weight-by": "pair", "pairs-per-user": 10.0, "privacy-mode": "none"}
    older = _settings(**pair, **{"server-lr": 0.3}).fingerprint()
    save_checkpoint(tmp_path / "older", RunState(round=1, basis=np.zeros((2, 2)), settings=older, population=[3]))

    def rate(out, *flags):
        return server_rate(parser.parse_args(["pairs.npz", "--out", str(out), *flags]))

    assert rate(tmp_path / "fresh", "--privacy", "none") is None
    assert rate(tmp_path / "older", "--privacy", "none") == 0.3
    assert rate(tmp_path / "older", "--privacy", "none", "--server-lr", "2") == 2.0
    assert rate(tmp_path / "older", "--privacy", "user") is None
    assert _settings(**pair).server_lr != 0.3  # today's default, which the checkpoint would refuse
    today = _settings(**pair, **{"server-lr": rate(tmp_path / "older", "--privacy", "none")}).fingerprint()
    check_resumable(RunState(round=1, basis=np.zeros((2, 2)), settings=older, population=[3]), today, [3], "run")


def test_a_release_record_of_other_local_steps_names_them(tmp_path):
    """A 0.2.0 pair-weighted run stopped before its first checkpoint has only its release record to say it took
    five steps: a resume under today's default is refused naming the key and both values (a reviewer: the refusal
    said only "other server optimizer settings")."""
    from server.release_record import ReleaseRecord, ReleaseRecordError, check_continuable

    pair = {"weight-by": "pair", "pairs-per-user": 10.0, "privacy-mode": "none"}
    older = _settings(**pair, **{"local-steps": 5}).release_optimizer()
    ReleaseRecord.open(tmp_path, optimizer=older, initial_basis=np.zeros((2, 3)))
    assert check_continuable(tmp_path, older) is not None
    with pytest.raises(ReleaseRecordError, match=r"\(local-steps 5 then, 1 now; run-config keys\); give local-steps 5"):
        check_continuable(tmp_path, _settings(**pair).release_optimizer())
    faster = _settings(**pair, **{"local-steps": 5, "server-lr": 0.1 + 0.7}).release_optimizer()
    with pytest.raises(ReleaseRecordError, match=r"\(server-lr 1 then, 0\.8 now; run-config keys\); give server-lr "
                                                 r"1\.0 to resume"):
        check_continuable(tmp_path, faster)  # values as the checkpoint's refusal writes them (repr: 0.7999999999999999)
    # short forms that would read the same are written exactly (a tester: "server-lr 1 then, 1 now")
    with pytest.raises(ReleaseRecordError, match=r"server-lr 1\.0 then, 1\.0000000001 now"):
        check_continuable(tmp_path, _settings(**pair, **{"local-steps": 5, "server-lr": 1 + 1e-10}).release_optimizer())


def test_a_resume_refusal_names_the_setting_that_changed_not_the_defaults_that_follow_it():
    """A DP run resumed under privacy none differs in the mode's server rate, schedule, initial scale and privacy
    group too: the refusal names privacy-mode alone (a tester's minor), and a setting given beside it is named."""
    from server.checkpoint import CheckpointError, RunState, check_resumable

    dp = _settings(**{"privacy-mode": "user"}).fingerprint()
    none = _settings(**{"weight-by": "pair", "pairs-per-user": 10.0, "privacy-mode": "none"}).fingerprint()
    assert {k for k in dp if dp[k] != none[k]} >= {"privacy_mode", "server_lr", "privacy", "weight_by", "local_steps"}
    state = RunState(round=1, basis=np.zeros((2, 2)), settings=dp, population=[3])
    with pytest.raises(CheckpointError, match=r"\(privacy-mode 'user' then, 'none' now; run-config keys\)"):
        check_resumable(state, none, [3], "run")
    with pytest.raises(CheckpointError, match=r"\(client-lr 1 then, 0.5 now; privacy-mode 'user' then"):
        check_resumable(state, {**none, "client_lr": 0.5}, [3], "run")
    # a following setting the user gave beside the leading one is named too (it was hidden until the next try)
    with pytest.raises(CheckpointError, match=r"\(privacy-mode 'user' then, 'none' now; server-lr 0.05 then, 1 now;"):
        check_resumable(state, none, [3], "run", given=frozenset({"server_lr"}))


def test_a_record_run_of_other_local_steps_is_told_to_start_anew():
    """A record run begun under 0.2.1 with --local-steps 3 holds K = 3, which record mode now refuses: the refusal
    says a new directory is the way, not "resume it with that run's settings" (a reviewer)."""
    from server.checkpoint import CheckpointError, RunState, check_resumable

    today = _settings(**{"privacy-mode": "record"}).fingerprint()
    state = RunState(round=1, basis=np.zeros((2, 2)), settings={**today, "local_steps": 3}, population=[3])
    with pytest.raises(CheckpointError, match=r"local-steps 3 then, 5 now; .*record mode takes no local-steps .*"
                                              r"use a new --out"):
        check_resumable(state, today, [3], "run")


def test_simulate_names_the_following_flags_the_user_gave():
    import argparse

    from lore_cli.simulate_command import configure, given_followers

    parser = argparse.ArgumentParser()
    configure(parser)
    assert given_followers(parser.parse_args(["p.npz", "--out", "o", "--privacy", "none"])) <= {"privacy_mode"}
    assert given_followers(parser.parse_args(["p.npz", "--out", "o", "--server-lr", "0.5", "--weight-by", "user"])) \
        >= {"server_lr", "weight_by"}
    # a privacy flag beside the mode stands for the privacy group, which follows the mode (a reviewer)
    assert "privacy" in given_followers(parser.parse_args(["p.npz", "--out", "o", "--noise-multiplier", "2"]))
    assert "privacy" not in given_followers(parser.parse_args(["p.npz", "--out", "o", "--privacy", "user"]))


def test_a_release_record_refusal_does_not_ask_for_a_value_the_mode_refuses(tmp_path):
    """A record run begun with --local-steps 3 (before lore-fed 0.2.2) that stopped before its first checkpoint was
    told to give local-steps 3, which record mode refuses (a reviewer)."""
    from server.release_record import ReleaseRecord, ReleaseRecordError, check_continuable

    record = _settings(**{"privacy-mode": "record"})
    ReleaseRecord.open(tmp_path, optimizer={**record.release_optimizer(), "local_steps": 3},
                       initial_basis=np.zeros((2, 3)))
    with pytest.raises(ReleaseRecordError, match=r"local-steps 3 then, 5 now; .*set by the privacy mode") as refused:
        check_continuable(tmp_path, record.release_optimizer(), fixed=record.fixed_optimizer_keys())
    assert "give local-steps" not in str(refused.value)
