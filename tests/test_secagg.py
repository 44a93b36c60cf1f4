"""Privacy mode `user+secagg` (docs/privacy.md §6-§7): the real ServerApp path (`run_federated` -> `run_secagg`,
Flower's DefaultWorkflow + SecAggPlusWorkflow) and the real ClientApp (`client.secagg_client_app:app`, secaggplus_mod
included) on the in-process grid."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import numpy as np
import pytest
from flwr.common import bytes_to_ndarray
from flwr.common.config import get_fused_config_from_dir
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from scipy import stats

from federation import protocol as p
from client.secagg_client_app import SecAggTrainer
from client.secagg_client_app import app as secagg_client_app
from lore_core.pairs import save_pairs
from lore_core.privacy.ledger import PrivacyLedger
from lore_core.privacy.privacy_settings import PrivacyConfigError
from server.server_app import run_federated
from server.optimizer import ServerAdam
from server.secagg_workflow import MODULUS_RANGE, SecAggLoReStrategy, plan_quantisation
from server.run_settings import ServerSettings
from simulations.synthetic_pairs import SyntheticPairsConfig, make_synthetic_pairs
from simulations.in_process_grid import LocalGrid

pytestmark = pytest.mark.filterwarnings("ignore:reproducible_noise is on")  # the debug runs below
ROOT = Path(__file__).resolve().parents[1]
RANK, DIM, USERS, M = 3, 24, 24, 8
Z, C = 0.5, 0.5


@pytest.fixture(scope="module")
def pair_file(tmp_path_factory) -> Path:
    pairs, _ = make_synthetic_pairs(SyntheticPairsConfig(dim=DIM, true_rank=RANK, seen_users=USERS, unseen_users=6,
                                                         train_pairs=(20, 30), seed=3))
    return save_pairs(pairs, tmp_path_factory.mktemp("data") / "pairs.npz")


@pytest.fixture(autouse=True)
def quiet_flower():
    logging.getLogger("flwr").setLevel(logging.WARNING)  # SecAgg+ logs every stage of every node at DEBUG


def make_run(pair_file: Path, run_dir: Path, nodes: int, **overrides):
    # reproducible-noise: a deterministic debug run (its ledger says NOT PRIVATE), so the accuracy check is stable.
    config = {"pairs-path": str(pair_file), "run-dir": str(run_dir), "rank": RANK, "num-server-rounds": 6,
              "clients-per-round": M, "server-lr": 0.1, "privacy-mode": "user+secagg", "noise-multiplier": Z,
              "clip-norm": C, "delta": 1e-3, "reproducible-noise": True, **overrides}
    cfg = get_fused_config_from_dir(ROOT, config)
    grid = LocalGrid(secagg_client_app, [{"partition-id": i, "num-partitions": nodes} for i in range(nodes)], cfg)
    return grid, ServerSettings.from_run_config(cfg)


def masked_uploads(grid: LocalGrid) -> list[np.ndarray]:
    """The (B, D) masked integer blocks of every node upload the server received (SecAgg+ stage 2)."""
    uploads = []
    for reply in grid.replies:
        configs = reply.content.config_records.get(RECORD_KEY_CONFIGS)
        if configs is not None and Key.MASKED_PARAMETERS in configs:
            factor, block = (bytes_to_ndarray(b) for b in configs[Key.MASKED_PARAMETERS])
            uploads.append(block)
    return uploads


def looks_uniform(block: np.ndarray) -> bool:
    """Entries uniform on [0, M) (KS test) and no low-rank structure (a user's update is rank one)."""
    u = block.astype(np.float64).ravel() / MODULUS_RANGE
    singular = np.linalg.svd(block.astype(np.float64) / MODULUS_RANGE - 0.5, compute_uv=False)
    return stats.kstest(u, "uniform").pvalue > 1e-4 and singular[1] > 0.3 * singular[0]


def test_secagg_run_trains_and_ledger_is_written_before_each_release(pair_file, tmp_path, monkeypatch):
    order = []  # ledger writes and basis steps, in the order they happen
    record_round, step = PrivacyLedger.record_round, ServerAdam.step
    monkeypatch.setattr(PrivacyLedger, "record_round",
                        lambda self, *a, **k: (order.append("ledger"), record_round(self, *a, **k))[1])
    monkeypatch.setattr(ServerAdam, "step", lambda self, *a, **k: (order.append("step"), step(self, *a, **k))[1])
    grid, settings = make_run(pair_file, tmp_path, nodes=6, **{"num-server-rounds": 8, "eval-every": 1,
                                                                "allow-uncovered-eval": True})
    state = run_federated(grid, settings)

    seen = [r["seen_test_acc"] for r in state.history]
    unseen = [r["unseen_test_acc"] for r in state.history]
    assert seen[-1] > seen[0] + 0.05 and unseen[-1] > unseen[0] + 0.03
    assert order == ["ledger", "step"] * 8
    ledger = json.loads((tmp_path / "ledger.json").read_text())
    assert ledger["mode"] == "user+secagg" and ledger["rounds"]["released"] == 8
    assert [e["sampled"] for e in ledger["events"]["rounds"]] == [r["sampled_users"] for r in state.history]
    assert np.all(np.diff([r["epsilon"] for r in state.history]) > 0)
    assert ledger["not_private"]["flag"]  # reproducible debug noise is marked, never silently private
    assert all(r["secagg_nodes"] >= 2 and r["accepted_users"] == r["sampled_users"] for r in state.history)


def test_server_receives_only_masked_vectors_and_unmasks_only_the_sum(pair_file, tmp_path, monkeypatch):
    client_sums, server_sums = {}, {}  # round -> node sums computed on the nodes / sums the server unmasked
    fit, secure_sum = SecAggTrainer.fit, SecAggLoReStrategy.secure_sum

    def spy_fit(self, parameters, config):
        params, n, metrics = fit(self, parameters, config)
        client_sums.setdefault(config[p.ROUND], []).append(params[0])
        return params, n, metrics

    def spy_sum(self, results):
        server_sums[self.run.round] = secure_sum(self, results)
        return server_sums[self.run.round]

    monkeypatch.setattr(SecAggTrainer, "fit", spy_fit)
    monkeypatch.setattr(SecAggLoReStrategy, "secure_sum", spy_sum)
    nodes = USERS  # one user per node, as on devices: SecAgg+ hides each user
    grid, settings = make_run(pair_file, tmp_path, nodes=nodes, **{"num-server-rounds": 3})
    run_federated(grid, settings)

    # Nothing the server received holds a float array: train replies carry masked integers, the rest metrics only.
    assert all(len(record) == 0 for reply in grid.replies for record in reply.content.array_records.values())
    uploads = masked_uploads(grid)
    assert len(uploads) == sum(len(v) for v in client_sums.values()) > 0
    assert all(block.shape == (RANK, DIM) and looks_uniform(block) for block in uploads)
    # The test can fail: a node's own update (rank one, one user) and its fixed-point encoding are not uniform.
    quant = plan_quantisation(C, 8.0, 1, nodes)
    own = client_sums[1][0]
    encoded = np.round((own + quant.clipping_range) / quant.step).astype(np.int64)
    assert not looks_uniform(encoded) and np.linalg.matrix_rank(own, tol=1e-9 * np.abs(own).max()) == 1
    # No node is ever asked alone, and what the server unmasked is the sum over nodes, up to rounding.
    assert set(server_sums) == set(client_sums) and all(len(v) >= 2 for v in client_sums.values())
    for t, node_sums in client_sums.items():
        error = np.abs(server_sums[t] - np.sum(node_sums, axis=0)).max()
        assert error <= len(node_sums) * quant.step
        assert error < 1e-4 * Z * C  # rounding is negligible next to the DP noise std z*C on the sum
        assert all(np.abs(server_sums[t] - s).max() > 1e-3 for s in node_sums)  # no single node's sum


def test_round_with_users_on_fewer_than_two_nodes_releases_pure_noise(pair_file, tmp_path):
    grid, settings = make_run(pair_file, tmp_path, nodes=2, **{"num-server-rounds": 4, "clients-per-round": 1})
    state = run_federated(grid, settings)
    ledger = json.loads((tmp_path / "ledger.json").read_text())
    assert ledger["rounds"]["released"] == 4  # every round is one accounted noisy release
    lonely = [r for r in state.history if r["secagg_nodes"] == 0]
    assert lonely  # with 1 expected user of 24 on 2 nodes, most rounds cannot form a secure sum
    train = [m for m in grid.sent if m.metadata.message_type == "train"]
    assert all(r["accepted_users"] == 0 for r in lonely)
    # No node is ever asked alone: a round that trains runs the 4 SecAgg+ stages on both nodes, the others none.
    assert len(train) == 4 * 2 * (4 - len(lonely))


@pytest.mark.parametrize("shares,threshold", [(4, 2), (3, 3)])
def test_invalid_secagg_shares_are_refused_before_training(pair_file, tmp_path, shares, threshold):
    grid, settings = make_run(pair_file, tmp_path, nodes=6)
    # num-shares is not a run-config key yet: the settings carry it as the run config will.
    settings = dataclasses.replace(settings, privacy={**settings.privacy, "num_shares": shares,
                                                      "reconstruction_threshold": threshold})
    with pytest.raises(PrivacyConfigError, match="num_shares|reconstruction_threshold"):
        run_federated(grid, settings)
    assert {m.metadata.message_type for m in grid.sent} == {"query"}  # population discovery only
    assert not (tmp_path / "ledger.json").exists()


def test_quantisation_never_clamps_a_node_sum_and_fits_the_modulus():
    quant = plan_quantisation(clip_norm=0.5, clipping_range_floor=8.0, max_users_per_node=50, num_nodes=28)
    assert quant.clipping_range == 25.0  # 50 users of norm <= 0.5: no entry of a node sum beyond 25
    assert 28 * quant.quantization_range < MODULUS_RANGE <= 2 * 28 * quant.quantization_range
    assert quant.rounding_slack(10 * 384) < 1e-3 * 0.5
