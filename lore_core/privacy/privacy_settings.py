"""Privacy settings of a run and their validation, which fails closed before round 1
(design: docs/privacy.md §7, §9).

Fields left `None` were not given; `validate` fills the defaults of the chosen mode (one place: DEFAULTS), rejects a
setting that the mode would silently ignore, solves the noise multiplier for a target epsilon, and predicts the
planned run's epsilon against max_epsilon. Every error says what to change.
"""

from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Mapping

from lore_core.privacy.accounting import (MAX_PRV_EPSILON, MAX_ROUNDS, AccountingError, epsilon, history_epsilon,
                                         noise_for_target_epsilon, rounds_within_budget)
from lore_core.privacy.record_dp import MAX_RECORD_STEPS, steps_per_epoch
from lore_core.setting_names import SettingError, as_field, setting

MODES = ("none", "user", "user+secagg", "record")
USER_MODES = ("user", "user+secagg")
WEIGHTINGS = ("uniform", "num-examples")
# Each field's run-config key, as `lore-fed simulate`'s flags and `flwr run -c` spell it (server.run_settings reads a
# run config by them, and a ledger refusal names them); the other fields come from the run, not its config.
RUN_CONFIG_KEYS = {
    "mode": "privacy-mode",
    "noise_multiplier": "noise-multiplier",
    "target_epsilon": "target-epsilon",
    "max_epsilon": "max-epsilon",
    "clip_norm": "clip-norm",
    "delta": "delta",
    "reproducible_noise": "reproducible-noise",
    "max_grad_norm": "max-grad-norm",
    "record_batch_size": "record-batch-size",
    "record_sample_rate": "record-sample-rate",
    "record_epochs": "record-epochs",
    "num_shares": "num-shares",
    "reconstruction_threshold": "reconstruction-threshold",
    "dropout_tolerance": "dropout-tolerance",
    "clients_per_round": "clients-per-round",
    "rounds": "num-server-rounds",
}
CLIENT_METRICS = ("none", "all")  # DP modes: clients report nothing the accountant does not cover
SAMPLINGS = ("poisson", "fixed")  # "fixed" = Flower's fraction_train sampling without replacement

DEFAULTS: dict[str, Any] = {
    "noise_multiplier": 1.0,
    "clip_norm": 1.0,
    "delta": 1e-5,  # record mode; the user modes default to user_delta(N), which follows the population
    "clients_per_round": 50,
    "max_grad_norm": 1.0,
    "record_batch_size": 4,
    "record_sample_rate": 0.25,
    "record_epochs": 1,
    "num_shares": 3,
    "reconstruction_threshold": 2,
    "dropout_tolerance": 0.1,  # user+secagg: the guarantee holds while at most 10 % of a round's sampled users drop
}
# The smallest delta taken: a tester's 1e-15 (and 1e-300) passed validation, then the first round's PRV call failed
# ("floating point errors will dominate") and left a run directory no rerun could fix; at T = 1000 rounds Opacus
# already fails at 1e-12.
MIN_DELTA = 1e-10
# The largest noise multiplier and clip norms taken: beyond, the noise std z*C overflowed the server's arithmetic
# (--clip-norm 1e308: every step infinite and skipped, exit 0 with the initial basis) or the accountant (z 1e200,
# refused with the advice to raise z), and nothing is gained: epsilon is about 0 from z = 1e3 on.
MAX_SCALE = 1e6
# Settings that mean something only under DP, and the modes that use them.
DP_FIELDS: dict[str, tuple[str, ...]] = {
    "noise_multiplier": ("user", "user+secagg", "record"),
    "target_epsilon": USER_MODES,
    "max_epsilon": ("user", "user+secagg", "record"),
    "clip_norm": USER_MODES,
    "delta": ("user", "user+secagg", "record"),
    "max_grad_norm": ("record",),
    "record_batch_size": ("record",),
    "record_sample_rate": ("record",),
    "record_epochs": ("record",),
    "num_shares": ("user+secagg",),
    "reconstruction_threshold": ("user+secagg",),
    "dropout_tolerance": ("user+secagg",),
    "dimension": ("user+secagg",),
}


def user_delta(population_size: int) -> float:
    """The user modes' default delta for N users: the largest power of ten at most min(1e-5, 1/(10 N)) (1e-5 up to
    N = 10,000, 1e-6 up to 100,000, ...), so that it stays well below 1/N as the population grows."""
    bound = min(DEFAULTS["delta"], 1.0 / (10 * population_size))
    return float(10.0 ** math.floor(math.log10(bound) + 1e-12))


class PrivacyConfigError(SettingError):
    """A privacy setting that would make the stated guarantee wrong or void; the message says what to change. It names
    the settings by `setting(field)`, shown as the fields (`clip_norm`); server.run_settings renders them as run-config
    keys, and the CLI as the flags its user typed."""

    spelling = staticmethod(as_field)


class PrivacyConfigWarning(UserWarning):
    """A legal but weak or debug-only privacy setting."""


@dataclass(frozen=True)
class PrivacySettings:
    """One run's privacy configuration. `None` = not given (validate fills the mode's default)."""

    mode: str = "none"
    noise_multiplier: float | None = None  # z: noise std on the sum = z * clip_norm (record: z * max_grad_norm)
    target_epsilon: float | None = None  # alternative to noise_multiplier: validate solves z for the planned run
    max_epsilon: float | None = None  # refuse to start / stop before a round that would exceed it
    clip_norm: float | None = None  # C: flat Frobenius clip of each user's update dA (user modes)
    delta: float | None = None
    clients_per_round: int | None = None  # m: expected sampled users per round; Poisson rate q = m / N
    population_size: int | None = None  # N: number of distinct users
    rounds: int | None = None  # T: planned rounds
    reproducible_noise: bool = False  # debug only: noise and sampling RNGs from noise_seed; the ledger says NOT PRIVATE
    noise_seed: int | None = None
    # record mode (Opacus DP-SGD per client on its pairs)
    max_grad_norm: float | None = None
    record_batch_size: int | None = None  # the public divisor of a DP-SGD step (its nominal expected batch)
    record_sample_rate: float | None = None  # public Poisson rate per pair; int(1 / q) steps per epoch
    record_epochs: int | None = None
    # user+secagg (Flower SecAgg+ with the distributed discrete Gaussian)
    num_shares: int | None = None
    reconstruction_threshold: int | None = None
    dropout_tolerance: float | None = None  # x: the fraction of a round's sampled users that may drop out
    dimension: int | None = None  # B*D, set by the server: the ddg-rdp accountant needs it
    weighting: str = "uniform"
    client_metrics: str = "none"
    sampling: str = "poisson"
    noise_from_target: bool = False  # set by validate when noise_multiplier was solved from target_epsilon

    @property
    def is_dp(self) -> bool:
        return self.mode != "none"

    @property
    def accountant(self) -> str:
        """Whose epsilon is the headline: the distributed discrete Gaussian's bound or Opacus' PRV."""
        return "ddg-rdp" if self.mode == "user+secagg" else "prv"

    @property
    def sample_rate(self) -> float | None:
        """Poisson user sampling rate q = m / N (user modes)."""
        if self.clients_per_round is None or self.population_size is None:
            return None
        return self.clients_per_round / self.population_size

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "PrivacySettings":
        """From a flat mapping such as Flower's run config section (`noise-multiplier` or `noise_multiplier`);
        an unknown key is an error, not silently ignored."""
        known = {f.name for f in fields(cls)}
        values = {}
        for key, value in config.items():
            name = str(key).replace("-", "_")
            if name not in known or name == "noise_from_target":
                raise PrivacyConfigError(f"unknown privacy setting {key!r}; known settings: {sorted(known)}")
            values[name] = value
        return cls(**values)


_VALIDATED: dict[PrivacySettings, PrivacySettings] = {}  # settings -> resolved; resolved settings map to themselves


def validate(settings: PrivacySettings) -> PrivacySettings:
    """Check `settings` before any training and return them resolved (defaults filled, z solved if targeted).

    Pure on a frozen dataclass, so a process validates each setting once however many layers ask (the command,
    the ServerApp, the ledger): solving z or predicting epsilon costs accountant calls."""
    if settings not in _VALIDATED:
        resolved = _validate(settings)
        _VALIDATED[settings] = _VALIDATED[resolved] = resolved
    return _VALIDATED[settings]


def _validate(settings: PrivacySettings) -> PrivacySettings:
    mode = settings.mode
    if mode not in MODES:
        raise PrivacyConfigError(f"{setting('mode')} must be one of {MODES}; got {mode!r} (a typo is not 'none')")
    _check_choice(settings.weighting, "weighting", WEIGHTINGS)
    _check_choice(settings.client_metrics, "client_metrics", CLIENT_METRICS)
    _check_choice(settings.sampling, "sampling", SAMPLINGS)
    _check_general(settings)
    if mode == "none":
        given = [name for name in DP_FIELDS if getattr(settings, name) is not None]
        if settings.reproducible_noise:
            given.append("reproducible_noise")
        if settings.noise_seed is not None:
            given.append("noise_seed")
        if given:
            raise PrivacyConfigError(
                f"privacy mode is 'none' but DP settings were given: {_names(given)}; "
                f"remove them, or set {setting('mode')} to 'user' (user-level DP) to use them"
            )
        return settings

    ignored = [name for name, modes in DP_FIELDS.items() if mode not in modes and getattr(settings, name) is not None]
    if ignored:
        raise PrivacyConfigError(
            f"mode {mode!r} does not use {_names(ignored)}; remove them "
            f"({setting('clip_norm')} and {setting('target_epsilon')} are user-mode settings, "
            f"{setting('max_grad_norm')} and the record_* settings record-mode, {setting('num_shares')}, "
            f"{setting('reconstruction_threshold')}, {setting('dropout_tolerance')} and dimension user+secagg)"
        )
    resolved = {name: value for name, value in DEFAULTS.items()  # clients_per_round: a user-mode default only
                if mode in DP_FIELDS.get(name, USER_MODES) and getattr(settings, name) is None}
    if settings.noise_multiplier is None and settings.target_epsilon is not None:
        del resolved["noise_multiplier"]  # solved below
    if "delta" in resolved and mode in USER_MODES and _is_int(settings.population_size) and \
            settings.population_size > 0:
        resolved["delta"] = user_delta(settings.population_size)
        if resolved["delta"] < MIN_DELTA:  # a tester's 2e9 users were told to remove a --delta never given
            raise PrivacyConfigError(
                f"{setting('population_size')} {settings.population_size} is above 1e9 users: its default delta (at "
                f"most 1/(10 N)) would be below {MIN_DELTA:g}, where the PRV accountant's floating-point error "
                f"dominates; give a population of at most 1e9, or {setting('delta')} {MIN_DELTA:g} (a weaker "
                "guarantee than 1/(10 N))")
    settings = replace(settings, **resolved)
    _check_dp_common(settings)
    if mode == "user+secagg":
        _check_secagg(settings)
    if mode in USER_MODES:
        settings = _check_user_modes(settings)
    else:
        _check_record(settings)
    if settings.reproducible_noise:
        if settings.noise_seed is None:
            settings = replace(settings, noise_seed=0)
        warnings.warn("reproducible_noise is on: anyone with noise_seed can remove the noise; NOT PRIVATE (debug only)",
                      PrivacyConfigWarning, stacklevel=2)
    return settings


def _names(names: list[str]) -> str:
    """A list of settings in a message: [clip_norm, delta]."""
    return "[" + ", ".join(setting(name) for name in names) + "]"


def _check_choice(value: Any, name: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise PrivacyConfigError(f"{name} must be one of {choices}; got {value!r}")


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _positive_int(settings: PrivacySettings, name: str) -> None:
    value = getattr(settings, name)
    if value is not None and not (_is_int(value) and value > 0):
        raise PrivacyConfigError(f"{setting(name)} must be a positive integer; got {value!r}")


def _positive_finite(value: Any, name: str, hint: str) -> None:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    if not ok:
        raise PrivacyConfigError(f"{setting(name)} must be a finite number > 0; got {value!r}: {hint}")


def _at_most_max_scale(value: float, name: str, hint: str) -> None:
    if value > MAX_SCALE:
        raise PrivacyConfigError(f"{setting(name)} must be at most {MAX_SCALE:g}; got {value!r}: {hint}")


def _check_general(settings: PrivacySettings) -> None:
    for name in ("population_size", "rounds", "clients_per_round"):
        _positive_int(settings, name)
    if settings.rounds is not None and settings.rounds > MAX_ROUNDS:  # a positive integer by now
        # Opacus' PRV grid grows with T: a tester's 1e9 rounds took 15 GB and minutes (1e6: 0.5 GB, 5 s)
        raise PrivacyConfigError(f"{setting('rounds')} must be at most {MAX_ROUNDS:,}; got {settings.rounds}")
    m, n = settings.clients_per_round, settings.population_size
    if m is not None and n is not None and m > n:
        raise PrivacyConfigError(f"{setting('clients_per_round')} must be at most the population ({n} users); got {m}: "
                                 f"lower it to <= {n}")
    if settings.noise_seed is not None and not _is_int(settings.noise_seed):
        raise PrivacyConfigError(f"noise_seed must be an integer; got {settings.noise_seed!r}")
    if settings.noise_seed is not None and not settings.reproducible_noise:
        raise PrivacyConfigError(
            f"noise_seed is used only with {setting('reproducible_noise', True)} (debug, NOT PRIVATE); remove it"
        )


def _check_dp_common(s: PrivacySettings) -> None:
    if s.weighting != "uniform":
        raise PrivacyConfigError(
            f"weighting {s.weighting!r} is not covered by the accountant: example counts change a user's influence "
            "(sensitivity) and are private themselves; set weighting = 'uniform' (clients send num-examples = 1)"
        )
    if s.client_metrics != "none":
        raise PrivacyConfigError(
            f"client_metrics {s.client_metrics!r} would release un-noised client statistics that the accountant does "
            "not cover; set client_metrics = 'none' under DP"
        )
    if s.noise_multiplier is not None:
        _positive_finite(s.noise_multiplier, "noise_multiplier",
                         f"DP needs noise; set e.g. {setting('noise_multiplier', 1.0)}")
        _at_most_max_scale(s.noise_multiplier, "noise_multiplier", "epsilon is already about 0 at 1e3")
    for name in ("target_epsilon", "max_epsilon"):
        if getattr(s, name) is not None:
            _positive_finite(getattr(s, name), name, f"give a positive epsilon or remove {setting(name)}")
    if not (isinstance(s.delta, numbers.Real) and 0 < s.delta < 1):
        raise PrivacyConfigError(f"{setting('delta')} must be in (0, 1/N); got {s.delta!r}: remove it to use the "
                                 "default (at most 1/(10 N))")
    if s.delta < MIN_DELTA:
        raise PrivacyConfigError(f"{setting('delta')} must be at least {MIN_DELTA:g}; got {s.delta!r}: below it the "
                                 "PRV accountant's floating-point error dominates (Opacus refuses), and 1/(10 N) "
                                 "reaches it only at N = 1e9 users; remove it to use the default (at most 1/(10 N))")
    if s.rounds is None:
        raise PrivacyConfigError(f"mode {s.mode!r} needs the planned number of rounds: set {setting('rounds')} = T")


def _check_user_modes(s: PrivacySettings) -> PrivacySettings:
    if s.sampling != "poisson":
        raise PrivacyConfigError(
            "user-level accounting assumes Poisson sampling of users; fixed-size sampling needs about twice the noise "
            "(replace-one, sensitivity 2C): set sampling = 'poisson'"
        )
    if s.population_size is None:
        raise PrivacyConfigError(f"mode {s.mode!r} needs {setting('population_size')} N (the number of distinct "
                                 "users)")
    _positive_finite(s.clip_norm, "clip_norm", f"set {setting('clip_norm')} to about the median update norm "
                     "(federated runs default to 0.25)")
    _at_most_max_scale(s.clip_norm, "clip_norm", "set it to about the median update norm (federated runs default to "
                       "0.25)")
    n = s.population_size
    if not s.delta < 1 / n:
        raise PrivacyConfigError(f"{setting('delta')} must be < 1/N = {1 / n:.3g} (N = {n} users); got {s.delta}: use "
                                 f"at most 1/(10 N) = {1 / (10 * n):.3g} (leave {setting('delta')} unset for the "
                                 f"default, {user_delta(n):g})")
    if s.delta > 1 / (10 * n):
        warnings.warn(f"delta = {s.delta} is above 1/(10 N) = {1 / (10 * n):.3g}: a weak guarantee",
                      PrivacyConfigWarning, stacklevel=3)
    if s.clients_per_round == n:
        warnings.warn("clients_per_round = population_size: every user every round, no amplification by sampling",
                      PrivacyConfigWarning, stacklevel=3)
    q, rounds = s.sample_rate, s.rounds
    accountant, dim = s.accountant, s.dimension
    if s.target_epsilon is not None:
        if s.noise_multiplier is not None and not s.noise_from_target:
            raise PrivacyConfigError(
                f"give either {setting('noise_multiplier')} or {setting('target_epsilon')}, not both: remove one (with "
                f"{setting('target_epsilon')} the noise multiplier is solved for the planned rounds)"
            )
        if s.max_epsilon is not None and s.target_epsilon > s.max_epsilon:
            raise PrivacyConfigError(
                f"{setting('target_epsilon', s.target_epsilon)} exceeds {setting('max_epsilon', s.max_epsilon)}: lower "
                f"{setting('target_epsilon')}"
            )
        if s.noise_multiplier is None:
            z = _accounted(noise_for_target_epsilon, s.target_epsilon, q, rounds, s.delta, accountant, dim=dim)
            s = replace(s, noise_multiplier=z, noise_from_target=True)
    planned_rdp = _accounted(epsilon, s.noise_multiplier, q, rounds, s.delta, "rdp" if accountant == "prv" else
                             accountant, dim)
    if planned_rdp > MAX_PRV_EPSILON:
        change = (f"lower {setting('target_epsilon')} until the RDP bound of the plan is at most "
                  f"{MAX_PRV_EPSILON:g} (user-level DP runs use 1 to 10; the noise multiplier solved for it is "
                  f"{s.noise_multiplier:.4g})" if s.noise_from_target else
                  f"raise {setting('noise_multiplier')} (now {s.noise_multiplier:g}), lower "
                  f"{setting('clients_per_round')} or {setting('rounds')}")
        raise PrivacyConfigError(
            f"the planned {rounds} rounds reach epsilon {planned_rdp:.4g} (RDP, delta={s.delta}): no meaningful "
            f"privacy; {change}, or train without DP ({setting('mode', 'none')})")
    if s.max_epsilon is not None:
        planned = _accounted(epsilon, s.noise_multiplier, q, rounds, s.delta, accountant, dim)
        if planned > s.max_epsilon:
            fit = _accounted(rounds_within_budget, s.noise_multiplier, q, s.delta, s.max_epsilon, limit=rounds,
                             accountant=accountant, dim=dim)
            raise PrivacyConfigError(
                f"the planned {rounds} rounds reach epsilon {planned:.3f} ({accountant}, delta={s.delta}) > "
                f"{setting('max_epsilon', s.max_epsilon)}; " +
                (f"only {fit} rounds fit: set {setting('rounds')} <= {fit}, raise" if fit else
                 "not even one round fits: raise") +
                f" {setting('noise_multiplier')}, lower {setting('clients_per_round')}, or raise "
                f"{setting('max_epsilon')}"
            )
    return s


def _accounted(function, *args, **kwargs):
    try:
        return function(*args, **kwargs)
    except AccountingError as exc:
        advice = "" if "unreachable" in str(exc) else f"; raise {setting('noise_multiplier')}"  # else exc says it
        message = f"privacy accounting failed for these settings ({exc.template}){advice}"
        raise PrivacyConfigError(message) from exc


def _check_record(s: PrivacySettings) -> None:
    _positive_finite(s.max_grad_norm, "max_grad_norm",
                     f"set the per-pair clip norm, e.g. {setting('max_grad_norm', 1.0)}")
    _at_most_max_scale(s.max_grad_norm, "max_grad_norm", f"set the per-pair clip norm, e.g. "
                       f"{setting('max_grad_norm', 1.0)}")
    _positive_int(s, "record_batch_size")
    q = s.record_sample_rate  # public, as every part of the mechanism must be: not derived from n_i
    if q is not None and not (isinstance(q, numbers.Real) and not isinstance(q, bool) and math.isfinite(q)
                              and 0 < q <= 1):
        raise PrivacyConfigError(f"{setting('record_sample_rate')} must be in (0, 1]; got {q!r}")
    if q is not None and q < 1 / MAX_RECORD_STEPS:
        raise PrivacyConfigError(f"{setting('record_sample_rate')} must be at least 1 / {MAX_RECORD_STEPS:,} (an epoch "
                                 f"is int(1 / rate) DP-SGD steps, at most {MAX_RECORD_STEPS:,} a round); got {q!r}")
    if q is not None and _is_int(s.record_epochs) and s.record_epochs * steps_per_epoch(q) > MAX_RECORD_STEPS:
        raise PrivacyConfigError(f"{setting('record_epochs')} x int(1 / {setting('record_sample_rate')}) = "
                                 f"{s.record_epochs * steps_per_epoch(q):,} DP-SGD steps per round; at most "
                                 f"{MAX_RECORD_STEPS:,} (a node refuses more)")
    _positive_int(s, "record_epochs")
    if s.noise_multiplier is None:
        raise PrivacyConfigError(f"record mode needs {setting('noise_multiplier')} ({setting('target_epsilon')} "
                                 "would need how often each client is sampled)")
    if s.max_epsilon is not None and q is not None and _is_int(s.record_epochs) and s.delta is not None:
        # a round's mechanism is public, so its cost is known up front: a tester's budget below one round ran every
        # round with every user sending a zero update, exit 0
        steps = s.record_epochs * steps_per_epoch(q)
        one = _accounted(history_epsilon, [(float(s.noise_multiplier), float(q), steps)], s.delta)
        if one > s.max_epsilon:
            raise PrivacyConfigError(
                f"one round of record-mode DP-SGD ({steps} steps at rate {q:g}, z {s.noise_multiplier:g}) costs a "
                f"client epsilon {one:.3f} (PRV, delta={s.delta}) > {setting('max_epsilon', s.max_epsilon)}: not even "
                f"one round fits; raise {setting('noise_multiplier')}, lower {setting('record_sample_rate')} or "
                f"{setting('record_epochs')}, or raise {setting('max_epsilon')}")


def min_secagg_nodes(s: PrivacySettings) -> int:
    """The fewest nodes a round's users must lie on for a secure sum: two (one node's sum would be its own update,
    unmasked) and at least SecAgg+'s reconstruction threshold. A round short of them releases a data-free noise
    step."""
    return max(2, int(s.reconstruction_threshold))


def check_secagg_layout(s: PrivacySettings, nodes: int, nodes_given: str) -> None:
    """Refuse a user+secagg run that could never, or would hardly ever, form a secure sum: fewer nodes holding the
    sampled (seen) users than a sum needs, or fewer users expected per round. A tester's run on one node spent
    epsilon 0.78 over rounds that were all data-free, wrote a basis of pure noise and exited 0; a reviewer's two
    nodes held every seen user on the first. `nodes`: the nodes that hold seen users; `nodes_given`: their source."""
    if s.mode != "user+secagg":
        return
    need = min_secagg_nodes(s)
    if nodes < need:
        raise PrivacyConfigError(f"user+secagg sums each round over the nodes hosting its sampled users, and a sum "
                                 f"needs at least {need} nodes; this run's seen users lie on {nodes} ({nodes_given}): "
                                 "every round would release a data-free noise step. Spread the seen users over "
                                 "more nodes, or use privacy mode user")
    if s.clients_per_round is not None and s.clients_per_round < need:
        raise PrivacyConfigError(f"{s.clients_per_round} user(s) per round under user+secagg: a round's users must lie "
                                 f"on at least {need} nodes for a secure sum, so most rounds would release a "
                                 f"data-free noise step; sample at least {need} users per round")


def _check_secagg(s: PrivacySettings) -> None:
    k, t = s.num_shares, s.reconstruction_threshold
    if not (_is_int(k) and k >= 3 and k % 2 == 1):
        raise PrivacyConfigError(f"{setting('num_shares')} must be an odd integer >= 3 (Flower SecAgg+ crashes on "
                                 f"even); got {k!r}")
    if not (_is_int(t) and 1 <= t < k):
        raise PrivacyConfigError(f"{setting('reconstruction_threshold')} must be an integer in "
                                 f"1..{setting('num_shares')}-1 = {k - 1}; got {t!r}")
    x = s.dropout_tolerance
    if not (isinstance(x, numbers.Real) and not isinstance(x, bool) and 0 <= x < 1):
        raise PrivacyConfigError(f"{setting('dropout_tolerance')} must be in [0, 1); got {x!r}: e.g. 0.1 (the "
                                 "guarantee holds while at most 10 % of a round's sampled users drop out)")
    if not (_is_int(s.dimension) and s.dimension > 0):
        raise PrivacyConfigError(f"mode user+secagg needs the dimension B*D of the basis (set by the server); got "
                                 f"{s.dimension!r}")
