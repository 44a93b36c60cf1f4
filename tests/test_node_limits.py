"""A device's own privacy limits (client.node_limits): no server message can loosen them.

Driven through the real client code paths (`client_app._record_train`, `SecAggTrainer.fit`) on a deployed node, one
whose node config has a `data-path` holding its own pairs.npz.
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, RecordDict
from flwr.common.config import get_fused_config_from_dir

from client import client_app as node_app
from client.node_limits import NodeLimitError, NodeLimits
from client.secagg_client_app import SecAggTrainer
from client.user_state import load_record_histories
from federation import protocol as p
from lore_core.pairs import PAIRS_FILENAME, save_pairs
from lore_core.privacy.accounting import history_epsilon
from simulations.synthetic_pairs import SyntheticPairsConfig, make_synthetic_pairs

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def device_pairs(tmp_path_factory) -> Path:
    pairs, _ = make_synthetic_pairs(SyntheticPairsConfig(dim=8, true_rank=2, seen_users=1, unseen_users=1,
                                                         train_pairs=(12, 12), few_shot_pairs=4, test_pairs=4,
                                                         seed=3))
    return save_pairs(pairs, tmp_path_factory.mktemp("device") / PAIRS_FILENAME)


def device_context(device_pairs: Path, tmp_path: Path, mode: str, **node_config) -> Context:
    data = tmp_path / "data"
    data.mkdir(parents=True)
    shutil.copy(device_pairs, data / PAIRS_FILENAME)
    cfg = get_fused_config_from_dir(ROOT, {"rank": 2, "privacy-mode": mode})
    return Context(run_id=0, node_id=1, node_config={"data-path": str(data), **node_config}, state=RecordDict(),
                   run_config=cfg)


def record_config(**overrides) -> dict:
    return {p.NOISE_MULTIPLIER: 4.0, p.MAX_GRAD_NORM: 1.0, p.RECORD_BATCH_SIZE: 4, p.RECORD_SAMPLE_RATE: 0.25,
            p.RECORD_EPOCHS: 1,
            p.DELTA: 1e-5, p.ROUND: 1, **overrides}


def train_until_stopped(context: Context, config: dict, rounds: int = 60) -> list:
    """Record rounds on the device's one user until it sends a zero update; its own accountant history."""
    settings = p.ClientSettings.from_run_config(context.run_config)
    node = node_app.node_users(context, settings)
    basis = np.random.default_rng(0).normal(size=(2, 8)) * 0.1
    for _ in range(rounds):
        updates, _ = node_app._record_train(context, config, settings, basis, node, np.array([0]))
        if not updates.any():
            break
    return [(z, q, int(k)) for u, z, q, k in load_record_histories(context) if u == 0]


def test_a_devices_own_record_budget_holds_whatever_budget_and_delta_the_server_sends(device_pairs, tmp_path):
    """The server asks for max-epsilon 3 at delta 0.05 (its messages set both); the device's node config says 1.5 at
    1e-5. Before the node's limits, the device spent up to the server's budget: epsilon at 1e-5 far above 1.5."""
    context = device_context(device_pairs, tmp_path, "record", **{"record-max-epsilon": 1.5, "record-delta": 1e-5})
    history = train_until_stopped(context, record_config(**{p.MAX_EPSILON: 3.0, p.DELTA: 0.05}))
    assert history, "the device trained nothing"
    assert 1.0 < history_epsilon(history, 1e-5) <= 1.5


def test_without_node_limits_the_server_budget_applies(device_pairs, tmp_path):
    context = device_context(device_pairs, tmp_path, "record")
    history = train_until_stopped(context, record_config(**{p.MAX_EPSILON: 1.5}))
    assert 1.0 < history_epsilon(history, 1e-5) <= 1.5


def test_a_deployed_node_refuses_a_servers_noise_seed_unless_its_node_config_allows_it(device_pairs, tmp_path):
    """Whoever chose the seed knows the noise. Before, a deployed device used any seed the server sent."""
    refusing = device_context(device_pairs, tmp_path / "a", "record")
    with pytest.raises(NodeLimitError, match="allow-noise-seed"):
        train_until_stopped(refusing, record_config(**{p.NOISE_SEED: 7}), rounds=1)
    assert load_record_histories(refusing).size == 0  # nothing trained, nothing stored
    allowing = device_context(device_pairs, tmp_path / "b", "record", **{"allow-noise-seed": True})
    assert train_until_stopped(allowing, record_config(**{p.NOISE_SEED: 7}), rounds=1)


def test_a_deployed_secagg_node_refuses_a_servers_noise_seed(device_pairs, tmp_path):
    def fit(context: Context, seed: int | None):
        config = {p.USER_INDICES: p.encode_user_indices(np.arange(1)), p.CLIP_NORM: 1.0, p.NOISE_MULTIPLIER: 1.0,
                  p.DROPOUT_TOLERANCE: 0.1, p.SAMPLED_USERS: 3, p.CLIPPING_RANGE: 4.0, p.GRANULARITY: 8.0 / 2**26,
                  p.ROUND: 1, **({} if seed is None else {p.NOISE_SEED: seed})}
        return SecAggTrainer(context).fit([np.zeros((2, 8))], config)[0][0]

    refusing = device_context(device_pairs, tmp_path / "a", "user+secagg")
    with pytest.raises(NodeLimitError, match="allow-noise-seed"):
        fit(refusing, 7)
    assert np.isfinite(fit(refusing, None)).all()
    allowing = device_context(device_pairs, tmp_path / "b", "user+secagg", **{"allow-noise-seed": "true"})
    np.testing.assert_array_equal(fit(allowing, 7), fit(allowing, 7))  # the debug seed really seeds the noise


def test_a_simulated_node_takes_the_simulations_noise_seed():
    assert NodeLimits.from_node_config({"partition-id": 0, "num-partitions": 2}).noise_seed(7) == 7


@pytest.mark.parametrize("node_config, message", [
    ({"record-max-epsilon": 2.0}, "together"),
    ({"record-delta": 1e-5}, "together"),
    ({"record-max-epsilon": 0.0, "record-delta": 1e-5}, "record-max-epsilon must be a number above 0"),
    ({"record-max-epsilon": 101.0, "record-delta": 1e-5}, "at most 100"),
    ({"record-max-epsilon": "inf", "record-delta": 1e-5}, "record-max-epsilon"),
    ({"record-max-epsilon": True, "record-delta": 1e-5}, "record-max-epsilon"),
    ({"record-max-epsilon": 2.0, "record-delta": 1.0}, "record-delta must be a number above 0 and below 1"),
    ({"record-max-epsilon": 2.0, "record-delta": "small"}, "record-delta"),
    ({"record-max-epsilon": 2.0, "record-delta": 1e-50}, "record-delta must be at least 1e-10"),  # a tester
    ({"record-max-epsilon": 2.0, "record-delta": 5e-324}, "record-delta must be at least 1e-10"),
    ({"allow-noise-seed": "yes"}, "allow-noise-seed must be true or false"),
    ({"allow-noise-seed": 1}, "allow-noise-seed"),
])
def test_a_bad_node_config_is_refused_naming_its_key(node_config, message):
    with pytest.raises(NodeLimitError, match=message):
        NodeLimits.from_node_config(node_config)


def test_the_tighter_budget_and_delta_win():
    limits = NodeLimits.from_node_config({"record-max-epsilon": 3.0, "record-delta": 1e-6})
    assert limits.record_budget(None, 1e-5) == (3.0, 1e-6)
    assert limits.record_budget(8.0, 1e-7) == (3.0, 1e-7)
    assert limits.record_budget(2.0, 1e-5) == (2.0, 1e-6)
    assert NodeLimits().record_budget(8.0, 1e-3) == (8.0, 1e-3)


@pytest.mark.parametrize("budget", [float("nan"), float("inf"), -1.0, 0.0])
def test_a_server_budget_that_is_not_a_finite_positive_number_is_refused(device_pairs, tmp_path, budget):
    """Found by a review: min(NaN, 1.5) is NaN and `epsilon > NaN` is False, so a NaN max-epsilon from the server
    turned the device's own budget off (40 rounds, epsilon 4.12 at 1e-5 against 1.5). Refused now, with limits or
    without (record_dp refuses it too, and stops when epsilon does not compare)."""
    limits = {"record-max-epsilon": 1.5, "record-delta": 1e-5}
    limited = device_context(device_pairs, tmp_path / "a", "record", **limits)
    with pytest.raises(NodeLimitError, match="max-epsilon must be a finite number > 0"):
        train_until_stopped(limited, record_config(**{p.MAX_EPSILON: budget}), rounds=1)
    bare = device_context(device_pairs, tmp_path / "b", "record")
    with pytest.raises(ValueError, match="max.epsilon must be"):
        train_until_stopped(bare, record_config(**{p.MAX_EPSILON: budget}), rounds=1)
    assert load_record_histories(limited).size == load_record_histories(bare).size == 0


def test_record_dp_refuses_a_budget_it_cannot_compare_and_stops_on_an_epsilon_it_cannot(monkeypatch):
    """The library's own guards behind the node's: `epsilon > NaN` and `NaN > budget` are both False."""
    from lore_core.privacy import record_dp
    from lore_core.privacy.accounting import PrivacyBudgetExhausted

    rng = np.random.default_rng(0)
    args = dict(noise_multiplier=4.0, max_grad_norm=1.0, batch_size=4, sample_rate=0.25, epochs=1, lr=0.1, delta=1e-5,
                state=record_dp.RecordDpState())
    basis, logits, diff = rng.normal(size=(2, 8)), np.zeros(2), rng.normal(size=(12, 8))
    with pytest.raises(ValueError, match="max_epsilon must be finite and > 0"):
        record_dp.dp_sgd_update(basis, logits, diff, max_epsilon=float("nan"), **args)
    monkeypatch.setattr(record_dp, "history_epsilon", lambda history, delta: float("nan"))
    with pytest.raises(PrivacyBudgetExhausted):
        record_dp.dp_sgd_update(basis, logits, diff, max_epsilon=1.5, **args)


def test_two_runs_on_one_device_share_its_budget(device_pairs, tmp_path):
    """Found by a review: a SuperNode keeps one Context per run, and the node read a run's Context before the device
    file, so two runs taken in turn each saw only their own spending (epsilon 2.04 in all, the file said 1.49, budget
    1.5). The device file comes first now: the two runs together stay within the budget."""
    first = device_context(device_pairs, tmp_path, "record", **{"record-max-epsilon": 1.5, "record-delta": 1e-5})
    second = Context(run_id=1, node_id=1, node_config=dict(first.node_config), state=RecordDict(),
                     run_config=first.run_config)
    settings = p.ClientSettings.from_run_config(first.run_config)
    node = node_app.node_users(first, settings)
    basis = np.random.default_rng(0).normal(size=(2, 8)) * 0.1
    spent, spending = [], True
    for _ in range(30):  # in turn, until neither run spends any more (about 3 rounds each)
        if not spending:
            break
        spending = False
        for context in (first, second):
            updates, rows = node_app._record_train(context, record_config(), settings, basis, node, np.array([0]))
            spent += [(z, q, int(k)) for _, z, q, k in rows]
            spending |= len(rows) > 0
    assert spent and history_epsilon(spent, 1e-5) <= 1.5
    assert history_epsilon([(z, q, int(k)) for _, z, q, k in load_record_histories(second)], 1e-5) > 1.0


def deliver(context: Context, message_type: str, config: dict, basis: np.ndarray):
    """One message to the real ClientApp on an in-process grid whose one node has `context`'s node config."""
    from flwr.app import Array, ArrayRecord, ConfigRecord

    from simulations.in_process_grid import LocalGrid

    grid = LocalGrid(node_app.app, [context.node_config], context.run_config)
    content = RecordDict({p.ARRAYS: ArrayRecord({p.BASIS: Array(basis)}), p.CONFIG: ConfigRecord(config)})
    (node,) = grid.contexts
    return list(grid.send_and_receive([grid.create_message(content, message_type, node, "1")]))[0]


def test_a_failing_node_tells_the_server_only_that_it_failed(device_pairs, tmp_path, caplog, monkeypatch):
    """Found by a reviewer: a node's exception text went to the server as the error reply's reason (and into
    rounds.jsonl): record mode's "delta must be < 1/n ... for this client's 12 pairs" told it a user's pair count.
    The node logs the details; the server gets a fixed sentence. A refusal of the request keeps its text. (That
    delta is now a warning on the device; a failure whose text names the data stands in for it.)"""
    from lore_core.privacy import record_dp

    def failing(basis, logits, diff, **kwargs):
        raise ValueError(f"something about this client's {len(diff)} pairs")

    monkeypatch.setattr(record_dp, "dp_sgd_update", failing)
    context = device_context(device_pairs, tmp_path, "record")
    config = {p.USER_INDICES: [0], **record_config(), p.PRIVACY_MODE: "record"}
    with caplog.at_level("ERROR", logger="lore_fed.client"):
        reply = deliver(context, "train", config, np.random.default_rng(0).normal(size=(2, 8)) * 0.1)
    assert reply.has_error() and "12 pairs" not in reply.error.reason, reply.error.reason
    # Not even the exception's class, which may depend on the data (a privacy reviewer)
    assert "the node failed while training; the details stay in the node's own log" in reply.error.reason
    assert "Error" not in reply.error.reason, reply.error.reason
    assert "12 pairs" in caplog.text  # on the node, for its owner
    refused = deliver(context, "train", {**config, p.USER_INDICES: [5]}, np.zeros((2, 8)))
    assert refused.has_error() and "user-indices must be distinct" in refused.error.reason
    # A node without its pair file is a configuration problem, not data: the operator is told which (a reviewer).
    missing = Context(run_id=0, node_id=2, node_config={"data-path": str(tmp_path / "nothing")}, state=RecordDict(),
                      run_config=context.run_config)
    with pytest.raises(node_app.ClientRequestError, match="nothing holds no pairs.npz"):
        node_app.query(None, missing)


def test_a_seen_user_without_a_training_pair_trains_like_one_with_pairs_in_record_mode(tmp_path):
    """Found by a reviewer: a device file's seen user with only test pairs made record-mode DP-SGD raise ("needs at
    least one pair") and the whole node failed each time that user was sampled, its other users' updates lost too
    (`simulate` and `train` refuse such a file; a device's own file is not checked). It then sent a zero update and
    spent nothing, which told a server whether a user's only pair was there (a second reviewer): it now takes the
    same noise-only steps and spends what a user with pairs spends."""
    pairs, _ = make_synthetic_pairs(SyntheticPairsConfig(dim=8, true_rank=2, seen_users=2, unseen_users=1,
                                                         train_pairs=(12, 12), few_shot_pairs=4, test_pairs=4,
                                                         seed=3))
    idle_user = np.unique(pairs.user[pairs.seen])[1]
    pairs = pairs.subset(~((pairs.user == idle_user) & (pairs.split == "train")))
    context = device_context(save_pairs(pairs, tmp_path / "file" / PAIRS_FILENAME), tmp_path, "record")
    settings = p.ClientSettings.from_run_config(context.run_config)
    node = node_app.node_users(context, settings)
    assert node.seen_users.tolist()[1] == idle_user
    basis = np.random.default_rng(0).normal(size=(2, 8)) * 0.1
    updates, _ = node_app._record_train(context, record_config(), settings, basis, node, np.array([0, 1]))
    assert updates[0].any() and updates[1].any() and np.isfinite(updates).all()
    histories = load_record_histories(context)
    spent = {int(u): [tuple(row[1:]) for row in histories if int(row[0]) == u] for u in (0, 1)}
    assert spent[0] == spent[1] == [(4.0, 0.25, 4.0)]  # the idle user's spending is any other's


@pytest.mark.parametrize("mode", ["none", "user", None])
def test_a_device_with_a_record_budget_refuses_training_in_another_mode(device_pairs, tmp_path, mode):
    """Found by a review: the server chose the mode, and in mode none or user the device's update left without its
    own noise, whatever its budget."""
    context = device_context(device_pairs, tmp_path, "record", **{"record-max-epsilon": 1.5, "record-delta": 1e-5})
    config = {p.USER_INDICES: [0], p.ROUND: 1, p.CLIP_NORM: 1.0, **({} if mode is None else {p.PRIVACY_MODE: mode})}
    reply = deliver(context, "train", config, np.zeros((2, 8)))
    assert reply.has_error() and "record-mode training only" in reply.error.reason, reply
    with pytest.raises(NodeLimitError, match="record-mode training only"):
        SecAggTrainer(context).fit([np.zeros((2, 8))], {})
    assert not (Path(context.node_config["data-path"]) / "user_weights.npz").exists()  # nothing trained


def test_a_device_with_a_record_budget_answers_no_evaluation_unless_allowed(device_pairs, tmp_path):
    budget = {"record-max-epsilon": 1.5, "record-delta": 1e-5}
    refusing = deliver(device_context(device_pairs, tmp_path / "a", "record", **budget), "evaluate", {p.ROUND: 1},
                       np.full((2, 8), 0.1))
    assert refusing.has_error() and "answers no evaluation" in refusing.error.reason
    allowed = deliver(device_context(device_pairs, tmp_path / "b", "record", **budget, **{"allow-evaluate": True}),
                      "evaluate", {p.ROUND: 1}, np.full((2, 8), 0.1))
    assert allowed.content[p.METRICS]["seen-users"] == 1
    plain = deliver(device_context(device_pairs, tmp_path / "c", "record"), "evaluate", {p.ROUND: 1},
                    np.full((2, 8), 0.1))
    assert not plain.has_error()


def test_a_message_holds_the_devices_lock_from_read_to_write(device_pairs, tmp_path, monkeypatch):
    """Two runs at the same moment on one device: each message's read-train-write holds `<data-path>/.lore-fed.lock`,
    so one run never writes over the other's spending. Checked from inside the private step: another process cannot
    take the lock while the node trains."""
    import subprocess
    import sys

    from client import user_state

    context = device_context(device_pairs, tmp_path, "record")
    lock = Path(context.node_config["data-path"]) / user_state.LOCK_FILENAME
    probe = ("import fcntl, sys; f = open(sys.argv[1], 'a')\n"
             "try:\n    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB); print('free')\n"
             "except BlockingIOError:\n    print('held')")
    seen = []
    real = node_app.record_dp_updates

    def spy(*args, **kwargs):
        seen.append(subprocess.run([sys.executable, "-c", probe, str(lock)], capture_output=True, text=True,
                                   check=True).stdout.strip())
        return real(*args, **kwargs)

    monkeypatch.setattr(node_app, "record_dp_updates", spy)
    config = {p.USER_INDICES: [0], **record_config(), p.PRIVACY_MODE: "record"}
    reply = deliver(context, "train", config, np.random.default_rng(0).normal(size=(2, 8)) * 0.1)
    assert not reply.has_error(), reply.error
    assert seen == ["held"]
    assert subprocess.run([sys.executable, "-c", probe, str(lock)], capture_output=True, text=True).stdout.strip() \
        == "free"


def test_the_node_config_flower_supernode_parses_is_read():
    """`flower-supernode --node-config 'record-max-epsilon=1.5 ...'`: Flower's own parser gives floats and bools."""
    from flwr.common.config import parse_config_args

    parsed = parse_config_args(['record-max-epsilon=1.5 record-delta=1e-5 allow-noise-seed=true '
                                'allow-evaluate=false data-path="/data"'])
    limits = NodeLimits.from_node_config(parsed)
    assert (limits.record_max_epsilon, limits.record_delta, limits.allow_noise_seed) == (1.5, 1e-5, True)
    assert limits.deployed and not limits.allow_evaluate and limits.record_only


def test_allow_evaluate_false_refuses_evaluation_without_a_record_budget_too():
    assert not NodeLimits.from_node_config({"allow-evaluate": False}).allow_evaluate
    assert NodeLimits.from_node_config({}).allow_evaluate
    with pytest.raises(NodeLimitError, match="answers no evaluation"):
        NodeLimits.from_node_config({"allow-evaluate": "false"}).check_evaluate()


@pytest.mark.parametrize("message_type", ["train", "evaluate"])
@pytest.mark.parametrize("run_id", ["../../w", "A" * 16, 7, "0" * 17])
def test_a_node_refuses_a_run_id_that_is_not_sixteen_hex_digits(device_pairs, tmp_path, message_type, run_id):
    """The run id names the device file's slot for the run's w (client/user_state.py): anything else is refused as
    the request's fault, and nothing is written."""
    context = device_context(device_pairs, tmp_path, "none")
    config = {p.USER_INDICES: [0], p.ROUND: 1, p.PRIVACY_MODE: "none", p.RUN_ID: run_id}
    reply = deliver(context, message_type, config, np.full((2, 8), 0.1))
    assert reply.has_error() and "run-id must be 16 lowercase hex digits" in reply.error.reason, reply
    assert not (Path(context.node_config["data-path"]) / "user_weights.npz").exists()
    good = deliver(context, message_type, {**config, p.RUN_ID: "0123456789abcdef"}, np.full((2, 8), 0.1))
    assert not good.has_error(), good.error
    with np.load(Path(context.node_config["data-path"]) / "user_weights.npz") as data:
        assert data.files == ["user_weights@0123456789abcdef"]


@pytest.mark.parametrize("scale, refused", [(1e-4, "multiply the embeddings by 2^"), (1e3, "multiply the embeddings "
                                            "by 2^-"), ("one coordinate", "1 of 8 coordinates"), (1e-2, None)])
def test_a_device_refuses_its_own_file_when_clearly_off_the_usual_scale(device_pairs, tmp_path, caplog, scale,
                                                                       refused):
    """`simulate` refuses a population's file at 1e-4, 1e3 or beside one coordinate 1000 times the others (runs at
    chance with exit 0); a deployed node read its own such file and trained the shared basis from it. It now fails,
    naming the remedy in its own log; the server learns only that it failed. Its few pairs get the wider
    DEVICE_DIFF_RMS band, so 1e-2 still trains."""
    pairs = np.load(device_pairs)
    arrays = {name: pairs[name] for name in pairs.files}
    diff = arrays["diff"].astype(np.float64)
    if scale == "one coordinate":
        diff[:, 0] *= 1000
    else:
        diff *= scale
    arrays["diff"] = diff.astype(np.float32)
    scaled = tmp_path / "scaled" / PAIRS_FILENAME
    scaled.parent.mkdir()
    np.savez(scaled, **arrays)
    context = device_context(scaled, tmp_path, "user")
    config = {p.USER_INDICES: [0], p.CLIP_NORM: 1.0, p.PRIVACY_MODE: "user", p.ROUND: 1}
    with caplog.at_level("ERROR", logger="lore_fed.client"):
        reply = deliver(context, "train", config, np.random.default_rng(0).normal(size=(2, 8)) * 0.1)
    if refused is None:
        assert not reply.has_error(), reply.error.reason
        return
    assert reply.has_error() and "the node failed while" in reply.error.reason, reply.error.reason
    assert "coordinate" not in reply.error.reason and "2^" not in reply.error.reason  # the remedy stays on the node
    assert f"{PAIRS_FILENAME}: " in caplog.text and refused in caplog.text, caplog.text


def test_a_device_with_fewer_pairs_than_the_check_needs_is_not_refused(device_pairs, tmp_path):
    """A reviewer: one or two near-identical responses measure as small as a broken embedder's, so a device that
    holds fewer than DEVICE_MIN_PAIRS pairs is not checked (and one that holds more is)."""
    from federation.user_block import load_device_users
    from lore_core.pairs import DEVICE_MIN_PAIRS, PairFileError, load_pairs

    pairs = load_pairs(device_pairs)
    tiny = replace(pairs, diff=(pairs.diff * 1e-4).astype(np.float32))
    keep = np.zeros(pairs.n, bool)
    keep[np.flatnonzero(pairs.split == "train")[:DEVICE_MIN_PAIRS - 1]] = True
    assert load_device_users(str(save_pairs(tiny.subset(keep), tmp_path / "few.npz"))).n_train_users == 1
    with pytest.raises(PairFileError, match="multiply the embeddings"):
        load_device_users(str(save_pairs(tiny, tmp_path / "all.npz")))
