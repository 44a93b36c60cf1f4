"""Who takes part in a round and how their updates become one: the seam the privacy modes replace.

An aggregator samples users (global indices into the population) and turns the accepted per-user updates
(k, B, D) into the mean update (B, D) that the server optimizer consumes.
- `none`: a seeded uniform sample of `clients-per-round` users without replacement (reproducible; its RNG state is
  checkpointed) and the plain mean of the received updates. The server sees every user's update.
- `user` (docs/privacy.md §2): Poisson sampling with a secret RNG, per-user flat clip (re-checked here after the
  client's), Gaussian noise on the sum, fixed denominator q*N (`UserDpAggregator`, numpy pieces from
  `lore_core.privacy.dp_fedavg`).
- `user+secagg` (docs/privacy.md §2b): the same sampler; the noise is the users' own discrete Gaussian shares, added
  on their devices before masking, so the server only divides the secure sum by q*N (`DistributedDpAggregator`;
  `lore_core.privacy.distributed_dp`).
- `record`: the clients' updates are already DP-SGD outputs (per pair); the server samples as in `none` (no
  user-level accountant relies on it) and takes the plain mean, no user-level noise.
"""

from __future__ import annotations

import numpy as np

from lore_core.privacy.privacy_settings import PrivacySettings
from server.run_settings import RunConfigError, ServerSettings


class NoPrivacyAggregator:
    mode = "none"

    def __init__(self, clients_per_round: int, seed: int) -> None:
        self.clients_per_round = clients_per_round
        self.rng = np.random.Generator(np.random.PCG64(seed))

    def sample(self, population_size: int) -> np.ndarray:
        """Sorted global user indices of this round's participants."""
        size = min(self.clients_per_round, population_size)
        return np.sort(self.rng.choice(population_size, size=size, replace=False))

    def aggregate(self, updates: np.ndarray, population_size: int) -> np.ndarray | None:
        """Mean of the accepted updates (k, B, D) -> (B, D); None when nothing was accepted (no step)."""
        return updates.mean(axis=0) if updates.shape[0] else None

    def state_dict(self) -> dict:
        return {"sampler": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["sampler"]


class UserDpAggregator:
    """DP-FedAvg (docs/privacy.md §2): Poisson(q = m/N) users from a secret RNG; per-user flat clip to C, N(0, (zC)^2) on
    the sum, divided by the fixed q*N. The RNG is secret, so its state is never checkpointed (a resumed run draws
    a fresh secret seed)."""

    mode = "user"

    def __init__(self, clients_per_round: int, noise_multiplier: float, clip_norm: float,
                 rng: np.random.Generator | None = None) -> None:
        from lore_core.privacy.dp_fedavg import make_private_rng

        self.clients_per_round, self.noise_multiplier, self.clip_norm = clients_per_round, noise_multiplier, clip_norm
        self.rng = rng if rng is not None else make_private_rng()

    def sample_rate(self, population_size: int) -> float:
        return min(1.0, self.clients_per_round / population_size)

    def sample(self, population_size: int) -> np.ndarray:
        from lore_core.privacy.dp_fedavg import poisson_sample

        return poisson_sample(population_size, self.sample_rate(population_size), self.rng)

    def aggregate(self, updates: np.ndarray, population_size: int) -> np.ndarray:
        """Always a noisy step, also with no accepted update (pure noise): skipping would leak who answered."""
        from lore_core.privacy.dp_fedavg import clip_updates

        clipped, _ = clip_updates(updates, self.clip_norm)
        return self.noisy_mean(clipped.sum(axis=0), population_size)

    def noisy_mean(self, clipped_sum: np.ndarray, population_size: int) -> np.ndarray:
        """(sum of clipped updates (B, D) + N(0, (zC)^2)) / (q N): the release of both the Message-API path and the
        SecAgg+ path, whose server only ever holds the sum."""
        from lore_core.privacy.dp_fedavg import add_noise_to_sum

        noisy = add_noise_to_sum(clipped_sum, self.noise_multiplier, self.clip_norm, self.rng)
        return noisy / (self.sample_rate(population_size) * population_size)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class DistributedDpAggregator(UserDpAggregator):
    """User-level DP with the distributed discrete Gaussian (docs/privacy.md §2b): Poisson(q = m/N) users from a
    secret RNG as `UserDpAggregator`; the users add the noise, so the server's release is the unmasked sum / (q N).
    `aggregate` runs the users' side (`encode_shares`, the client code) and the server's decoding without the
    masks, which cancel exactly: the mechanism a round releases, for audits and in-process benchmarks."""

    mode = "user+secagg"

    def __init__(self, clients_per_round: int, noise_multiplier: float, clip_norm: float, dropout_tolerance: float,
                 rng: np.random.Generator | None = None) -> None:
        super().__init__(clients_per_round, noise_multiplier, clip_norm, rng=rng)
        self.dropout_tolerance = dropout_tolerance
        self.encoding = None  # DdgEncoding of the run (set by the SecAgg+ workflow, or `for_audit`)
        self.privacy: PrivacySettings | None = None  # `for_audit`: the settings whose one step is audited

    @classmethod
    def for_audit(cls, privacy: PrivacySettings) -> "DistributedDpAggregator":
        """The aggregator of validated `user+secagg` settings with the grid of one user per node, all N nodes."""
        from lore_core.privacy.distributed_dp import plan_encoding

        aggregator = cls(privacy.clients_per_round, privacy.noise_multiplier, privacy.clip_norm,
                         privacy.dropout_tolerance)
        aggregator.encoding = plan_encoding(privacy.clip_norm, privacy.noise_multiplier, 1, privacy.population_size,
                                            privacy.population_size)
        aggregator.privacy = privacy
        return aggregator

    def one_step_epsilon(self) -> float:
        """The accountant's epsilon of one unsampled round (q = 1) of this mechanism (the mechanism audit's claim)."""
        from lore_core.privacy.ddg_accounting import ddg_epsilon

        return ddg_epsilon([(self.noise_multiplier, 1.0, 1)], self.privacy.delta, self.privacy.dimension)[0]

    def aggregate(self, updates: np.ndarray, population_size: int) -> np.ndarray:
        from lore_core.privacy.distributed_dp import decode_sum, encode_shares, share_std

        std = share_std(self.noise_multiplier, self.clip_norm, len(updates), self.dropout_tolerance)
        shares = encode_shares(updates, self.encoding, std)
        return self.noisy_mean(decode_sum(shares.sum(axis=0) * self.encoding.granularity, self.encoding),
                               population_size)

    def noisy_mean(self, noisy_sum: np.ndarray, population_size: int) -> np.ndarray:
        """The unmasked sum, noise included, / (q N)."""
        return noisy_sum / (self.sample_rate(population_size) * population_size)

    def pure_noise_mean(self, shape: tuple[int, ...], population_size: int) -> np.ndarray:
        """A round without a usable secure sum: a data-free N(0, (zC)^2) step from the server, so every round
        releases one noisy step (whether a sum arrived is not told)."""
        return super().noisy_mean(np.zeros(shape), population_size)


class RecordMeanAggregator(NoPrivacyAggregator):
    """Record mode: seeded uniform sample, plain mean of the clients' DP-SGD updates."""

    mode = "record"


Aggregator = NoPrivacyAggregator | UserDpAggregator | DistributedDpAggregator | RecordMeanAggregator


def make_aggregator(settings: ServerSettings, privacy: PrivacySettings) -> Aggregator:
    """The aggregator of the run's validated privacy settings (`ServerSettings.privacy_settings`)."""
    if privacy.mode == "none":
        return NoPrivacyAggregator(settings.clients_per_round, settings.seed)
    if privacy.mode == "record":
        return RecordMeanAggregator(settings.clients_per_round, settings.seed)
    if privacy.mode in ("user", "user+secagg"):
        from lore_core.privacy.dp_fedavg import make_private_rng

        # Never the experiment seed: a secret seed, or the debug seed of a run the ledger marks NOT PRIVATE.
        rng = make_private_rng(privacy.noise_seed if privacy.reproducible_noise else None)
        if privacy.mode == "user+secagg":
            return DistributedDpAggregator(privacy.clients_per_round, privacy.noise_multiplier, privacy.clip_norm,
                                           privacy.dropout_tolerance, rng=rng)
        return UserDpAggregator(privacy.clients_per_round, privacy.noise_multiplier, privacy.clip_norm, rng=rng)
    raise RunConfigError(f"privacy mode {privacy.mode!r} has no aggregator")
