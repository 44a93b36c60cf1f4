"""Accounting audit: recompute a ledger's epsilon independently of the code that wrote it.

The ledger stores events (per round: noise multiplier z, sample rate q) and, apart from them, the epsilon derived. This audit
reads the raw JSON (a ledger.json path is first checked by the ledger's own reader, which can only refuse a
file, never supply a figure), rebuilds the history with its own checks, and computes epsilon with
- dp_accounting's PLD accountant (Google; a different method from Opacus PRV) when installed: the independent check;
- Opacus RDP directly (a valid upper bound: it must not fall below PRV beyond PRV's error).
It fails when the ledger's stored PRV epsilon differs from the PLD value by more than max(0.05, 2%) (notes §10), when
RDP < PRV - tolerance, or when the stored per-round events do not reproduce the stored epsilon.
Mode `user+secagg` (distributed discrete Gaussian): the stored ddg-rdp epsilon must be what its events give, and
not below the continuous Gaussian's PLD epsilon for the same events (the discrete sum cannot be more private than
the continuous mechanism of the same std; a bound below it is wrong).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from lore_core.audits.statistics import AuditInputError
from lore_core.privacy.ledger import MOST_USER_ROUNDS, NOT_DERIVED, NUMBER

ABS_TOL = 0.05
REL_TOL = 0.02


def ledger_history(ledger: dict) -> list[tuple[float, float, int]]:
    """(z, q, steps) segments from the ledger's per-round events, consecutive equal (z, q) merged."""
    segments: list[tuple[float, float, int]] = []
    for entry in (ledger.get("events") or {}).get("rounds", []):
        if not isinstance(entry, dict) or "noise_multiplier" not in entry or "sample_rate" not in entry:
            raise AuditInputError(f"ledger round entry {entry!r} lacks noise_multiplier/sample_rate")
        try:
            z, q = float(entry["noise_multiplier"]), float(entry["sample_rate"])
        except (TypeError, ValueError) as exc:
            raise AuditInputError(f"ledger round entry {entry!r}: noise_multiplier and sample_rate must be numbers, "
                                  f"got {entry['noise_multiplier']!r} and {entry['sample_rate']!r}") from exc
        if not (math.isfinite(z) and z > 0 and 0 < q <= 1):
            raise AuditInputError(f"ledger round entry {entry!r}: noise_multiplier must be finite and > 0 and "
                                  "sample_rate in (0, 1]")
        if segments and segments[-1][:2] == (z, q):
            segments[-1] = (z, q, segments[-1][2] + 1)
        else:
            segments.append((z, q, 1))
    return segments


def _claimed(ledger: dict) -> dict:
    """The ledger's stored epsilon block ({} where it holds something else: then the audit fails, it does not crash)."""
    return ledger["epsilon"] if isinstance(ledger.get("epsilon"), dict) else {}


def _stated_claim_problems(ledger: dict, epsilon: float, tol: float) -> list[str]:
    """Where the ledger's stated headline epsilon, or its guarantee sentence, is not the epsilon its events give:
    a tester's ledger claimed (0.500, 1e-05)-DP beside a PRV of 2.931, and passed."""
    problems = []
    headline = _number(_claimed(ledger).get("headline"))
    if headline is None or abs(headline - epsilon) > tol:
        problems.append(f"its headline epsilon {headline} is not what its events give ({epsilon:.4f})")
    guarantee, stated = ledger.get("guarantee"), epsilon if problems else headline  # as the ledger rounded it
    if not (isinstance(guarantee, str) and f"({stated:.3f}, " in guarantee):
        problems.append(f"its guarantee does not state the epsilon its events give ({epsilon:.3f}): "
                        f"{str(guarantee)[:120]!r}")
    return problems


def _number(value) -> float | None:
    """A stored epsilon as a float, or None where the ledger holds anything else."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def pld_epsilon(history: list[tuple[float, float, int]], delta: float) -> float | None:
    """dp_accounting PLD epsilon (None if dp_accounting is not installed)."""
    try:
        import dp_accounting
    except ImportError:
        return None
    accountant = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-3)
    for z, q, steps in history:
        event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)) if q < 1 else \
            dp_accounting.GaussianDpEvent(z)
        accountant.compose(event, steps)
    return float(accountant.get_epsilon(delta))


def opacus_epsilons(history: list[tuple[float, float, int]], delta: float) -> tuple[float, float]:
    """(PRV, RDP) straight from Opacus, bypassing lore_core.privacy.accounting."""
    import warnings

    from opacus.accountants import PRVAccountant, RDPAccountant

    prv = PRVAccountant()
    prv.history = list(history)
    rdp = RDPAccountant()
    rdp.history = list(history)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(prv.get_epsilon(delta)), float(rdp.get_epsilon(delta))


def _read_ledger(ledger) -> tuple[str, float, list[tuple[float, float, int]]]:
    """(mode, delta, history) of a parsed ledger; AuditInputError (or a KeyError/ValueError) for a bad one."""
    if not isinstance(ledger, dict):
        raise AuditInputError(f"a ledger is a JSON object, got {type(ledger).__name__}")
    mode = ledger.get("mode")
    if mode not in ("user", "user+secagg"):
        raise AuditInputError(f"the accounting audit recomputes user-level ledgers; this ledger's mode is {mode!r}")
    return mode, float(ledger["config"]["delta"]), ledger_history(ledger)  # the fact, not the derived top-level key


def accounting_audit(ledger: dict | str | Path, *, abs_tol: float = ABS_TOL, rel_tol: float = REL_TOL) -> dict:
    """Recompute a user-mode ledger's epsilon; `ledger` is the parsed JSON or a path to ledger.json."""
    if not isinstance(ledger, dict):
        path = Path(ledger)
        if path.is_dir():
            path = path / "ledger.json"
        if not path.is_file():
            raise FileNotFoundError(f"no ledger at {path}: the accounting audit reads the privacy ledger of a "
                                    "`lore-fed simulate` run under user-level DP")
        from lore_core.privacy.ledger import LedgerError, read_ledger

        try:
            ledger = read_ledger(path)  # the ledger's own checks: schema, events, every round's (z, q)
        except LedgerError as exc:
            raise AuditInputError(str(exc)) from exc
        try:
            mode, delta, history = _read_ledger(ledger)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:  # name the file the bad entry came from
            raise AuditInputError(f"{path}: {exc}") from exc
    else:
        mode, delta, history = _read_ledger(ledger)
    if mode == "user+secagg":
        return _ddg_audit(ledger, history, delta, abs_tol, rel_tol)
    stored, stored_rdp = (_number(_claimed(ledger).get(key)) for key in ("prv", "rdp"))
    if not history:
        raise AuditInputError("the ledger has no released rounds: nothing to recompute")
    prv, rdp = opacus_epsilons(history, delta)
    pld = pld_epsilon(history, delta)
    tol = max(abs_tol, rel_tol * (stored if stored else prv))
    problems = []
    if stored is None or not math.isfinite(stored):
        problems.append("the ledger stores no finite PRV epsilon")
    else:
        if abs(stored - prv) > tol:
            problems.append(f"stored PRV {stored:.4f} is not what its own events give ({prv:.4f})")
        if pld is not None and abs(stored - pld) > tol:
            problems.append(f"stored PRV {stored:.4f} disagrees with the independent PLD {pld:.4f}")
        if stored_rdp is not None and abs(stored_rdp - rdp) > max(abs_tol, rel_tol * rdp):
            problems.append(f"stored RDP {stored_rdp:.4f} is not what its events give ({rdp:.4f})")
    if rdp < prv - tol:
        problems.append(f"RDP {rdp:.4f} below PRV {prv:.4f}: one accountant is wrong")
    problems += _stated_claim_problems(ledger, prv, tol)
    passed = not problems
    if passed:
        sentence = (f"PASS: the ledger's epsilon {stored:.3f} (PRV) is reproduced by its {sum(s[2] for s in history)} "
                    f"round events: Opacus PRV {prv:.3f}, RDP {rdp:.3f}"
                    + (f", independent PLD {pld:.3f}" if pld is not None else " (dp_accounting not installed: no "
                       "independent PLD check)") + f" at delta={delta:g}.")
    else:
        sentence = "FAIL: " + "; ".join(problems) + ". Do not publish this epsilon; recompute it from the events."
    return {
        "audit": "accounting", "verdict": "pass" if passed else "fail", "passed": passed, "summary": sentence,
        "epsilon_stored_prv": stored, "epsilon_stored_rdp": stored_rdp, "epsilon_prv": prv, "epsilon_rdp": rdp,
        "epsilon_pld": pld, "tolerance": tol, "problems": problems, "history": [list(s) for s in history],
        "delta": delta, "rounds": int(sum(s[2] for s in history)),
        "method": "history rebuilt from the raw ledger events; Opacus PRV and RDP called directly; dp_accounting "
                  f"PLD (value_discretization_interval=1e-3); tolerance max({abs_tol}, {rel_tol:.0%})",
        "seed": None, "trials": 1,
    }


# Epsilons computed by another accountant version land a little apart (as run_consistency.EPSILON_TOLERANCE); the
# accountant's own by-products (the RDP order, PRV's error bound) are not claims and are not compared. Every other
# number is compared exactly, but a decimal printed in a sentence within a unit of its last digit.
EPSILON_REL_TOL = 0.02
EPSILON_PATHS = ("epsilon.headline", "epsilon.prv", "epsilon.rdp", "epsilon.against_server.epsilon")
BY_PRODUCTS = ("epsilon.rdp_optimal_order", "epsilon.prv_error_bound")
# What a ledger in other wording (another version or commit) is still held to: the figures its conclusions state.
CLAIMS = ("mode", "guarantee", "delta", "population_size", "rounds", "sampling.rate", "sampling.method",
          "sampling.expected_clients_per_round", "clipping.norm", "noise.multiplier", "noise.std_on_sum",
          "noise.solved_from_target_epsilon", "noise.dropout_tolerance", *EPSILON_PATHS,
          "epsilon.against_server.most_user_rounds", "budget", "not_private.flag", "evaluation.covered_by_accountant")


def same_numbers(stated: str, derived: str, *, wording: bool = False) -> bool:
    """Whether two sentences state the same numbers in the same order: whole numbers and exponents exactly, decimals
    within EPSILON_REL_TOL or a unit of their last printed digit; with `wording`, also the same text around them."""
    got, want = (list(NUMBER.finditer(text.replace(",", ""))) for text in (stated, derived))
    if len(got) != len(want) or wording and NUMBER.sub("#", stated.replace(",", "")) != NUMBER.sub(
            "#", derived.replace(",", "")):
        return False
    for x, y in zip(got, want):
        decimals = y.group(1)
        try:
            close = math.isclose(float(x.group()), float(y.group()), rel_tol=EPSILON_REL_TOL,
                                 abs_tol=10.0 ** -len(decimals)) if decimals and "e" not in y.group().lower() \
                else float(x.group()) == float(y.group())
        except OverflowError:
            close = False
        if not close:
            return False
    return True


def derived_view_problems(stored: dict, derived: dict) -> list[str]:
    """Where ledger.json's conclusions (guarantee sentence, epsilon block, delta, noise, sampling, clipping, rounds,
    budget, evaluation, not_covered, ...) are not what its config and events give (`derived`: the ledger class's own
    rendering of them, as JSON). Written in the wording the installed code renders (`written_by`), every key, text
    and number must be what it renders; in other wording (another version or commit), the CLAIMS paths' numbers.
    Numbers: exactly, but epsilons within EPSILON_REL_TOL and decimals in sentences within a unit of their last
    digit. A tester's ledger claimed (2.164, 1e-05)-DP from a top-level delta of 0.02, a guarantee with "[was (5.984,
    1e-05)-DP]" appended, an edited noise multiplier, and a reviewer's "honest but curious" rewritten as "even if it
    is malicious", each passed before."""
    problems: list[str] = []
    wording = stored.get("written_by") == derived.get("written_by")

    def held(path: str) -> bool:
        return wording or any(path == claim or path.startswith(claim + ".") for claim in CLAIMS)

    def compare(path: str, a, b) -> None:
        name = path[:-1]
        if name in BY_PRODUCTS or name and not held(name) and not any(c.startswith(name + ".") for c in CLAIMS):
            return
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b)):
                if key in a and key in b:
                    compare(f"{path}{key}.", a[key], b[key])
                elif held(f"{path}{key}") and f"{path}{key}" not in BY_PRODUCTS:
                    problems.append(f"{path}{key} is {'missing' if key not in a else 'not one its events give'}")
        elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
            for i, (x, y) in enumerate(zip(a, b)):
                compare(f"{path}{i}.", x, y)
        elif isinstance(a, list) and isinstance(b, list):
            problems.append(f"{name} lists {len(a)} entries, where its config and events give {len(b)}")
        elif isinstance(a, str) and isinstance(b, str):
            if not same_numbers(a, b, wording=wording) or name == "mode" and a != b:
                problems.append(f"{name} states {a[:160]!r}, where its config and events give {b[:160]!r}")
        elif all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (a, b)):
            if not _same_figure(a, b, EPSILON_REL_TOL if name in EPSILON_PATHS else 0.0):
                problems.append(f"{name} is {a!r}, where its config and events give {b!r}")
        elif a != b:
            problems.append(f"{name} is {repr(a)[:80]}, where its config and events give {repr(b)[:80]}")

    compare("", {k: v for k, v in stored.items() if k not in NOT_DERIVED},
            {k: v for k, v in derived.items() if k not in NOT_DERIVED})
    return problems


def _same_figure(a: float, b: float, rel_tol: float) -> bool:
    """Two numbers from JSON: equal (ints, or floats within rel_tol and rounding); an int too large for a float (a
    reviewer's population of 10**400) is simply not equal."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    try:
        return math.isclose(a, b, rel_tol=max(rel_tol, 1e-12))
    except OverflowError:
        return False


# The chance below which a ledger's sampled counts are refused as not drawn at its q (an honest run: once in 1e9).
FALSE_ALARM = 1e-9


def ledger_run_mismatches(ledger: dict, expected: dict | None = None, population_size: int | None = None) -> list[str]:
    """Where a user-mode ledger disagrees with itself or with the run that wrote it. The accountant reads only the
    events' (z, q), but the server sampled with q = m / N for the N users its nodes held and noised with the z and
    C its own settings give. `expected`: the privacy settings rebuilt from the run's checkpoint (PrivacySettings
    fields, z solved from a target as the server did); `population_size`: the training users its nodes held. Events
    edited consistently with a lower epsilon pass the recomputation; they fail here (an adversarial tester: z and C
    traded, N raised, the reproducible-noise flag dropped, a vacuous delta, a count of the most-sampled user's
    rounds that the sampled counts rule out)."""
    config = ledger.get("config") if isinstance(ledger.get("config"), dict) else {}
    n, m, z = (config.get(key) for key in ("population_size", "clients_per_round", "noise_multiplier"))
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (n, m)):
        return [f"its config holds population_size {n!r} and clients_per_round {m!r}, not positive whole numbers"]
    q = min(1.0, m / n)  # the server's sampler (server/aggregation.py)
    rounds = (ledger.get("events") or {}).get("rounds", [])
    problems = []
    off_q = [i for i, e in enumerate(rounds, 1) if not math.isclose(float(e["sample_rate"]), q, rel_tol=1e-9)]
    if off_q:
        problems.append(f"{len(off_q)} of its {len(rounds)} rounds (the first: round {off_q[0]}) record a sample rate "
                        f"other than clients_per_round / population_size = {m}/{n} = {q:.6g}")
    if _number(z) is not None:
        off_z = [i for i, e in enumerate(rounds, 1) if not math.isclose(float(e["noise_multiplier"]), z, rel_tol=1e-9)]
        if off_z:
            problems.append(f"{len(off_z)} of its rounds (the first: round {off_z[0]}) record a noise multiplier "
                            f"other than the config's {z}")
    if ledger.get("population_size") != n:
        problems.append(f"its population_size {ledger.get('population_size')!r} is not its config's {n}")
    delta = _number(config.get("delta"))
    if delta is None or not 0 < delta < 1 / n:
        problems.append(f"its delta {config.get('delta')!r} is not in (0, 1/N = {1 / n:.3g}): a guarantee that may "
                        "reveal a user outright")
    if config.get("reproducible_noise"):
        problems.append(f"its noise is reproducible from noise_seed {config.get('noise_seed')!r} (a debug run): "
                        "anyone with the seed removes it, so the run is NOT PRIVATE whatever its epsilon")
    problems += _sampled_count_problems(rounds, q, n)
    if population_size is not None and population_size != n:
        problems.append(f"its population_size {n} is not the {population_size} training users the run's nodes hold "
                        "(checkpoint.npz)")
    if expected is not None:
        # the keys this ledger holds (an older one lacks later fields); N: against the nodes' count above
        for key in sorted((set(expected) & set(config)) - {"rounds", "population_size"}):
            ran, claimed = expected[key], config[key]
            # a z solved from a target: the solver stops within 0.01 in epsilon, and another Opacus may land apart
            tolerance = 0.02 if key == "noise_multiplier" and config.get("noise_from_target") else 1e-9
            same = math.isclose(ran, claimed, rel_tol=tolerance) \
                if all(_number(v) is not None for v in (ran, claimed)) else ran == claimed
            if not same:
                problems.append(f"its {key} {claimed!r} is not the run's {ran!r} (the settings in checkpoint.npz)")
    return problems


def _sampled_count_problems(rounds: list[dict], q: float, n: int) -> list[str]:
    """The rounds' sampled counts against Poisson sampling at q, and under user+secagg the count of the most-sampled
    user's rounds, each refused when its chance under q is below FALSE_ALARM: the total, Binomial(R N, q), too high
    (the rate that ran was larger); the count falling, or below what the largest of N Binomial(r, q) counts reaches
    by round r (the server records an upper bound on it; a count forged low lowers the epsilon against it)."""
    from scipy.stats import binom

    sampled = [e.get("sampled") for e in rounds]
    if not rounds or not all(isinstance(k, int) and not isinstance(k, bool) for k in sampled):
        return []
    problems = []
    total, trials = sum(sampled), len(rounds) * n
    if binom.sf(total - 1, trials, q) < FALSE_ALARM:
        problems.append(f"its rounds sampled {total} users in all, where {len(rounds)} rounds at q = {q:.6g} draw "
                        f"about {trials * q:.0f} (a chance below {FALSE_ALARM:g}): the sample rate it claims is not "
                        "the one that ran")
    most = np.array([e.get(MOST_USER_ROUNDS, -1) for e in rounds])
    if q < 1 and (most >= 0).all():
        fell = np.flatnonzero(np.diff(most) < 0)
        if fell.size:
            problems.append(f"its count of the most-sampled user's rounds falls at round {fell[0] + 2} "
                            f"({most[fell[0]]} -> {most[fell[0] + 1]}); it only grows")
        # P(max of N Binomial(r, q) <= count) = F(count)^N, round by round
        log_chance = n * binom.logcdf(most, np.arange(1, len(rounds) + 1), q)
        low = np.flatnonzero(log_chance < math.log(FALSE_ALARM))
        if low.size:
            i = int(low[0])
            problems.append(f"round {i + 1} counts {most[i]} rounds for the most-sampled user, but among {n} users "
                            f"sampled at q = {q:.6g} over {i + 1} rounds the largest count is that low with a chance "
                            f"below {FALSE_ALARM:g}")
    return problems


def _against_server(ledger: dict, history: list[tuple[float, float, int]], delta: float) -> tuple[float, float | None]:
    """user+secagg: (epsilon against the server from the events, the stored one): the discrete Gaussian unsampled
    (q = 1) at the smallest z over the rounds of the most-sampled user (the last event's count; every round where
    the events lack it)."""
    from lore_core.privacy.ddg_accounting import ddg_epsilon

    rounds = ledger["events"]["rounds"]
    most = rounds[-1].get("most_user_rounds", len(rounds))
    server = ddg_epsilon([(min(z for z, _, _ in history), 1.0, most)], delta,
                         int(ledger["config"]["dimension"]))[0] if most else 0.0
    stored = ledger["epsilon"].get("against_server") if isinstance(ledger.get("epsilon"), dict) else None
    return float(server), _number(stored.get("epsilon")) if isinstance(stored, dict) else None


def _ddg_audit(ledger: dict, history: list[tuple[float, float, int]], delta: float, abs_tol: float,
               rel_tol: float) -> dict:
    from lore_core.privacy.ddg_accounting import ddg_epsilon

    if not history:
        raise AuditInputError("the ledger has no released rounds: nothing to recompute")
    stored = _number(_claimed(ledger).get("headline"))
    ddg, _ = ddg_epsilon(history, delta, int(ledger["config"]["dimension"]))
    pld = pld_epsilon(history, delta)
    tol = max(abs_tol, rel_tol * ddg)
    problems = []
    if stored is None or abs(stored - ddg) > tol:
        problems.append(f"stored epsilon {stored} is not what its own events give ({ddg:.4f})")
    if pld is not None and ddg < pld - tol:
        problems.append(f"the ddg-rdp bound {ddg:.4f} is below the continuous Gaussian's PLD {pld:.4f}")
    problems += _stated_claim_problems(ledger, ddg, tol)
    server, stored_server = _against_server(ledger, history, delta)
    if stored_server is None:  # a ledger from before the figure was stated: its headline was claimed against all
        problems.append(f"the ledger states no epsilon against the server, which draws the sample (written before "
                        f"lore-fed stated one): against it the events give {server:.4f} (no amplification, the "
                        "most-sampled user's rounds), not the headline")
    elif abs(stored_server - server) > max(abs_tol, rel_tol * server):
        problems.append(f"stored epsilon against the server {stored_server} is not what its events give "
                        f"({server:.4f}: no amplification, the most-sampled user's rounds)")
    passed = not problems
    sentence = (f"PASS: the ledger's epsilon {ddg:.3f} (distributed discrete Gaussian, RDP) is reproduced by its "
                f"{sum(s[2] for s in history)} round events" + (f" and lies above the continuous Gaussian's PLD "
                f"{pld:.3f}" if pld is not None else "") + f" at delta={delta:g}.") if passed else \
        "FAIL: " + "; ".join(problems) + ". Do not publish this epsilon; recompute it from the events."
    return {
        "audit": "accounting", "verdict": "pass" if passed else "fail", "passed": passed, "summary": sentence,
        "epsilon_stored_prv": stored, "epsilon_stored_rdp": stored, "epsilon_prv": ddg, "epsilon_rdp": ddg,
        "epsilon_pld": pld, "epsilon_against_server": server, "epsilon_against_server_stored": stored_server,
        "accountant": "ddg-rdp", "tolerance": tol, "problems": problems,
        "history": [list(s) for s in history], "delta": delta, "rounds": int(sum(s[2] for s in history)),
        "method": "history rebuilt from the raw ledger events; ddg_epsilon recomputed; continuous Gaussian PLD "
                  "(dp_accounting) as a floor", "seed": None, "trials": 1,
    }
