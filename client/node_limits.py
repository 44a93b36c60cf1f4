"""A device's own privacy limits, set by its owner in the node config (`flower-supernode --node-config`), which no
server message can loosen.

Record mode's guarantee is computed on the device from the z, q and steps it really runs, but the budget it stops
at (max-epsilon) and the delta it checks it at come from the server's messages, and so does a debug noise seed,
which hands whoever chose it the noise. A node that sets these keys holds its users to its own budget whatever the
server sends:

- `record-max-epsilon` and `record-delta` (together): record mode trains a user only while its per-pair epsilon at
  the tighter of the two deltas stays within the tighter of the two budgets (the server's and the node's). Such a
  node takes part in record-mode training only (a train message of another mode, whose update carries no noise of
  the device's own, is refused) and answers no evaluation (per-node accuracy sums no accountant covers) unless
  `allow-evaluate` is true;
- `allow-noise-seed` (default false): a deployed node (one with a `data-path`) refuses a server's noise seed in
  every mode unless this is true. Simulated nodes are the simulation's own and accept it.
A server value that is not a finite positive number (a NaN budget compared False: no stop) is refused. Not covered:
`user+secagg` shares are sized from the server's z, sampled count and drop-out tolerance; that mode assumes an
honest-but-curious server, and these limits do not harden it. This module is client code that Flower ships to the
device in the run's app bundle: the limits hold against a server's messages, not against a submitter who ships
other client code (a device that must not trust it runs only bundles it has checked).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

from lore_core.privacy.privacy_settings import MIN_DELTA

RECORD_MAX_EPSILON = "record-max-epsilon"
RECORD_DELTA = "record-delta"
ALLOW_NOISE_SEED = "allow-noise-seed"
ALLOW_EVALUATE = "allow-evaluate"
MAX_EPSILON_LIMIT = 100.0  # beyond it epsilon promises nothing (as `lore-fed privacy epsilon --max-epsilon`)
MIN_RECORD_DELTA = MIN_DELTA  # the server's floor too: below it Opacus' PRV accountant fails on long histories


class NodeLimitError(ValueError):
    """A node config this device cannot run under, or a server request its limits refuse."""


@dataclass(frozen=True)
class NodeLimits:
    record_max_epsilon: float | None = None
    record_delta: float | None = None
    allow_noise_seed: bool = False
    deployed: bool = False
    allow_evaluate: bool = True

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> NodeLimits:
        """The limits in a node config, validated (NodeLimitError names the key and what it must be)."""
        max_epsilon = _positive(node_config, RECORD_MAX_EPSILON, upper=MAX_EPSILON_LIMIT, closed=True)
        delta = _positive(node_config, RECORD_DELTA, upper=1.0, closed=False)
        if delta is not None and delta < MIN_RECORD_DELTA:  # every train message failed in the accountant
            raise NodeLimitError(f"node config: {RECORD_DELTA} must be at least {MIN_RECORD_DELTA:g} (the "
                                 f"accountant cannot compute epsilon below it); got {delta:g}")
        if (max_epsilon is None) != (delta is None):
            given = RECORD_DELTA if max_epsilon is None else RECORD_MAX_EPSILON
            raise NodeLimitError(f"node config: set {RECORD_MAX_EPSILON} and {RECORD_DELTA} together (a budget is "
                                 f"an (epsilon, delta) pair); got only {given}")
        # default: answer evaluations unless a record budget is set; an explicit value wins either way
        allow_evaluate = _flag(node_config, ALLOW_EVALUATE) if ALLOW_EVALUATE in node_config else max_epsilon is None
        return cls(max_epsilon, delta, _flag(node_config, ALLOW_NOISE_SEED),
                   deployed=bool(node_config.get("data-path")), allow_evaluate=allow_evaluate)

    @property
    def record_only(self) -> bool:
        return self.record_max_epsilon is not None

    def check_mode(self, mode: str) -> None:
        """A node with a record budget trains in record mode only: in another mode its update leaves without the
        device's own noise, whatever the budget says."""
        if self.record_only and mode != "record":
            raise NodeLimitError(f"this device takes part in record-mode training only (its node config sets "
                                 f"{RECORD_MAX_EPSILON}); the server asked for privacy mode {mode!r}")

    def check_evaluate(self) -> None:
        if not self.allow_evaluate:
            raise NodeLimitError(f"this device answers no evaluation: per-node accuracy sums are not covered by its "
                                 f"record budget (set {ALLOW_EVALUATE}=true in its node config to allow them)")

    def record_budget(self, server_max_epsilon: float | None, server_delta: float) -> tuple[float | None, float]:
        """(max epsilon, delta) a record-mode user is checked at: the tighter of the server's and the node's."""
        if server_max_epsilon is not None and not (math.isfinite(server_max_epsilon) and server_max_epsilon > 0):
            raise NodeLimitError(f"the server's max-epsilon must be a finite number > 0; got {server_max_epsilon}")
        if not (math.isfinite(server_delta) and 0 < server_delta < 1):
            raise NodeLimitError(f"the server's delta must be a finite number in (0, 1); got {server_delta}")
        if self.record_max_epsilon is None:
            return server_max_epsilon, server_delta
        budget = self.record_max_epsilon if server_max_epsilon is None else min(server_max_epsilon,
                                                                                self.record_max_epsilon)
        return budget, min(server_delta, self.record_delta)

    def noise_seed(self, seed: Any) -> int | None:
        """The server's debug noise seed, refused on a deployed node that does not allow one: whoever knows the
        seed knows the noise, so the node's updates would not be private."""
        if seed is None:
            return None
        if self.deployed and not self.allow_noise_seed:
            raise NodeLimitError(f"the server sent a noise seed (reproducible noise is NOT private); this device "
                                 f"refuses it (set {ALLOW_NOISE_SEED}=true in its node config for a debug run)")
        return int(seed)


def _flag(node_config: Mapping[str, Any], key: str) -> bool:
    """A node config boolean (true/false, or the strings "true"/"false"); absent: False."""
    value = node_config.get(key, False)
    if isinstance(value, str) and value.lower() in ("true", "false"):
        value = value.lower() == "true"
    if not isinstance(value, bool):
        raise NodeLimitError(f"node config: {key} must be true or false; got {value!r}")
    return value


def _positive(node_config: Mapping[str, Any], key: str, *, upper: float, closed: bool) -> float | None:
    """A node config number in (0, upper] (closed) or (0, upper); None when the key is absent."""
    if key not in node_config:
        return None
    value = node_config[key]
    try:
        number = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        number = math.nan
    if not (math.isfinite(number) and number > 0 and (number <= upper if closed else number < upper)):
        bound = f"at most {upper:g}" if closed else f"below {upper:g}"
        raise NodeLimitError(f"node config: {key} must be a number above 0 and {bound}; got {value!r}")
    return number
