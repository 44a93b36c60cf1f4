"""Accounting, settings validation and the privacy ledger (docs/privacy.md §3, §8, §9)."""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import replace

import pytest

from lore_core.privacy import (
    AccountingError,
    LedgerError,
    PrivacyBudgetExhausted,
    PrivacyConfigError,
    PrivacyLedger,
    PrivacySettings,
    epsilon,
    epsilon_report,
    history_epsilon,
    noise_for_target_epsilon,
    rounds_within_budget,
    validate,
)
from lore_core.privacy.ledger import LEDGER_FILENAME
from lore_core.privacy.privacy_settings import PrivacyConfigWarning

DELTA = 1e-5


def pld_epsilon(events, delta=DELTA):
    """Google dp_accounting PLD: the independent oracle. events: list of (z, q, steps)."""
    from dp_accounting import dp_event
    from dp_accounting.pld.pld_privacy_accountant import PLDAccountant

    accountant = PLDAccountant(value_discretization_interval=1e-3)
    for z, q, steps in events:
        accountant.compose(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(z)), steps)
    return accountant.get_epsilon(delta)


def user_settings(**overrides):
    values = dict(mode="user", population_size=1400, clients_per_round=50, rounds=200, noise_multiplier=1.0,
                  clip_norm=0.25)
    values.update(overrides)
    return PrivacySettings(**values)


# -- accountant ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("z, m, rounds", [
    (1.0, 50, 200), (0.5, 10, 100), (2.0, 100, 500), (1.0, 25, 50), (0.8, 70, 300), (1.5, 100, 100),
])
def test_prv_agrees_with_dp_accounting_pld(z, m, rounds):
    q = m / 1400
    report = epsilon_report([(z, q, rounds)], DELTA)
    oracle = pld_epsilon([(z, q, rounds)])
    assert report.prv == pytest.approx(oracle, rel=0.02)
    assert report.rdp >= report.prv - 0.02  # RDP is the conservative bound


@pytest.mark.parametrize("z, m, rounds, prv, rdp", [(1.0, 50, 200, 3.37, 3.84), (2.0, 100, 500, 3.79, 4.12)])
def test_epsilon_matches_the_notes_table(z, m, rounds, prv, rdp):
    assert epsilon(z, m / 1400, rounds, DELTA, "prv") == pytest.approx(prv, abs=0.01)
    assert epsilon(z, m / 1400, rounds, DELTA, "rdp") == pytest.approx(rdp, abs=0.01)


def test_a_history_of_repeated_mechanisms_gets_opacus_epsilon_for_it_as_written():
    """Each mechanism (z, q) is composed once with its steps summed (a record client's history holds one segment per
    round, and Opacus' cost grows with segments): the epsilon is Opacus' for the history as written, interleaved."""
    from opacus.accountants import PRVAccountant, RDPAccountant

    history = [(2.0, 0.05, 3), (1.5, 0.02, 2), (2.0, 0.05, 4)]
    report = epsilon_report(history, DELTA)
    prv, rdp = PRVAccountant(), RDPAccountant()
    prv.history, rdp.history = list(history), list(history)
    assert report.prv == pytest.approx(prv.get_epsilon(DELTA), rel=1e-6)
    assert report.rdp == pytest.approx(rdp.get_epsilon(DELTA), rel=1e-9)
    assert history_epsilon(history, DELTA) == report.prv


def test_prv_reports_an_error_bound():
    report = epsilon_report([(1.0, 50 / 1400, 200)], DELTA)
    assert 0 < report.prv_error_bound <= 0.011
    assert report.prv_estimate == pytest.approx(report.prv - report.prv_error_bound)


def test_accountant_refuses_missing_noise():
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(AccountingError):
            epsilon(bad, 0.01, 10, DELTA)


def test_target_epsilon_round_trip():
    q, rounds = 30 / 1400, 300
    target = epsilon(1.3, q, rounds, DELTA)
    z = noise_for_target_epsilon(target, q, rounds, DELTA)
    assert z == pytest.approx(1.3, rel=0.02)
    assert target - 0.01 <= epsilon(z, q, rounds, DELTA) <= target


def test_a_target_beyond_the_prv_range_is_refused_with_the_reachable_epsilon():
    # Above MAX_PRV_EPSILON (RDP) PRV is not computed: the search once stopped there and returned a z whose PRV
    # epsilon (95.5 here) was far below the target it claimed to reach.
    with pytest.raises(AccountingError, match=r"target epsilon 100 is unreachable .* set target_epsilon <= 95\.5"):
        noise_for_target_epsilon(100.0, 1.0, 1, DELTA)


def test_a_short_bracket_away_from_prvs_jump_is_not_refused():
    """A review found the refusal above firing where nothing jumps: the bracket stops below z = 1e-3 (or epsilon is
    too steep for the z resolution) and ends short of the target. z = high still meets the target: return it."""
    z = noise_for_target_epsilon(1e6, 1.0, 1, DELTA, accountant="rdp")
    assert 0 < z < 1e-3 and epsilon(z, 1.0, 1, DELTA, accountant="rdp") <= 1e6


def test_validate_solves_and_records_noise_for_target_epsilon():
    settings = validate(user_settings(noise_multiplier=None, target_epsilon=2.0))
    assert settings.noise_from_target
    assert epsilon(settings.noise_multiplier, settings.sample_rate, 200, DELTA) <= 2.0
    assert validate(settings) == settings  # resolved settings validate again unchanged (resume)


def test_rounds_within_budget_is_the_last_round_inside():
    q = 50 / 1400
    k = rounds_within_budget(1.0, q, DELTA, 2.0)
    assert epsilon(1.0, q, k, DELTA) <= 2.0 < epsilon(1.0, q, k + 1, DELTA)


# -- validation ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, fix", [
    (dict(mode="users"), "one of"),
    (dict(noise_multiplier=0.0), "noise_multiplier = 1.0"),
    (dict(noise_multiplier=float("nan")), "noise_multiplier = 1.0"),
    (dict(noise_multiplier=-1.0), "noise_multiplier = 1.0"),
    (dict(clip_norm=0.0), "median update norm"),
    (dict(clip_norm=float("inf")), "median update norm"),
    (dict(delta=1 / 1400), "use at most 1/(10 N) = 7.14e-05"),
    (dict(delta=0.0), "remove it to use the default"),
    (dict(clients_per_round=0), "positive integer"),
    (dict(clients_per_round=1401), "lower it to <= 1400"),
    (dict(target_epsilon=3.0), "either noise_multiplier or target_epsilon"),
    (dict(weighting="num-examples"), "weighting = 'uniform'"),
    (dict(client_metrics="all"), "client_metrics = 'none'"),
    (dict(sampling="fixed"), "sampling = 'poisson'"),
    (dict(max_grad_norm=1.0), "remove them"),
    (dict(population_size=None), "population_size"),
    (dict(rounds=None), "set rounds"),
    (dict(noise_seed=3), "reproducible_noise"),
])
def test_validation_fails_closed_with_the_fix(overrides, fix):
    with pytest.raises(PrivacyConfigError) as info:
        validate(user_settings(**overrides))
    assert fix in str(info.value)


def test_planned_rounds_over_max_epsilon_are_refused_before_round_one():
    settings = user_settings(population_size=1000, clients_per_round=100, rounds=20, max_epsilon=2.0)
    with pytest.raises(PrivacyConfigError, match=r"set rounds <= \d+") as info:
        validate(settings)
    fit = int(str(info.value).split("set rounds <= ")[1].split(",")[0])
    assert epsilon(1.0, 0.1, fit, DELTA) <= 2.0 < epsilon(1.0, 0.1, fit + 1, DELTA)
    assert validate(replace(settings, rounds=fit)).rounds == fit


def test_dp_setting_with_mode_none_is_refused():
    with pytest.raises(PrivacyConfigError, match="mode to 'user'"):
        validate(PrivacySettings(mode="none", noise_multiplier=1.0))
    assert validate(PrivacySettings(mode="none", rounds=3)).mode == "none"


def test_secagg_needs_odd_shares_a_dropout_tolerance_and_the_dimension():
    with pytest.raises(PrivacyConfigError, match="odd"):
        validate(user_settings(mode="user+secagg", num_shares=4, reconstruction_threshold=2, dimension=1920))
    with pytest.raises(PrivacyConfigError, match="dropout_tolerance"):
        validate(user_settings(mode="user+secagg", dropout_tolerance=1.0, dimension=1920))
    with pytest.raises(PrivacyConfigError, match="dimension"):
        validate(user_settings(mode="user+secagg"))
    with pytest.raises(PrivacyConfigError, match="does not use"):
        validate(user_settings(mode="user", dimension=1920))
    settings = validate(user_settings(mode="user+secagg", dimension=1920))
    assert settings.num_shares % 2 == 1 and settings.reconstruction_threshold < settings.num_shares
    assert settings.dropout_tolerance == 0.1 and settings.accountant == "ddg-rdp"


def test_distributed_discrete_gaussian_accounting_bounds_the_continuous_mechanism():
    from lore_core.privacy.ddg_accounting import ddg_epsilon, rounded_l2_norm_bound, sum_tau

    for z, q, steps in ((1.0, 50 / 1400, 200), (2.0, 0.05, 100), (1.0, 1.0, 1)):
        ddg, _ = ddg_epsilon([(z, q, steps)], DELTA, 1920)
        continuous = pld_epsilon([(z, q, steps)]) if q < 1 else epsilon(z, 1.0, 1, DELTA, "rdp")
        assert continuous - 0.05 <= ddg <= 2 * continuous  # never below the tight continuous value, not vacuous
    # the discrete pieces: rounding inflates the sensitivity by ~1e-5 at 2^16 grid units; tau vanishes at 64 units
    assert 1 < rounded_l2_norm_bound(2**16, 1920) / 2**16 < 1 + 1e-4
    assert sum_tau(64.0, 10**6) == 0.0 and sum_tau(0.3, 50) > 1


def test_secagg_ledger_reports_the_distributed_accountant_and_solves_targets_with_it(tmp_path):
    from lore_core.privacy.ddg_accounting import ddg_epsilon

    settings = validate(user_settings(mode="user+secagg", dimension=1920, target_epsilon=3.0, noise_multiplier=None,
                                      rounds=50))
    assert ddg_epsilon([(settings.noise_multiplier, settings.sample_rate, 50)], DELTA, 1920)[0] <= 3.0
    assert settings.noise_multiplier > validate(user_settings(target_epsilon=3.0, noise_multiplier=None,
                                                              rounds=50)).noise_multiplier  # looser bound, more noise
    ledger = PrivacyLedger.create(tmp_path, settings)
    for t in (1, 2, 3):
        ledger.record_round(t, 50)
    data = json.loads((tmp_path / LEDGER_FILENAME).read_text())
    assert data["epsilon"]["accountant"] == "ddg-rdp" and data["epsilon"]["prv"] is None
    assert data["epsilon"]["headline"] == pytest.approx(
        ddg_epsilon([(settings.noise_multiplier, settings.sample_rate, 3)], DELTA, 1920)[0])
    assert "server" in data["threat_model"] and "noised sums" in data["threat_model"]
    assert data["noise"]["dropout_tolerance"] == 0.1 and "discrete Gaussian" in data["noise"]["distribution"]


def test_unknown_config_key_is_an_error():
    settings = PrivacySettings.from_config({"mode": "user", "noise-multiplier": 2.0})
    assert settings.noise_multiplier == 2.0
    with pytest.raises(PrivacyConfigError, match="unknown privacy setting 'noise-multiplyer'"):
        PrivacySettings.from_config({"noise-multiplyer": 2.0})


def test_default_delta_follows_the_population_and_the_refusal_states_the_bound():
    assert validate(user_settings()).delta == 1e-5
    assert validate(user_settings(population_size=100_000, clients_per_round=100, rounds=20)).delta == 1e-6
    assert validate(user_settings(population_size=2_000_000, clients_per_round=100, rounds=20)).delta == 1e-8
    with pytest.raises(PrivacyConfigError) as info:
        validate(user_settings(population_size=100_000, clients_per_round=100, rounds=20, delta=1e-5))
    assert "1/(10 N) = 1e-06" in str(info.value) and "1e-5 or less" not in str(info.value)


def test_weak_delta_and_no_amplification_warn():
    with pytest.warns(PrivacyConfigWarning, match="weak"):
        validate(user_settings(delta=5e-4))
    with pytest.warns(PrivacyConfigWarning, match="no amplification"):
        validate(user_settings(clients_per_round=1400, rounds=2))


# -- ledger ----------------------------------------------------------------------------------------------------------
def test_ledger_epsilon_is_derived_from_recorded_rounds_and_matches_pld(tmp_path):
    settings = user_settings(population_size=1000, clients_per_round=200, rounds=4, noise_multiplier=0.8)
    ledger = PrivacyLedger.create(tmp_path, settings)
    for t in range(1, 5):
        z = 0.8 if t <= 2 else 1.2  # heterogeneous composition
        ledger.record_round(t, sampled=190, noise_multiplier=z)
    on_disk = json.loads((tmp_path / LEDGER_FILENAME).read_text())
    assert on_disk["rounds"]["released"] == 4
    assert on_disk["epsilon"]["prv"] == pytest.approx(pld_epsilon([(0.8, 0.2, 2), (1.2, 0.2, 2)]), rel=0.02)
    assert PrivacyLedger.load(tmp_path).epsilon_by_round()[-1] == on_disk["epsilon"]["prv"]
    assert set(on_disk["events"]["rounds"][-1]) == {"round", "sampled", "noise_multiplier", "sample_rate"}
    assert on_disk["epsilon"]["rdp"] >= on_disk["epsilon"]["prv"] - 0.02
    assert on_disk["not_private"]["flag"] is False
    assert "user-level" in on_disk["guarantee"]


def test_max_epsilon_stops_before_the_exceeding_round(tmp_path):
    q = 0.1
    limit = (epsilon(1.0, q, 3, DELTA) + epsilon(1.0, q, 4, DELTA)) / 2  # exactly 3 rounds fit
    settings = user_settings(population_size=1000, clients_per_round=100, rounds=3, max_epsilon=limit)
    ledger = PrivacyLedger.create(tmp_path, settings)
    for t in (1, 2, 3):
        ledger.check_next_round()
        ledger.record_round(t, sampled=97)
    assert ledger.would_exceed()
    with pytest.raises(PrivacyBudgetExhausted, match="stopping after 3"):
        ledger.check_next_round()
    with pytest.raises(PrivacyBudgetExhausted):
        ledger.record_round(4, sampled=100)
    on_disk = json.loads((tmp_path / LEDGER_FILENAME).read_text())
    assert on_disk["budget"]["stopped_early"] is True
    assert on_disk["rounds"]["released"] == 3 and on_disk["epsilon"]["prv"] <= limit


def test_ledger_resume_and_refusals(tmp_path):
    settings = user_settings(rounds=10)
    ledger = PrivacyLedger.create(tmp_path, settings)
    ledger.record_round(1, sampled=48)
    ledger.record_round(2, sampled=55)
    with pytest.raises(LedgerError, match="already exists"):
        PrivacyLedger.create(tmp_path, settings)
    with pytest.raises(LedgerError, match="next is 3"):
        ledger.record_round(4, sampled=50)

    resumed = PrivacyLedger.open(tmp_path, settings)
    assert resumed.rounds_released == 2 and resumed.epsilon() == ledger.epsilon()
    resumed.record_round(3, sampled=51)
    with pytest.raises(LedgerError, match="clip-norm: stored 0.25, new 0.5"):
        PrivacyLedger.load(tmp_path, user_settings(rounds=10, clip_norm=0.5))


def test_ledger_write_is_atomic(tmp_path, monkeypatch):
    ledger = PrivacyLedger.create(tmp_path, user_settings(rounds=10))
    ledger.record_round(1, sampled=50)
    before = (tmp_path / LEDGER_FILENAME).read_text()

    def crash(*args, **kwargs):
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        ledger.record_round(2, sampled=50)
    monkeypatch.undo()
    assert (tmp_path / LEDGER_FILENAME).read_text() == before  # the previous ledger is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == [LEDGER_FILENAME]  # no temp file left behind


def test_none_mode_ledger_says_there_is_no_guarantee(tmp_path):
    ledger = PrivacyLedger.create(tmp_path, PrivacySettings(mode="none", rounds=3))
    ledger.record_round(1, sampled=10)
    on_disk = json.loads((tmp_path / LEDGER_FILENAME).read_text())
    assert on_disk["guarantee"].startswith("NONE: no differential privacy")
    assert "recover every participant's w_i" in on_disk["guarantee"]
    assert on_disk["not_private"]["flag"] is True and on_disk["epsilon"] is None
    assert ledger.summary()["epsilon_prv"] is None


def test_reproducible_noise_marks_the_ledger_not_private(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PrivacyConfigWarning)
        ledger = PrivacyLedger.create(tmp_path, user_settings(rounds=5, reproducible_noise=True, noise_seed=1))
    summary = ledger.summary()
    assert summary["not_private"] and "noise seed is known" in summary["not_private"]
    assert summary["guarantee"].startswith("NOT PRIVATE")


def test_record_mode_ledger_reports_max_over_clients(tmp_path):
    settings = PrivacySettings(mode="record", rounds=5, noise_multiplier=1.0, record_batch_size=2, record_epochs=1)
    ledger = PrivacyLedger.create(tmp_path, settings)
    ledger.record_round(1, sampled=2, client_histories={"a": [(1.0, 0.2, 5)], "b": [(1.0, 0.1, 10)]})
    worst = max(epsilon(1.0, 0.2, 5, DELTA), epsilon(1.0, 0.1, 10, DELTA))
    summary = ledger.summary()
    assert summary["epsilon_prv"] == pytest.approx(worst)
    assert "NOT a user-level guarantee" in summary["guarantee"]


def test_cli_prints_prv_and_rdp(capsys):
    from lore_cli.main import main

    assert main(["privacy", "epsilon", "--noise-multiplier", "1", "--clients-per-round", "50",
                 "--population", "1400", "--rounds", "200", "--max-epsilon", "3.37"]) == 0
    out = capsys.readouterr().out
    assert "epsilon PRV (headline) = 3.368" in out and "epsilon RDP (upper bound) = 3.836" in out
    assert "max rounds with epsilon (PRV) <= 3.37 at z = 1: 200" in out
    assert main(["privacy", "epsilon", "--noise-multiplier", "0", "--clients-per-round", "50",
                 "--population", "1400", "--rounds", "200"]) == 2


@pytest.mark.parametrize("z", [1e-6, 0.05])
def test_vanishing_noise_is_refused_by_validation_and_never_crashes_the_accountant(z):
    """Opacus' PRV grid asked for exabytes at z = 1e-6 (a MemoryError). A user-mode plan beyond any meaningful
    epsilon is refused before training; the accountant itself reports the RDP bound (>= PRV) instead of running PRV."""
    from lore_core.privacy.accounting import MAX_PRV_EPSILON, epsilon_report

    report = epsilon_report([(z, 0.037, 200)], 1e-5)
    assert report.prv == report.rdp > MAX_PRV_EPSILON and report.prv_is_rdp_bound
    with pytest.raises(PrivacyConfigError, match="no meaningful privacy"):
        validate(PrivacySettings(mode="user", noise_multiplier=z, population_size=1350, rounds=200,
                                 clients_per_round=50))


def test_a_target_beyond_meaningful_privacy_is_refused_asking_for_a_lower_target():
    """Found by a tester: `privacy epsilon --target-epsilon 1000` was told to raise a noise multiplier it never gave."""
    with pytest.raises(PrivacyConfigError, match="no meaningful privacy; lower target_epsilon .*solved for it") as info:
        validate(PrivacySettings(mode="user", target_epsilon=1000.0, population_size=100, rounds=50,
                                 clients_per_round=10))
    assert "raise noise_multiplier" not in str(info.value)
    assert "until the RDP bound of the plan is at most 100" in str(info.value)  # a tester: how far to lower it


def test_prv_runs_below_the_stand_in_threshold():
    report = epsilon_report([(0.5, 0.037, 200)], 1e-5)
    assert report.prv < report.rdp and not report.prv_is_rdp_bound  # PRV is computed where it is cheap


def test_ledger_load_reads_only_config_and_events_and_writes_them_back_unchanged(tmp_path):
    ledger = PrivacyLedger.create(tmp_path, user_settings(population_size=1000, clients_per_round=100, rounds=3))
    ledger.record_round(1, sampled=97)
    first = json.loads((tmp_path / LEDGER_FILENAME).read_text())
    tampered = dict(first, epsilon={"prv": 0.0001}, guarantee="tampered conclusion")
    (tmp_path / LEDGER_FILENAME).write_text(json.dumps(tampered))
    reloaded = PrivacyLedger.load(tmp_path)
    assert reloaded.epsilon().prv == pytest.approx(first["epsilon"]["prv"])  # conclusions are never read back
    reloaded.record_audit({"audit": "x"})
    again = json.loads((tmp_path / LEDGER_FILENAME).read_text())
    assert again["config"] == first["config"] and again["events"]["rounds"] == first["events"]["rounds"]
    assert again["epsilon"] == first["epsilon"]


def test_a_ledger_saved_with_a_byte_order_mark_is_read_and_bad_utf8_is_named_by_line(tmp_path):
    """A tester: a ledger.json saved by an editor with a UTF-8 BOM was refused (text files may start with one), and a
    byte that is not UTF-8 was named by its byte offset."""
    from lore_core.privacy.ledger import read_ledger

    ledger = PrivacyLedger.create(tmp_path, user_settings(population_size=1000, clients_per_round=100, rounds=3))
    ledger.record_round(1, sampled=97)
    path = tmp_path / LEDGER_FILENAME
    text = path.read_bytes()
    path.write_bytes(b"\xef\xbb\xbf" + text)
    assert read_ledger(path)["events"]["rounds"][0]["sampled"] == 97
    path.write_bytes(text.replace(b'"events"', b'"ev\xffents"', 1))
    with pytest.raises(LedgerError, match=r"line \d+: not valid UTF-8 \(byte 0xff at column \d+\)"):
        read_ledger(path)


def test_ledger_refuses_to_append_over_events_it_did_not_write(tmp_path):
    settings = user_settings(population_size=1000, clients_per_round=100, rounds=5)
    ours = PrivacyLedger.create(tmp_path, settings)
    ours.record_round(1, sampled=100)
    other = PrivacyLedger.load(tmp_path, settings)  # a second writer on the same directory
    other.record_round(2, sampled=101)
    other.record_round(3, sampled=99)
    with pytest.raises(LedgerError, match="another process"):
        ours.record_round(2, sampled=98)
    on_disk = PrivacyLedger.load(tmp_path)
    assert on_disk.rounds_released == 3  # the budget on disk never went down


def test_second_run_on_one_directory_is_refused_with_the_holder(tmp_path):
    import subprocess
    import sys

    from lore_core.run_lock import RunDirBusy, RunDirLock

    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from lore_core.run_lock import RunDirLock\n"
                               f"with RunDirLock({str(tmp_path)!r}):\n print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunDirBusy, match=f"pid {holder.pid}"):
            with RunDirLock(tmp_path):
                pass
    finally:
        holder.kill()
        holder.wait()
    with RunDirLock(tmp_path), RunDirLock(tmp_path):  # free again once the holder died; re-entrant in one process
        pass


def test_a_lock_taken_before_the_checks_writes_nothing_until_announced(tmp_path, monkeypatch):
    """`simulate` locks its run directory before the resume checks and names itself in the lock file only once they
    pass: an unannounced holder still excludes other runs, leaves the previous record as it was and removes a lock
    file it had to create; a waiter that opened that removed file locks the path's current file instead."""
    import fcntl
    import subprocess
    import sys

    from lore_core import run_lock
    from lore_core.run_lock import LOCK_FILENAME, RunDirBusy, RunDirLock

    lock_file = tmp_path / LOCK_FILENAME
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from lore_core.run_lock import RunDirLock\n"
                               f"with RunDirLock({str(tmp_path)!r}, announce=False):\n print('held', flush=True); "
                               "sys.stdin.readline()"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert lock_file.read_bytes() == b""  # created (it is what flock locks), not written
        with pytest.raises(RunDirBusy):
            with RunDirLock(tmp_path):
                pass
        holder.communicate("\n", timeout=30)  # released without announcing: the file it created is gone
        assert holder.returncode == 0 and not lock_file.exists()
    finally:
        holder.kill()
        holder.wait()

    lock_file.write_text("the previous run")
    with RunDirLock(tmp_path, announce=False):
        assert lock_file.read_text() == "the previous run"
    assert lock_file.read_text() == "the previous run"
    with RunDirLock(tmp_path, announce=False) as lock:
        lock.announce()
        assert json.loads(lock_file.read_text())["pid"] == os.getpid()

    lock_file.unlink()
    real_flock, removed = fcntl.flock, []

    def flock(fd, operation):  # the file this process opened is removed by its holder before the lock is granted
        if not removed and operation & fcntl.LOCK_EX:
            removed.append(os.fstat(fd).st_ino)
            lock_file.unlink()
        return real_flock(fd, operation)

    monkeypatch.setattr(run_lock.fcntl, "flock", flock)
    with RunDirLock(tmp_path):
        held = run_lock._held[str(tmp_path.resolve())].fd
        assert removed and os.fstat(held).st_ino == lock_file.stat().st_ino  # it holds the file others will open
        assert json.loads(lock_file.read_text())["pid"] == os.getpid()


def test_a_refused_run_that_locked_a_file_another_run_just_created_leaves_no_empty_lock(tmp_path, monkeypatch):
    """A review found an empty .lock left behind: run A created the file, run B opened it and locked it before A
    could; A was refused as busy, and B, refused by its checks, kept the file because it had not created it. An
    unannounced holder removes a lock file that holds no record, whoever created it."""
    import fcntl

    from lore_core import run_lock
    from lore_core.run_lock import LOCK_FILENAME, RunDirLock

    lock_file = tmp_path / LOCK_FILENAME
    real_open, run_a = os.open, []

    def open_(path, flags, *mode):  # run A creates the lock file just before this run (B) opens the path
        if not run_a and str(path) == str(lock_file):
            run_a.append(real_open(lock_file, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644))
        return real_open(path, flags, *mode)

    monkeypatch.setattr(run_lock.os, "open", open_)
    with RunDirLock(tmp_path, announce=False):  # B locks A's file first; its checks then fail
        with pytest.raises(BlockingIOError):  # A finds it held and is refused
            fcntl.flock(run_a[0], fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.close(run_a[0])
    assert not lock_file.exists()


def test_a_refused_run_keeps_the_record_of_a_run_that_locked_its_new_lock_file_first(tmp_path, monkeypatch):
    """The same race the other way round: this run creates .lock, another run locks it first, names itself and
    ends; this run, refused by its checks, leaves that record (it used to remove the file it had created)."""
    import fcntl

    from lore_core import run_lock
    from lore_core.run_lock import LOCK_FILENAME, RunDirLock

    lock_file = tmp_path / LOCK_FILENAME
    record = json.dumps({"pid": 1, "command": "lore-fed simulate other", "since": "2026-01-01 00:00:00"})
    real_flock, other_ran = fcntl.flock, []

    def flock(fd, operation):  # before this run's lock is granted, the other run holds the file, announces, ends
        if not other_ran and operation & fcntl.LOCK_EX:
            other_ran.append(os.open(lock_file, os.O_RDWR))
            real_flock(other_ran[0], fcntl.LOCK_EX)
            os.pwrite(other_ran[0], record.encode(), 0)
            os.close(other_ran[0])
        return real_flock(fd, operation)

    monkeypatch.setattr(run_lock.fcntl, "flock", flock)
    with RunDirLock(tmp_path, announce=False):
        assert other_ran
    assert lock_file.read_text() == record


def test_a_busy_run_directory_does_not_blame_an_ended_run(tmp_path):
    """A review found a waiting run told "in use by pid P" while the holder was still checking its input and the
    file still held an earlier, ended run's record (P's number may now belong to an unrelated process)."""
    import subprocess
    import sys

    from lore_core.run_lock import LOCK_FILENAME, RunDirBusy, RunDirLock

    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / LOCK_FILENAME).write_text(json.dumps({"pid": int(ended.stdout), "command": "lore-fed simulate old",
                                                      "since": "2026-01-01 00:00:00"}))
    holder = subprocess.Popen([sys.executable, "-c", "import sys; from lore_core.run_lock import RunDirLock\n"
                               f"with RunDirLock({str(tmp_path)!r}, announce=False):\n print('held', flush=True); "
                               "sys.stdin.readline()"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunDirBusy, match="still checking its input.*is of an ended run"):
            with RunDirLock(tmp_path):
                pass
        holder.communicate("\n", timeout=30)
    finally:
        holder.kill()
        holder.wait()


def test_every_guarantee_and_the_simulate_summary_name_who_is_trusted(tmp_path):
    """Found by a tester: metrics.json's `privacy_guarantee` (the ledger's sentence) read "user-level (3.411,
    1e-05)-DP ... of the 5 released bases" without saying that mode `user` trusts the server, which sees every
    update; and `simulate` printed "epsilon 2.633 (delta 1e-05)" alone, also for a NOT PRIVATE debug run (and
    nothing in record mode). Each now says who is trusted, and a debug run is NOT PRIVATE in the summary too."""
    from lore_cli.simulate_command import privacy_summary

    user = PrivacyLedger.create(tmp_path / "user", user_settings(rounds=5))
    user.record_round(1, sampled=50)
    assert "trusted: the server" in user.guarantee()
    secagg = PrivacyLedger.create(tmp_path / "secagg", PrivacySettings(
        mode="user+secagg", rounds=5, noise_multiplier=1.0, clip_norm=0.25, clients_per_round=50,
        population_size=1400, dimension=80))
    secagg.record_round(1, sampled=50)
    assert "against the server itself, which draws the sample" in secagg.guarantee()
    assert "against the server, which knows the sample, 1.2" in privacy_summary(
        {"privacy_mode": "user+secagg", "not_private": False, "epsilon": 0.5, "delta": 1e-5,
         "epsilon_against_server": 1.2})
    record = PrivacyLedger.create(tmp_path / "record", PrivacySettings(mode="record", rounds=5, noise_multiplier=1.0,
                                                                       record_batch_size=2, record_epochs=1))
    record.record_round(1, sampled=2, client_histories={"a": [(1.0, 0.2, 5)]})
    assert "trusted: nobody" in record.guarantee()

    user_metrics = {"privacy_mode": "user", "not_private": False, "epsilon": 2.633, "delta": 1e-5}
    assert "the server trusted" in privacy_summary(user_metrics)
    assert privacy_summary({**user_metrics, "not_private": True}).strip().startswith("NOT PRIVATE")
    assert "epsilon" not in privacy_summary({**user_metrics, "not_private": True})
    assert "per-pair epsilon 4.695" in privacy_summary({"privacy_mode": "record", "not_private": False, "delta": 1e-5,
                                                         "record_epsilon_max_over_clients": 4.695})
    assert privacy_summary({"privacy_mode": "none", "not_private": True}) == ""


@pytest.mark.parametrize("field, mode", [("clip_norm", "user"), ("clip_norm", "user+secagg"),
                                         ("noise_multiplier", "user"), ("max_grad_norm", "record")])
def test_noise_scales_that_overflow_are_refused_before_any_round(field, mode):
    """Found by a tester: `simulate --clip-norm 1e308` ran to exit 0 under a DP claim with an untrained basis (the
    noise std z*C overflowed, every server step was infinite and skipped, the Adam state left infinite), and
    `--noise-multiplier 1e308` was refused with the advice to raise it (the accountant overflowed). Both are now
    refused by name above 1e6, where nothing is gained."""
    import re

    from lore_core.privacy.privacy_settings import MAX_SCALE

    base = {"user": user_settings(rounds=5), "record": PrivacySettings(mode="record", rounds=5, noise_multiplier=1.0),
            "user+secagg": user_settings(mode="user+secagg", rounds=5, dimension=80)}[mode]
    validate(replace(base, **{field: MAX_SCALE}))  # the bound itself is taken
    for value in (1e7, 1e308):
        with pytest.raises(PrivacyConfigError, match=re.escape(f"{field} must be at most 1e+06; got {value!r}")):
            validate(replace(base, **{field: value}))


def test_a_record_client_that_lost_its_state_keeps_what_it_spent_before(tmp_path):
    """Found by a tester: `simulate --privacy record` interrupted after 44 rounds and resumed lost every client's
    spending before the interrupt (a simulated node keeps its accountant history in memory, so after the restart
    each client reported only its new steps, and the ledger replaced its history with them): client 0 was sampled
    in 40 rounds of 8 steps and the ledger held 256 steps, not 320. Clients now report what they spent each round,
    which the ledger appends, so a client that lost its state reports as one that did not."""
    settings = PrivacySettings(mode="record", rounds=6, noise_multiplier=1.0, record_batch_size=2, record_epochs=1)
    ledger = PrivacyLedger.create(tmp_path, settings)
    steps = []
    for round_ in range(1, 6):
        ledger.record_round(round_, sampled=1, client_histories={"a": [(1.0, 0.125, 8)]})
        on_disk = json.loads((tmp_path / LEDGER_FILENAME).read_text())["events"]["clients"]["a"]["history"]
        steps.append(sum(k for _, _, k in on_disk))
    assert steps == [8, 16, 24, 32, 40]
    reloaded = PrivacyLedger.load(tmp_path)
    assert reloaded.epsilon().prv == pytest.approx(epsilon(1.0, 0.125, 40, DELTA))


def test_a_record_run_begun_before_the_public_rate_is_not_resumed(tmp_path):
    """A reviewer: a record run begun before 0.2.3 (its DP-SGD took the rate and divisor from each client's pair
    count, which let a server tell n pairs from n - 1) resumed silently, its guarantee stated as if it had held."""
    ledger = PrivacyLedger.create(tmp_path, PrivacySettings(mode="record", rounds=6, noise_multiplier=1.0))
    ledger.record_round(1, sampled=1, client_histories={"a": [(1.0, 0.125, 8)]})
    assert PrivacyLedger.load(tmp_path).settings.record_sample_rate == 0.25
    data = json.loads((tmp_path / LEDGER_FILENAME).read_text())
    del data["config"]["record_sample_rate"]
    (tmp_path / LEDGER_FILENAME).write_text(json.dumps(data))
    with pytest.raises(LedgerError, match="begun before lore-fed 0.2.3.*not resumed"):
        PrivacyLedger.load(tmp_path)


def test_a_record_state_reports_what_it_spent_since_an_earlier_one():
    from lore_core.privacy.record_dp import RecordDpState

    before = RecordDpState(history=[(2.0, 0.5, 4), (1.0, 0.25, 8)])
    assert RecordDpState(history=[(2.0, 0.5, 4), (1.0, 0.25, 12)]).spent_since(before) == [(1.0, 0.25, 4)]
    assert RecordDpState(history=[(2.0, 0.5, 4), (1.0, 0.25, 8), (1.0, 0.5, 2)]).spent_since(before) == \
        [(1.0, 0.5, 2)]
    assert before.spent_since(before) == [] and before.spent_since(RecordDpState()) == before.history
    with pytest.raises(ValueError, match="does not extend"):
        RecordDpState(history=[(1.0, 0.25, 8)]).spent_since(before)


def test_a_user_starts_from_the_ledgers_history_only_where_it_extends_its_own():
    """Found by a review: a node took whichever history had more steps, so a server could send a long history of
    cheap steps (z 1e3, q 1e-3), replace the user's own and let it spend past max-epsilon. Only an extension of the
    user's own history is taken (epsilon only grows along one); what the client reports catches up a ledger that
    missed a reply."""
    from lore_core.privacy.record_dp import RecordDpState, spending_to_report, starting_history

    own = RecordDpState(history=[(3.0, 1 / 6, 66)])
    cheap = RecordDpState(history=[(1e3, 1e-3, 1000)])
    assert starting_history(own, cheap) is own
    assert starting_history(RecordDpState(), cheap) is cheap  # a node that lost its state: nothing of its own
    longer = RecordDpState(history=[(3.0, 1 / 6, 72), (2.0, 0.5, 4)])
    assert starting_history(own, longer) is longer and starting_history(own, None) is own
    behind = RecordDpState(history=[(3.0, 1 / 6, 60)])  # the ledger missed a reply of 6 steps
    assert starting_history(own, behind) is own
    after = RecordDpState(history=[(3.0, 1 / 6, 72)])
    assert spending_to_report(after, own, behind) == [(3.0, 1 / 6, 12)]  # this round's 6 and the missed 6
    assert spending_to_report(after, own, None) == [(3.0, 1 / 6, 6)]
    assert spending_to_report(after, own, cheap) == [(3.0, 1 / 6, 6)]  # a history it does not extend: its own steps


def test_record_mode_unreported_clients_clear_when_they_reply_and_a_damaged_list_is_refused(tmp_path):
    """A reviewer: a client whose reply was lost stayed unreported (LOWER BOUND) for good when its next reply carried
    no new spending (its budget spent); and a damaged `unreported` list loaded, then crashed or was read letter by
    letter."""
    settings = PrivacySettings(mode="record", rounds=5, noise_multiplier=1.0, record_batch_size=2, record_epochs=1)
    ledger = PrivacyLedger.create(tmp_path, settings)
    ledger.record_round(1, sampled=2, client_histories={"a": [(1.0, 0.2, 5)]}, unreported=["b"], replied=["a"])
    assert ledger.unreported_clients() == ["b"] and "LOWER BOUND: 1 sampled" in ledger.guarantee()
    ledger.record_round(2, sampled=1, client_histories={}, replied=["b"])  # b answered, nothing new to report
    assert ledger.unreported_clients() == [] and "LOWER BOUND" not in ledger.guarantee()
    assert PrivacyLedger.load(tmp_path).unreported_clients() == []
    data = json.loads((tmp_path / "ledger.json").read_text())
    data["events"]["rounds"][0]["unreported"] = 5
    (tmp_path / "ledger.json").write_text(json.dumps(data))
    with pytest.raises(LedgerError, match="unreported 5, expected a list of client ids"):
        PrivacyLedger.load(tmp_path)


def test_planned_rounds_past_what_the_accountant_can_bound_are_refused_up_front():
    """Found by a tester: `privacy epsilon --rounds 1000000000` took 15 GB of memory in Opacus' PRV grid, and minutes;
    a plan of more than MAX_ROUNDS rounds is refused before any accountant call."""
    from lore_core.privacy.accounting import MAX_ROUNDS

    with pytest.raises(PrivacyConfigError, match="at most 1,000,000"):
        validate(PrivacySettings(mode="user", noise_multiplier=5.0, clients_per_round=50, population_size=10**9,
                                 rounds=MAX_ROUNDS + 1))


def test_a_ledger_of_another_mode_names_the_mode_alone_by_its_run_config_key(tmp_path):
    """A DP run stopped before its first checkpoint and rerun under privacy none: the ledger listed the mode and
    every setting that follows it (noise_multiplier: stored 1.0, new None, ...), in Python spelling (a tester)."""
    PrivacyLedger.create(tmp_path, user_settings(population_size=100, clients_per_round=5, rounds=3))
    with pytest.raises(LedgerError) as refused:
        PrivacyLedger.load(tmp_path, PrivacySettings(mode="none", population_size=100, rounds=3))
    assert "(privacy-mode: stored 'user', new 'none')" in str(refused.value)
    with pytest.raises(LedgerError, match=r"\(noise-multiplier: stored 1.0, new 2.0\)"):
        PrivacyLedger.load(tmp_path, user_settings(population_size=100, clients_per_round=5, rounds=3,
                                                   noise_multiplier=2.0))


@pytest.mark.parametrize("mode", ["user", "record"])
def test_a_delta_the_accountant_cannot_compute_is_refused_before_any_round(mode):
    """A tester: --delta 1e-15 (or 1e-300) passed validation, the first round's PRV call failed ("floating point
    errors will dominate"), and the run directory it left could be neither resumed nor rerun with another delta."""
    from lore_core.privacy.privacy_settings import PrivacyConfigError, PrivacySettings, validate

    extra = {"clients_per_round": 10, "clip_norm": 0.25} if mode == "user" else {}
    for delta in (1e-15, 1e-300):
        with pytest.raises(PrivacyConfigError, match="must be at least 1e-10"):
            validate(PrivacySettings(mode=mode, noise_multiplier=1.0, delta=delta, population_size=100, rounds=3,
                                     **extra))
    validate(PrivacySettings(mode=mode, noise_multiplier=1.0, delta=1e-10, population_size=100, rounds=3, **extra))


@pytest.mark.parametrize("delta", ["NaN", "null", "2"])
def test_a_ledger_whose_delta_is_not_a_probability_is_refused_naming_it(tmp_path, delta):
    """A tester: a ledger with delta NaN failed the accounting audit with "cannot convert float NaN to integer", no
    file named, and `audit update-leakage` wrote it back as null."""
    from lore_core.privacy import PrivacyLedger, PrivacySettings
    from lore_core.privacy.ledger import LedgerError, read_ledger

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        PrivacyLedger.create(tmp_path, PrivacySettings(mode="user", noise_multiplier=1.0, clip_norm=0.5,
                                                       clients_per_round=10, population_size=100, rounds=2))
    path = tmp_path / LEDGER_FILENAME
    data = json.loads(path.read_text())
    data["config"]["delta"] = "__DELTA__"
    path.write_text(json.dumps(data).replace('"__DELTA__"', delta))
    with pytest.raises(LedgerError, match=r"ledger.json: config.delta must be a number in \(0, 1\)"):
        read_ledger(path)
