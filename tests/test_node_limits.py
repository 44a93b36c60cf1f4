"""A device's own privacy limits (client.node_limits): no server message can loosen them.

Driven through the real client code paths (`client_app._record_train`, `SecAggTrainer.fit`) on a deployed node, one
whose node config has a `data-path` holding its own pairs.npz.
"""

from __future__ import annotations

import shutil
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
    return {p.NOISE_MULTIPLIER: 4.0, p.MAX_GRAD_NORM: 1.0, p.RECORD_BATCH_SIZE: 4, p.RECORD_EPOCHS: 1,
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
