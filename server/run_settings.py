"""Server-side run settings, parsed once from the flat run config (`[tool.flwr.app.config]` + overrides)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from lore_core.marginal_fit import OBJECTIVES, WEIGHTINGS
from lore_core.reward_math import MAX_L2
from lore_core.simplex_fit import MAX_PRIOR_PAIRS
from federation.protocol import config_number, local_steps, pairs_per_user, personal_prior_pairs
from lore_core.privacy.privacy_settings import MODES as PRIVACY_MODES
from lore_core.privacy.privacy_settings import (DEFAULTS as PRIVACY_DEFAULTS, DP_FIELDS, RUN_CONFIG_KEYS, USER_MODES,
                                                 PrivacyConfigError, PrivacySettings, user_delta, validate)
from lore_core.setting_names import NO_VALUE, SettingError, as_field, as_run_config, setting
from server.optimizer import (SCHEDULES, ServerAdam, ServerSGD, default_init_scale, default_schedule,
                              default_server_lr, make_optimizer)

SERVER_OPTIMIZERS = ("adam", "sgd")
PROGRESS_STYLES = ("bar", "log")
MAX_RATE = 1e3  # server-lr and client-lr: the defaults are 1.0 (0.05 under DP)
MIN_CLIENT_LR = 1e-6  # the server's pseudo-gradient divides the clients' mean update by it
MAX_LOCAL_STEPS = 10_000  # a client's steps on its users per round (default 5; 1 under weight-by pair)


# Run-config key -> PrivacySettings field. An empty string means "not given": `validate` fills the mode's default
# (lore_core.privacy.privacy_settings.DEFAULTS, the one source of truth), so `flwr run -c "noise-multiplier=0.0"` is an error,
# not the default. Shared by every privacy mode (also user+secagg).
PRIVACY_KEYS = {key: field for field, key in RUN_CONFIG_KEYS.items() if field not in ("clients_per_round", "rounds")}


def given_fields(keys) -> frozenset[str]:
    """The checkpoint fields (ServerSettings.fingerprint) that run-config `keys` the user gave set: a privacy key
    other than the mode sets the privacy group (`privacy`); a resume refusal names these even where their defaults
    follow a changed leading setting (server.checkpoint.FOLLOWERS)."""
    group = {"privacy"} if set(keys) & (set(PRIVACY_KEYS) - {"privacy-mode"}) else set()
    return frozenset({key.replace("-", "_") for key in keys} | group)


# Default clip norm C of the user modes for this client training (client-lr 1, local-steps 5): about the median
# per-user update norm, 0.24, of a non-private pilot on a separate synthetic population (D = 384, 300 users, 60
# rounds; `python -m simulations.bench_privacy --pilot`), never tuned on a private run. The clip norm dominates the
# utility (docs/privacy.md §4: C near the median norm lost <1 point at z = 1, 2x the median 3 points). It replaces
# lore_core's generic DEFAULTS["clip_norm"] only for federated runs, whose update scale it matches.
FEDERATED_CLIP_NORM = 0.25


class RunConfigError(SettingError):
    """A run-config value that cannot work; says which key, what was expected and what came. The message names keys
    by `setting(key)`: str() shows them as run-config keys (`flwr run`, pyproject.toml), and `spelled` as a command
    line sets them (`lore-fed simulate --eval-every 0`, `lore-fed deploy local -c eval-every=0`)."""

    spelling = staticmethod(as_run_config)


class RunPrivacyConfigError(RunConfigError, PrivacyConfigError):
    """A PrivacyConfigError of a run's privacy settings, naming run-config keys instead of PrivacySettings' fields."""


# PrivacySettings field -> the run-config key that sets it (the others, such as population_size, come from the run)
FIELD_KEYS = RUN_CONFIG_KEYS


def _as_key(field: str, value=NO_VALUE) -> str:
    return setting(FIELD_KEYS[field], value) if field in FIELD_KEYS else as_field(field, value)


def privacy_config(cfg: dict) -> dict:
    """The privacy keys of a run config as PrivacySettings fields; absent or "" = not given."""
    return {field: cfg[key] for key, field in PRIVACY_KEYS.items() if key in cfg and cfg[key] != ""}


@dataclass(frozen=True)
class ServerSettings:
    rounds: int
    rank: int
    clients_per_round: int
    seed: int
    eval_every: int
    local_steps: int
    client_lr: float
    server_optimizer: str
    server_lr: float
    server_lr_schedule: str
    l2: float
    train_prior_pairs: float
    prior_pairs: float
    init_scale: float
    privacy_mode: str
    run_dir: str
    min_nodes: int
    round_timeout: float
    privacy: dict  # PrivacySettings fields as given (privacy_config); resolved per population by privacy_settings
    allow_uncovered_eval: bool = False  # DP modes: evaluate every eval-every rounds although uncovered
    progress: str = "log"  # server.round_progress.STYLES
    objective: str = "joint"  # clients' update: "joint" or "marginal" (federation/local_training.py)
    weight_by: str = "user"  # "pair": users' updates weighted by their pairs (privacy none; protocol.pairs_per_user)
    pairs_per_user: float = 1.0

    @classmethod
    def from_run_config(cls, cfg: dict) -> "ServerSettings":
        try:
            settings = cls(
                rounds=_typed(cfg, "num-server-rounds", int),
                rank=_typed(cfg, "rank", int),
                clients_per_round=_typed(cfg, "clients-per-round", int),
                seed=_typed(cfg, "seed", int),
                eval_every=_typed(cfg, "eval-every", int),
                local_steps=local_steps(cfg),
                client_lr=_typed(cfg, "client-lr", float),
                server_optimizer=str(cfg["server-optimizer"]),
                server_lr=_typed(cfg, "server-lr", float, _or_default(cfg["server-lr"], default_server_lr, cfg)),
                server_lr_schedule=_or_default(cfg.get("server-lr-schedule", ""), default_schedule, cfg),
                l2=_typed(cfg, "l2", float),
                train_prior_pairs=_typed(cfg, "train-prior-pairs", float),
                prior_pairs=personal_prior_pairs(cfg),
                init_scale=_typed(cfg, "init-scale", float, _or_default(cfg["init-scale"], default_init_scale, cfg)),
                privacy_mode=str(cfg["privacy-mode"]),
                run_dir=str(cfg["run-dir"]),
                min_nodes=_typed(cfg, "min-nodes", int),
                round_timeout=_typed(cfg, "round-timeout", float),
                privacy=privacy_config(cfg),
                allow_uncovered_eval=_flag(cfg, "allow-uncovered-eval"),
                progress=str(cfg.get("progress", "log")),
                objective=str(cfg.get("objective", "joint")),
                weight_by=str(cfg.get("weight-by", "user")),
                pairs_per_user=pairs_per_user(cfg),
            )
        except KeyError as exc:
            raise RunConfigError(f"run config lacks key {exc}; keys present: {sorted(cfg)}") from exc
        except RunConfigError:
            raise
        except ValueError as exc:  # federation.protocol's parsers name their key
            raise RunConfigError(exc.template if isinstance(exc, SettingError) else str(exc)) from exc
        settings.validate()
        return settings

    def validate(self) -> None:
        positive = {"num-server-rounds": self.rounds, "rank": self.rank, "clients-per-round": self.clients_per_round,
                    "local-steps": self.local_steps, "client-lr": self.client_lr,
                    "server-lr": self.server_lr, "train-prior-pairs": self.train_prior_pairs,
                    "prior-pairs": self.prior_pairs,
                    "init-scale": self.init_scale, "min-nodes": self.min_nodes, "round-timeout": self.round_timeout}
        for key, value in positive.items():
            if not (value > 0 and value != float("inf")):
                raise RunConfigError(f"{setting(key)} must be a finite number > 0, got {value}")
        for key, value, ceiling in (("server-lr", self.server_lr, MAX_RATE), ("client-lr", self.client_lr, MAX_RATE),
                                    ("local-steps", self.local_steps, MAX_LOCAL_STEPS),
                                    ("prior-pairs", self.prior_pairs, MAX_PRIOR_PAIRS),
                                    ("train-prior-pairs", self.train_prior_pairs, MAX_PRIOR_PAIRS)):
            if value > ceiling:  # a larger rate overflows the basis (every step skipped); more steps never end; a
                # larger prior pins w to the population's
                raise RunConfigError(f"{setting(key, value)} is above {ceiling:g}; the defaults are of order 1")
        if self.client_lr < MIN_CLIENT_LR:  # the server divides the mean update by it: the noise overflows
            raise RunConfigError(f"{setting('client-lr', self.client_lr)} is below {MIN_CLIENT_LR:g}; the default "
                                 "is 1")
        if self.server_lr_schedule not in SCHEDULES:
            raise RunConfigError(f"{setting('server-lr-schedule')} must be one of {SCHEDULES} or \"\" (the privacy "
                                 f"mode's default), got {self.server_lr_schedule!r}")
        if self.eval_every < 0:
            raise RunConfigError(f"{setting('eval-every')} must be >= 0 (0 = only after the last round), "
                                 f"got {self.eval_every}")
        if not 0 <= self.l2 <= MAX_L2:
            raise RunConfigError(f"{setting('l2')} must be a number in [0, {MAX_L2:g}], got {self.l2}")
        if not 0 <= self.seed < 2**32:
            raise RunConfigError(f"{setting('seed')} must be in [0, 2**32), got {self.seed}")
        if self.server_optimizer not in SERVER_OPTIMIZERS:
            raise RunConfigError(f"{setting('server-optimizer')} must be one of {SERVER_OPTIMIZERS}, "
                                 f"got {self.server_optimizer!r}")
        if self.privacy_mode not in PRIVACY_MODES:
            raise RunConfigError(f"{setting('privacy-mode')} must be one of {PRIVACY_MODES}, got {self.privacy_mode!r}")
        if self.privacy_mode != "none" and self.eval_every and not self.allow_uncovered_eval:
            raise RunConfigError(
                f"{setting('eval-every', self.eval_every)} under privacy mode {self.privacy_mode!r}: federated "
                "evaluation releases per-node accuracy sums that the accountant does not cover; set "
                f"{setting('eval-every', 0)} (evaluate only after the last round) or opt in with "
                f"{setting('allow-uncovered-eval', True)}")
        if self.progress not in PROGRESS_STYLES:
            raise RunConfigError(f"{setting('progress')} must be one of {PROGRESS_STYLES}, got {self.progress!r}")
        if self.objective not in OBJECTIVES:
            raise RunConfigError(f"{setting('objective')} must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.weight_by not in WEIGHTINGS:
            raise RunConfigError(f"{setting('weight-by')} must be one of {WEIGHTINGS}, got {self.weight_by!r}")
        if self.weight_by == "pair" and self.privacy_mode != "none":
            raise RunConfigError(
                f"{setting('weight-by', 'pair')} under privacy mode {self.privacy_mode!r}: a DP mode bounds each "
                f"user's (or pair's) contribution by its clip norm, which would undo the weights; use "
                f"{setting('weight-by', 'user')} (the default there)")
        if self.objective == "marginal" and self.privacy_mode != "none":
            raise RunConfigError(
                f"{setting('objective', 'marginal')} under privacy mode {self.privacy_mode!r}: the DP clip norm and "
                f"server rate are calibrated for the joint update only; use {setting('objective', 'joint')} with DP")
        if not self.run_dir:
            raise RunConfigError(f"{setting('run-dir')} is empty: the server needs a directory for its checkpoints")

    @property
    def is_dp(self) -> bool:
        return self.privacy_mode != "none"

    def check_population(self, seen_users: int, dim: int, source: str) -> None:
        """The settings that depend on the pair file (`source`: D-dimensional, `seen_users` seen users): the basis
        size B <= D, and at most every seen user per round."""
        if self.rank > dim:
            raise RunConfigError(f"{setting('rank', self.rank)} is more than the embedding width D = {dim} of "
                                 f"{source}: the basis size B must be <= D; choose B <= {dim} (LoRe uses a handful)")
        if self.clients_per_round > seen_users:
            raise RunConfigError(f"{setting('clients-per-round', self.clients_per_round)} is more than the "
                                 f"{seen_users} seen users of {source}; lower it")

    def privacy_settings(self, population_size: int, dim: int) -> PrivacySettings:
        """The run's validated privacy settings for a population of N training users with D-dimensional embeddings
        (raises RunPrivacyConfigError, a PrivacyConfigError that names run-config keys)."""
        return run_privacy_settings(self.privacy_mode, self.privacy, self.clients_per_round, self.rank,
                                    self.rounds, population_size, dim)

    def new_optimizer(self) -> ServerSGD | ServerAdam:
        """The run's server optimizer, fresh: its rate, schedule over the planned rounds and tail average."""
        return make_optimizer(self.server_optimizer, self.server_lr, self.rounds, self.server_lr_schedule)

    def fixed_optimizer_keys(self) -> frozenset[str]:
        """release_optimizer's keys that this run's mode sets whatever is given: local_steps under record mode and
        the marginal objective (federation.protocol.local_steps refuses another value)."""
        return frozenset({"local_steps"}) if self.privacy_mode == "record" or self.objective == "marginal" \
            else frozenset()

    def release_optimizer(self) -> dict:
        """The public server step settings the release record is written with (server/release_record.py)."""
        return {"name": self.server_optimizer, "server_lr": self.server_lr, "client_lr": self.client_lr,
                "local_steps": self.local_steps, "l2": self.l2, "rounds": self.rounds,
                "schedule": self.server_lr_schedule}

    def fingerprint(self) -> dict:
        """What a resumed run must share with the run that wrote the checkpoint. Timeouts may change, and so may the
        evaluation's personal prior: it only post-processes the basis (a DP run checkpointed when its default was 3
        resumes under today's default)."""
        fields = asdict(self)
        for volatile in ("run_dir", "min_nodes", "round_timeout", "rounds", "progress", "prior_pairs"):
            fields.pop(volatile)
        return fields


def chosen_privacy(mode: str, privacy: dict, population_size: int) -> dict:
    """The privacy fields given (privacy_config) less those equal to the mode's defaults for N training users: a
    resume that repeats a default as a flag (`--noise-multiplier 1` on a run begun without it) is the same run, and
    a tester's was refused."""
    defaults = {name: value for name, value in PRIVACY_DEFAULTS.items() if mode in DP_FIELDS.get(name, USER_MODES)}
    if mode in USER_MODES:
        defaults.update(clip_norm=FEDERATED_CLIP_NORM, delta=user_delta(population_size) if population_size else None)
    if "target_epsilon" in privacy:
        defaults.pop("noise_multiplier", None)  # solved from the target: a z given beside it is not the default
    return {name: value for name, value in privacy.items()
            if isinstance(value, bool) or name not in defaults or value != defaults[name]}


def run_privacy_settings(mode: str, privacy: dict, clients_per_round: int, rank: int, rounds: int,
                         population_size: int, dim: int) -> PrivacySettings:
    """A run's validated privacy settings from its run-config fields, for N training users with D-dimensional
    embeddings; the server calls it, and an audit with the fields a checkpoint holds (their names unchanged since
    checkpoints had them). In DP user modes m = clients-per-round is the expected Poisson count; mode `none` and
    `record` sample a fixed count with the experiment's seeded sampler, which no user-level accountant relies on.
    In `user+secagg` the accountant also needs the dimension B*D of the released sum."""
    fields = {"mode": mode, **privacy, "population_size": int(population_size), "rounds": rounds}
    if mode in ("user", "user+secagg"):
        fields["clients_per_round"] = clients_per_round
        fields.setdefault("clip_norm", FEDERATED_CLIP_NORM)
    if mode == "user+secagg":
        fields["dimension"] = int(rank * dim)
    try:
        return validate(PrivacySettings(**fields))
    except PrivacyConfigError as exc:
        raise RunPrivacyConfigError(exc.spelled(_as_key)) from exc


def _typed(cfg: dict, key: str, kind: type, value=None):
    """cfg[key] (or `value`, read from it) by `federation.protocol.config_number`, the clients' parser too."""
    return config_number(key, cfg[key] if value is None else value, kind)


def _flag(cfg: dict, key: str) -> bool:
    """A boolean run-config key (absent = false): true/false, never a truthy string such as "false"."""
    value = cfg.get(key, False)
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    if not isinstance(value, bool):
        raise RunConfigError(f"{setting(key)} must be true or false, got {value!r}")
    return value


def _or_default(value, default, cfg: dict):
    """A run-config value, or the privacy mode's default where it is "" (not given)."""
    return default(str(cfg["privacy-mode"])) if value == "" else value
