"""The demo's report: every run it made, the references, and the privacy guarantee it reached."""

import json

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


def test_demo_passes_its_privacy_flags_on_to_simulate():
    args = build_parser(only="demo").parse_args(
        ["demo", "--privacy", "user", "--noise-multiplier", "2", "--max-epsilon", "9", "--reproducible-noise"])
    argv = simulate_privacy_argv(args)
    assert argv[:2] == ["--privacy", "user"]
    assert ["--noise-multiplier", "2.0"] == argv[argv.index("--noise-multiplier"):argv.index("--noise-multiplier") + 2]
    assert "--max-epsilon" in argv and "--reproducible-noise" in argv


import pytest  # noqa: E402


@pytest.mark.parametrize("flags,expect", [
    (["--noise-multiplier", "0"], "noise_multiplier must be a finite number > 0"),
    (["--clip-norm", "inf"], "clip_norm must be a finite number > 0"),
    (["--delta", "0.5"], "delta must be < 1/N"),
    (["--target-epsilon", "3", "--noise-multiplier", "1"], "either noise_multiplier or target_epsilon"),
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
