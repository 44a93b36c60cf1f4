"""A device's own privacy limits, set by its owner in the node config (`flower-supernode --node-config`), which no
server message can loosen.

Record mode's guarantee is computed on the device from the z, q and steps it really runs, but the budget it stops
at (max-epsilon) and the delta it checks it at come from the server's messages, and so does a debug noise seed,
which hands whoever chose it the noise. A node that sets these keys holds its users to its own budget whatever the
server sends:

- `record-max-epsilon` and `record-delta` (together): record mode trains a user only while its per-pair epsilon at
  the tighter of the two deltas stays within the tighter of the two budgets (the server's and the node's);
- `allow-noise-seed` (default false): a deployed node (one with a `data-path`) refuses a server's noise seed in
  every mode unless this is true. Simulated nodes are the simulation's own and accept it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

RECORD_MAX_EPSILON = "record-max-epsilon"
RECORD_DELTA = "record-delta"
ALLOW_NOISE_SEED = "allow-noise-seed"
MAX_EPSILON_LIMIT = 100.0  # beyond it epsilon promises nothing (as `lore-fed privacy epsilon --max-epsilon`)


class NodeLimitError(ValueError):
    """A node config this device cannot run under, or a server request its limits refuse."""


@dataclass(frozen=True)
class NodeLimits:
    record_max_epsilon: float | None = None
    record_delta: float | None = None
    allow_noise_seed: bool = False
    deployed: bool = False

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> NodeLimits:
        """The limits in a node config, validated (NodeLimitError names the key and what it must be)."""
        max_epsilon = _positive(node_config, RECORD_MAX_EPSILON, upper=MAX_EPSILON_LIMIT, closed=True)
        delta = _positive(node_config, RECORD_DELTA, upper=1.0, closed=False)
        if (max_epsilon is None) != (delta is None):
            given = RECORD_DELTA if max_epsilon is None else RECORD_MAX_EPSILON
            raise NodeLimitError(f"node config: set {RECORD_MAX_EPSILON} and {RECORD_DELTA} together (a budget is "
                                 f"an (epsilon, delta) pair); got only {given}")
        allow = node_config.get(ALLOW_NOISE_SEED, False)
        if isinstance(allow, str) and allow.lower() in ("true", "false"):
            allow = allow.lower() == "true"
        if not isinstance(allow, bool):
            raise NodeLimitError(f"node config: {ALLOW_NOISE_SEED} must be true or false; got {allow!r}")
        return cls(max_epsilon, delta, allow, deployed=bool(node_config.get("data-path")))

    def record_budget(self, server_max_epsilon: float | None, server_delta: float) -> tuple[float | None, float]:
        """(max epsilon, delta) a record-mode user is checked at: the tighter of the server's and the node's."""
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
