"""The demo's report: every run it made, the references, and the privacy guarantee it reached."""

import json
import shutil

from lore_cli.demo_command import simulate_privacy_argv, write_demo_report
from lore_cli.main import build_parser


def test_demo_report_lists_the_runs_references_and_epsilon(tmp_path):
    dataset = tmp_path / "dataset"
    dataset.mkdir()
    (dataset / "summary.json").write_text(json.dumps({"users_kept": 12, "seen_users": 10}))
    central = {"rank": 3, "seen_test_acc": 0.71, "unseen_test_acc": 0.72, "oracle_seen_test_acc": 0.86,
               "oracle_unseen_test_acc": 0.87, "true_basis_seen_test_acc": 0.81, "true_basis_unseen_test_acc": 0.82}
    runs = {"federated": {"rank": 3, "seen_test_acc": 0.69, "unseen_test_acc": 0.70, "privacy_mode": "user",
                          "epsilon": 6.84, "epsilon_rdp": 7.45, "delta": 1e-5, "rounds": 60},
            "federated-nonprivate": {"rank": 3, "seen_test_acc": 0.72, "unseen_test_acc": 0.73}}
    report = write_demo_report(tmp_path, dataset, central, runs, 12.0).read_text()
    assert "| federated, privacy `user` | 3 | 0.6900 | 0.7000 |" in report
    assert "| federated, no privacy (all seen users each round) | 3 | 0.7200 | 0.7300 |" in report
    assert "oracle (true basis and weights) | - | 0.8600 | 0.8700" in report
    assert "true basis, each user fits only w (ceiling) | - | 0.8100 | 0.8200" in report
    assert "(epsilon, delta) = (6.840, 1e-05)" in report
    # the other runs trained on the same users without privacy: the epsilon is not theirs (a privacy reviewer)
    assert "This epsilon is that of the `federated/` run alone" in report
    assert "(`centralized/`, `federated-nonprivate/`) trained" in report
    assert "was chosen by the centralized" not in report  # --rank given: nothing to say
    # --nonprivate-rounds 0: no such run to name (a tester)
    alone = write_demo_report(tmp_path, dataset, central, {"federated": runs["federated"]}, 12.0).read_text()
    assert "federated-nonprivate" not in alone and "(`centralized/`) trained" in alone
    # --rank auto: the rank of the private run came from a non-private fit on the same users (a reviewer's finding)
    report = write_demo_report(tmp_path, dataset, central, runs, 12.0, reference_choices=("rank",)).read_text()
    assert "The rank 3 was chosen by the centralized, non-private run on the same users" in report
    # the DP run's l2 came from `train --l2 auto` on the same users too (a reviewer): named, with or without the rank
    central["l2"] = 3e-05
    report = write_demo_report(tmp_path, dataset, central, runs, 12.0, reference_choices=("rank", "l2")).read_text()
    assert ("The rank 3 and the l2 penalty 3e-05 were chosen by the centralized, non-private run on the same users "
            "(`--rank auto` and `--l2 auto`): those choices are not covered") in report
    assert "run `lore-fed simulate` with `--rank` and `--l2` from a public pilot population" in report
    report = write_demo_report(tmp_path, dataset, central, runs, 12.0, reference_choices=("l2",)).read_text()
    assert "The l2 penalty 3e-05 was chosen by the centralized" in report and "The rank 3 was" not in report
    del central["l2"]
    runs["federated"].update(privacy_mode="user+secagg", epsilon_against_server=21.5, most_user_rounds=17)
    report = write_demo_report(tmp_path, dataset, central, runs, 12.0).read_text()
    assert "against it the run is (21.500, 1e-05)-DP over the 17 rounds of the most-sampled user" in report


def test_demo_passes_its_privacy_flags_on_to_simulate():
    args = build_parser(only="demo").parse_args(
        ["demo", "--privacy", "user", "--noise-multiplier", "2", "--max-epsilon", "9", "--reproducible-noise"])
    argv = simulate_privacy_argv(args)
    assert argv[:2] == ["--privacy", "user"]
    assert ["--noise-multiplier", "2.0"] == argv[argv.index("--noise-multiplier"):argv.index("--noise-multiplier") + 2]
    assert "--max-epsilon" in argv and "--reproducible-noise" in argv


import pytest  # noqa: E402


@pytest.mark.parametrize("flags,expect", [
    (["--noise-multiplier", "0"], "--noise-multiplier must be a finite number > 0"),
    (["--clip-norm", "inf"], "--clip-norm must be a finite number > 0"),
    (["--delta", "0.5"], "--delta must be < 1/N"),
    (["--target-epsilon", "3", "--noise-multiplier", "1"], "either --noise-multiplier or --target-epsilon"),
    (["--rounds", "0"], "--rounds must be >= 1"),
    (["--nonprivate-rounds", "-1"], "--nonprivate-rounds must be >= 0"),
    (["--rank", "abc"], "--rank must be 'auto' or a positive integer"),
    (["--users", "60", "--clients-per-round", "55"], "--clients-per-round 55 is more than the at most 48"),
])
def test_demo_checks_every_flag_before_its_first_stage_writes(tmp_path, capsys, flags, expect):
    """Found by a hostile-input test: these were refused by `simulate` after synth, prepare, embed and train had
    run (minutes in), and the demo exited 1. Now exit 2 before anything is written."""
    from lore_cli.main import main

    assert main(["demo", "--out", str(tmp_path / "demo"), *flags]) == 2
    assert expect in capsys.readouterr().err and not (tmp_path / "demo").exists()


# --- a demo directory made with other flags is refused, never reported as a run of the flags asked for ---

def _snapshot(directory):
    """Every path under `directory` with its mtime and bytes: 'nothing changed' means this is equal."""
    return {str(path.relative_to(directory)): (path.stat().st_mtime_ns, path.read_bytes() if path.is_file() else None)
            for path in sorted(directory.rglob("*"))}


def _fake_demo(out, flags, monkeypatch):
    """DIR/demo_flags.json as `lore-fed demo --out DIR *flags` writes it before its first stage, then the files each
    stage leaves (enough for the report); `flags` None: a demo from before that record."""
    from lore_core.prism_schema import GROUND_TRUTH_FILE

    if flags is not None:
        import lore_cli.demo_command as demo
        from lore_cli.main import CommandFailed, main

        def first_stage_stops(name, done, argv, out):
            raise CommandFailed("stopped by the test")

        with monkeypatch.context() as patch:
            patch.setattr(demo, "_stage", first_stage_stops)
            assert main(["demo", "--out", str(out), *flags]) == 1
    for sub in ("prism", "dataset", "centralized", "federated"):
        (out / sub).mkdir(parents=True)
    for name in (GROUND_TRUTH_FILE, "survey.jsonl", "conversations.jsonl", "utterances.jsonl"):
        (out / "prism" / name).write_bytes(b"")
    (out / "dataset" / "summary.json").write_text(json.dumps({"users_kept": 12, "seen_users": 10}))
    (out / "dataset" / "pairs.npz").write_bytes(b"")
    (out / "centralized" / "metrics.json").write_text(json.dumps({"rank": 1, "seen_test_acc": 0.7}))
    (out / "federated" / "metrics.json").write_text(
        json.dumps({"rank": 1, "seen_test_acc": 0.6, "unseen_test_acc": 0.6, "privacy_mode": "none"}))


FAKE_FLAGS = ["--users", "80", "--rounds", "10", "--nonprivate-rounds", "0", "--rank", "1", "--privacy", "none"]


def test_demo_refuses_a_directory_made_with_other_flags_before_writing(tmp_path, capsys, monkeypatch):
    """Found by a tester: a second `lore-fed demo --out DIR` with other --users/--rounds/--privacy skipped every stage
    as 'already done', exited 0 and reported the first demo's runs as runs of the new flags."""
    from lore_cli.main import main

    out = tmp_path / "demo"
    _fake_demo(out, FAKE_FLAGS, monkeypatch)
    before = _snapshot(out)
    code = main(["demo", "--out", str(out), "--users", "100", "--rounds", "12", "--nonprivate-rounds", "0",
                 "--rank", "1", "--privacy", "user+secagg"])
    captured = capsys.readouterr()
    assert code == 2 and "already done" not in captured.out
    assert f"--out {out} holds a demo made with other settings" in captured.err
    for differ in ("--users: asked 100, stored 80", "--rounds: asked 12, stored 10",
                   '--privacy: asked "user+secagg", stored "none"',
                   "--noise-multiplier: asked 2.0, stored (not given)"):
        assert differ in captured.err
    assert "--rank" not in captured.err and "--seed" not in captured.err
    assert "give a new --out, or run with the flags it was made with" in captured.err
    assert _snapshot(out) == before


def test_a_clients_per_round_above_the_seen_users_prepare_made_can_be_corrected_on_rerun(tmp_path, capsys,
                                                                                          monkeypatch):
    """Found by a tester: the up-front check bounds --clients-per-round by 0.8 x --users, but `prepare` made fewer
    seen users; the private stage failed (exit 1) after four stages, and a rerun with a corrected value was refused
    as other settings. The stage now refuses with exit 2 naming the bound, and a rerun may change the flags of
    stages not yet begun (and only those)."""
    import lore_cli.demo_command as demo
    from lore_cli.main import main

    out = tmp_path / "demo"
    flags = [*FAKE_FLAGS, "--clients-per-round", "40"]
    _fake_demo(out, flags, monkeypatch)
    shutil.rmtree(out / "federated")  # `prepare` made 10 seen users; the private stage has not begun
    ran = []

    def stage(name, done, argv, out_dir):
        if not done:
            ran.append(name)
            (out / "federated").mkdir()
            (out / "federated" / "metrics.json").write_text(
                json.dumps({"rank": 1, "seen_test_acc": 0.6, "unseen_test_acc": 0.6, "privacy_mode": "none"}))

    monkeypatch.setattr(demo, "_stage", stage)
    assert main(["demo", "--out", str(out), *flags]) == 2
    assert "--clients-per-round 40 is more than the 10 seen users" in capsys.readouterr().err and not ran
    refused = main(["demo", "--out", str(out), *FAKE_FLAGS, "--clients-per-round", "8", "--users", "81"])
    assert refused == 2 and "--users: asked 81, stored 80" in capsys.readouterr().err  # the population's: never
    assert main(["demo", "--out", str(out), *FAKE_FLAGS, "--clients-per-round", "8"]) == 0
    assert "new settings for the stages not yet begun: --clients-per-round" in capsys.readouterr().out
    assert len(ran) == 1 and json.loads((out / "demo_flags.json").read_text())["flags"]["clients_per_round"] == 8
    assert main(["demo", "--out", str(out), *FAKE_FLAGS, "--clients-per-round", "9"]) == 2  # that stage is done now


def test_demo_resumes_a_directory_made_with_the_same_flags(tmp_path, capsys, monkeypatch):
    """Same flags: every finished stage is skipped; --cache-dir and --device do not change results, so they may
    differ."""
    from lore_cli.main import main

    out = tmp_path / "demo"
    _fake_demo(out, FAKE_FLAGS, monkeypatch)
    neutral = ["--cache-dir", str(tmp_path / "cache"), "--device", "cpu"]
    assert main(["demo", "--out", str(out), *FAKE_FLAGS, *neutral]) == 0
    assert capsys.readouterr().out.count("already done, skipped") == 5
    assert "privacy `none`" in (out / "report.md").read_text()
    assert "Its stages took an unknown time" in (out / "report.md").read_text()  # no stage ran here: no record
    (out / "stage_seconds.json").write_text('{"a": 3, "b": -5, "c": true, "d": "7"}')  # damaged: only 3 s counts
    assert main(["demo", "--out", str(out), *FAKE_FLAGS]) == 0
    assert "Its stages took 3 s in all" in (out / "report.md").read_text()


def test_demo_runs_synth_again_when_its_write_was_cut_short_after_the_truth(tmp_path, monkeypatch):
    """synth writes its truth first (a tester: so that its --out check knows a population of its own cut short),
    so the truth alone does not mean the population stage is done."""
    import lore_cli.demo_command as demo
    from lore_cli.main import CommandFailed, main

    out = tmp_path / "demo"
    _fake_demo(out, FAKE_FLAGS, monkeypatch)
    (out / "prism" / "utterances.jsonl").unlink()
    stages = []

    def record(name, done, argv, out_dir):
        stages.append((name, done))
        raise CommandFailed("stopped by the test")

    monkeypatch.setattr(demo, "_stage", record)
    assert main(["demo", "--out", str(out), *FAKE_FLAGS]) == 1
    assert stages == [("benchmark population", False)]


def test_demo_refuses_a_demo_directory_without_its_flags(tmp_path, capsys, monkeypatch):
    """A demo from before DIR/demo_flags.json: its flags cannot be checked, so its stages are not reused (whatever the
    flags): refused with advice, nothing written."""
    from lore_cli.main import main

    out = tmp_path / "demo"
    _fake_demo(out, None, monkeypatch)
    before = _snapshot(out)
    assert main(["demo", "--out", str(out), *FAKE_FLAGS]) == 2
    err = capsys.readouterr().err
    assert f"--out {out} holds a demo" in err and "without demo_flags.json" in err and "give a new --out" in err
    assert _snapshot(out) == before


FAKE_DP_FLAGS = [*FAKE_FLAGS[:-1], "user+secagg"]
DP_DEFAULTS_TYPED = ["--noise-multiplier", "2", "--clip-norm", "0.25", "--delta", "1e-5", "--num-shares", "3",
                     "--reconstruction-threshold", "2", "--dropout-tolerance", "0.1"]


@pytest.mark.parametrize("first,rerun", [([], DP_DEFAULTS_TYPED), (DP_DEFAULTS_TYPED, [])],
                         ids=["defaults-typed-on-rerun", "defaults-omitted-on-rerun"])
def test_demo_resumes_when_a_rerun_types_out_the_defaults_or_leaves_them_out(tmp_path, capsys, monkeypatch, first,
                                                                           rerun):
    """Found by a reviewer: the flags were compared as typed, so `--delta 1e-5` (the default) on a rerun of a demo
    that left --delta out was refused as other settings. The settings after defaults are compared."""
    from lore_cli.main import main

    out = tmp_path / "demo"
    _fake_demo(out, [*FAKE_DP_FLAGS, *first], monkeypatch)
    capsys.readouterr()
    assert main(["demo", "--out", str(out), *FAKE_DP_FLAGS, *rerun]) == 0
    assert capsys.readouterr().out.count("already done, skipped") == 5


def test_demo_passes_the_same_privacy_settings_to_simulate_typed_out_or_not():
    """The federated stage resumes from its checkpoint only with the settings it started with, compared as
    `simulate` was given them: a demo resumed with the defaults typed out passes it what it passed before."""
    from lore_cli.demo_command import resolve_demo_flags

    parse = build_parser(only="demo").parse_args
    left_out, typed = parse(["demo", *FAKE_DP_FLAGS]), parse(["demo", *FAKE_DP_FLAGS, *DP_DEFAULTS_TYPED])
    resolve_demo_flags(left_out)
    resolve_demo_flags(typed)
    assert simulate_privacy_argv(left_out) == simulate_privacy_argv(typed)


def _edit_record(out, **changes):
    """Change keys of DIR/demo_flags.json; a key changed to None is removed."""
    from lore_cli.demo_command import FLAGS_FILE

    record = json.loads((out / FLAGS_FILE).read_text())
    record.update(changes)
    (out / FLAGS_FILE).write_text(json.dumps({key: value for key, value in record.items() if value is not None}))


def test_demo_refuses_a_directory_made_by_another_lore_fed_version(tmp_path, capsys, monkeypatch):
    """Found by a reviewer: the record held no code version, so a newer lore-fed reused an older one's stages as its
    own. Another version is refused with the file and the advice, nothing written."""
    from lore_cli.main import main
    from lore_core import __version__

    out = tmp_path / "demo"
    _fake_demo(out, FAKE_FLAGS, monkeypatch)
    _edit_record(out, lore_fed_version="0.0.1")
    before = _snapshot(out)
    assert main(["demo", "--out", str(out), *FAKE_FLAGS]) == 2
    err = capsys.readouterr().err
    assert f"{out / 'demo_flags.json'} records a demo made by lore-fed 0.0.1, not {__version__}" in err
    assert f"give a new --out (or delete {out} to rerun the demo there)" in err
    assert _snapshot(out) == before


def test_demo_refuses_a_flags_record_without_a_version(tmp_path, capsys, monkeypatch):
    """A record from before the version was recorded (format 1): which lore-fed made its stages is unknown, so they
    are not reused; refused with the file and the advice, nothing written."""
    from lore_cli.main import main

    out = tmp_path / "demo"
    _fake_demo(out, FAKE_FLAGS, monkeypatch)
    _edit_record(out, format=1, lore_fed_version=None)
    before = _snapshot(out)
    assert main(["demo", "--out", str(out), *FAKE_FLAGS]) == 2
    err = capsys.readouterr().err
    assert f"{out / 'demo_flags.json'} does not record which lore-fed made this demo" in err
    assert f"give a new --out (or delete {out} to rerun the demo there)" in err
    assert _snapshot(out) == before


@pytest.mark.slow
def test_real_demo_resumes_after_a_crash_only_with_its_own_flags(tmp_path, capsys, monkeypatch):
    """The real stages, smallest settings (about a minute on two cores): a demo that fails at its federated stage
    is refused with other flags (nothing changes) and resumes with its own from that stage."""
    import lore_cli.main as cli

    real_main = cli.main
    out = tmp_path / "demo"
    flags = ["--out", str(out), "--users", "30", "--rounds", "1", "--nonprivate-rounds", "0", "--rank", "1",
             "--privacy", "none"]
    monkeypatch.setattr(cli, "main", lambda argv: 1 if argv[0] == "simulate" else real_main(argv))
    assert real_main(["demo", *flags]) == 1  # the federated stage "crashed"
    monkeypatch.setattr(cli, "main", real_main)
    assert (out / "centralized" / "metrics.json").exists()
    assert not (out / "federated" / "metrics.json").exists()
    capsys.readouterr()

    before = _snapshot(out)
    assert real_main(["demo", *flags[:2], "--users", "40", "--rounds", "2", "--nonprivate-rounds", "0",
                      "--rank", "1", "--privacy", "user+secagg"]) == 2
    err = capsys.readouterr().err
    assert "--users: asked 40, stored 30" in err and "--rounds: asked 2, stored 1" in err
    assert _snapshot(out) == before

    assert real_main(["demo", *flags]) == 0  # resumes: only the federated stage runs
    stdout = capsys.readouterr().out
    for stage in ("benchmark population", "PRISM pipeline", "pair embeddings", "centralized reference"):
        assert f"== {stage}: already done, skipped" in stdout
    assert "== federated training, privacy none (Flower simulation engine): lore-fed simulate" in stdout
    assert json.loads((out / "federated" / "metrics.json").read_text())["rounds"] == 1
    central = json.loads((out / "centralized" / "metrics.json").read_text())
    federated = json.loads((out / "federated" / "metrics.json").read_text())  # like for like (a tester: rank only)
    assert all(federated[key] == central[key] for key in ("rank", "l2", "prior_pairs", "objective", "weight_by"))
    assert "privacy `none`" in (out / "report.md").read_text()
    times = json.loads((out / "stage_seconds.json").read_text())  # every stage's, whichever start ran it
    assert len(times) == 5 and f"Its stages took {sum(times.values()):.0f} s in all" in (out / "report.md").read_text()

    before = _snapshot(out)
    assert real_main(["demo", *flags[:2], "--users", "30", "--rounds", "3", "--nonprivate-rounds", "0",
                      "--rank", "1", "--privacy", "none"]) == 2
    assert "--rounds: asked 3, stored 1" in capsys.readouterr().err and _snapshot(out) == before


def test_the_package_version_is_written_the_same_in_both_places():
    """demo_flags.json records lore_core.__version__; Flower needs a static [project] version in pyproject.toml, so
    the two are written apart and a release must bump both."""
    import tomllib
    from pathlib import Path

    from lore_core import __version__

    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    assert pyproject["project"]["version"] == __version__


def test_a_record_mode_demo_report_states_its_per_pair_guarantee(tmp_path):
    """Found by a tester: `demo --privacy record` wrote "Mode `record`: no differential-privacy guarantee for this
    run" (its metrics hold no user-level `epsilon`), denying the per-pair guarantee the run has. The report now
    gives the run's own guarantee sentence, which says it is not user-level and who is trusted."""
    dataset = tmp_path / "dataset"
    dataset.mkdir()
    (dataset / "summary.json").write_text(json.dumps({"users_kept": 12, "seen_users": 10}))
    central = {"rank": 3, "seen_test_acc": 0.71, "unseen_test_acc": 0.72}
    guarantee = "record-level (4.695, 1e-05)-DP per client and per preference pair, epsilon the max over clients"
    runs = {"federated": {"rank": 3, "seen_test_acc": 0.69, "unseen_test_acc": 0.70, "privacy_mode": "record",
                          "record_epsilon_max_over_clients": 4.695, "privacy_guarantee": guarantee},
            "federated-nonprivate": {"rank": 3, "seen_test_acc": 0.72, "unseen_test_acc": 0.73}}
    report = write_demo_report(tmp_path, dataset, central, runs, 12.0).read_text()
    assert f"Mode `record`: {guarantee}." in report and "no differential-privacy guarantee" not in report
    # the other runs and the rank choice, as the user modes say them (a privacy reviewer)
    assert "It is that of the `federated/` run alone: the runs of this report (`centralized/`" in report
    assert "was chosen by the centralized" not in report
    report = write_demo_report(tmp_path, dataset, central, runs, 12.0, reference_choices=("rank",)).read_text()
    assert "The rank 3 was chosen by the centralized, non-private run on the same users" in report


@pytest.mark.parametrize("code, raised", [(130, KeyboardInterrupt), (143, "Terminated")])
def test_an_interrupted_stage_interrupts_the_demo(monkeypatch, tmp_path, code, raised):
    """A reviewer: a stage ended by Ctrl-C or kill -TERM (its `main` returns 130 / 143) made the demo exit 1 with
    "failed ... rerun after fixing it" instead of the demo's own interruption sentence and code."""
    from lore_cli import demo_command, main as cli
    from lore_core.termination import Terminated

    monkeypatch.setattr(cli, "main", lambda argv: code)
    with pytest.raises(Terminated if raised == "Terminated" else raised):
        demo_command._stage("a stage", False, ["train"], tmp_path)
    assert "a stage" in demo_command.stage_seconds(tmp_path)  # the interrupted start's time is kept for the report


def test_the_demo_s_federated_runs_take_what_the_centralized_run_chose():
    """A tester: the demo passed only the rank, so its federated rows ran with other l2 and personal prior than the
    centralized row they sit beside. Without privacy they take all of `train`'s choice; under DP its l2 only."""
    from lore_cli.demo_command import train_choice

    chosen = train_choice({"rank": 2, "l2": 4.4e-05, "prior_pairs": 1.0, "objective": "joint", "weight_by": "pair"})
    assert chosen["none"] == ["--l2", "4.4e-05", "--prior-pairs", "1.0", "--objective", "joint", "--weight-by", "pair"]
    assert chosen["dp"] == ["--l2", "4.4e-05"]


def test_the_demo_names_the_l2_its_private_run_took_from_the_centralized_run(tmp_path, capsys, monkeypatch):
    """A reviewer: the DP run takes `train --l2 auto`'s penalty, chosen on the same users, and the report named
    only a rank choice (and nothing with `--rank` given)."""
    from lore_cli.main import main

    out = tmp_path / "demo"
    flags = [f if f != "none" else "user" for f in FAKE_FLAGS]
    _fake_demo(out, flags, monkeypatch)
    (out / "centralized" / "metrics.json").write_text(json.dumps({"rank": 1, "seen_test_acc": 0.7, "l2": 3e-05}))
    (out / "federated" / "metrics.json").write_text(json.dumps(
        {"rank": 1, "seen_test_acc": 0.6, "unseen_test_acc": 0.6, "privacy_mode": "user", "epsilon": 5.0,
         "delta": 1e-5}))
    assert main(["demo", "--out", str(out), *flags]) == 0
    report = (out / "report.md").read_text()
    assert "The l2 penalty 3e-05 was chosen by the centralized, non-private run on the same users" in report
    assert "The rank" not in report  # --rank 1 given
