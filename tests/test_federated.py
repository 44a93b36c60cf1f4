"""Federated LoRe: the real ServerApp strategy and ClientApp handlers on an in-process grid, plus one run through
Flower's Ray simulation engine."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from flwr.common.config import get_fused_config_from_dir

from federation import protocol as p
from client.client_app import app as client_app
from client.user_state import STATE_KEY, WEIGHTS_KEY
from lore_core.pairs import save_pairs
from server.server_app import run_federated
from server.checkpoint import CheckpointError, load_checkpoint
from server.run_settings import ServerSettings
from simulations.synthetic_pairs import SyntheticPairsConfig, make_synthetic_pairs
from simulations.in_process_grid import LocalGrid

ROOT = Path(__file__).resolve().parents[1]
RANK, DIM = 3, 24


@pytest.fixture(scope="module")
def pair_file(tmp_path_factory) -> Path:
    pairs, _ = make_synthetic_pairs(SyntheticPairsConfig(dim=DIM, true_rank=RANK, seen_users=24, unseen_users=6,
                                                         train_pairs=(20, 30), seed=3))
    return save_pairs(pairs, tmp_path_factory.mktemp("data") / "pairs.npz")


def make_run(pair_file: Path, run_dir: Path, nodes: int = 4, reply_hook=None, **overrides):
    config = {"pairs-path": str(pair_file), "run-dir": str(run_dir), "rank": RANK, "num-server-rounds": 6,
              "clients-per-round": 8, "eval-every": 3, "server-lr": 0.1, "privacy-mode": "none", **overrides}
    cfg = get_fused_config_from_dir(ROOT, config)
    grid = LocalGrid(client_app, [{"partition-id": i, "num-partitions": nodes} for i in range(nodes)], cfg,
                     reply_hook=reply_hook)
    return grid, ServerSettings.from_run_config(cfg)


def final_eval(state) -> dict:
    return {k: v for k, v in state.history[-1].items() if k.endswith("_test_acc")}


def test_in_process_run_improves_accuracy(pair_file, tmp_path):
    grid, settings = make_run(pair_file, tmp_path, **{"num-server-rounds": 12, "eval-every": 1})
    state = run_federated(grid, settings)
    evals = [r for r in state.history if "seen_test_acc" in r]
    assert [r["round"] for r in state.history] == list(range(1, 13))
    assert evals[-1]["seen_test_acc"] > evals[0]["seen_test_acc"] + 0.05
    assert evals[-1]["unseen_test_acc"] > evals[0]["unseen_test_acc"] + 0.05
    rounds_file = (tmp_path / "rounds.jsonl").read_text().splitlines()
    assert [json.loads(line)["round"] for line in rounds_file] == list(range(1, 13))


def test_a_run_started_by_hand_leaves_its_basis_metrics_and_report(pair_file, tmp_path):
    """`flwr run` by hand runs only the ServerApp: its `main` writes what devices and `evaluate --basis` read."""
    from flwr.app import Context, RecordDict

    from lore_core.basis_file import UNKNOWN_EMBEDDER, load_basis
    from server.optimizer import reported_basis
    from server.run_outputs import write_run_outputs
    from server.server_app import main

    grid, settings = make_run(pair_file, tmp_path, **{"num-server-rounds": 8, "eval-every": 4})
    run_config = next(iter(grid.contexts.values())).run_config
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)
    main(grid, context)
    state = load_checkpoint(tmp_path)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["rounds"] == 8 and metrics["node_kind"] == "deployed" and metrics["nodes"] == 4
    assert metrics["seen_test_acc"] == final_eval(state)["seen_test_acc"] and metrics["privacy_mode"] == "none"
    saved = load_basis(tmp_path / "basis.npz")
    reported = reported_basis(state.optimizer, state.basis)  # the tail average, not the last iterate
    assert not np.allclose(reported, state.basis) and np.allclose(saved.basis, reported)
    assert saved.version == 8 and saved.prior_pairs == settings.prior_pairs and saved.embedder == UNKNOWN_EMBEDDER
    assert (tmp_path / "report.md").exists()
    # Started again, the finished run trains nothing and keeps its recorded wall time.
    main(grid, context)
    assert json.loads((tmp_path / "metrics.json").read_text())["wall_seconds"] == metrics["wall_seconds"]
    # A run with rounds left reports nothing (a rerun resumes it).
    for name in ("metrics.json", "basis.npz"):
        (tmp_path / name).unlink()
    unfinished = ServerSettings.from_run_config({**run_config, "num-server-rounds": 10})
    assert write_run_outputs(tmp_path, state, unfinished, "none", nodes=4, seconds=1.0, command="x") is None
    assert not (tmp_path / "metrics.json").exists() and not (tmp_path / "basis.npz").exists()


def test_a_run_whose_outputs_cannot_be_written_still_completes_and_says_so(pair_file, tmp_path, monkeypatch, caplog):
    from server import server_app

    def broken(*_, **__):
        raise OSError("read-only file system")

    monkeypatch.setattr(server_app, "write_run_outputs", broken)
    grid, settings = make_run(pair_file, tmp_path, **{"num-server-rounds": 2, "eval-every": 2})
    with caplog.at_level(logging.WARNING, logger="lore_fed.server"):
        state = server_app.run_and_report(grid, settings)
    assert state.round == 2 and load_checkpoint(tmp_path).round == 2
    assert "were not written (read-only file system)" in caplog.text and not (tmp_path / "basis.npz").exists()


def test_a_benchmark_grid_keeps_no_messages_and_runs_alike(pair_file, tmp_path):
    """LocalGrid(keep_messages=False), as the benchmarks run it: a run kept every user's update of every round
    (600 rounds of 1,000 users grew past 10 GB); without them it must run the same rounds to the same basis."""
    from dataclasses import replace

    grid, settings = make_run(pair_file, tmp_path / "kept")
    kept = run_federated(grid, settings)
    assert grid.sent and grid.replies
    bare = LocalGrid(client_app, [{"partition-id": i, "num-partitions": 4} for i in range(4)],
                     {**grid.contexts[next(iter(grid.contexts))].run_config, "run-dir": str(tmp_path / "bare")},
                     keep_messages=False)
    state = run_federated(bare, replace(settings, run_dir=str(tmp_path / "bare")))
    assert not bare.sent and not bare.replies
    np.testing.assert_array_equal(state.basis, kept.basis)


def test_replies_carry_only_per_user_basis_updates_and_counts(pair_file, tmp_path):
    grid, settings = make_run(pair_file, tmp_path)
    run_federated(grid, settings)
    asked = {m.metadata.message_id: m for m in grid.sent}
    kinds = {"query": 0, "train": 0, "evaluate": 0}
    for reply in grid.replies:
        assert not reply.has_error()
        request = asked[reply.metadata.reply_to_message_id]
        kind = request.metadata.message_type
        kinds[kind] += 1
        content = reply.content
        assert not content.config_records  # no configs (nothing free-form) leave a node
        metrics = content[p.METRICS]
        for value in metrics.values():  # metrics are scalars: no per-pair or per-user vectors
            assert isinstance(value, (int, float))
        if kind == "train":
            n_asked = len(request.content[p.CONFIG][p.USER_INDICES])
            assert set(content.keys()) == {p.ARRAYS, p.METRICS}
            assert set(content[p.ARRAYS].keys()) == {p.UPDATES}
            assert content[p.ARRAYS][p.UPDATES].numpy().shape == (n_asked, RANK, DIM)
            assert dict(metrics) == {p.NUM_USERS: n_asked}
        else:
            assert set(content.keys()) == {p.METRICS}
            allowed = {"query": {p.PARTITION_ID, p.NUM_TRAIN_USERS, p.DIM},
                       "evaluate": set(p.EVAL_SUM_KEYS) | set(p.ORACLE_SUM_KEYS)}[kind]
            assert set(metrics.keys()) <= allowed
    assert kinds["query"] == 4 and kinds["train"] >= 6 and kinds["evaluate"] == 8
    # Each user's update is rank one (w (x) v): a basis update, not data. (Under mode `none` the server could
    # still read w off it by SVD; docs/privacy.md §0.3 - the DP modes address that.)
    updates = [r.content[p.ARRAYS][p.UPDATES].numpy() for r in grid.replies if p.ARRAYS in r.content]
    singular = np.linalg.svd(np.concatenate(updates), compute_uv=False)
    assert np.all(singular[:, 1] <= 1e-8 * singular[:, 0])


def test_user_weights_persist_in_context_state(pair_file, tmp_path):
    grid, settings = make_run(pair_file, tmp_path, nodes=1, **{"num-server-rounds": 3, "eval-every": 100})
    (context,) = grid.contexts.values()
    stored = []  # the node's w after rounds 1 and 2 (train only; round 3 also evaluates)
    run_federated(grid, settings, on_round=lambda r: stored.append(context.state[STATE_KEY][WEIGHTS_KEY].numpy()))
    asked = [set(m.content[p.CONFIG][p.USER_INDICES]) for m in grid.sent if m.metadata.message_type == "train"]
    fitted = [set(np.flatnonzero(~np.isclose(w, 1.0 / RANK).all(axis=1))) for w in stored[:2]]
    assert stored[0].shape == (24, RANK)
    np.testing.assert_allclose(stored[1].sum(axis=1), 1.0)
    assert fitted[0] == asked[0] and fitted[1] == asked[0] | asked[1]
    kept = sorted(asked[0] - asked[1])  # fitted in round 1, not sampled in round 2: w carried over unchanged
    assert kept
    np.testing.assert_array_equal(stored[1][kept], stored[0][kept])


def test_device_keeps_user_weights_in_a_file(pair_file, tmp_path):
    from flwr.app import Context, RecordDict

    from client.user_state import WEIGHTS_FILENAME, load_weights
    from lore_core.pairs import load_pairs

    pairs = load_pairs(pair_file)
    devices = []
    for user in np.unique(pairs.user[pairs.seen])[:4]:  # deployment: one user per device, its own pair file
        save_pairs(pairs.subset(pairs.user == user), tmp_path / user / "pairs.npz")
        devices.append({"partition-id": len(devices), "data-path": str(tmp_path / user)})
    cfg = get_fused_config_from_dir(ROOT, {"run-dir": str(tmp_path / "run"), "rank": RANK, "num-server-rounds": 2,
                                           "clients-per-round": 4, "privacy-mode": "none"})
    grid = LocalGrid(client_app, devices, cfg)
    run_federated(grid, ServerSettings.from_run_config(cfg))
    run_id = load_checkpoint(tmp_path / "run").run_id
    for node_id, context in grid.contexts.items():
        in_state = context.state[STATE_KEY][WEIGHTS_KEY].numpy()
        fresh = Context(run_id=2, node_id=node_id, node_config=context.node_config, state=RecordDict(), run_config=cfg)
        assert (Path(context.node_config["data-path"]) / WEIGHTS_FILENAME).exists()
        np.testing.assert_array_equal(load_weights(fresh, 1, RANK, run_id), in_state)  # a restarted node: the file


def test_runs_on_one_device_keep_their_own_w_and_share_the_spending(tmp_path):
    """Two runs on one device (one data-path, two run ids): each starts from the prior, not from the other's w or
    record logits (fitted against another basis), and resumes its own; the accountant histories are the device's,
    shared. A server that sends no run id gets a slot by run directory. The file keeps the RUN_SLOTS most recently
    written runs."""
    from flwr.app import Context, RecordDict

    from client import user_state as us

    def context(run_dir: str = "run") -> Context:
        return Context(run_id=1, node_id=1, node_config={"data-path": str(tmp_path)}, state=RecordDict(),
                       run_config={"run-dir": str(tmp_path / run_dir)})

    first, second = "a" * 16, "b" * 16
    w = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    us.save_weights(context(), w, first)
    rows = np.array([[0, 1.1, 0.5, 3], [1, 1.1, 0.5, 3]], dtype=np.float64)
    us.save_record_state(context(), rows, np.log(w), first)
    np.testing.assert_array_equal(us.load_weights(context(), 2, 3, second), np.full((2, 3), 1 / 3))
    np.testing.assert_array_equal(us.load_record_logits(context(), 2, 3, second), np.zeros((2, 3)))
    np.testing.assert_array_equal(us.load_weights(context(), 2, 3, None), np.full((2, 3), 1 / 3))
    np.testing.assert_array_equal(us.load_record_histories(context()), rows)  # one budget per device
    us.save_weights(context(), w[::-1], second)
    us.save_record_state(context(), rows[:1], np.zeros((2, 3)), second)
    np.testing.assert_array_equal(us.load_weights(context(), 2, 3, first), w)  # a resumed run: a new Context
    np.testing.assert_array_equal(us.load_record_logits(context(), 2, 3, first), np.log(w))
    np.testing.assert_array_equal(us.load_record_histories(context()), rows[:1])
    np.testing.assert_array_equal(us.load_weights(context(), 2, 3, second), w[::-1])
    us.save_weights(context("old"), w / 2, None)  # an older server: no run id, a slot by run directory
    np.testing.assert_array_equal(us.load_weights(context("old"), 2, 3, None), w / 2)
    np.testing.assert_array_equal(us.load_weights(context("other"), 2, 3, None), np.full((2, 3), 1 / 3))
    ids = [f"{run:016x}" for run in range(us.RUN_SLOTS + 2)]
    for run, run_id in enumerate(ids):
        us.save_weights(context(), w + run, run_id)
    with np.load(tmp_path / us.WEIGHTS_FILENAME) as data:
        assert data.files == [us.run_slot(context(), us.WEIGHTS_KEY, run_id) for run_id in ids[2:]]
    np.testing.assert_array_equal(us.load_weights(context(), 2, 3, ids[-1]), w + us.RUN_SLOTS + 1)


def test_a_new_run_in_a_reused_directory_starts_from_the_prior_on_the_device(pair_file, tmp_path):
    """Found by a reviewer: the device's slot for w was named by the run-dir string, so a new run in a directory
    an earlier run had used (deleted in between, or the default `runs/federated` of two servers) continued w fitted
    against the earlier run's basis. Now each run draws an id, kept by its resumes, and the slot bears it."""
    from client import user_state as us
    from lore_core.pairs import load_pairs

    pairs = load_pairs(pair_file)
    user = np.unique(pairs.user[pairs.seen])[0]
    save_pairs(pairs.subset(pairs.user == user), tmp_path / "device" / "pairs.npz")
    cfg = get_fused_config_from_dir(ROOT, {"run-dir": str(tmp_path / "run"), "rank": RANK, "num-server-rounds": 2,
                                           "clients-per-round": 1, "privacy-mode": "none"})
    started_from = []
    load_weights = us.load_weights

    def spy(context, n_users, rank, run_id):
        weights = load_weights(context, n_users, rank, run_id)
        started_from.append(weights.copy())
        return weights

    ids = []
    for attempt in range(2):
        grid = LocalGrid(client_app, [{"partition-id": 0, "data-path": str(tmp_path / "device")}], cfg)
        started_from.clear()
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr("client.client_app.load_weights", spy)
            run_federated(grid, ServerSettings.from_run_config(cfg))
        ids.append(load_checkpoint(tmp_path / "run").run_id)
        np.testing.assert_array_equal(started_from[0], np.full((1, RANK), 1 / RANK))  # the prior, both times
        assert not np.allclose(started_from[-1], 1 / RANK)  # then its own w
        shutil.rmtree(tmp_path / "run")  # the run is deleted; the next one uses the same directory
    with np.load(tmp_path / "device" / us.WEIGHTS_FILENAME) as data:
        assert ids[0] != ids[1] and data.files == [f"{us.WEIGHTS_KEY}@{run_id}" for run_id in ids]


@pytest.mark.parametrize("damage", ["nan", "inf", "shape", "count"])
def test_bad_reply_is_rejected_logged_and_round_goes_on(pair_file, tmp_path, caplog, damage):
    from flwr.app import Array, ArrayRecord, MetricRecord

    victims = []

    def tamper(reply):
        content = reply.content
        if p.UPDATES not in content.array_records.get(p.ARRAYS, {}) or victims:
            return reply
        victims.append(reply.metadata.src_node_id)
        updates = content[p.ARRAYS][p.UPDATES].numpy().copy()
        if damage == "nan":
            updates[0, 0, 0] = np.nan
        elif damage == "inf":
            updates[-1, -1, -1] = np.inf
        elif damage == "shape":
            updates = updates[:, :, :-1]
        content[p.ARRAYS] = ArrayRecord({p.UPDATES: Array(updates)})
        if damage == "count":
            content[p.METRICS] = MetricRecord({p.NUM_USERS: updates.shape[0] + 1})
        return reply

    grid, settings = make_run(pair_file, tmp_path, reply_hook=tamper, **{"num-server-rounds": 2})
    with caplog.at_level(logging.WARNING, logger="lore_fed.server"):
        state = run_federated(grid, settings)
    first = state.history[0]
    if damage in ("nan", "inf"):  # one user's non-finite update leaves out that user, not the node's other users
        assert first["rejected_replies"] == [] and first["non_finite_users"] == 1
        assert first["accepted_users"] == first["sampled_users"] - 1
        assert any("non-finite user updates" in rec.message for rec in caplog.records)
    else:
        assert [r["node"] for r in first["rejected_replies"]] == victims
        assert first["accepted_users"] < first["sampled_users"]
        assert any("rejected the reply of node" in rec.message for rec in caplog.records)
    assert state.history[1]["rejected_replies"] == [] and len(state.history) == 2
    assert np.isfinite(state.basis).all()


def test_a_resumed_run_keeps_its_id_and_its_w_on_the_device_and_an_older_checkpoint_its_run_dir_slot(pair_file,
                                                                                                       tmp_path):
    """A reviewer: no test held a resume to its run id. A run killed in round 3 resumes with the id its checkpoint
    keeps, and its device's first training starts from the w it stored, not the prior. A checkpoint written before
    run ids (none in its meta) resumes without sending one, and its nodes keep w in the run-dir slot."""
    from client import user_state as us
    from lore_core.pairs import load_pairs
    from server.checkpoint import save_checkpoint

    pairs = load_pairs(pair_file)
    user = np.unique(pairs.user[pairs.seen])[0]
    device = tmp_path / "device"
    save_pairs(pairs.subset(pairs.user == user), device / "pairs.npz")

    class Killed(Exception):
        pass

    def run(run_dir: Path, kill_in_round: int | None = None) -> LocalGrid:
        cfg = get_fused_config_from_dir(ROOT, {"run-dir": str(run_dir), "rank": RANK, "num-server-rounds": 4,
                                               "clients-per-round": 1, "privacy-mode": "none"})

        def kill(reply):
            request = next(m for m in grid.sent if m.metadata.message_id == reply.metadata.reply_to_message_id)
            if request.metadata.message_type == "train" and request.content[p.CONFIG][p.ROUND] == kill_in_round:
                raise Killed
            return reply

        grid = LocalGrid(client_app, [{"partition-id": 0, "data-path": str(device)}], cfg, reply_hook=kill)
        if kill_in_round is None:
            run_federated(grid, ServerSettings.from_run_config(cfg))
        else:
            with pytest.raises(Killed):
                run_federated(grid, ServerSettings.from_run_config(cfg))
        return grid

    started_from = []
    load_weights = us.load_weights

    def spy(context, n_users, rank, run_id):
        started_from.append(load_weights(context, n_users, rank, run_id).copy())
        return started_from[-1]

    run(tmp_path / "run", kill_in_round=3)
    run_id = load_checkpoint(tmp_path / "run").run_id
    with np.load(device / us.WEIGHTS_FILENAME) as data:
        stored = data[f"{us.WEIGHTS_KEY}@{run_id}"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("client.client_app.load_weights", spy)
        run(tmp_path / "run")
    assert load_checkpoint(tmp_path / "run").run_id == run_id
    np.testing.assert_array_equal(started_from[0], stored)  # not the prior
    assert not np.allclose(stored, 1 / RANK)

    run(tmp_path / "old", kill_in_round=3)
    state = load_checkpoint(tmp_path / "old")
    state.run_id = ""  # as checkpoints were written before run ids
    save_checkpoint(tmp_path / "old", state)
    grid = run(tmp_path / "old")
    assert all(p.RUN_ID not in m.content[p.CONFIG] for m in grid.sent if p.CONFIG in m.content)
    old_slot = us.run_slot(next(iter(grid.contexts.values())), us.WEIGHTS_KEY, None)
    assert old_slot == f"{us.WEIGHTS_KEY}@{hashlib.sha256(str(tmp_path / 'old').encode()).hexdigest()[:16]}"
    with np.load(device / us.WEIGHTS_FILENAME) as data:
        assert old_slot in data.files

    with np.load(tmp_path / "old" / "checkpoint.npz") as data:
        arrays = dict(data)
    meta = json.loads(str(arrays["meta"]))
    np.savez(tmp_path / "old" / "checkpoint.npz", **{**arrays, "meta": np.array(json.dumps({**meta, "run_id": "XYZ"}))})
    with pytest.raises(CheckpointError, match="run_id must be 16 lowercase hex digits"):
        load_checkpoint(tmp_path / "old")


def test_killed_run_resumes_to_the_same_final_metrics(pair_file, tmp_path):
    grid, settings = make_run(pair_file, tmp_path / "straight")
    straight = run_federated(grid, settings)

    class Killed(Exception):
        pass

    def kill_in_round_4(reply):
        request = next(m for m in grid2.sent if m.metadata.message_id == reply.metadata.reply_to_message_id)
        if request.metadata.message_type == "train" and request.content[p.CONFIG][p.ROUND] == 4:
            raise Killed  # the server process dies in the middle of round 4
        return reply

    grid2, settings2 = make_run(pair_file, tmp_path / "killed", reply_hook=kill_in_round_4)
    with pytest.raises(Killed):
        run_federated(grid2, settings2)
    assert load_checkpoint(tmp_path / "killed").round == 3
    grid3, settings3 = make_run(pair_file, tmp_path / "killed")  # a new process: fresh node contexts, no w
    resumed = run_federated(grid3, settings3)
    assert [r["round"] for r in resumed.history] == list(range(1, 7))
    assert final_eval(resumed) == final_eval(straight)
    np.testing.assert_allclose(resumed.basis, straight.basis, rtol=0, atol=1e-7)
    with pytest.raises(CheckpointError, match="other settings"):
        run_federated(*make_run(pair_file, tmp_path / "killed", **{"server-lr": 0.2}))
    ledger = (tmp_path / "killed" / "ledger.json").read_text()
    with pytest.raises(CheckpointError, match="other settings"):  # refused before the ledger states its policy
        run_federated(*make_run(pair_file, tmp_path / "killed", **{"eval-every": 5}))
    assert (tmp_path / "killed" / "ledger.json").read_text() == ledger  # (a reviewer: the audit then flagged it)
    resumed_other_prior = run_federated(*make_run(pair_file, tmp_path / "killed", **{"prior-pairs": 10.0}))
    assert resumed_other_prior.history[-1]["round"] == 6  # the evaluation's prior is post-processing: not refused


def test_a_checkpoint_that_fingerprinted_the_personal_prior_still_resumes(pair_file, tmp_path):
    """Checkpoints written while `prior_pairs` was fingerprinted (a DP run whose default was then 3) resume under
    today's default; any training setting that differs is still refused."""
    from server.checkpoint import CheckpointError, RunState, check_resumable

    fingerprint = make_run(pair_file, tmp_path / "run")[1].fingerprint()
    assert "prior_pairs" not in fingerprint
    old = RunState(round=3, basis=np.zeros((RANK, 4)), settings={**fingerprint, "prior_pairs": 3.0}, population=[1])
    check_resumable(old, fingerprint, [1], tmp_path)
    with pytest.raises(CheckpointError, match="server-lr 0.1 then, 0.5 now"):
        check_resumable(old, {**fingerprint, "server_lr": 0.5}, [1], tmp_path)


def test_a_resume_that_repeats_a_privacy_default_as_a_flag_is_the_same_run(tmp_path):
    """A tester: `simulate --noise-multiplier 1` on a run begun without the flag was refused ("other settings"), as
    given privacy settings were compared as typed. Defaults given are the same run (both ways); other values are
    still refused."""
    from server.checkpoint import CheckpointError, RunState, check_resumable

    population = [30, 10, 16]  # 40 training users: the user modes' delta 1e-5
    for mode, defaults, other in (
            ("user", {"noise_multiplier": 1, "clip_norm": 0.25, "delta": 1e-5}, {"noise_multiplier": 2.0}),
            ("record", {"record_batch_size": 4, "record_sample_rate": 0.25, "max_grad_norm": 1.0},
             {"record_sample_rate": 0.5})):
        plain = {"privacy_mode": mode, "privacy": {"reproducible_noise": False}}
        spelled = {"privacy_mode": mode, "privacy": {**defaults, "reproducible_noise": False}}
        for begun, resumed in ((plain, spelled), (spelled, plain)):
            check_resumable(RunState(round=1, basis=np.zeros((2, 16)), settings=begun, population=population),
                            resumed, population, tmp_path)
        changed = {"privacy_mode": mode, "privacy": {**other, "reproducible_noise": False}}
        with pytest.raises(CheckpointError, match="other settings"):
            check_resumable(RunState(round=1, basis=np.zeros((2, 16)), settings=plain, population=population),
                            changed, population, tmp_path)
    with pytest.raises(CheckpointError, match="other settings"):  # a user-mode default is no record-mode one
        check_resumable(RunState(round=1, basis=np.zeros((2, 16)), population=population,
                                 settings={"privacy_mode": "record", "privacy": {}}),
                        {"privacy_mode": "record", "privacy": {"clip_norm": 0.25}}, population, tmp_path)


def test_a_checkpoint_over_another_population_is_refused_naming_what_differs(tmp_path):
    """Found by a tester: a D = 64 run's checkpoint under a D = 384 run was refused with "users per node differ",
    naming neither the checkpoint nor the width."""
    from server.checkpoint import CheckpointError, RunState, check_resumable

    old = RunState(round=3, basis=np.zeros((RANK, 64)), settings={}, population=[5, 4, 64])
    with pytest.raises(CheckpointError, match=r"checkpoint.npz holds a run over another population: embedding "
                                              r"width D 64, now 384; use a new --out"):
        check_resumable(old, {}, [5, 4, 384], tmp_path)
    with pytest.raises(CheckpointError, match=r"2 nodes with 9 training users \[5, 4\], now 2 nodes with 10 "
                                              r"training users \[5, 5\]"):
        check_resumable(old, {}, [5, 5, 64], tmp_path)


def test_user_dp_aggregator_fits_the_strategy_seam(pair_file, tmp_path):
    from lore_core.privacy.dp_fedavg import make_private_rng
    from server.aggregation import UserDpAggregator

    grid, settings = make_run(pair_file, tmp_path, **{"num-server-rounds": 4})
    dp = UserDpAggregator(clients_per_round=8, noise_multiplier=1.0, clip_norm=0.1, rng=make_private_rng(7))
    state = run_federated(grid, settings, aggregator=dp)
    sampled = [r["sampled_users"] for r in state.history]
    assert len(sampled) == 4 and len(set(sampled)) > 1  # Poisson: the count varies from round to round
    assert np.isfinite(state.basis).all() and "seen_test_acc" in state.history[-1]


@pytest.mark.slow
def test_simulate_command_runs_through_the_ray_engine(pair_file, tmp_path):
    from lore_cli.main import main

    out = tmp_path / "sim"
    code = main(["simulate", str(pair_file), "--rounds", "2", "--clients-per-round", "4", "--rank", str(RANK),
                 "--out", str(out), "--users-per-node", "10", "--eval-every", "1", "--allow-uncovered-eval"])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("seen_test_acc", "unseen_test_acc", "rank", "train_seconds", "oracle_seen_test_acc",
                "oracle_unseen_test_acc", "rounds", "wall_seconds", "privacy_mode", "epsilon", "epsilon_rdp",
                "delta", "noise_multiplier", "clip_norm"):
        assert key in metrics
    assert metrics["rounds"] == 2 and metrics["privacy_mode"] == "user" and metrics["nodes"] == 3  # DP by default
    ledger = json.loads((out / "ledger.json").read_text())
    assert ledger["rounds"]["released"] == 2 and ledger["epsilon"]["prv"] == metrics["epsilon"]
    assert len((out / "rounds.jsonl").read_text().splitlines()) == 2
    assert "## Privacy" in (out / "report.md").read_text()
    # evaluated in both rounds (opted in under DP): both plots; with one evaluation the accuracy plot is a point and
    # is not drawn (test_failure_paths)
    assert (out / "privacy_per_round.png").stat().st_size > 0 and (out / "accuracy_per_round.png").stat().st_size > 0


def test_device_evaluation_uses_the_device_adaptation_and_matches_the_batched_node(tmp_path):
    """In deployment the ClientApp adapts w with client.device's code; it reaches the batched solver's result."""
    from federation.local_training import device_fit_weights, evaluate_node, personal_fit_weights
    from federation.user_block import load_device_users
    from lore_core.pairs import save_pairs
    from simulations.synthetic_pairs import SyntheticPairsConfig, make_synthetic_pairs

    pairs, truth = make_synthetic_pairs(SyntheticPairsConfig(dim=12, true_rank=3, seen_users=4, unseen_users=3))
    node = load_device_users(str(save_pairs(pairs, tmp_path / "pairs.npz")))
    basis = truth.basis
    start = np.full((node.n_train_users, 3), 1 / 3)
    w_batched, sums_batched = evaluate_node(basis, node, start, prior_pairs=3.0, fit=personal_fit_weights)
    w_device, sums_device = evaluate_node(basis, node, start, prior_pairs=3.0, fit=device_fit_weights)
    np.testing.assert_allclose(w_device, w_batched, atol=1e-6)
    assert sums_device == pytest.approx(sums_batched, abs=1e-9)


@pytest.mark.parametrize("bad", [0.0, -2.0, float("inf"), "abc"])
def test_invalid_personal_prior_stops_the_run_before_training(pair_file, tmp_path, bad):
    from server.run_settings import RunConfigError

    with pytest.raises(RunConfigError, match="prior-pairs"):
        make_run(pair_file, tmp_path / "run", **{"prior-pairs": bad})


@pytest.mark.parametrize("key, bad", [("l2", "abc"), ("rank", "four"), ("client-lr", "fast"), ("seed", 1.9),
                                      ("local-steps", "x"), ("server-lr", "x"), ("init-scale", "x"),
                                      ("prior-pairs", True), ("allow-uncovered-eval", "no")])
def test_a_run_config_value_of_the_wrong_type_names_its_key(pair_file, tmp_path, key, bad):
    from server.run_settings import RunConfigError

    with pytest.raises(RunConfigError, match=f"`{key}`"):
        make_run(pair_file, tmp_path / "run", **{key: bad})


def test_allow_uncovered_eval_reads_the_string_false_as_false(pair_file, tmp_path):
    """A truthy string must not switch on evaluation the accountant does not cover."""
    assert make_run(pair_file, tmp_path / "run", **{"allow-uncovered-eval": "false"})[1].allow_uncovered_eval is False
    assert make_run(pair_file, tmp_path / "run", **{"allow-uncovered-eval": True})[1].allow_uncovered_eval is True


@pytest.mark.parametrize("flags, expected", [(["--privacy", "none"], 3.0), ([], 10.0),
                                             (["--privacy", "user", "--prior-pairs", "5"], 5.0)])
def test_personal_prior_defaults_to_the_dp_pilots_choice_under_dp(flags, expected):
    """Under DP the released basis is noisy: without --prior-pairs (run config `prior-pairs = ""`), users' final w
    fits lean on the population (DP_PRIOR_PAIRS); without privacy the trainer's default; an explicit value always
    wins. Server and clients resolve it the same way."""
    import argparse

    from flwr.common.config import get_fused_config_from_dir

    from federation.protocol import ClientSettings
    from lore_cli.simulate_command import configure, run_overrides
    from server.run_settings import ServerSettings
    from simulations.flower_run import ROOT

    parser = argparse.ArgumentParser()
    configure(parser)
    cfg = get_fused_config_from_dir(ROOT, {**run_overrides(parser.parse_args(["pairs.npz", "--out", "run", *flags]),
                                                           100, 2000), "run-dir": "run"})
    assert ServerSettings.from_run_config(cfg).prior_pairs == expected
    assert ClientSettings.from_run_config(cfg).prior_pairs == expected


class _SlowNodes:
    """A grid whose nodes in `slow` answer a message only when the server waits at least `needs` seconds for it (a
    node still running ClientApps for a crashed run's messages after a SuperLink restart). Counts the messages."""

    def __init__(self, grid, slow: set, needs: float):
        self.grid, self.slow, self.needs, self.sent = grid, slow, needs, 0

    def get_node_ids(self):
        return self.grid.get_node_ids()

    def send_and_receive(self, messages, timeout):
        messages = list(messages)
        self.sent += len(messages)
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        return [r for r in replies if r.metadata.src_node_id not in self.slow or timeout >= self.needs]


def test_a_node_that_answers_the_query_late_is_waited_for_with_one_message(pair_file, tmp_path):
    """Found in CI (twice): after a SuperLink restart one node, still running ClientApps for the crashed run's
    messages, answered the new run's query only after the server's 60 s wait had ended. Asking again queued
    duplicate queries on that node and dropped its late answers (it answered every one, each too late). One query
    per node now waits up to QUERY_WAIT_TIMEOUTS round timeouts."""
    from server.population import QUERY_WAIT_TIMEOUTS, PopulationError, discover_population

    grid, _ = make_run(pair_file, tmp_path, nodes=3)
    node_ids = sorted(grid.get_node_ids())
    everyone = discover_population(grid, 3, timeout=5.0)
    slow = _SlowNodes(grid, {node_ids[1]}, needs=2 * 5.0)
    late = discover_population(slow, 3, timeout=5.0)
    np.testing.assert_array_equal(late.counts, everyone.counts)
    np.testing.assert_array_equal(late.node_ids, everyone.node_ids)
    assert slow.sent == 3  # one query per node, no duplicates
    with pytest.raises(PopulationError, match=f"2 of 3 nodes answered the query within {QUERY_WAIT_TIMEOUTS * 5:g} s"):
        discover_population(_SlowNodes(grid, {node_ids[1]}, needs=QUERY_WAIT_TIMEOUTS * 5.0 + 1), 3, timeout=5.0)
