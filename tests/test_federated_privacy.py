"""Privacy modes of the federated run (docs/privacy.md §2, §7-§9): the real ServerApp strategy and ClientApp on the
in-process grid, and the `simulate` command's fail-closed validation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from flwr.app import MetricRecord
from flwr.common.config import get_fused_config_from_dir

from federation import protocol as p
from client.client_app import app as client_app
from lore_core.pairs import save_pairs
from lore_core.privacy.accounting import epsilon
from lore_core.privacy.accounting import history_epsilon
from lore_core.privacy.ledger import LedgerError, PrivacyLedger
from server.server_app import run_federated
from lore_core.privacy.ledger import EPSILON_COVERED, POPULATION_NOT_COVERED, RECORD_EPSILON_NOT_COVERED, W_NOT_COVERED
from server.run_ledger import EVAL_NOT_COVERED, RUN_FILES_NOT_COVERED
from server.run_settings import ServerSettings
from server.optimizer import make_optimizer
from simulations.synthetic_pairs import SyntheticPairsConfig, make_synthetic_pairs
from simulations.in_process_grid import LocalGrid

ROOT = Path(__file__).resolve().parents[1]
RANK, DIM, USERS, M = 3, 24, 24, 8
Q = M / USERS


@pytest.fixture(scope="module")
def pair_file(tmp_path_factory) -> Path:
    pairs, _ = make_synthetic_pairs(SyntheticPairsConfig(dim=DIM, true_rank=RANK, seen_users=USERS, unseen_users=6,
                                                         train_pairs=(20, 30), seed=5))
    return save_pairs(pairs, tmp_path_factory.mktemp("data") / "pairs.npz")


def make_run(pair_file: Path, run_dir: Path, nodes: int = 4, reply_hook=None, **overrides):
    config = {"pairs-path": str(pair_file), "run-dir": str(run_dir), "rank": RANK, "num-server-rounds": 5,
              "clients-per-round": M, "server-lr": 0.1, "privacy-mode": "user", "noise-multiplier": 1.0,
              "clip-norm": 0.5, **overrides}
    cfg = get_fused_config_from_dir(ROOT, config)
    grid = LocalGrid(client_app, [{"partition-id": i, "num-partitions": nodes} for i in range(nodes)], cfg,
                     reply_hook=reply_hook)
    return grid, ServerSettings.from_run_config(cfg)


def ledger_json(run_dir: Path) -> dict:
    return json.loads((run_dir / "ledger.json").read_text())


def requests_of(grid: LocalGrid, kind: str) -> list:
    return [m for m in grid.sent if m.metadata.message_type == kind]


def test_user_mode_ledger_grows_each_round_and_replies_carry_only_clipped_updates(pair_file, tmp_path):
    epsilons_on_disk = []
    grid, settings = make_run(pair_file, tmp_path)
    state = run_federated(grid, settings,
                          on_round=lambda r: epsilons_on_disk.append(ledger_json(tmp_path)["epsilon"]["prv"]))
    ledger = ledger_json(tmp_path)
    per_round = PrivacyLedger.load(tmp_path).epsilon_by_round()
    assert [e["round"] for e in ledger["events"]["rounds"]] == [1, 2, 3, 4, 5]
    assert all("epsilon" not in key for e in ledger["events"]["rounds"] for key in e)  # events hold facts only
    assert np.all(np.diff(per_round) > 0) and epsilons_on_disk == per_round  # on disk when the round ended
    assert per_round[-1] == pytest.approx(epsilon(1.0, Q, 5, 1e-5))
    assert [r["epsilon"] for r in state.history] == per_round
    assert ledger["mode"] == "user" and ledger["sampling"]["method"] == "poisson" and not ledger["not_private"]["flag"]
    assert EVAL_NOT_COVERED in ledger["not_covered"] and ledger["evaluation"]["policy"] == "after the last round only"
    assert POPULATION_NOT_COVERED in ledger["not_covered"]  # N is exact: a reviewer found it listed nowhere
    assert RUN_FILES_NOT_COVERED in ledger["not_covered"]  # the pair file's fingerprint: listed nowhere before
    # w_i "never leaves the device" hid that this mode's rank-one update discloses it to the server (a reviewer)
    assert W_NOT_COVERED["user"] in ledger["not_covered"] and EPSILON_COVERED in ledger["covered"]
    assert [m.content[p.CONFIG][p.ROUND] for m in requests_of(grid, "evaluate")] == [5] * 4  # only after the last
    train_ids = {m.metadata.message_id for m in requests_of(grid, "train")}
    assert all(m.content[p.CONFIG][p.CLIP_NORM] == 0.5 for m in requests_of(grid, "train"))
    for reply in grid.replies:
        if reply.metadata.reply_to_message_id not in train_ids:
            continue
        assert set(reply.content.keys()) == {p.ARRAYS, p.METRICS} and not reply.content.config_records
        assert set(reply.content[p.ARRAYS].keys()) == {p.UPDATES}
        updates = reply.content[p.ARRAYS][p.UPDATES].numpy()
        assert dict(reply.content[p.METRICS]) == {p.NUM_USERS: updates.shape[0]}  # no data-dependent metric
        assert np.all(np.linalg.norm(updates.reshape(len(updates), -1), axis=1) <= 0.5 + 1e-9)  # client clip


def test_noise_is_on_the_sum_with_the_stated_std(pair_file, tmp_path):
    def zero_updates(reply):  # every client sends a zero update: what the server releases is pure noise / (q N)
        from flwr.app import Array, ArrayRecord

        if p.UPDATES in reply.content.array_records.get(p.ARRAYS, {}):
            zeros = np.zeros_like(reply.content[p.ARRAYS][p.UPDATES].numpy())
            reply.content[p.ARRAYS] = ArrayRecord({p.UPDATES: Array(zeros)})
        return reply

    rounds, z, clip = 12, 1.0, 0.5
    grid, settings = make_run(pair_file, tmp_path, reply_hook=zero_updates, **{
        "num-server-rounds": rounds, "server-optimizer": "sgd", "server-lr": 1.0, "client-lr": 1.0,
        "local-steps": 1, "l2": 0.0, "reproducible-noise": True})
    state = run_federated(grid, settings)
    # basis_{t+1} - basis_t = mean update of round t (SGD, lr 1, no l2); basis_t is what round t's train messages carry
    sent = {}
    for m in requests_of(grid, "train"):
        sent.setdefault(m.content[p.CONFIG][p.ROUND], m.content[p.ARRAYS][p.BASIS].numpy())
    bases = [sent[t] for t in range(1, rounds + 1)] + [state.basis]
    # The server's rate follows the run's schedule (server/optimizer.py): undo it to read the released noise.
    schedule = make_optimizer("sgd", 1.0, rounds, settings.server_lr_schedule)
    rates = []
    for _ in range(rounds):
        rates.append(schedule.lr)
        schedule.t += 1
    released = np.diff(np.stack(bases), axis=0) / np.array(rates)[:, None, None]  # (rounds, B, D)
    expected = z * clip / (Q * USERS)  # std on the sum z C, over the fixed denominator q N
    sampled = np.array([r["sampled_users"] for r in state.history])
    assert len(set(sampled)) > 1  # Poisson counts vary; the denominator does not
    assert np.std(released) == pytest.approx(expected, rel=0.1)  # 864 draws: relative SE ~2.4%
    assert abs(np.mean(released)) < 4 * expected / math.sqrt(released.size)
    ledger = ledger_json(tmp_path)
    assert ledger["not_private"]["flag"] and "NOT PRIVATE" in ledger["guarantee"]


def test_server_reclips_an_over_norm_update(pair_file, tmp_path):
    tampered = []

    def blow_up(reply):  # a client that skipped its clip: one user's update at 1e6 times the clip norm
        from flwr.app import Array, ArrayRecord

        if p.UPDATES in reply.content.array_records.get(p.ARRAYS, {}) and not tampered:
            updates = reply.content[p.ARRAYS][p.UPDATES].numpy().copy()
            updates[0] = 1e6 * 0.5 * np.ones_like(updates[0]) / np.sqrt(updates[0].size)
            reply.content[p.ARRAYS] = ArrayRecord({p.UPDATES: Array(updates)})
            tampered.append(reply.metadata.src_node_id)
        return reply

    grid, settings = make_run(pair_file, tmp_path, reply_hook=blow_up, **{
        "num-server-rounds": 1, "server-optimizer": "sgd", "server-lr": 1.0, "client-lr": 1.0, "local-steps": 1,
        "l2": 0.0})
    state = run_federated(grid, settings)
    basis0 = requests_of(grid, "train")[0].content[p.ARRAYS][p.BASIS].numpy()
    record = state.history[0]
    assert tampered and record["rejected_replies"] == [] and record["accepted_users"] == record["sampled_users"]
    step = np.linalg.norm(state.basis - basis0)
    # clipped: |sum| <= k C, plus noise of norm ~ z C sqrt(B D); unclipped it would be ~1e6 C / (q N)
    bound = (record["sampled_users"] * 0.5 + 3 * 0.5 * math.sqrt(RANK * DIM)) / (Q * USERS)
    assert step <= bound


def test_max_epsilon_stops_before_the_exceeding_round_and_resume_continues_the_ledger(pair_file, tmp_path,
                                                                                      monkeypatch):
    import server.training_round

    rounds = 4
    cap = epsilon(1.0, Q, rounds, 1e-5) + 0.01  # the plan fits; one release more does not
    overrides = {"num-server-rounds": rounds, "max-epsilon": cap}
    real_save = server.training_round.save_checkpoint

    class Killed(Exception):
        pass

    def crash_in_round_3(run_dir, state):
        if state.round == 3:
            raise Killed  # round 3 is in the ledger (spent), its checkpoint is lost
        real_save(run_dir, state)

    monkeypatch.setattr(server.training_round, "save_checkpoint", crash_in_round_3)
    with pytest.raises(Killed):
        run_federated(*make_run(pair_file, tmp_path, **overrides))
    monkeypatch.setattr(server.training_round, "save_checkpoint", real_save)
    assert len(ledger_json(tmp_path)["events"]["rounds"]) == 3

    with pytest.raises(LedgerError, match="other privacy settings"):
        run_federated(*make_run(pair_file, tmp_path, **{**overrides, "noise-multiplier": 2.0}))
    grid, settings = make_run(pair_file, tmp_path, **overrides)  # a new process resumes after round 2
    state = run_federated(grid, settings)
    ledger = ledger_json(tmp_path)
    # round 3 again = the 4th release, within the cap; a 5th would exceed it, so round 4 never starts
    assert [e["round"] for e in ledger["events"]["rounds"]] == [1, 2, 3, 4]
    assert ledger["budget"]["stopped_early"] and ledger["epsilon"]["prv"] <= cap
    assert state.round == 3 and [r["round"] for r in state.history] == [1, 2, 3]
    assert all(m.content[p.CONFIG][p.ROUND] == 3 for m in requests_of(grid, "train"))
    last = state.history[-1]
    assert last["stopped_early"] and "seen_test_acc" in last  # metrics of the last released basis
    assert [m.content[p.CONFIG][p.ROUND] for m in requests_of(grid, "evaluate")] == [3] * 4


@pytest.fixture(scope="module")
def tiny_pair_file(tmp_path_factory) -> Path:
    pairs, _ = make_synthetic_pairs(SyntheticPairsConfig(dim=8, true_rank=2, seen_users=3, unseen_users=1,
                                                         train_pairs=(9, 14), few_shot_pairs=4, test_pairs=4,
                                                         seed=2))
    return save_pairs(pairs, tmp_path_factory.mktemp("tiny") / "pairs.npz")


def test_record_mode_accounts_per_pair_like_one_uninterrupted_opacus_run(tiny_pair_file, tmp_path, monkeypatch):
    from opacus.accountants import PRVAccountant

    import lore_core.privacy.record_dp as record_dp
    from lore_core.privacy.record_dp import steps_per_epoch
    from lore_core.pairs import load_pairs

    calls = []  # (pairs of the user, logits passed in, logits returned): w only ever comes out of the private step
    real_update = record_dp.dp_sgd_update

    def spy(basis, logits, diff, **kwargs):
        update, new_logits, state = real_update(basis, logits, diff, **kwargs)
        calls.append((diff.shape[0], logits.copy(), new_logits.copy()))
        return update, new_logits, state

    monkeypatch.setattr(record_dp, "dp_sgd_update", spy)
    rounds = 10
    cfg = get_fused_config_from_dir(ROOT, {
        "pairs-path": str(tiny_pair_file), "run-dir": str(tmp_path), "rank": 2, "num-server-rounds": rounds,
        "clients-per-round": 3, "privacy-mode": "record", "noise-multiplier": 1.0, "max-grad-norm": 1.0,
        "record-batch-size": 4, "record-epochs": 1, "server-lr": 0.05, "eval-every": 3,
        "allow-uncovered-eval": True})
    grid = LocalGrid(client_app, [{"partition-id": 0, "num-partitions": 1}], cfg)
    run_federated(grid, ServerSettings.from_run_config(cfg))

    pairs = load_pairs(tiny_pair_file)
    train = pairs.subset(pairs.seen & (pairs.split == "train"))
    users, counts = np.unique(train.user, return_counts=True)
    for n in counts:  # each user's w starts uniform and then is exactly what its last private step returned,
        mine = [(before, after) for pairs_n, before, after in calls if pairs_n == n]  # also after evaluations
        assert len(mine) == rounds and np.array_equal(mine[0][0], np.zeros(2))  # (which refit w without privacy)
        for (_, previous), (current, _) in zip(mine, mine[1:]):
            np.testing.assert_array_equal(current, previous)

    ledger = ledger_json(tmp_path)
    assert ledger["privacy_unit"] == "one preference pair of one client"
    # record mode's epsilon is the largest client history, which follows each client's sampling and budget stops:
    # not covered (a reviewer)
    assert RECORD_EPSILON_NOT_COVERED in ledger["not_covered"] and EPSILON_COVERED not in ledger["covered"]
    assert "NOT a user-level guarantee" in ledger["guarantee"] and ledger["epsilon"]["over"] == "max over 3 clients"
    # the claim names its epsilon with its delta (it read "record-level (1e-05-)DP ..."; a tester)
    assert ledger["guarantee"].startswith(f"record-level ({ledger['epsilon']['prv']:.3f}, ")
    steps = steps_per_epoch(0.25)  # the default public rate: every client's history is the same, whatever its n
    assert len(set(counts)) > 1  # clients of different pair counts
    for i in range(len(counts)):
        client = ledger["events"]["clients"][str(i)]
        assert [tuple(seg) for seg in client["history"]] == [(1.0, 0.25, rounds * steps)]
        fresh = PRVAccountant()  # one uninterrupted Opacus accountant of the same steps
        fresh.history = [(1.0, 0.25, rounds * steps)]
        derived = history_epsilon([tuple(seg) for seg in client["history"]], 1e-5)
        assert derived == pytest.approx(fresh.get_epsilon(1e-5), rel=1e-6)
    train_ids = {m.metadata.message_id for m in requests_of(grid, "train")}
    for reply in grid.replies:
        if reply.metadata.reply_to_message_id in train_ids:
            assert set(reply.content[p.ARRAYS].keys()) == {p.UPDATES, p.DP_HISTORY}
            assert set(reply.content[p.METRICS].keys()) == {p.NUM_USERS}


# --- the CLI refuses invalid settings before training: exit 2, a message that says what to change, nothing written
BAD_SETTINGS = [
    (["--privacy", "user", "--noise-multiplier", "0"], "--noise-multiplier must be a finite number > 0"),
    (["--noise-multiplier", "-1"], "--noise-multiplier must be a finite number > 0"),
    (["--noise-multiplier", "nan"], "--noise-multiplier must be a finite number > 0"),
    (["--noise-multiplier", "inf"], "--noise-multiplier must be a finite number > 0"),
    (["--clip-norm", "0"], "--clip-norm must be a finite number > 0"),
    (["--delta", "0.1"], "--delta must be < 1/N"),
    (["--delta", "0"], "--delta must be in (0, 1/N)"),
    (["--clients-per-round", "100"], "more than the 24 seen users"),
    (["--noise-multiplier", "1", "--target-epsilon", "3"], "give either --noise-multiplier or --target-epsilon"),
    (["--max-epsilon", "0.5"], "not even one round fits"),
    (["--eval-every", "2"], "opt in with --allow-uncovered-eval"),
    (["--privacy", "none", "--noise-multiplier", "1"], "privacy mode is 'none' but DP settings were given"),
    (["--privacy", "user", "--max-grad-norm", "1"], "does not use [--max-grad-norm]"),
    (["--privacy", "record", "--delta", "0.04"], "record mode needs delta < 1/n_i"),
]


@pytest.mark.parametrize("flags,message", BAD_SETTINGS, ids=[" ".join(f) for f, _ in BAD_SETTINGS])
def test_invalid_privacy_settings_exit_2_before_anything_runs(pair_file, tmp_path, capsys, flags, message):
    from lore_cli.main import main

    out = tmp_path / "run"
    argv = ["simulate", str(pair_file), "--rounds", "50", "--clients-per-round", str(M), "--rank", str(RANK),
            "--out", str(out)]
    if "--clients-per-round" in flags:
        argv[argv.index("--clients-per-round"):argv.index("--clients-per-round") + 2] = []
    assert main(argv + flags) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_unknown_privacy_mode_is_refused(pair_file, tmp_path, capsys):
    from lore_cli.main import main

    with pytest.raises(SystemExit) as exc:
        main(["simulate", str(pair_file), "--rounds", "5", "--clients-per-round", "4", "--rank", "3", "--out",
              str(tmp_path / "run"), "--privacy", "users"])
    assert exc.value.code == 2 and "invalid choice: 'users'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_run_config_privacy_errors_reach_flwr_run_users_too(pair_file, tmp_path):
    from lore_core.privacy.privacy_settings import PrivacyConfigError

    grid, settings = make_run(pair_file, tmp_path, **{"noise-multiplier": 0.0})
    with pytest.raises(PrivacyConfigError, match="run config `noise-multiplier`"):  # the key flwr's user set
        run_federated(grid, settings)
    assert not requests_of(grid, "train") and not (tmp_path / "ledger.json").exists()  # only the population query


@pytest.mark.slow
def test_a_second_simulate_on_one_run_directory_is_refused_and_the_ledger_never_goes_down(pair_file, tmp_path, capsys):
    """Two `lore-fed simulate` runs on one --out (issue 13): the second is refused with a message naming the
    holder, writes nothing, and the spent budget on disk only grows."""
    import os
    import subprocess
    import sys
    import time

    from lore_cli.main import main

    out = tmp_path / "run"
    rounds = 12  # still running when the second run is refused, with margin (20 took 80 s of the suite)
    argv = ["simulate", str(pair_file), "--out", str(out), "--rounds", str(rounds), "--clients-per-round", str(M),
            "--rank", str(RANK)]
    first = subprocess.Popen([sys.executable, "-m", "lore_cli.main", *argv], env={**os.environ, "PYTHONPATH": str(ROOT)},
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        released = []
        deadline = time.monotonic() + 240
        while not released or released[-1] < 1:  # wait until the first run has released a round
            assert first.poll() is None and time.monotonic() < deadline, "the first run ended or never started"
            time.sleep(0.5)
            if (out / "ledger.json").exists():
                released.append(len(ledger_json(out)["events"]["rounds"]))
        assert main(argv) == 2
        message = capsys.readouterr().err
        assert f"pid {first.pid}" in message and "simulate" in message and "in use by another run" in message
        while first.poll() is None:
            time.sleep(0.5)
            released.append(len(ledger_json(out)["events"]["rounds"]))
    finally:
        first.kill()
        first.wait()
    assert first.returncode == 0
    released.append(len(ledger_json(out)["events"]["rounds"]))
    assert released[-1] == rounds and all(b >= a for a, b in zip(released, released[1:]))  # never went down


@pytest.mark.parametrize("damage", ["deleted", "an older copy"])
def test_a_resumed_run_whose_ledger_lacks_its_released_rounds_is_refused(pair_file, tmp_path, capsys, damage):
    """Found by a tester: rerunning a finished 300-round user+secagg run whose ledger.json had been deleted created
    a new, empty ledger and wrote epsilon 0.000 to the ledger, metrics.json and report; a ledger put back from an
    earlier copy was continued from its count. The ServerApp and `simulate` (before Ray, exit 2) now refuse a
    ledger with fewer rounds than the checkpoint, naming the file; nothing is written."""
    run_dir = tmp_path / "run"
    run_federated(*make_run(pair_file, run_dir, **{"num-server-rounds": 3}))
    ledger = ledger_json(run_dir)
    if damage == "deleted":
        (run_dir / "ledger.json").unlink()
    else:
        ledger["events"]["rounds"] = ledger["events"]["rounds"][:1]
        (run_dir / "ledger.json").write_text(json.dumps(ledger))
    def files():  # (.lock names the latest holder)
        return {f.name: f.read_bytes() for f in run_dir.iterdir() if f.is_file() and f.name != ".lock"}

    before = files()
    with pytest.raises(LedgerError, match="ledger.json (is missing|holds 1 rounds), but the run's checkpoint is "
                                          "after round 3"):
        run_federated(*make_run(pair_file, run_dir, **{"num-server-rounds": 3}))
    assert files() == before


@pytest.mark.parametrize("damage", ["deleted", "cut short"])
def test_a_resumed_run_whose_release_record_lacks_its_releases_is_refused(pair_file, tmp_path, damage):
    """Found by a tester: rerunning a finished run whose releases/ had been deleted began a new record at the initial
    basis (exit 0), and `audit canary` of the run then failed with "cannot reshape array of size 0". The ServerApp
    and `simulate` (before Ray) now refuse a record with fewer releases than the checkpoint's rounds."""
    import shutil

    from lore_cli.simulate_command import check_resume
    from server.release_record import ReleaseRecordError

    run_dir = tmp_path / "run"
    grid, settings = make_run(pair_file, run_dir, **{"num-server-rounds": 3})
    run_federated(grid, settings)
    chain = run_dir / "releases" / "chain.jsonl"
    if damage == "deleted":
        shutil.rmtree(run_dir / "releases")
    else:
        chain.write_text("".join(chain.read_text().splitlines(keepends=True)[:2]))
    match = "chain.jsonl (is missing|holds 1 releases), but the run's checkpoint is after round 3"
    with pytest.raises(ReleaseRecordError, match=match):
        check_resume(run_dir, pair_file, settings, settings.privacy_settings(USERS, DIM))
    with pytest.raises(ReleaseRecordError, match=match):
        run_federated(*make_run(pair_file, run_dir, **{"num-server-rounds": 3}))
    assert (run_dir / "releases").exists() == (damage != "deleted")


@pytest.mark.parametrize("mode", ["user", "user+secagg"])
def test_one_users_non_finite_update_leaves_out_that_user_only_under_dp(pair_file, tmp_path, monkeypatch, mode):
    """Found by a tester (`simulate --server-lr 1e308`): under DP the client clips before it replies, and the clip
    refused a non-finite update, so the node failed with all its users, then every node, and the run stopped (exit
    1) where README promises that user left out. The client now passes it on as NaN, which the server (user) or the
    node's sum (user+secagg) leaves out."""
    import client.client_app as client_module

    real = client_module.train_sampled_users

    def one_nan(*args, **kwargs):
        weights, updates = real(*args, **kwargs)
        updates = updates.copy()
        updates[0, 0, 0] = np.nan
        return weights, updates

    monkeypatch.setattr(client_module, "train_sampled_users", one_nan)
    if mode == "user":
        state = run_federated(*make_run(pair_file, tmp_path, nodes=2, **{"num-server-rounds": 2}))
        assert len(state.history) == 2 and all(r["non_finite_users"] in (1, 2) for r in state.history)  # per node
        assert all(r["accepted_users"] == r["sampled_users"] - r["non_finite_users"] for r in state.history)
    else:
        updates = np.ones((3, RANK, DIM))
        updates[1, 0, 0] = np.inf
        clipped = client_module.clip_finite_users(updates, 0.5)
        assert np.isnan(clipped[1]).all() and np.allclose(np.linalg.norm(clipped[[0, 2]], axis=(1, 2)), 0.5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_record_mode_ledger_counts_every_step_across_a_crash_whose_nodes_lost_their_state(tiny_pair_file, tmp_path,
                                                                                         monkeypatch, seed):
    """Found by a tester: a resumed record run under-counted clients whose simulated node had lost its accountant
    history (kept in memory). Clients report what they spent each round and the ledger appends it: after a crash in
    round 3 (recorded, then lost) and a resume by new nodes, each user's ledger history holds every step its
    DP-SGD took, the lost round's included, and each DP-SGD call starts from all the user spent before. The old whole-history reports under-counted a user first sampled in
    the lost round (its fresh report looked like a client that had spent nothing since)."""
    import server.training_round

    steps_taken, started_from = count_record_steps(monkeypatch)
    real_save = server.training_round.save_checkpoint

    def crash_in_round_3(run_dir, state):
        if state.round == 3:
            raise Killed
        real_save(run_dir, state)

    monkeypatch.setattr(server.training_round, "save_checkpoint", crash_in_round_3)
    with pytest.raises(Killed):
        run_federated(*make_run(tiny_pair_file, tmp_path, nodes=1, **record_crash_run(seed)))
    monkeypatch.setattr(server.training_round, "save_checkpoint", real_save)
    run_federated(*make_run(tiny_pair_file, tmp_path, nodes=1, **record_crash_run(seed)))  # new nodes
    assert ledger_steps(tiny_pair_file, tmp_path) == steps_taken and len(ledger_json(tmp_path)["events"]["rounds"]) == 6
    # the new nodes start every user from all it spent (the server sends the ledger's history), so max-epsilon is
    # checked against it; they started from zero before
    assert all(taken == start for taken, start in started_from), started_from


@pytest.mark.parametrize("seed", [0, 1])
def test_a_record_round_that_never_reached_the_ledger_is_counted_after_the_resume(tiny_pair_file, tmp_path,
                                                                                  monkeypatch, seed):
    """The crash comes after round 3's replies reached the server but before its ledger write, and the resumed run's
    nodes are new. Its steps were lost (README listed them as not counted): each simulated node now also keeps its
    users' accountant histories in <run-dir>/client-accountants, and the new node reports what the ledger lacks."""
    from server.training_round import TrainingRun

    steps_taken, _ = count_record_steps(monkeypatch)
    real_release = TrainingRun.release

    def crash_before_recording_round_3(run, *args, **kwargs):
        if run.round == 3:
            raise Killed
        return real_release(run, *args, **kwargs)

    monkeypatch.setattr(TrainingRun, "release", crash_before_recording_round_3)
    with pytest.raises(Killed):
        run_federated(*make_run(tiny_pair_file, tmp_path, nodes=1, **record_crash_run(seed)))
    monkeypatch.setattr(TrainingRun, "release", real_release)
    run_federated(*make_run(tiny_pair_file, tmp_path, nodes=1, **record_crash_run(seed)))  # new nodes
    assert ledger_steps(tiny_pair_file, tmp_path) == steps_taken
    assert sorted(p.name for p in (tmp_path / "client-accountants").iterdir()) == ["partition-0-of-1.npz"]


class Killed(Exception):
    pass


def record_crash_run(seed: int) -> dict:
    return {"rank": 2, "num-server-rounds": 5, "clients-per-round": 1, "privacy-mode": "record",
            "max-grad-norm": 1.0, "record-batch-size": 4, "server-lr": 0.05, "seed": seed, "clip-norm": ""}


def test_record_mode_stops_at_max_epsilon_in_the_first_run_as_a_rerun_does(tiny_pair_file, tmp_path):
    """Found by a tester: in record mode the users' own histories decide when max-epsilon is reached, which the
    plan cannot know ahead, so the round that would exceed it raised out of the run: `simulate` failed (exit 1,
    no metrics) and only its rerun stopped cleanly. The first run now stops there, as the rerun does."""
    settings = {"rank": 2, "num-server-rounds": 5, "clients-per-round": 3, "privacy-mode": "record",
                "max-grad-norm": 1.0, "record-batch-size": 4, "server-lr": 0.05, "clip-norm": ""}
    free = run_federated(*make_run(tiny_pair_file, tmp_path / "free", nodes=1, **settings))
    spent = [r["record_epsilon_max"] for r in free.history]
    cap = (spent[1] + spent[2]) / 2  # rounds 1 and 2 fit, round 3 does not
    state = run_federated(*make_run(tiny_pair_file, tmp_path / "capped", nodes=1, **settings, **{"max-epsilon": cap}))
    assert [r["round"] for r in state.history] == [1, 2]
    assert state.history[-1]["stopped_early"] and "seen_test_acc" in state.history[-1]
    assert ledger_json(tmp_path / "capped")["budget"]["stopped_early"]


def count_record_steps(monkeypatch) -> tuple[dict[int, int], list[tuple[int, int]]]:
    """Spy on record_dp.dp_sgd_update: (pairs of the user (distinct per user in tiny_pair_file) -> DP-SGD steps it
    took, [(steps the user had taken, steps of the history it started from)] per call)."""
    import lore_core.privacy.record_dp as record_dp

    steps_taken: dict[int, int] = {}
    started_from: list[tuple[int, int]] = []
    real_update = record_dp.dp_sgd_update

    def counting(basis, logits, diff, **kwargs):
        started_from.append((steps_taken.get(diff.shape[0], 0), kwargs["state"].steps))
        update, new_logits, state = real_update(basis, logits, diff, **kwargs)
        steps_taken[diff.shape[0]] = steps_taken.get(diff.shape[0], 0) + state.steps - kwargs["state"].steps
        return update, new_logits, state

    monkeypatch.setattr(record_dp, "dp_sgd_update", counting)
    return steps_taken, started_from


def ledger_steps(pair_file: Path, run_dir: Path) -> dict[int, int]:
    """The ledger's steps per user, keyed like count_record_steps (the user's number of training pairs)."""
    from lore_core.pairs import load_pairs

    pairs = load_pairs(pair_file)
    train = pairs.subset(pairs.seen & (pairs.split == "train"))
    _, counts = np.unique(train.user, return_counts=True)
    assert len(set(counts)) == len(counts)  # the spy tells users apart by their number of pairs
    clients = ledger_json(run_dir)["events"]["clients"]
    return {int(counts[int(cid)]): sum(seg[2] for seg in c["history"]) for cid, c in clients.items()}


def test_a_server_cannot_push_a_record_user_past_max_epsilon_with_a_cheap_history(tiny_pair_file):
    """Found by a review: the node took the server's history whenever it had more steps. A server that sent one of
    many cheap steps (z 1e3, q 1e-3) replaced the user's own and the user trained 30 steps past max-epsilon. The real
    client code path, driven round by round: an honest server's ledger stops the user at max-epsilon, and the cheap
    history afterwards does not make it train again."""
    from flwr.app import Context, RecordDict

    from client import client_app as node_app
    from client.user_state import load_record_histories

    cfg = get_fused_config_from_dir(ROOT, {"pairs-path": str(tiny_pair_file), "rank": 2, "privacy-mode": "record"})
    settings = p.ClientSettings.from_run_config(cfg)
    context = Context(run_id=0, node_id=1, node_config={"partition-id": 0, "num-partitions": 1}, state=RecordDict(),
                      run_config=cfg)
    node = node_app.node_users(context, settings)
    basis = np.random.default_rng(0).normal(size=(2, 8)) * 0.1
    config = {p.NOISE_MULTIPLIER: 3.0, p.MAX_GRAD_NORM: 1.0, p.RECORD_BATCH_SIZE: 4, p.RECORD_SAMPLE_RATE: 0.25,
              p.RECORD_EPOCHS: 1, p.DELTA: 1e-5, p.MAX_EPSILON: 2.0, p.ROUND: 1}
    user = np.array([0])
    ledger = np.zeros((0, 4))
    for _ in range(100):  # an honest server: its ledger holds what the client reported
        updates, spent = node_app._record_train(context, config, settings, basis, node, user, ledger)
        if not updates.any():
            break
        ledger = np.concatenate([ledger, spent])
    own = [(z, q, int(k)) for u, z, q, k in load_record_histories(context) if u == 0]
    assert 1.5 < history_epsilon(own, 1e-5) <= 2.0
    for _ in range(3):
        updates, spent = node_app._record_train(context, config, settings, basis, node, user,
                                                np.array([[0, 1e3, 1e-3, 1000]]))
        assert not updates.any() and spent.size == 0
    assert [(z, q, int(k)) for u, z, q, k in load_record_histories(context) if u == 0] == own


@pytest.mark.parametrize("rate", [float("nan"), 2.0, 1e-9, 5e-324, "x"])
def test_a_record_node_refuses_an_unusable_sample_rate_before_any_user_trains(tiny_pair_file, rate):
    """A reviewer: the server's rate was checked inside each user's DP-SGD step, so a node failed on q = NaN only
    where a sampled user held pairs (whether a user's only pair was there showed), and q = 1e-9 asked 1e9 steps. The
    node refuses the request as such, by name, before any user trains."""
    from flwr.app import Context, RecordDict

    from client import client_app as node_app

    cfg = get_fused_config_from_dir(ROOT, {"pairs-path": str(tiny_pair_file), "rank": 2, "privacy-mode": "record"})
    settings = p.ClientSettings.from_run_config(cfg)
    context = Context(run_id=0, node_id=1, node_config={"partition-id": 0, "num-partitions": 1}, state=RecordDict(),
                      run_config=cfg)
    node = node_app.node_users(context, settings)
    config = {p.NOISE_MULTIPLIER: 3.0, p.MAX_GRAD_NORM: 1.0, p.RECORD_BATCH_SIZE: 4, p.RECORD_SAMPLE_RATE: rate,
              p.RECORD_EPOCHS: 1, p.DELTA: 1e-5, p.ROUND: 1}
    with pytest.raises(node_app.ClientRequestError, match="record mode"):
        node_app._record_train(context, config, settings, np.zeros((2, 8)), node, np.array([0]), None)


def test_a_rejected_record_reply_still_counts_in_the_ledger(tiny_pair_file, tmp_path, monkeypatch):
    """Found by a review: the server left out the dp-history of a reply it rejected, though it had received that
    upload, and the client then reported only its later steps: the ledger stayed behind for good (6 steps taken, 3
    counted). The rejected reply's spending is recorded when its dp-history is well formed."""
    import lore_core.privacy.record_dp as record_dp

    taken: dict[int, int] = {}
    real_update = record_dp.dp_sgd_update

    def counting(basis, logits, diff, **kwargs):
        update, new_logits, state = real_update(basis, logits, diff, **kwargs)
        taken[diff.shape[0]] = taken.get(diff.shape[0], 0) + state.steps - kwargs["state"].steps
        return update, new_logits, state

    monkeypatch.setattr(record_dp, "dp_sgd_update", counting)
    train_replies = []

    def reject_the_second(reply):
        if not reply.has_error() and p.UPDATES in reply.content.get(p.ARRAYS, {}):
            train_replies.append(reply)
            if len(train_replies) == 2:
                reply.content[p.METRICS] = MetricRecord({p.NUM_USERS: 99})  # refused by the server
        return reply

    overrides = {"rank": 2, "num-server-rounds": 5, "clients-per-round": 1, "privacy-mode": "record",
                 "max-grad-norm": 1.0, "record-batch-size": 4, "server-lr": 0.05, "seed": 0, "clip-norm": ""}
    grid, settings = make_run(tiny_pair_file, tmp_path, nodes=1, reply_hook=reject_the_second, **overrides)
    state = run_federated(grid, settings)
    assert any(r["rejected_replies"] for r in state.history)
    from lore_core.pairs import load_pairs

    pairs = load_pairs(tiny_pair_file)
    _, counts = np.unique(pairs.user[pairs.seen & (pairs.split == "train")], return_counts=True)
    clients = ledger_json(tmp_path)["events"]["clients"]
    assert {int(counts[int(c)]): sum(s[2] for s in v["history"]) for c, v in clients.items()} == taken


class LosingGrid(LocalGrid):
    """LocalGrid whose train round r loses its first `lose[r]` replies on their way to the server: the nodes
    trained, the server never heard (a deployment's late replies)."""
    lose: dict[int, int] = {}
    train_rounds = 0

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        replies = list(super().send_and_receive(messages, timeout=timeout))
        if messages and messages[0].metadata.message_type == "train":
            self.train_rounds += 1
            return replies[self.lose.get(self.train_rounds, 0):]
        return replies


def test_a_record_reply_that_never_reached_the_ledger_marks_its_epsilon_a_lower_bound_until_it_reports(
        tiny_pair_file, tmp_path, monkeypatch):
    """Found by a privacy reviewer: a node's record-mode reply that missed the deadline (a deployment's late reply)
    had spent on the device, but the ledger learns of it only when those users report again; in the last round they
    never do, and the ledger printed 4.03 for a client at 4.29. The ledger now lists such clients, and its guarantee
    says it is a lower bound until they report (a later report carries what the ledger lacks)."""
    steps_taken, _ = count_record_steps(monkeypatch)
    grid, settings = make_run(tiny_pair_file, tmp_path, nodes=3, **{
        "rank": 2, "num-server-rounds": 3, "clients-per-round": 3, "privacy-mode": "record", "max-grad-norm": 1.0,
        "record-batch-size": 4, "server-lr": 0.05, "clip-norm": ""})
    grid.__class__ = LosingGrid
    grid.lose = {1: 1, 3: 1}  # the first train reply of rounds 1 and 3 never reaches the server
    after_round = []
    run_federated(grid, settings, on_round=lambda r: after_round.append(ledger_json(tmp_path)))
    first, second, last = after_round
    lost = first["events"]["rounds"][0]["unreported"]  # the users of the node whose reply was lost
    assert lost and first["epsilon"]["unreported_clients"] == len(lost)
    assert f"LOWER BOUND: {len(lost)} sampled" in first["guarantee"]
    assert second["epsilon"]["unreported_clients"] == 0 and "LOWER BOUND" not in second["guarantee"]  # caught up
    assert last["epsilon"]["unreported_clients"] > 0 and "LOWER BOUND" in last["guarantee"]
    assert sum(ledger_steps(tiny_pair_file, tmp_path).values()) < sum(steps_taken.values())  # round 3's lost steps


def test_a_record_round_whose_every_reply_was_lost_leaves_its_clients_unreported_until_they_report(tiny_pair_file,
                                                                                                   tmp_path):
    """A reviewer: a round where every reply was lost fails the run (RoundFailed) before any ledger entry, so its
    clients' spending on their devices left no trace and the guarantee no LOWER BOUND. The ledger now records them
    (`lost_replies`); the resumed run's reports clear them."""
    from server.training_round import RoundFailed

    config = {"rank": 2, "num-server-rounds": 3, "clients-per-round": 3, "privacy-mode": "record",
              "max-grad-norm": 1.0, "record-batch-size": 4, "server-lr": 0.05, "clip-norm": ""}
    grid, settings = make_run(tiny_pair_file, tmp_path, nodes=3, **config)
    grid.__class__ = LosingGrid
    grid.lose = {2: 3}  # every train reply of round 2 is lost
    with pytest.raises(RoundFailed):
        run_federated(grid, settings)
    failed = ledger_json(tmp_path)
    assert failed["rounds"]["released"] == 1 and failed["events"]["lost_replies"][0]["after_round"] == 1
    assert failed["epsilon"]["unreported_clients"] == 3 and "LOWER BOUND: 3 sampled" in failed["guarantee"]
    run_federated(*make_run(tiny_pair_file, tmp_path, nodes=3, **config))  # resumed: every user sampled, reports
    resumed = ledger_json(tmp_path)
    assert resumed["epsilon"]["unreported_clients"] == 0 and "LOWER BOUND" not in resumed["guarantee"]
