"""The privacy ledger `RUN_DIR/ledger.json` (docs/privacy.md).

Facts and conclusions apart, like Opacus' accountant (its `history` is the state, `get_epsilon` derives):
- `config` (the validated settings) and `events` (per round: round, sampled count, noise multiplier, sample rate;
  record mode: each client's accountant history; audits; whether the budget stopped the run; evaluation policy)
  are the only state. `load` reads exactly these two, `_write` writes them back unchanged: save and load are
  symmetric.
- Every other key (guarantee, epsilon, threat model, not covered, ...) is a conclusion, recomputed from config and
  events on each write for people and reports, and never read back.
The server calls `check_next_round()` and then `record_round(...)` BEFORE it releases that round's basis: the write
is atomic, so a crash can lose a release but never spent budget. Before each append the file is read again: if it
holds events this object does not (another writer), the append is refused, so the budget on disk never goes down.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from lore_core import __version__ as lore_fed_version
from lore_core.atomic_io import atomic_write_json
from lore_core.privacy.accounting import (
    AccountingError,
    EpsilonReport,
    PrivacyBudgetExhausted,
    check_history,
    epsilon_report,
)
from lore_core.privacy.privacy_settings import DEFAULTS, RUN_CONFIG_KEYS, USER_MODES, PrivacySettings, validate
from lore_core.privacy.record_dp import steps_per_epoch
from lore_core.text_file import json_loads, read_text

LEDGER_FILENAME = "ledger.json"
SCHEMA = "lore-privacy-ledger/2"
EVENT_KEYS = ("rounds", "clients", "audits", "stopped_early")

NONE_GUARANTEE = (
    "NONE: no differential privacy. The server receives every participant's raw basis update dA_i; with w_i held "
    "fixed during the local step dA_i = w_i (x) v_i is rank one, so the server can recover every participant's w_i "
    "from its update (by SVD), and which candidate pairs it trained on. The released basis is not protected either."
)
# w_i is never sent as such, but what each mode sends about it differs (a privacy reviewer: "never leaves the device"
# hid that the user mode's update discloses it to the server).
W_NOT_COVERED = {
    "user": "w_i: never sent as such, but each sampled user's raw update reaches the server, trusted in this mode: "
            "under the joint objective it is rank one, dA = -lr w_i r_i^T, and gives w_i exactly (under the "
            "marginal objective, the gradient of the user's pairs with w integrated out); from everyone else it is "
            "protected only through the released bases; it is not a DP output",
    "user+secagg": "w_i: never sent; the server sees only masked updates and noised sums of them, but w_i itself "
                   "is not a DP output",
    "record": "w_i: never sent as such; the DP-SGD updates that carry it are covered at record level only",
}
NOT_COVERED = [
    "hyper-parameter search runs (the privacy of the runs that chose these settings)",
    "personalised scores if served (B queries recover w_i when A is public)",
]
# User modes: N is found by querying the nodes and written exactly; the accountant takes q = m / N as public.
POPULATION_NOT_COVERED = ("the population size N and each node's number of training users (ledger population_size "
                          "and sampling rate q = m / N, checkpoint.npz population), and the number of nodes "
                          "(metrics.json nodes; with few users per node it tells how many users are held out for "
                          "evaluation): exact, found by asking the nodes; "
                          "under add/remove adjacency N itself tells whether a user is present, so the guarantee "
                          "treats N as public (the accountant uses one q for neighbouring populations)")
RECORD_NOT_COVERED = ["a user as a whole: w_i and all of a user's pairs together (record level only)"]
# What a run writes that IS covered: post-processing of the noisy releases and of data-independent settings.
COVERED = [
    "the released bases A_t (train and evaluation messages, checkpoint.npz, releases/) and the noisy mean updates "
    "that produced them (releases/)",
    "the norm of each released basis step (rounds.jsonl, report): a function of released bases",
    "the server optimizer state (checkpoint.npz): a function of the released mean updates",
    "the reported basis (basis.npz, the evaluated basis): the running mean of the bases released in the last quarter "
    "of the rounds, a function of released bases",
]
EPSILON_COVERED = ("epsilon after each round (ledger, rounds.jsonl, report): a function of the settings and the "
                   "round count")
RECORD_EPSILON_NOT_COVERED = ("record mode: epsilon after each round (ledger, rounds.jsonl record_epsilon_max, "
                              "report), the max-epsilon stop and so the number of rounds released: the largest of "
                              "the clients' accountant histories, which follow how often each was sampled and whether "
                              "a max-epsilon (the server's or its device's) stopped it")
DESCRIPTIONS: dict[str, dict[str, str]] = {
    "user": {
        "privacy_unit": "user (all preference pairs of one client)",
        "adjacency": "add/remove one user",
        "threat_model": "trusted server: it sees each sampled user's raw update (from which it can recover w_i: the "
        "update is rank one), clips it, adds the noise and releases A_t; the guarantee protects the released bases "
        "from everyone else, not from the server",
        "clipping_where": "client and re-checked at server",
    },
    "user+secagg": {
        "privacy_unit": "user (all preference pairs of one client)",
        "adjacency": "add/remove one user",
        "threat_model": "distributed DP: each sampled user clips its update, rounds it to a grid and adds its own "
        "share of discrete Gaussian noise on the integer ring before SecAgg+ masks it; the server unmasks only the "
        "sum over at least ceil((1 - x) k) of the round's k sampled users (a round with more drop-outs is aborted "
        "before unmasking), and that sum carries noise of std >= z C. The server learns only noised sums, but it "
        "draws the sample, so it knows who took part: against it there is no amplification by sampling, and its "
        "guarantee is the discrete Gaussian composed over the rounds of the most-sampled user (epsilon."
        "against_server). Assumed: an honest-but-curious server (it follows the protocol, tells the users "
        "the true k, aborts as required) and users who add their shares; a server colluding with users is not "
        "covered, and Flower 1.42 seeds SecAgg+ masks with 32 bits, so the masking is not a cryptographic guarantee "
        "against a server willing to brute-force seeds",
        "clipping_where": "client (the server cannot re-check under SecAgg)",
    },
    "record": {
        "privacy_unit": "one preference pair of one client",
        "adjacency": "add/remove one pair in one client's data",
        "threat_model": "each client runs Opacus DP-SGD per pair over its user's weights w_i and the basis together "
        "(one flat clip per pair over both gradients, noise on both); w_i, itself a DP-SGD output, stays on the "
        "device; protects each pair from everyone including the server",
        "clipping_where": "client, per pair over (w_i, A) (Opacus)",
    },
    "none": {"privacy_unit": "none", "adjacency": "none", "clipping_where": "",
             "threat_model": "none: no protection; everybody is trusted (the server can read each participant's w_i "
                             "off its update, rank one under the joint objective)"},
}


# Who each mode's guarantee trusts, in one clause (the threat models above say it at length).
TRUSTED = {
    "user": ("trusted: the server, which sees each sampled user's update, and whoever sees which devices take part "
             "in a round (the SuperLink, the network between them): the amplification by sampling needs the sample "
             "secret; the guarantee holds against everyone who sees only what the server releases"),
    "user+secagg": "against everyone but the server, which draws the sample (see against_server for it)",
    "record": ("trusted: nobody; holds per pair against everyone, the server included, as long as the run ships "
               "lore-fed's client code and the server sends its clients the run's noise multiplier, clip, sample "
               "rate, epochs and max-epsilon (they take them from its messages); a device whose node config sets its "
               "own "
               "record-max-epsilon and record-delta is held to the tighter budget at the tighter delta, trains in "
               "record mode only and answers no evaluation unless it allows it, and a deployed device refuses a "
               "server's noise seed"),
}


# user+secagg round events: the rounds of the most-sampled user so far (the guarantee against the server).
MOST_USER_ROUNDS = "most_user_rounds"


class LedgerError(ValueError):
    """A ledger that cannot be used for this run (missing, foreign schema, other settings, out-of-order round)."""


@functools.lru_cache(maxsize=4096)
def _report(history: tuple[tuple[float, float, int], ...], delta: float, dim: int | None = None) -> EpsilonReport:
    return epsilon_report(history, delta, dim)


def _comparable(settings: PrivacySettings) -> dict[str, Any]:
    return json.loads(json.dumps(settings.to_dict()))


def compress_history(events: Iterable[Sequence]) -> list[tuple[float, float, int]]:
    """Per-round (z, q) events -> (z, q, steps) segments, merging consecutive equal (z, q) as Opacus does."""
    segments: list[tuple[float, float, int]] = []
    for z, q in events:
        if segments and segments[-1][:2] == (z, q):
            segments[-1] = (z, q, segments[-1][2] + 1)
        else:
            segments.append((z, q, 1))
    return segments


class PrivacyLedger:
    """Events of one run's privacy spending and the guarantee derived from them."""

    def __init__(self, path: Path, settings: PrivacySettings, facts: dict[str, Any]):
        self.path = path
        self.settings = settings
        self._facts = facts  # the events: rounds, clients, audits, stopped_early; everything else is derived

    # -- opening ---------------------------------------------------------------------------------------------------
    @classmethod
    def create(cls, run_dir: str | os.PathLike, settings: PrivacySettings) -> "PrivacyLedger":
        """A new ledger for a new run (refuses to overwrite an existing one: resume with `load`)."""
        path = Path(run_dir) / LEDGER_FILENAME
        if path.exists():
            raise LedgerError(f"{path} already exists: resume with PrivacyLedger.load, or use a new run directory")
        ledger = cls(path, validate(settings), {"rounds": [], "clients": {}, "audits": [], "stopped_early": False})
        ledger._write()
        return ledger

    @classmethod
    def load(cls, run_dir: str | os.PathLike, settings: PrivacySettings | None = None) -> "PrivacyLedger":
        """Resume from RUN_DIR/ledger.json; with `settings`, they must equal the stored ones."""
        path = Path(run_dir) / LEDGER_FILENAME
        if not path.exists():
            raise FileNotFoundError(f"no privacy ledger at {path}")
        data = _read(path)
        if data["config"].get("mode") == "record" and "record_sample_rate" not in data["config"]:
            # a reviewer: such a run resumed silently, its guarantee stated as if its first rounds had held it
            raise LedgerError(f"{path} is a record-mode run begun before lore-fed 0.2.3, whose DP-SGD took its rate "
                              "and step divisor from each client's pair count, which let a server tell n pairs from "
                              "n - 1: its stated guarantee does not hold for those rounds and it is not resumed; start "
                              "a new run directory")
        stored = PrivacySettings(**data["config"])
        if settings is not None:
            new = _comparable(validate(settings))
            diffs = {k: (v, new[k]) for k, v in data["config"].items() if new.get(k) != v}
            if "mode" in diffs:  # the others follow the mode's defaults (a tester was shown five for one --privacy)
                diffs = {"mode": diffs["mode"]}
            if diffs:
                changes = ", ".join(f"{RUN_CONFIG_KEYS.get(k, k)}: stored {a!r}, new {b!r}"
                                    for k, (a, b) in diffs.items())
                raise LedgerError(
                    f"{path} was written with other privacy settings ({changes}); resume with the stored settings "
                    "or start a new run directory"
                )
        return cls(path, stored, data["events"])

    @classmethod
    def open(cls, run_dir: str | os.PathLike, settings: PrivacySettings) -> "PrivacyLedger":
        """Resume if RUN_DIR has a ledger (same settings required), else create one."""
        if (Path(run_dir) / LEDGER_FILENAME).exists():
            return cls.load(run_dir, settings)
        return cls.create(run_dir, settings)

    # -- facts -----------------------------------------------------------------------------------------------------
    @property
    def rounds_released(self) -> int:
        return len(self._facts["rounds"])

    @property
    def stopped_early(self) -> bool:
        """max_epsilon allowed no further round, and the run stopped there."""
        return bool(self._facts["stopped_early"])

    def history(self, next_rounds: Sequence[tuple[float, float]] = ()) -> list[tuple[float, float, int]]:
        """User modes: the accountant history (z, q, steps) of the recorded rounds, plus hypothetical next ones."""
        events = [(e["noise_multiplier"], e["sample_rate"]) for e in self._facts["rounds"]]
        return compress_history(events + list(next_rounds))

    @property
    def _dim(self) -> int | None:
        """user+secagg: the dimension its (ddg-rdp) accountant needs; None: Opacus' PRV and RDP."""
        return self.settings.dimension if self.settings.mode == "user+secagg" else None

    def epsilon_by_round(self) -> list[float]:
        """User modes: the headline epsilon after each recorded round (derived on demand, for plots)."""
        if self.settings.mode not in USER_MODES:
            return []
        events = [(e["noise_multiplier"], e["sample_rate"]) for e in self._facts["rounds"]]
        return [_report(tuple(compress_history(events[:t])), self.settings.delta, self._dim).headline
                for t in range(1, len(events) + 1)]

    def most_user_rounds(self) -> int:
        """user+secagg: the rounds of the most-sampled user so far (an entry without the count: every round)."""
        rounds = self._facts["rounds"]
        return int(rounds[-1].get(MOST_USER_ROUNDS, len(rounds))) if rounds else 0

    def epsilon_against_server(self) -> float | None:
        """user+secagg: epsilon against the server, which knows the sample: the discrete Gaussian at the smallest
        recorded z, unsampled (q = 1), over the most-sampled user's rounds; None in other modes."""
        if self.settings.mode != "user+secagg":
            return None
        most = self.most_user_rounds()
        if not most:
            return 0.0
        z = min(e["noise_multiplier"] for e in self._facts["rounds"])
        return _report(((float(z), 1.0, most),), self.settings.delta, self._dim).headline

    def unreported_clients(self) -> list[str]:
        """Record mode: clients sampled in some round whose reply brought no history, and who have not reported
        since (a later report carries what the ledger lacks). They may have spent more than the ledger holds, so
        the ledger's epsilon is a lower bound while any remain (a privacy reviewer: a late reply in the last round
        was never counted, 4.03 printed for a client at 4.29)."""
        lost = self._facts.get("lost_replies", [])
        pending = {c for event in lost if event["after_round"] == 0 for c in event["clients"]}
        for position, entry in enumerate(self._facts["rounds"], 1):
            reported = set(entry.get("clients", ())) | set(entry.get("caught_up", ()))
            pending = (pending - reported) | set(entry.get("unreported", ()))
            pending |= {c for event in lost if event["after_round"] == position for c in event["clients"]}
        return sorted(pending)

    def record_lost_replies(self, clients: Iterable[str]) -> None:
        """Record mode: a round failed with every reply lost (late or failed) and released nothing, so it has no
        round entry; its sampled clients may have spent on their devices all the same, and stay unreported until
        they report again (a reviewer: such a round left no trace, and the guarantee no LOWER BOUND)."""
        self._reread()
        self._facts.setdefault("lost_replies", []).append(
            {"after_round": self.rounds_released, "clients": sorted({str(c) for c in clients})})
        self._write()

    def epsilon(self) -> EpsilonReport | None:
        """User modes: epsilon so far; record mode: the client with the largest PRV epsilon; none: None."""
        mode, delta = self.settings.mode, self.settings.delta
        if mode in USER_MODES:
            return _report(tuple(self.history()), delta, self._dim)
        if mode == "record" and self._facts["clients"]:
            reports = [_report(_key(c["history"]), delta) for c in self._facts["clients"].values()]
            return max(reports, key=lambda r: r.prv)
        return None

    # -- budget ----------------------------------------------------------------------------------------------------
    def _predicted(self, rounds: int) -> float:
        s = self.settings
        if s.mode in USER_MODES:
            nxt = self.history([(s.noise_multiplier, s.sample_rate)] * rounds)
            return _report(tuple(nxt), s.delta, self._dim).headline
        # record: each client seen so far, `rounds` more rounds of record_epochs epochs at the public rate (a
        # history begun before it was public ends at its own)
        worst = 0.0
        for client in self._facts["clients"].values():
            q = s.record_sample_rate or DEFAULTS["record_sample_rate"]  # a run begun before the key: its nodes' q
            extra = (s.noise_multiplier, q, rounds * s.record_epochs * steps_per_epoch(q))
            worst = max(worst, _report(_key(client["history"]) + (extra,), s.delta).prv)
        return worst

    def would_exceed(self, max_epsilon: float | None = None, rounds: int = 1) -> bool:
        """Would `rounds` more rounds take PRV epsilon above max_epsilon (default: the settings')?
        Record mode predicts only clients already seen; clients check their own budget (record_dp)."""
        max_epsilon = self.settings.max_epsilon if max_epsilon is None else max_epsilon
        if max_epsilon is None or self.settings.mode == "none":
            return False
        return self._predicted(rounds) > max_epsilon

    def check_next_round(self) -> None:
        """Raise PrivacyBudgetExhausted (after marking `stopped_early` on disk) if the next round would exceed
        max_epsilon. Call before sampling round t's clients."""
        if not self.would_exceed():
            return
        self._facts["stopped_early"] = True
        self._write()
        raise PrivacyBudgetExhausted(
            f"round {self.rounds_released + 1} would bring epsilon to {self._predicted(1):.3f} > max_epsilon "
            f"{self.settings.max_epsilon}; stopping after {self.rounds_released} released rounds"
        )

    # -- events ----------------------------------------------------------------------------------------------------
    def record_round(
        self,
        round: int,
        sampled: int,
        *,
        noise_multiplier: float | None = None,
        sample_rate: float | None = None,
        client_histories: Mapping[str, Any] | None = None,
        most_user_rounds: int | None = None,
        unreported: Iterable[str] = (),
        replied: Iterable[str] = (),
    ) -> dict[str, Any]:
        """Record round `round` (1-based, consecutive) atomically; call BEFORE releasing that round's basis.

        sampled: number of users sampled (data-independent under Poisson). User modes: z and q default to the
        settings'. user+secagg: most_user_rounds, the rounds (this one included) of the user sampled most often so
        far, for the guarantee against the server (default: every round, the bound that needs no count). Record
        mode: client_histories maps client id -> what it spent this round ((z, q, steps) segments appended to its
        accountant history, or a RecordDpState of them); unreported: the clients sampled this round whose reply
        brought no history (late, failed, missing), who may have spent without the ledger knowing until they report
        again; replied: the clients whose reply did reach it, with or without new spending (a reply with nothing new
        clears an unreported client: it had nothing left to report). Raises PrivacyBudgetExhausted (user modes) or
        AccountingError, writing nothing.
        """
        s = self.settings
        if round != self.rounds_released + 1:
            raise LedgerError(f"round {round} recorded out of order: {self.rounds_released} rounds are in the ledger, "
                              f"the next is {self.rounds_released + 1}")
        if int(sampled) != sampled or sampled < 0:
            raise LedgerError(f"sampled must be a non-negative integer; got {sampled!r}")
        entry: dict[str, Any] = {"round": int(round), "sampled": int(sampled)}
        updates: dict[str, Any] = {}
        if s.mode in USER_MODES:
            z = float(s.noise_multiplier if noise_multiplier is None else noise_multiplier)
            q = float(s.sample_rate if sample_rate is None else sample_rate)
            history = tuple(check_history(self.history([(z, q)])))  # rejects z <= 0: never skip noise
            report = _report(history, s.delta, self._dim)
            if s.max_epsilon is not None and report.headline > s.max_epsilon:
                raise PrivacyBudgetExhausted(f"round {round} would bring epsilon to {report.headline:.3f} > "
                                             f"max_epsilon {s.max_epsilon}; do not release it")
            entry.update(noise_multiplier=z, sample_rate=q)
            if s.mode == "user+secagg":
                most = int(round if most_user_rounds is None else most_user_rounds)
                if not 0 <= most <= round:
                    raise LedgerError(f"most_user_rounds must be in [0, {round}]; got {most_user_rounds!r}")
                entry[MOST_USER_ROUNDS] = most
        elif s.mode == "record":
            for cid, history in (client_histories or {}).items():
                history = check_history(getattr(history, "history", history))
                if not history:
                    continue
                updates[str(cid)] = self._client_record(str(cid), history)
            entry["clients"] = sorted(updates)
            caught_up = sorted(set(self.unreported_clients()) & {str(c) for c in replied} - set(updates))
            if caught_up:
                entry["caught_up"] = caught_up
            missing = sorted({str(c) for c in unreported} - set(updates))
            if missing:
                entry["unreported"] = missing
        self._reread()
        self._facts["clients"].update(updates)
        self._facts["rounds"].append(entry)
        self._write()
        return entry

    def _client_record(self, cid: str, spent: list) -> dict[str, Any]:
        """Record mode: client `cid`'s entry after it reported what it spent THIS round (its new accountant segments):
        the stored history with them appended. Reports of increments, never of a client's whole history, so that a
        client that lost its state (a simulated node restarted with a resumed run keeps its history in memory) cannot
        shrink what the ledger holds: whole-history reports had replaced every client's rounds before an interrupt
        (a tester), and telling a reset client from one that spent nothing was not always possible."""
        stored = self._facts["clients"].get(cid)
        full = _merged((_key(stored["history"]) if stored else ()) + _key(spent))
        return {"history": [list(seg) for seg in full]}

    def client_history(self, cid: str) -> list[tuple[float, float, int]]:
        """Record mode: client `cid`'s accountant history as the ledger holds it (empty before its first round)."""
        stored = self._facts["clients"].get(str(cid))
        return list(_key(stored["history"])) if stored else []

    def record_audit(self, result: Mapping[str, Any]) -> None:
        """Append an audit result (kind, seed, trials, alpha, bound, passed ...) to the ledger."""
        self._reread()
        self._facts["audits"].append(dict(result))
        self._write()

    def _reread(self) -> None:
        """Before an append: the file must hold no event this object lacks (another writer, a second run on the same
        directory). Its events are adopted when they extend ours only by audits; otherwise the append is refused, so
        the spent budget on disk never goes down."""
        if not self.path.exists():
            return
        events = _read(self.path)["events"]
        ours = self._facts
        if events["rounds"] != ours["rounds"][:len(events["rounds"])] or len(events["rounds"]) > len(ours["rounds"]):
            raise LedgerError(f"{self.path} holds {len(events['rounds'])} released rounds that this run did not "
                              f"write (it knows {len(ours['rounds'])}): another process is writing this ledger; "
                              "nothing was appended")
        if len(events["audits"]) > len(ours["audits"]):
            ours["audits"] = events["audits"]

    # -- derived view ----------------------------------------------------------------------------------------------
    def not_private_reason(self) -> str | None:
        if self.settings.mode == "none":
            return "mode none: no noise, no guarantee"
        if self.settings.reproducible_noise:
            return "reproducible_noise: the noise seed is known, anyone with it can subtract the noise (debug run)"
        return None

    def guarantee(self) -> str:
        """The claim, with who it holds against: metrics.json and the command's summary carry this sentence alone,
        without the ledger's threat model beside it."""
        if self.settings.mode == "none":
            return NONE_GUARANTEE
        return f"{self._claim()}; {TRUSTED[self.settings.mode]}"

    def _claim(self) -> str:
        s, eps = self.settings, self.epsilon()
        prefix = "NOT PRIVATE (reproducible debug noise). Nominally: " if s.reproducible_noise else ""
        if s.mode == "record":
            value = (f"({eps.prv:.3f}, {s.delta})-DP per client and per preference pair, epsilon the max over "
                     f"clients (PRV; RDP {eps.rdp:.3f})") if eps else \
                f"(epsilon, {s.delta})-DP per client and per preference pair, no rounds yet"
            unreported = self.unreported_clients()
            if unreported:
                value += (f", a LOWER BOUND: {len(unreported)} sampled clients' replies never reached the ledger "
                          "(late or failed), and they have not reported since")
            return (f"{prefix}record-level {value}. This is NOT a "
                    "user-level guarantee: a user's w_i and all of its pairs together are not protected "
                    "(group privacy for k pairs costs about k times epsilon, and delta grows to about "
                    "k e^((k-1) epsilon) delta)")
        if s.mode == "user+secagg":
            return (f"{prefix}user-level ({eps.headline:.3f}, {s.delta})-DP (distributed discrete Gaussian: RDP bound "
                    f"of Kairouz, Liu & Steinke 2021 with Poisson subsampling) of the {self.rounds_released} released "
                    "bases and of every sum the server unmasked, add/remove one user with all its pairs, while at "
                    f"most {s.dropout_tolerance:.0%} of each round's sampled users drop out (rounds with more are "
                    f"aborted before unmasking); against the server itself, which draws the sample and so knows who "
                    f"took part, ({self.epsilon_against_server():.3f}, {s.delta})-DP without amplification, over "
                    f"the {self.most_user_rounds()} rounds of the most-sampled user, for what a user's pairs hold, "
                    "not for whether it takes part (zero-out adjacency: the server sees who it samples), if it is "
                    "honest but curious; max_epsilon caps the first figure only")
        return (f"{prefix}user-level ({eps.prv:.3f}, {s.delta})-DP (PRV; RDP bound {eps.rdp:.3f}) of the "
                f"{self.rounds_released} released bases, add/remove one user with all its pairs")

    def _render(self) -> dict[str, Any]:
        s, eps = self.settings, self.epsilon()
        text = DESCRIPTIONS[s.mode]
        reason = self.not_private_reason()
        return {
            "schema": SCHEMA,
            "mode": s.mode,
            "guarantee": self.guarantee(),
            "privacy_unit": text["privacy_unit"],
            "adjacency": text["adjacency"],
            "threat_model": text["threat_model"],
            "population_size": s.population_size,
            **_mechanism(s),
            "rounds": {"planned": s.rounds, "released": self.rounds_released},
            "delta": s.delta,
            "epsilon": None if eps is None else {
                "headline": eps.headline, "accountant": eps.accountant,
                "prv": None if eps.accountant == "ddg-rdp" else eps.prv,
                "prv_error_bound": eps.prv_error_bound, "rdp": eps.rdp, "rdp_optimal_order": eps.rdp_optimal_order,
                **({"over": f"max over {len(self._facts['clients'])} clients",
                    "unreported_clients": len(self.unreported_clients())} if s.mode == "record" else {}),
                **({"against_server": {
                    "epsilon": self.epsilon_against_server(), "most_user_rounds": self.most_user_rounds(),
                    "why": "the server draws the sample, so it knows who took part: no amplification; the "
                           "distributed discrete Gaussian (q = 1) over the rounds of the most-sampled user",
                    "adjacency": "zero-out: a user's pairs replaced by none (sensitivity C), not its presence, which "
                                 "the server sees",
                    "count": "the server's own count of its sample (audit accounting recomputes epsilon from it, "
                             "it cannot check it)", "capped_by_max_epsilon": False}}
                   if s.mode == "user+secagg" else {}),
            },
            "budget": {"target_epsilon": s.target_epsilon, "max_epsilon": s.max_epsilon,
                       "stopped_early": self._facts["stopped_early"]},
            "accountants": _accountants(s) if s.is_dp else None,
            "not_private": {"flag": reason is not None, "reason": reason},
            "config": _comparable(s),
            "events": self._facts,
            "derived": "every key but schema, config and events is recomputed from config and events at each write; "
                       "load reads only config and events",
        }

    def _write(self) -> None:
        atomic_write_json(self.path, self.rendered())

    def rendered(self) -> dict[str, Any]:
        """ledger.json as this object writes it: the conclusions recomputed from config and events, stamped with the
        wording they were written in (`written_by`). Reports show these, never the file's own, which an edit can
        change (a tester's forged headline reached report.md)."""
        view = self._render()
        return {**view, "written_by": written_by(view)}

    def summary(self) -> dict[str, Any]:
        """The few facts a report shows."""
        eps = self.epsilon()
        return {
            "mode": self.settings.mode,
            "guarantee": self.guarantee(),
            "epsilon": None if eps is None else eps.headline,
            "accountant": None if eps is None else eps.accountant,
            "epsilon_prv": None if eps is None or eps.accountant == "ddg-rdp" else eps.prv,
            "epsilon_rdp": None if eps is None else eps.rdp,
            "epsilon_against_server": self.epsilon_against_server(),
            "delta": self.settings.delta if self.settings.is_dp else None,
            "rounds_released": self.rounds_released,
            "rounds_planned": self.settings.rounds,
            "not_private": self.not_private_reason(),
            "stopped_early": self._facts["stopped_early"],
        }


def _accountants(s: PrivacySettings) -> dict[str, Any]:
    if s.mode == "user+secagg":
        return {"headline": "ddg-rdp", "method": "distributed discrete Gaussian: Kairouz, Liu & Steinke 2021 "
                "Proposition 14 with the conditional-rounding sensitivity of their Theorem 1 (tau = 0 at >= 64 grid "
                "units of noise per share), Poisson subsampling by Zhu & Wang 2019 Theorem 5, RDP to (epsilon, "
                "delta) as Opacus", "opacus": _opacus_version()}
    return {"opacus": _opacus_version(), "headline": "prv", "second": "rdp"}


def _mechanism(s: PrivacySettings) -> dict[str, Any]:
    """The ledger's sampling / clipping / noise / covered / not_covered sections for the settings' mode."""
    if s.mode == "none":
        return {"sampling": None, "clipping": None, "noise": None, "covered": [], "not_covered": ["everything"]}
    where = DESCRIPTIONS[s.mode]["clipping_where"]
    rng = ("fixed debug seed (NOT PRIVATE)" if s.reproducible_noise else "seeded from os.urandom")
    if s.mode == "record":
        return {
            "sampling": {"method": "per client: Poisson batches of its pairs at the public rate (Opacus); client "
                                   "sampling not accounted", "rate": s.record_sample_rate},
            "clipping": {"norm": s.max_grad_norm, "scope": "per pair gradient over (w_i, A)", "where": where},
            "noise": {"multiplier": s.noise_multiplier, "std_on_sum": s.noise_multiplier * s.max_grad_norm,
                      "aggregation": f"Opacus: (sum of clipped grads + noise) / record-batch-size "
                                     f"{s.record_batch_size} (public)",
                      "rng": f"torch generator, {rng}", "solved_from_target_epsilon": False},
            "covered": COVERED,
            "not_covered": [W_NOT_COVERED["record"], *NOT_COVERED, *RECORD_NOT_COVERED, RECORD_EPSILON_NOT_COVERED],
        }
    noise = {"multiplier": s.noise_multiplier, "std_on_sum": s.noise_multiplier * s.clip_norm,
             "aggregation": "sum / (q*N)", "rng": f"numpy PCG64, {rng}",
             "solved_from_target_epsilon": s.noise_from_target}
    if s.mode == "user+secagg":
        noise.update(std_on_sum_is="the minimum: more when fewer than the tolerated users drop out",
                     distribution="discrete Gaussian shares on the integer ring, one per user, added on the device "
                                  "before masking",
                     share_std="z C / sqrt(ceil((1 - x) k)) for the round's k sampled users",
                     dropout_tolerance=s.dropout_tolerance,
                     rng=f"numpy PCG64 on each device, {rng}")
    return {
        "sampling": {"method": s.sampling, "rate": s.sample_rate, "expected_clients_per_round": s.clients_per_round},
        "clipping": {"norm": s.clip_norm, "scope": "flat L2 over all of dA", "where": where},
        "noise": noise,
        "covered": [*COVERED, EPSILON_COVERED],
        "not_covered": [W_NOT_COVERED[s.mode], *NOT_COVERED, POPULATION_NOT_COVERED],
    }


# ledger.json's keys that are not conclusions drawn from config and events: the facts themselves, the stamp, and the
# versions and wording of the accountants' description.
NOT_DERIVED = ("schema", "config", "events", "accountants", "derived", "written_by")
NUMBER = re.compile(r"[-+]?\d+(?:\.(\d+))?(?:[eE][-+]?\d+)?")


def written_by(view: Mapping[str, Any]) -> str:
    """The version and a digest of the wording of a ledger's conclusions (their keys and texts, every number left
    out): `audit accounting` compares the wording of a ledger whose stamp is the one it renders itself, and only the
    numbers of one written in other wording (another version, or commit: wording changed within 0.2.4)."""
    def skeleton(value: Any) -> Any:
        if isinstance(value, dict):
            return {key: skeleton(item) for key, item in value.items()}
        if isinstance(value, list):
            return [skeleton(item) for item in value]
        if isinstance(value, str):
            return NUMBER.sub("#", value.replace(",", ""))
        return "#" if isinstance(value, (int, float)) and not isinstance(value, bool) else value

    derived = {key: item for key, item in view.items() if key not in NOT_DERIVED}
    digest = hashlib.sha256(json.dumps(skeleton(derived), sort_keys=True).encode()).hexdigest()[:16]
    return f"lore-fed {lore_fed_version}, wording {digest}"


def append_audit(run_dir: str | os.PathLike, result: Mapping[str, Any]) -> None:
    """Append an audit result to RUN_DIR/ledger.json's events, under the run directory's lock (refused while a run
    writes there). Only `events.audits` changes: no derived key depends on audits, so the conclusions the run's
    own ledger class derived (a federated run's evaluation policy and not-covered list) stay as they are."""
    from lore_core.run_lock import RunDirLock

    with RunDirLock(run_dir):
        path = Path(run_dir) / LEDGER_FILENAME
        data = _read(path)
        data["events"]["audits"].append(dict(result))
        atomic_write_json(path, data)


def read_ledger(path: str | os.PathLike) -> dict[str, Any]:
    """A ledger.json's parsed content, checked (schema, events, every round's (z, q)); LedgerError names the file."""
    return _read(Path(path))


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json_loads(read_text(path))  # a BOM dropped, bad UTF-8 named by line and column (a tester)
    except (OSError, ValueError) as exc:
        raise LedgerError(f"{path} is not a readable ledger ({exc}); restore it or start a new run directory") from exc
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        found = data.get("schema") if isinstance(data, dict) else type(data).__name__
        raise LedgerError(f"{path} has schema {found!r}; expected {SCHEMA!r}")
    events = data.get("events")
    if not isinstance(events, dict) or not set(EVENT_KEYS) <= set(events) <= {*EVENT_KEYS, *OPTIONAL_EVENT_KEYS} \
            or not isinstance(data.get("config"), dict):
        raise LedgerError(f"{path} lacks `config` or `events` with keys {EVENT_KEYS}")
    _check_events(path, events, data["config"].get("mode"))
    mode, delta = data["config"].get("mode"), data["config"].get("delta")
    if mode in ("user", "user+secagg", "record") and not (
            isinstance(delta, (int, float)) and not isinstance(delta, bool) and 0 < delta < 1):
        # a tester's NaN read "cannot convert float NaN to integer", and an audit wrote it back as null
        raise LedgerError(f"{path}: config.delta must be a number in (0, 1) under mode {mode!r}, got {delta!r}; "
                          "restore the ledger")
    return data


EVENT_TYPES = {"rounds": list, "clients": dict, "audits": list, "stopped_early": bool}
MAX_SAMPLED = 10**9  # users one round samples, at most: the largest population a run takes
OPTIONAL_EVENT_KEYS = ("lost_replies",)  # record mode, only once a round lost every reply


def _check_events(path: Path, events: dict, mode) -> None:
    """The events' types, and in user modes every round's (z, q) as the accountant needs them: a tampered or
    damaged ledger is refused by name before anything reads it (a NaN noise multiplier had Opacus spin forever)."""
    wrong = [f"{key} ({type(events[key]).__name__}, expected {kind.__name__})" for key, kind in EVENT_TYPES.items()
             if not isinstance(events[key], kind)]
    if wrong:
        raise LedgerError(f"{path}: events of the wrong type: {', '.join(wrong)}; restore the ledger")
    for position, entry in enumerate(events["rounds"], 1):
        if not isinstance(entry, dict):
            raise LedgerError(f"{path}: round entry {position} is not an object: {entry!r}")
        number, sampled = entry.get("round", position), entry.get("sampled", 0)
        if isinstance(number, bool) or number != position or not isinstance(number, int):  # 1.5, or 9 twice
            raise LedgerError(f"{path}: round entry {position} has round {number!r}, expected {position} (the rounds "
                              "in order); restore the ledger")
        if isinstance(sampled, bool) or not isinstance(sampled, int) or not 0 <= sampled <= MAX_SAMPLED:
            raise LedgerError(f"{path}: round entry {position} has sampled {sampled!r}, expected a whole number of "
                              f"users in [0, {MAX_SAMPLED:.0e}]; restore the ledger")
        if mode in USER_MODES:
            z, q = entry.get("noise_multiplier"), entry.get("sample_rate")
            try:
                check_history([(z, q, 1)])
            except (AccountingError, TypeError, ValueError) as exc:
                raise LedgerError(f"{path}: round entry {position} has noise_multiplier {z!r} and sample_rate {q!r} "
                                  f"({exc}); restore the ledger") from exc
            most = entry.get(MOST_USER_ROUNDS, 0)
            if isinstance(most, bool) or not isinstance(most, int) or not 0 <= most <= position:
                raise LedgerError(f"{path}: round entry {position} has {MOST_USER_ROUNDS} {most!r}, expected a whole "
                                  f"number in [0, {position}]; restore the ledger")
        for key in ("clients", "unreported", "caught_up"):  # record mode: lists of client ids
            _check_client_ids(path, f"round entry {position}", key, entry.get(key, []))
    for event in events.get("lost_replies", []):
        after = event.get("after_round") if isinstance(event, dict) else None
        if isinstance(after, bool) or not isinstance(after, int) or not 0 <= after <= len(events["rounds"]):
            raise LedgerError(f"{path}: lost_replies entry {event!r} has no after_round in "
                              f"[0, {len(events['rounds'])}]; restore the ledger")
        _check_client_ids(path, "a lost_replies entry", "clients", event.get("clients"))
    for cid, client in events["clients"].items():  # record mode: what each client spent (a tester: audits crashed)
        try:
            check_history(client["history"])
        except (AccountingError, KeyError, TypeError, ValueError, OverflowError) as exc:
            raise LedgerError(f"{path}: client {cid} has no valid accountant history ({type(exc).__name__}: {exc}); "
                              "restore the ledger") from exc


def _check_client_ids(path: Path, where: str, key: str, ids) -> None:
    if not isinstance(ids, list) or not all(isinstance(c, str) for c in ids):
        raise LedgerError(f"{path}: {where} has {key} {ids!r}, expected a list of client ids (strings); restore the "
                          "ledger")


def _key(history: Iterable[Sequence]) -> tuple[tuple[float, float, int], ...]:
    return tuple((float(z), float(q), int(k)) for z, q, k in history)


def _merged(history: tuple) -> tuple[tuple[float, float, int], ...]:
    """Segments with consecutive equal (z, q) merged."""
    out: list[tuple[float, float, int]] = []
    for z, q, k in history:
        if out and out[-1][:2] == (z, q):
            out[-1] = (z, q, out[-1][2] + k)
        else:
            out.append((z, q, k))
    return tuple(out)


def _opacus_version() -> str:
    from importlib.metadata import version

    return version("opacus")
