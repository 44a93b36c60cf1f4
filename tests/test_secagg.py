"""Privacy mode `user+secagg` (docs/privacy.md §2b, §6-§7): the distributed discrete Gaussian through the real
ServerApp path (`run_federated` -> `run_secagg`, Flower's DefaultWorkflow + SecAggPlusWorkflow) and the real
ClientApp on the in-process grid: the one `pyproject.toml` deploys (`client.client_app:app`), which hands SecAgg+
messages to `client.secagg_client_app:app` (secaggplus_mod included)."""

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
import client.client_app as message_app
from client.secagg_client_app import SecAggTrainer
from lore_core.pairs import save_pairs
from lore_core.privacy import distributed_dp as ddg
from lore_core.privacy.ledger import PrivacyLedger
from lore_core.privacy.privacy_settings import PrivacyConfigError
from server.server_app import run_and_report, run_federated
from server.optimizer import ServerAdam
from server.release_record import read_releases
from server.secagg_workflow import SecAggLoReStrategy
from server.run_settings import ServerSettings
from simulations.synthetic_pairs import SyntheticPairsConfig, make_synthetic_pairs
from simulations.in_process_grid import LocalGrid

pytestmark = pytest.mark.filterwarnings("ignore:reproducible_noise is on")  # the debug runs below
ROOT = Path(__file__).resolve().parents[1]
RANK, DIM, USERS, M = 3, 24, 24, 8
Z, C = 0.5, 0.5
MODULUS_RANGE = 2**32


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
    grid = LocalGrid(message_app.app, [{"partition-id": i, "num-partitions": nodes} for i in range(nodes)], cfg)
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


def looks_uniform(block: np.ndarray, alpha: float = 1e-4) -> bool:
    """Entries uniform on [0, M) (KS test at level alpha) and no low-rank structure (a user's update is rank one)."""
    u = block.astype(np.float64).ravel() / MODULUS_RANGE
    singular = np.linalg.svd(block.astype(np.float64) / MODULUS_RANGE - 0.5, compute_uv=False)
    return stats.kstest(u, "uniform").pvalue > alpha and singular[1] > 0.3 * singular[0]


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
    from lore_cli.main import main

    # The users' shares carry the claimed noise, but a debug run's noise can be removed by anyone with its seed: the
    # audit fails it (exit 1), whatever its epsilon (an adversarial tester: it passed, never saying NOT PRIVATE).
    assert main(["audit", "accounting", str(tmp_path)]) == 1
    audit = json.loads((tmp_path / "audits" / "accounting.json").read_text())
    assert audit["released_noise"]["verdict"] == "pass" and audit["released_noise"]["noise_ratio"] > 0.9, audit
    assert audit["ledger_mismatches"] == [f"{tmp_path / 'ledger.json'}: its noise is reproducible from noise_seed 0 "
                                          "(a debug run): anyone with the seed removes it, so the run is NOT PRIVATE "
                                          "whatever its epsilon"]


def test_the_guarantee_against_the_server_counts_the_most_sampled_users_rounds(pair_file, tmp_path, monkeypatch):
    """Found by a reviewer: the ledger claimed the subsampled epsilon "against the server too", but the server draws
    the sample, so it knows who took part and amplification does not hold against it. The ledger now states a
    second epsilon: the discrete Gaussian unsampled over the rounds of the most-sampled user, counted from the
    sampler and, after a resume (a new sampler), added to the count the ledger already holds."""
    from lore_cli.main import main
    from lore_core.privacy.ddg_accounting import ddg_epsilon
    from server.aggregation import DistributedDpAggregator
    from server.training_round import TrainingRun

    drawn = []
    sample, begin = DistributedDpAggregator.sample, TrainingRun.begin_round
    monkeypatch.setattr(DistributedDpAggregator, "sample",
                        lambda self, n: (drawn.append(sample(self, n)), drawn[-1])[1])

    def crash_at_round_4(self):
        if self.round == 3:
            raise RuntimeError("killed")
        return begin(self)

    monkeypatch.setattr(TrainingRun, "begin_round", crash_at_round_4)
    private = {"num-server-rounds": 5, "clients-per-round": 6, "reproducible-noise": False}  # the audit's subject
    grid, settings = make_run(pair_file, tmp_path, nodes=6, **private)
    with pytest.raises(RuntimeError, match="killed"):
        run_federated(grid, settings)
    counts = np.zeros(USERS, dtype=int)
    running = []
    for users in drawn:
        counts[users] += 1
        running.append(int(counts.max()))
    ledger = json.loads((tmp_path / "ledger.json").read_text())
    assert [e["most_user_rounds"] for e in ledger["events"]["rounds"]] == running and len(running) == 3

    monkeypatch.setattr(TrainingRun, "begin_round", begin)
    drawn.clear()
    run_and_report(*make_run(pair_file, tmp_path, nodes=6, **private))  # basis.npz and metrics.json: audited too
    assert (tmp_path / "basis.npz").is_file() and (tmp_path / "metrics.json").is_file()
    fresh = np.zeros(USERS, dtype=int)
    for users in drawn:
        fresh[users] += 1
    ledger = json.loads((tmp_path / "ledger.json").read_text())
    most = running[-1] + int(fresh.max())  # max(a + b) <= max a + max b: never below the true count
    assert len(ledger["events"]["rounds"]) == 5 and ledger["events"]["rounds"][-1]["most_user_rounds"] == most
    against = ledger["epsilon"]["against_server"]
    expected = ddg_epsilon([(Z, 1.0, most)], ledger["delta"], RANK * DIM)[0]
    assert against["most_user_rounds"] == most and against["epsilon"] == pytest.approx(expected)
    assert against["epsilon"] > ledger["epsilon"]["headline"]  # q = 6 / 24: amplification the server never grants
    assert f"({against['epsilon']:.3f}, " in ledger["guarantee"]

    assert main(["audit", "accounting", str(tmp_path)]) == 0
    audit = json.loads((tmp_path / "audits" / "accounting.json").read_text())
    assert audit["verdict"] == "pass" and audit["epsilon_against_server"] == pytest.approx(expected)
    ledger["epsilon"]["against_server"]["epsilon"] = ledger["epsilon"]["headline"]  # the old, amplified claim
    (tmp_path / "ledger.json").write_text(json.dumps(ledger))
    assert main(["audit", "accounting", str(tmp_path)]) == 1
    assert json.loads((tmp_path / "audits" / "accounting.json").read_text())["verdict"] == "fail"
    # An adversarial tester: a count of 0 gave epsilon 0 against the server, though users were sampled every round.
    # The count can neither fall nor stay below ceil(sampled so far / N).
    for entry in ledger["events"]["rounds"]:
        entry["most_user_rounds"] = 0
    ledger["epsilon"]["against_server"]["epsilon"] = 0.0
    (tmp_path / "ledger.json").write_text(json.dumps(ledger))
    assert main(["audit", "accounting", str(tmp_path)]) == 1
    audit = json.loads((tmp_path / "audits" / "accounting.json").read_text())
    assert "rounds for the most-sampled user" in audit["summary"] and audit["verdict"] == "fail"


def test_a_round_is_in_the_ledger_before_the_server_unmasks_its_sum(pair_file, tmp_path, monkeypatch):
    """Found by a reviewer: the ledger entry was written after the unmasking, so a server that crashed in between
    had seen a noised sum the ledger never counted."""
    from server.secagg_workflow import DdgSecAggPlusWorkflow

    in_ledger_at_unmask = []
    unmask = DdgSecAggPlusWorkflow.unmask_stage

    def spy(self, grid, context, state):
        rounds = json.loads((tmp_path / "ledger.json").read_text())["events"]["rounds"]
        in_ledger_at_unmask.append((self.strategy.run.round, len(rounds)))
        return unmask(self, grid, context, state)

    monkeypatch.setattr(DdgSecAggPlusWorkflow, "unmask_stage", spy)
    grid, settings = make_run(pair_file, tmp_path, nodes=6, **{"num-server-rounds": 3})
    run_federated(grid, settings)
    assert in_ledger_at_unmask and all(t == recorded for t, recorded in in_ledger_at_unmask), in_ledger_at_unmask
    assert len(json.loads((tmp_path / "ledger.json").read_text())["events"]["rounds"]) == 3  # once per round


def spy_round_sums(monkeypatch):
    """round -> the clipped updates the nodes' users computed (before their noise) / the sums the server unmasked."""
    clipped, unmasked = {}, {}
    train_clipped, secure_sum = message_app.train_clipped, SecAggLoReStrategy.secure_sum
    rounds = {}

    def spy_fit(self, parameters, config):
        rounds["now"] = config[p.ROUND]
        return fit(self, parameters, config)

    def spy_train(*args, **kwargs):
        updates = train_clipped(*args, **kwargs)
        clipped.setdefault(rounds["now"], []).append(updates)
        return updates

    def spy_sum(self, results):
        unmasked[self.run.round] = secure_sum(self, results)
        return unmasked[self.run.round]

    fit = SecAggTrainer.fit
    monkeypatch.setattr(SecAggTrainer, "fit", spy_fit)
    monkeypatch.setattr(message_app, "train_clipped", spy_train)
    monkeypatch.setattr(SecAggLoReStrategy, "secure_sum", spy_sum)
    return clipped, unmasked


def test_server_receives_only_masked_vectors_and_unmasks_only_noised_sums(pair_file, tmp_path, monkeypatch):
    uploads_sent = {}  # round -> the nodes' uploads (noised integer sums as grid multiples) before masking
    fit = SecAggTrainer.fit

    def spy_fit(self, parameters, config):
        params, n, metrics = fit(self, parameters, config)
        uploads_sent.setdefault(config[p.ROUND], []).append(params[0])
        return params, n, metrics

    monkeypatch.setattr(SecAggTrainer, "fit", spy_fit)
    clipped, unmasked = spy_round_sums(monkeypatch)
    nodes = USERS  # one user per node, as on devices
    grid, settings = make_run(pair_file, tmp_path, nodes=nodes, **{"num-server-rounds": 3})
    run_federated(grid, settings)

    # Nothing the server received holds a float array: train replies carry masked integers, the rest metrics only.
    assert all(len(record) == 0 for reply in grid.replies for record in reply.content.array_records.values())
    uploads = masked_uploads(grid)
    assert len(uploads) == sum(len(v) for v in uploads_sent.values()) > 0
    # one KS test per block: at level 1e-4 / blocks the whole run fails by chance with probability below 1e-4 (at
    # 1e-4 per block a run of uniform masks failed about once in 100, found in a full-suite run)
    assert all(block.shape == (RANK, DIM) and looks_uniform(block, 1e-4 / len(uploads)) for block in uploads)
    # The test can fail: one user's clipped update is rank one, and its integer encoding is not uniform.
    own = clipped[1][0][0]
    assert np.linalg.matrix_rank(own, tol=1e-9 * np.abs(own).max()) == 1
    assert not looks_uniform(np.round(own / (own.std() / 1000)).astype(np.int64) % MODULUS_RANGE)
    # The server unmasked exactly the sum of the noised uploads (grid arithmetic, no rounding), never a clipped sum.
    assert set(unmasked) == set(uploads_sent) and all(len(v) >= 2 for v in uploads_sent.values())
    for t, node_uploads in uploads_sent.items():
        assert np.array_equal(unmasked[t], np.sum(node_uploads, axis=0))
        clean = np.concatenate(clipped[t]).sum(axis=0)
        assert np.abs(unmasked[t] - clean).std() > 0.5 * Z * C  # the noise is in what the server sees


def test_unmasked_sum_is_the_clipped_sum_plus_noise_of_the_stated_std(pair_file, tmp_path, monkeypatch):
    clipped, unmasked = spy_round_sums(monkeypatch)
    grid, settings = make_run(pair_file, tmp_path, nodes=6, **{"num-server-rounds": 8})
    state = run_federated(grid, settings)
    ledger = json.loads((tmp_path / "ledger.json").read_text())
    stated = ledger["noise"]["std_on_sum"]
    tolerance = ledger["noise"]["dropout_tolerance"]
    assert stated == pytest.approx(Z * C)
    noise, expected = [], []
    for record in state.history:
        t, k = record["round"], record["sampled_users"]
        if t not in unmasked:
            continue
        noise.append((unmasked[t] - np.concatenate(clipped[t]).sum(axis=0)).ravel())
        # k users each add a share of std z C / sqrt(n_min): the sum's std is z C sqrt(k / n_min) >= z C
        expected.append(np.full(noise[-1].size, stated * np.sqrt(k / ddg.min_contributors(k, tolerance))))
    noise, expected = np.concatenate(noise), np.concatenate(expected)
    assert noise.size >= 5 * RANK * DIM
    standardized = noise / expected
    assert standardized.std() == pytest.approx(1.0, rel=0.08)  # >= 360 draws: relative SE ~4 %
    assert abs(standardized.mean()) < 4 / np.sqrt(noise.size)
    assert np.all(expected >= stated)


def test_a_round_with_more_dropouts_than_tolerated_is_never_unmasked(pair_file, tmp_path, monkeypatch):
    from flwr.app import Error, Message

    dropped = []

    def drop_one_upload(reply):  # one node dies after uploading nothing in the masked-vector stage
        configs = reply.content.config_records.get(RECORD_KEY_CONFIGS) if not reply.has_error() else None
        if configs is not None and Key.MASKED_PARAMETERS in configs and len(dropped) < 2:
            dropped.append(reply.metadata.src_node_id)
            return Message(Error(code=1, reason="node died"), reply_to=reply)
        return reply

    clipped, unmasked = spy_round_sums(monkeypatch)
    grid, settings = make_run(pair_file, tmp_path, nodes=6, **{"num-server-rounds": 2, "dropout-tolerance": 0.0})
    grid.reply_hook = drop_one_upload
    state = run_federated(grid, settings)
    first = state.history[0]
    assert dropped and first["round"] not in unmasked  # never unmasked: the server saw no under-noised sum
    assert first["secagg_nodes"] == 0 and first["accepted_users"] == 0
    assert json.loads((tmp_path / "ledger.json").read_text())["rounds"]["released"] == 2  # still one release each


@pytest.mark.parametrize("stage", [Key.PUBLIC_KEY_1, Key.DESTINATION_LIST, Key.MASKED_PARAMETERS, Key.NODE_ID_LIST])
def test_a_secagg_round_where_every_node_fails_stops_the_run_with_nothing_released(pair_file, tmp_path, stage):
    """Found by a privacy reviewer: deployed nodes failed every SecAgg+ message, yet each round released a noise-only
    step and the run finished as if it had trained. Every node failing a stage (setup, or the masked upload) now
    fails the run, as in the Message-API path: nothing of the round released, the same command resumes."""
    from flwr.app import Error, Message

    from server.training_round import RoundFailed

    def every_node_fails(reply):
        configs = reply.content.config_records.get(RECORD_KEY_CONFIGS) if not reply.has_error() else None
        if configs is not None and stage in configs:
            return Message(Error(code=1, reason="the node failed while training"), reply_to=reply)
        return reply

    grid, settings = make_run(pair_file, tmp_path, nodes=6, **{"num-server-rounds": 2})
    grid.reply_hook = every_node_fails
    with pytest.raises(RoundFailed, match="round 1: every node asked failed"):
        run_federated(grid, settings)
    assert not (tmp_path / "releases").exists() or read_releases(tmp_path).rounds.size == 0  # nothing released
    ledger = json.loads((tmp_path / "ledger.json").read_text()) if (tmp_path / "ledger.json").exists() else None
    # counted only where the sum could have been unmasked: the ledger is written before the unmask stage
    assert (ledger["rounds"]["released"] if ledger else 0) == (1 if stage == Key.NODE_ID_LIST else 0)


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
    with pytest.raises(PrivacyConfigError, match="num-shares|reconstruction-threshold"):
        run_federated(grid, settings)
    assert {m.metadata.message_type for m in grid.sent} == {"query"}  # population discovery only
    assert not (tmp_path / "ledger.json").exists()


def test_grid_values_cross_flowers_quantiser_exactly_and_fit_the_ring():
    from flwr.common.secure_aggregation.quantization import quantize

    encoding = ddg.plan_encoding(clip_norm=0.25, noise_multiplier=1.0, max_users_per_node=50, num_nodes=28,
                                 population=1400)
    assert encoding.clipping_range >= 50 * 0.25 and 28 * encoding.quantization_range < MODULUS_RANGE
    updates = np.random.default_rng(0).normal(size=(50, 5, 384))
    shares = ddg.encode_shares(updates, encoding, ddg.share_std(1.0, 0.25, 50, 0.1), np.random.default_rng(1))
    upload = ddg.node_upload(shares, encoding)
    (quantized,) = quantize([upload], encoding.clipping_range, encoding.quantization_range)
    assert np.array_equal(quantized.astype(np.int64), shares.sum(axis=0) + encoding.quantization_range // 2)
    # every user's rounded update stays within the accounted sensitivity (conditional rounding)
    from lore_core.privacy.ddg_accounting import rounded_l2_norm_bound

    rounded = ddg.encode_shares(updates, encoding, 1e-9 * encoding.granularity * 64, np.random.default_rng(2))
    bound = rounded_l2_norm_bound(0.25 / encoding.granularity, 5 * 384)
    assert np.linalg.norm(rounded.reshape(50, -1), axis=1).max() <= bound + 1e-9


def test_discrete_gaussian_sampler_has_the_stated_std():
    draws = ddg.discrete_gaussian(3.7, (200_000,), np.random.default_rng(0))
    assert draws.dtype == np.int64 and abs(draws.mean()) < 0.03
    assert draws.std() == pytest.approx(3.7, rel=0.01)


def test_nodes_not_asked_for_want_of_a_secure_sum_are_not_reported_as_missing_replies(pair_file, tmp_path):
    """Found by a tester: a user+secagg round whose sampled users lay on one node (no secure sum, a data-free noise
    step, by design) counted that node as a missing reply, and `simulate` warned "4 nodes did not answer a train
    request" of nodes that were never asked. They are now `unasked_nodes`, said as such; missing_replies stays for
    nodes asked that did not answer."""
    from lore_cli.simulate_command import PROBLEMS, run_problems

    # 1 expected user of 24 per round: a round has one sampled user (on one node) with probability 0.64
    grid, settings = make_run(pair_file, tmp_path, nodes=2, **{"num-server-rounds": 10, "clients-per-round": 1})
    state = run_federated(grid, settings)
    lonely = [r for r in state.history if r["secagg_nodes"] == 0]
    assert any(r["sampled_users"] for r in lonely) and all(r["missing_replies"] == 0 for r in state.history)
    assert all(r.get("unasked_nodes", 0) == (1 if r["sampled_users"] else 0) for r in lonely)
    totals = run_problems(state.history)
    assert "missing_replies" not in totals and totals["unasked_nodes"] >= 1
    assert "were not asked" in PROBLEMS["unasked_nodes"].format(totals["unasked_nodes"])


def test_simulate_and_deployments_run_the_one_client_app_that_serves_every_mode():
    """Found by a privacy reviewer: `pyproject.toml` deploys `client.client_app:app`, which failed every SecAgg+
    message (KeyError 'config'), so a `deploy local -c privacy-mode=user+secagg` released noise-only steps for every
    round and finished; only `simulate` swapped in the SecAgg+ app. Now that app routes SecAgg+ messages (the tests
    above run it), and `simulate` runs what a deployment runs."""
    import tomllib

    from simulations.flower_run import CLIENT_APP, SERVER_APP

    components = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["components"]
    assert (components["serverapp"], components["clientapp"]) == (SERVER_APP, CLIENT_APP)


@pytest.mark.parametrize("command", ["simulate-one-node", "simulate-one-user", "deploy-one-node",
                                     "deploy-seen-users-on-one-node"])
def test_a_secagg_run_that_could_never_form_a_secure_sum_is_refused_before_anything_is_written(pair_file, tmp_path,
                                                                                             capsys, command):
    """A tester: user+secagg on one node (or one user a round) spent epsilon 0.78 over rounds that were all data-free,
    wrote a basis of pure noise and exited 0. Now exit 2, naming why, before a file is written. A reviewer: two nodes,
    but every seen user (the only ones sampled) on the first, passed."""
    from lore_cli.main import main

    out = tmp_path / "run"
    dp = ["--noise-multiplier", "3"]
    if command == "deploy-seen-users-on-one-node":  # 10 seen users sort before 30 unseen: blocks of 20 users
        pairs, _ = make_synthetic_pairs(SyntheticPairsConfig(dim=DIM, true_rank=RANK, seen_users=10,
                                                             unseen_users=30, seed=3))
        pair_file = save_pairs(pairs, tmp_path / "skewed.npz")
        assert sorted(set(pairs.user[pairs.seen]))[-1] < sorted(set(pairs.user[~pairs.seen]))[0]
    argv = {"simulate-one-node": ["simulate", str(pair_file), "--out", str(out), "--privacy", "user+secagg", *dp,
                                  "--users-per-node", "100"],
            "simulate-one-user": ["simulate", str(pair_file), "--out", str(out), "--privacy", "user+secagg", *dp,
                                  "--clients-per-round", "1"],
            "deploy-one-node": ["deploy", "local", "--nodes", "1", "--pairs", str(pair_file), "--run-dir", str(out),
                                "--insecure", "-c", 'privacy-mode="user+secagg" noise-multiplier=3'],
            "deploy-seen-users-on-one-node": ["deploy", "local", "--nodes", "2", "--pairs", str(pair_file),
                                              "--run-dir", str(out), "--insecure", "-c",
                                              'privacy-mode="user+secagg" noise-multiplier=3']}[command]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert ("a sum needs at least 2 nodes; this run's seen users lie on 1" in err if "node" in command else
            "1 user(s) per round under user+secagg" in err), err
    assert not out.exists()
