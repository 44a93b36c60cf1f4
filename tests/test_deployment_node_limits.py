"""A device's own record budget (client/node_limits.py) through Flower's Deployment Engine: real SuperNodes started
with `--node-config 'record-max-epsilon=... record-delta=...'`, the ClientApp shipped in the run's bundle, and a
server that asks for no budget at all."""

from __future__ import annotations

import numpy as np
import pytest

from lore_cli.local_deployment import LocalDeployment, split_pairs
from lore_core.pairs import save_pairs
from lore_core.privacy.accounting import history_epsilon
from simulations.synthetic_pairs import SyntheticPairsConfig, make_synthetic_pairs

NODES, SEEN_USERS, ROUNDS = 2, 4, 4
BUDGET, DELTA = 2.4, 1e-5  # at z = 2 and q = 1/3 a user's 4 rounds reach about 2.9; 2 rounds fit in 2.4


@pytest.mark.slow
def test_real_supernodes_hold_their_users_to_the_devices_own_record_budget(tmp_path):
    pairs, _ = make_synthetic_pairs(SyntheticPairsConfig(dim=8, true_rank=2, seen_users=SEEN_USERS, unseen_users=NODES,
                                                         train_pairs=(12, 12), test_pairs=4, seed=4))
    save_pairs(pairs, tmp_path / "all-pairs.npz")
    split_pairs(tmp_path / "all-pairs.npz", tmp_path, NODES)
    deployment = LocalDeployment(tmp_path, NODES, insecure=True, node_extra={
        "record-max-epsilon": BUDGET, "record-delta": DELTA, "allow-evaluate": True})
    run_dir = tmp_path / "run"
    try:
        deployment.start()
        outcome = deployment.run({"run-dir": str(run_dir), "num-server-rounds": ROUNDS, "rank": 2,
                                  "clients-per-round": SEEN_USERS, "eval-every": 0, "round-timeout": 60.0,
                                  "privacy-mode": "record", "noise-multiplier": 2.0, "record-batch-size": 4})
    finally:
        deployment.close()
    assert outcome.completed, f"{outcome.status} {outcome.details}; see {outcome.log}"
    spent = []
    for k in range(NODES):
        with np.load(tmp_path / f"node{k}" / "data" / "record_dp_state.npz") as state:
            rows = state["lore-record-dp"]
        for user in np.unique(rows[:, 0]):
            history = [(z, q, int(s)) for u, z, q, s in rows if u == user]
            spent.append(history_epsilon(history, DELTA))
    assert len(spent) == SEEN_USERS and all(1.5 < eps <= BUDGET for eps in spent), spent
