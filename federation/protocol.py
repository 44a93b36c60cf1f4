"""The message contract between the lore-fed ServerApp and ClientApp (one source of truth for both sides).

query    server -> node: {}                       node -> server: metrics {partition-id, num-train-users, dim}
train    server -> node: arrays {basis (B, D)}, config {user-indices: [local index, ...], round, privacy-mode,
                          run-id (16 hex digits: names the node's slot for the run's w; absent from a run whose
                          checkpoint predates it, whose nodes name the slot by run-dir),
                          + user modes: clip-norm; + record: noise-multiplier, max-grad-norm, record-batch-size,
                          record-sample-rate, record-epochs, delta[, max-epsilon][, noise-seed (debug, NOT PRIVATE)]}
         node -> server: arrays {updates (k, B, D)}, metrics {num-users: k}     -- nothing else, ever
                         (mode none with run config weight-by pair: each user's update multiplied by its training
                         pairs / pairs-per-user on the node, so the server's mean counts every pair once)
         user+secagg (legacy FitIns through secaggplus_mod): config {user-indices (bytes), round, privacy-mode,
                          [run-id,] clip-norm, noise-multiplier, dropout-tolerance, sampled-users, granularity,
                          clipping-range}; the node uploads its users' noised integer sum, masked
                         record mode: the server adds arrays {dp-history (s, 4): rows (position in user-indices,
                         z, q, steps)}, each sampled user's accountant history as the ledger holds it (a node that
                         lost its state starts from it), and the reply
                         adds arrays {dp-history (s, 4): rows (position in updates, z, q, steps)}:
                         what each sampled user spent this round (the segments it added to its accountant
                         history), which the ledger appends (the public rate and steps: nothing of its pair count)
evaluate server -> node: arrays {basis}, config {round[, run-id]}
         node -> server: metrics {seen-acc-sum, seen-users, unseen-acc-sum, unseen-users[, oracle-*-acc-sum]}
Client settings come from the run config (flat `[tool.flwr.app.config]` keys, shared with the server).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

from lore_core.setting_names import SettingError, setting

ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
BASIS = "basis"
UPDATES = "updates"
USER_INDICES = "user-indices"
ROUND = "round"
RUN_ID = "run-id"
RUN_ID_PATTERN = re.compile(r"[0-9a-f]{16}")
NUM_USERS = "num-users"
DP_HISTORY = "dp-history"
PRIVACY_MODE = "privacy-mode"
CLIP_NORM = "clip-norm"
NOISE_MULTIPLIER = "noise-multiplier"
MAX_GRAD_NORM = "max-grad-norm"
RECORD_BATCH_SIZE = "record-batch-size"
RECORD_SAMPLE_RATE = "record-sample-rate"
RECORD_EPOCHS = "record-epochs"
DELTA = "delta"
MAX_EPSILON = "max-epsilon"
NOISE_SEED = "noise-seed"
DROPOUT_TOLERANCE = "dropout-tolerance"
SAMPLED_USERS = "sampled-users"
GRANULARITY = "granularity"
CLIPPING_RANGE = "clipping-range"
PARTITION_ID = "partition-id"
NUM_TRAIN_USERS = "num-train-users"
DIM = "dim"
EVAL_SUM_KEYS = ("seen-acc-sum", "seen-users", "unseen-acc-sum", "unseen-users")
ORACLE_SUM_KEYS = ("oracle-seen-acc-sum", "oracle-unseen-acc-sum")


@dataclass(frozen=True)
class ClientSettings:
    """What a node needs from the run config."""

    pairs_path: str  # simulation: the shared pair file; empty in deployment (node_config data-path instead)
    train_prior_pairs: float  # training: prior of the w fit before each local step, in pairs (c / n_u per user)
    prior_pairs: float  # evaluation: the personal prior of the final w fit, in pairs (simplex_fit.prior_from_pairs)
    local_steps: int  # 1 with the marginal objective (one exact gradient step)
    client_lr: float
    objective: str = "joint"  # "joint" (w fitted, then local steps) or "marginal" (w integrated out)
    weight_by: str = "user"  # "pair": each user's update (mode none) scaled by its training pairs / pairs_per_user
    pairs_per_user: float = 1.0
    device: str = "cpu"  # record mode: torch device of the DP-SGD step
    canary_nodes: int = 0  # simulation with canaries: the last `canary_nodes` partitions host canary users
    canary_secrets: str = ""  # ... whose directions and coins they read from this file (federation/canary_users.py)

    @classmethod
    def from_run_config(cls, run_config: dict) -> "ClientSettings":
        return cls(
            pairs_path=str(run_config.get("pairs-path", "")),
            train_prior_pairs=float(run_config["train-prior-pairs"]),
            prior_pairs=personal_prior_pairs(run_config),
            local_steps=local_steps(run_config),
            client_lr=float(run_config["client-lr"]),
            objective=str(run_config.get("objective", "joint")),
            weight_by=str(run_config.get("weight-by", "user")),
            pairs_per_user=pairs_per_user(run_config),
            device=str(run_config.get("device", "cpu")),
            canary_nodes=int(run_config.get("canary-nodes", 0) or 0),
            canary_secrets=str(run_config.get("canary-secrets", "")),
        )


# Every seen user has a training pair, so the mean is at least 1; far above any population's, a tester's 1e308 shrank
# every update to nothing and the run ended at chance with exit 0.
PAIRS_PER_USER_RANGE = (1.0, 1e6)


def pairs_per_user(run_config: dict) -> float:
    """`pairs-per-user` where `weight-by` is "pair" (in PAIRS_PER_USER_RANGE; server and clients read it here), else
    1. With weight-by pair a user's update is multiplied by n_u / pairs-per-user, so the server's plain mean over a
    round's users estimates the update of every pair counted once (`lore-fed train --weight-by pair`). It must be the
    seen users' mean training pairs: the updates then keep their usual size, and the server's L2 on the basis, which
    it does not scale, weighs against them as in `train` (a value 100 times too large acted as a 100 times stronger
    L2; a tester)."""
    if str(run_config.get("weight-by", "user")) != "pair":
        if str(run_config.get("pairs-per-user", "")) != "":  # a tester's, silently ignored before
            raise SettingError(f"{setting('pairs-per-user')} is read only with {setting('weight-by', 'pair')}, "
                               "which privacy none alone allows; remove it")
        return 1.0
    if str(run_config.get("privacy-mode")) != "none":
        return 1.0  # (under DP the server refuses weight-by pair itself: server.run_settings)
    value = config_number("pairs-per-user", run_config.get("pairs-per-user", ""), float,
                          " (the seen users' mean training pairs: `lore-fed simulate` sets it, a deployment gives "
                          "it with -c)")
    low, high = PAIRS_PER_USER_RANGE
    if not (math.isfinite(value) and low <= value <= high):
        raise SettingError(f"{setting('pairs-per-user')} must be the seen users' mean training pairs, from {low:g} "
                           f"to {high:g}, got {value!r}")
    return value


# Local steps of a user-weighted joint update (`local-steps` ""): a few steps on the user's own loss per round.
JOINT_LOCAL_STEPS = 5
# Record mode's update is `record-epochs` of DP-SGD, whose step count varies with each user's pairs; the server scales
# it as JOINT_LOCAL_STEPS steps' worth (as it always has: its DP-pilot server rate was chosen so). Not a local-steps
# setting: a record run reports its record-epochs instead.
RECORD_UPDATE_STEPS = JOINT_LOCAL_STEPS


def local_steps(run_config: dict) -> int:
    """The local steps a client takes (server and clients read it here, so the server's pseudo-gradient divides by
    what ran): RECORD_UPDATE_STEPS in record mode, where an explicit value is refused; 1 with the marginal objective,
    whose update is one exact gradient step; else `local-steps`, whose default "" is 1 under weight-by pair and
    JOINT_LOCAL_STEPS under user weighting. A pair-weighted update is multiplied by the user's pairs, which makes the
    round's mean the pair-weighted likelihood's gradient only for one step: five steps on a one-pair user are not
    five times one step's, and on a population of mostly one-pair users the run settled 1.4 / 1.9 points below
    `train` (one step: 0.2 / 0.0; bench_results/federated_steps_pilot.md, pilot seeds)."""
    value = run_config["local-steps"]
    given = None if value == "" else config_number("local-steps", value, int, ' or "" (the weighting\'s default)')
    if str(run_config.get("privacy-mode")) == "record":
        if given is not None:  # a tester: clients ran record-epochs of DP-SGD while the server divided by the given K
            raise SettingError(f"{setting('local-steps', given)} with {setting('privacy-mode', 'record')}: a record-"
                               "mode update is record-epochs of DP-SGD, not local steps; leave local-steps out")
        return RECORD_UPDATE_STEPS
    if str(run_config.get("objective", "joint")) == "marginal":
        if given not in (None, 1):  # a tester's --local-steps 7 (and 0) ran one step with exit 0
            raise SettingError(f"{setting('local-steps', given)} with {setting('objective', 'marginal')}: the "
                               "marginal update is one exact gradient step; leave local-steps out (or 1)")
        return 1
    if given is None:
        pair = str(run_config.get("weight-by", "user")) == "pair" and str(run_config.get("privacy-mode")) == "none"
        return 1 if pair else JOINT_LOCAL_STEPS
    return given


def personal_prior_pairs(run_config: dict) -> float:
    """`prior-pairs`, or where it is "" (the default) the privacy mode's: DEFAULT_PRIOR_PAIRS without privacy,
    DP_PRIOR_PAIRS under DP, whose released basis is noisy (server and clients read it here, so both agree)."""
    from lore_core.simplex_fit import DEFAULT_PRIOR_PAIRS, DP_PRIOR_PAIRS

    value = run_config.get("prior-pairs", "")
    if value == "":
        return DEFAULT_PRIOR_PAIRS if str(run_config["privacy-mode"]) == "none" else DP_PRIOR_PAIRS
    return config_number("prior-pairs", value, float, ' or "" (the privacy mode\'s default)')


def config_number(key: str, value, kind: type = float, alternative: str = ""):
    """A run-config value as int or float, parsed the same way by server and clients: a bool, a non-number or a
    fraction for an int is a ValueError (SettingError) naming its key (the server turns it into RunConfigError:
    exit 2)."""
    try:
        number = None if isinstance(value, bool) else float(value)
    except (TypeError, ValueError):
        number = None
    if number is None or (kind is int and not number.is_integer()):
        raise SettingError(f"{setting(key)} must be {'an integer' if kind is int else 'a number'}{alternative}, "
                           f"got {value!r}")
    return int(number) if kind is int else number


def run_id(config) -> str | None:
    """The run's id from a train or evaluate config (server/checkpoint.py draws it): it names the node's slot for
    the run's w, so anything but 16 hex digits is refused (ValueError); None from a server that sends none."""
    value = config.get(RUN_ID)
    return None if value is None else valid_run_id(value)


def valid_run_id(value, name: str = RUN_ID) -> str:
    """`value` if it is a run id (16 lowercase hex digits), else ValueError naming it `name`; the one check of
    both sides (nodes, and the server reading its checkpoint)."""
    if not isinstance(value, str) or not RUN_ID_PATTERN.fullmatch(value):
        raise ValueError(f"{name} must be 16 lowercase hex digits, got {str(value)[:40]!r}")
    return value


def encode_user_indices(indices: np.ndarray) -> bytes:
    """Local user indices (k,) -> bytes: a legacy FitIns config (SecAgg+ path) holds scalars only, no lists."""
    return np.ascontiguousarray(indices, dtype="<i8").tobytes()


def decode_user_indices(data: bytes) -> np.ndarray:
    if not isinstance(data, bytes) or len(data) % 8:
        raise ValueError(f"user-indices must be int64 bytes, got {type(data).__name__}")
    return np.frombuffer(data, dtype="<i8").astype(np.int64)
