"""A LoRe-shaped pair file with a known truth, for benchmarks and tests (no text, no embedder).

Users' rewards are r_u = w_u . A* e with a hidden rank-K basis A* (K x D) and Dirichlet weights; labels are sampled
from the Bradley-Terry model, so the oracle (true A*, true w) is below 1. Knobs that make a population hard:
  isotropic           embeddings with no preferred direction (default: anisotropic, like differences of normalised
                      sentence embeddings: a few strong directions, a long tail, which is where the rewards live)
  personalization     1 = every user draws its own Dirichlet weights; 0 = every user has the population weights;
                      between, a mix (weak personalization)
  responses_per_turn  2 = independent pairs; R > 2 = PRISM-style turns: R responses, the user picks one (Gumbel
                      choice = Bradley-Terry / Plackett-Luce), and the chosen is paired with each of the other R - 1,
                      so the pairs of a turn share a response. `group` names the turn.
  label_noise         share of labels flipped at random, beyond Bradley-Terry
Train and test rows are whole groups, as `prepare` splits whole conversations.

Large populations of independent pairs are written without being held (`write_synthetic_pairs`, peak memory a few
hundred MB plus ~40 bytes per pair): the diffs are drawn in chunks twice from the same random stream, once for the label scale (a
statistic of all pairs) and once to write them, so the file is the one `make_synthetic_pairs` builds in memory.

    python -m simulations.synthetic_pairs --seen-users N --out FILE [--unseen-users M] [--dim D]
        [--train-pairs LO-HI] [--few-shot-pairs K] [--test-pairs T] [--true-rank K] [--seed S]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from lore_core.atomic_io import atomic_save_npz
from lore_core.pairs import PairSet, save_pairs
from lore_core.prism_schema import GROUND_TRUTH_FILE

CHUNK_VALUES = 1 << 23  # diff values drawn at a time (64 MB of float64)


@dataclass(frozen=True)
class SyntheticPairsConfig:
    dim: int = 384
    true_rank: int = 5
    seen_users: int = 200
    unseen_users: int = 50
    train_pairs: tuple[int, int] = (30, 50)  # per seen user, inclusive range
    few_shot_pairs: int = 10  # per unseen user
    test_pairs: int = 20  # per user
    heterogeneity: float = 0.5  # Dirichlet concentration of users' weights (small = diverse users)
    logit_scale: float = 5.0  # larger = less label noise (oracle accuracy up)
    seed: int = 0
    isotropic: bool = False
    personalization: float = 1.0
    responses_per_turn: int = 2
    label_noise: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.personalization <= 1.0:
            raise ValueError(f"personalization must be in [0, 1], got {self.personalization}")
        if self.responses_per_turn < 2:
            raise ValueError(f"responses_per_turn must be >= 2, got {self.responses_per_turn}")
        if not 0.0 <= self.label_noise < 0.5:
            raise ValueError(f"label_noise must be in [0, 0.5), got {self.label_noise}")


@dataclass(frozen=True)
class SyntheticTruth:
    basis: np.ndarray  # (K, D)
    user_ids: np.ndarray  # (U,)
    user_weights: np.ndarray  # (U, K)


@dataclass(frozen=True)
class _Population:
    """Everything of a synthetic population but its diffs, which `_diff_chunks` draws (twice, identically)."""

    config: SyntheticPairsConfig
    mixing: np.ndarray  # (D, D): a diff is mixing @ g, g standard normal
    diff_rng_state: dict  # the generator's state just before the diffs are drawn
    user_ids: np.ndarray  # (U,) zero-padded so that string order is index order (the file is sorted by user)
    user_idx: np.ndarray  # (n,) rows grouped by user
    is_test: np.ndarray  # (n,)
    seen_users: np.ndarray  # (U,)
    sign: np.ndarray | None = None  # (n,) +1 where the first response is chosen
    logit: np.ndarray | None = None  # (n,) true logit of the drawn order
    truth: SyntheticTruth | None = None


def _draw_population(config: SyntheticPairsConfig):
    """Users and their pair counts, without labels; returns (population, rng, extra, true basis (K, D) before
    scaling, user weights (U, K), train pairs per user (U,)). `extra` draws the newer knobs, so the default stream
    (and every population made before them) is unchanged."""
    rng = np.random.default_rng(config.seed)
    extra = np.random.default_rng([config.seed, 7])
    dim, k = config.dim, config.true_rank
    spectrum = np.ones(dim) if config.isotropic else 1.0 / np.sqrt(1.0 + np.arange(dim))
    rotation, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    mixing = rotation * spectrum  # (D, D); d = mixing @ g
    true_basis = rng.standard_normal((k, dim)) @ mixing.T  # anisotropic: rewards live in the strong directions
    user_count = config.seen_users + config.unseen_users
    width = max(5, len(str(user_count - 1)))
    user_ids = np.array([f"user{i:0{width}d}" for i in range(user_count)])
    weights = rng.dirichlet(np.full(k, config.heterogeneity), size=user_count)
    if config.personalization < 1.0:
        population_w = extra.dirichlet(np.ones(k))
        weights = config.personalization * weights + (1.0 - config.personalization) * population_w
    seen = np.arange(user_count) < config.seen_users
    train_counts = np.where(
        seen, rng.integers(config.train_pairs[0], config.train_pairs[1] + 1, size=user_count), config.few_shot_pairs
    )
    counts = train_counts + config.test_pairs
    user_idx = np.repeat(np.arange(user_count), counts)
    first_test = np.repeat(np.cumsum(counts) - config.test_pairs, counts)  # each user: train rows, then test rows
    is_test = np.arange(user_idx.size) >= first_test
    population = _Population(config, mixing, rng.bit_generator.state, user_ids, user_idx, is_test, seen)
    return population, rng, extra, true_basis, weights, train_counts


def _raw_chunks(population: _Population, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """The pair diffs before labelling, (rows, D) float64 chunks in row order, drawn from `rng`."""
    n, dim = population.user_idx.size, population.config.dim
    rows = max(1, CHUNK_VALUES // dim)
    for start in range(0, n, rows):
        raw = rng.standard_normal((min(rows, n - start), dim)) @ population.mixing.T
        raw /= np.linalg.norm(raw, axis=1, keepdims=True) / np.sqrt(2.0)  # |d| ~ distance of two unit embeddings
        yield raw


def _labelled(config: SyntheticPairsConfig) -> _Population:
    """Independent pairs: draw the population and its Bradley-Terry labels (one pass over the diffs, none kept)."""
    population, rng, extra, true_basis, weights, _ = _draw_population(config)
    basis_scores = np.concatenate([raw @ true_basis.T for raw in _raw_chunks(population, rng)])  # (n, K)
    scale = config.logit_scale / basis_scores.std()
    logit = scale * np.einsum("nk,nk->n", basis_scores, weights[population.user_idx])
    chosen_first = rng.random(population.user_idx.size) < 1.0 / (1.0 + np.exp(-logit))
    sign = np.where(chosen_first, 1.0, -1.0)
    if config.label_noise:
        sign *= np.where(extra.random(sign.size) < config.label_noise, -1.0, 1.0)
    truth = SyntheticTruth(basis=true_basis * scale, user_ids=population.user_ids, user_weights=weights)
    return replace(population, sign=sign, logit=logit * sign, truth=truth)


def _diff_chunks(population: _Population) -> Iterator[np.ndarray]:
    """The labelled diffs (rows, D) float32, drawn again from the state the labels were computed on."""
    rng = np.random.default_rng()
    rng.bit_generator.state = population.diff_rng_state
    start = 0
    for raw in _raw_chunks(population, rng):
        yield (raw * population.sign[start:start + len(raw), None]).astype(np.float32)
        start += len(raw)


def make_synthetic_pairs(config: SyntheticPairsConfig = SyntheticPairsConfig()) -> tuple[PairSet, SyntheticTruth]:
    if config.responses_per_turn > 2:
        return _turn_pairs(config)
    population = _labelled(config)
    pairs = _pair_set(np.concatenate(list(_diff_chunks(population))), population.user_ids, population.user_idx,
                      population.is_test, population.seen_users, population.logit,
                      np.arange(population.user_idx.size))
    return pairs, population.truth


def _pair_set(diff, user_ids, user_idx, is_test, seen_users, logit, group_within_user) -> PairSet:
    """The PairSet of generated pairs (row-aligned arrays); `group` is the user id and `group_within_user`."""
    return PairSet(diff=diff.astype(np.float32, copy=False), user=user_ids[user_idx],
                   split=np.where(is_test, "test", "train"), seen=seen_users[user_idx],
                   logit_true=logit.astype(np.float32),
                   group=np.char.add(user_ids[user_idx], np.char.add("-", group_within_user.astype(str))),
                   source="synthetic")


def _turn_pairs(config: SyntheticPairsConfig) -> tuple[PairSet, SyntheticTruth]:
    """PRISM-style turns (in memory): R responses per turn, the chosen one paired with each of the others."""
    population, _, extra, true_basis, weights, train_counts = _draw_population(config)
    emb, turn_user, turn_test = _turn_responses(extra, population.mixing, train_counts, config.test_pairs,
                                                config.responses_per_turn)
    scale = config.logit_scale / ((emb[:, 0] - emb[:, 1]) @ true_basis.T).std()
    diff, turn = _chosen_pairs(extra, emb, scale * true_basis, weights[turn_user])
    user_idx, is_test = turn_user[turn], turn_test[turn]
    logit = scale * np.einsum("nk,nk->n", diff @ true_basis.T, weights[user_idx])
    sign = np.ones(user_idx.size)  # the chosen response is already first
    if config.label_noise:
        sign *= np.where(extra.random(user_idx.size) < config.label_noise, -1.0, 1.0)
    user_ids = population.user_ids
    pairs = _pair_set(diff * sign[:, None], user_ids, user_idx, is_test, population.seen_users, logit * sign, turn)
    return pairs, SyntheticTruth(basis=true_basis * scale, user_ids=user_ids, user_weights=weights)


def _turn_responses(rng, mixing, train_counts, test_pairs, responses):
    """PRISM-style turns: per user ceil(n / (R - 1)) train turns and ceil(test / (R - 1)) test turns, each of R unit
    response embeddings. Returns embeddings (T, R, D), each turn's user (T,) and test flag (T,)."""
    per_turn = responses - 1
    train_turns = -(-train_counts // per_turn)
    test_turns = -(-test_pairs // per_turn)
    turn_user = np.repeat(np.arange(train_counts.size), train_turns + test_turns)
    turn_test = np.concatenate([np.r_[np.zeros(t, bool), np.ones(test_turns, bool)] for t in train_turns])
    emb = rng.standard_normal((turn_user.size, responses, mixing.shape[0])) @ mixing.T
    return emb / np.linalg.norm(emb, axis=2, keepdims=True), turn_user, turn_test


def _chosen_pairs(rng, emb, basis, turn_weights):
    """The user picks one response per turn by Gumbel-max over its rewards (Bradley-Terry for every pair); the
    chosen is paired with each of the others. emb (T, R, D), basis (K, D) in logit units, turn_weights (T, K).
    Returns diffs (T * (R-1), D) chosen - other, and each pair's turn (T * (R-1),)."""
    n_turns, responses, _ = emb.shape
    reward = np.einsum("trd,kd,tk->tr", emb, basis, turn_weights)
    chosen = np.argmax(reward + rng.gumbel(size=reward.shape), axis=1)
    others = np.array([[j for j in range(responses) if j != c] for c in range(responses)])[chosen]  # (T, R-1)
    rows = np.arange(n_turns)[:, None]
    diff = emb[rows, chosen[:, None]] - emb[rows, others]  # (T, R-1, D)
    return diff.reshape(-1, emb.shape[2]), np.repeat(np.arange(n_turns), responses - 1)


def write_synthetic_pairs(config: SyntheticPairsConfig, path: str | Path) -> tuple[Path, SyntheticTruth]:
    """The pair file of `make_synthetic_pairs(config)`, streamed to `path` (sorted by user). Independent pairs
    carry no `group` array here (each pair is its own group, which is what a missing group means)."""
    from lore_core.pair_columns import pair_file_writer

    if config.responses_per_turn > 2:
        pairs, truth = make_synthetic_pairs(config)
        return save_pairs(pairs, path), truth
    population = _labelled(config)
    n, idx = population.user_idx.size, population.user_idx
    path = Path(path)
    with pair_file_writer(path) as out:
        with out.column("diff", np.float32, (n, config.dim)) as diff:
            for chunk in _diff_chunks(population):
                diff.write(chunk)
        with out.column("user", population.user_ids.dtype, (n,)) as user:
            for start in range(0, n, 1 << 20):
                user.write(population.user_ids[idx[start:start + (1 << 20)]])
        out.array("split", np.where(population.is_test, "test", "train"))
        out.array("seen", population.seen_users[idx])
        out.array("logit_true", population.logit.astype(np.float32))
    return path, population.truth


def write_synthetic_dataset(directory: str | Path, config: SyntheticPairsConfig) -> Path:
    """Write `pairs.npz` and its truth `ground_truth.npz` (basis in logit units, logit_scale 1, user_id,
    user_weights: the arrays `lore-fed synth` writes that readers of a truth use) into `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    pairs, truth = make_synthetic_pairs(config)
    atomic_save_npz(directory / GROUND_TRUTH_FILE, basis=truth.basis.astype(np.float32), user_id=truth.user_ids,
                    user_weights=truth.user_weights, logit_scale=np.float64(1.0), embedder=np.str_("synthetic"))
    return save_pairs(pairs, directory)


def main(argv: list[str] | None = None) -> int:
    defaults = SyntheticPairsConfig()
    parser = argparse.ArgumentParser(description="Write a synthetic LoRe pair file with a known truth (streamed).")
    parser.add_argument("--seen-users", type=int, required=True)
    parser.add_argument("--unseen-users", type=int, default=None, help="new users (default: seen users / 10)")
    parser.add_argument("--out", required=True, help="pair file to write (.npz)")
    parser.add_argument("--dim", type=int, default=defaults.dim)
    parser.add_argument("--true-rank", type=int, default=defaults.true_rank)
    parser.add_argument("--train-pairs", default="-".join(map(str, defaults.train_pairs)),
                        help="training pairs per seen user, LO-HI (default %(default)s)")
    parser.add_argument("--few-shot-pairs", type=int, default=defaults.few_shot_pairs)
    parser.add_argument("--test-pairs", type=int, default=defaults.test_pairs)
    parser.add_argument("--heterogeneity", type=float, default=defaults.heterogeneity)
    parser.add_argument("--logit-scale", type=float, default=defaults.logit_scale)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    args = parser.parse_args(argv)
    low, _, high = args.train_pairs.partition("-")
    if not (low.isdigit() and (high or low).isdigit() and 0 < int(low) <= int(high or low)):
        parser.error(f"--train-pairs must be LO-HI with 0 < LO <= HI, got {args.train_pairs!r}")
    for name in ("seen_users", "dim", "true_rank", "few_shot_pairs", "test_pairs"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    unseen = args.seen_users // 10 if args.unseen_users is None else args.unseen_users
    if unseen < 0:
        parser.error("--unseen-users must be >= 0")
    config = SyntheticPairsConfig(dim=args.dim, true_rank=args.true_rank, seen_users=args.seen_users,
                                  unseen_users=unseen, train_pairs=(int(low), int(high or low)),
                                  few_shot_pairs=args.few_shot_pairs, test_pairs=args.test_pairs,
                                  heterogeneity=args.heterogeneity, logit_scale=args.logit_scale, seed=args.seed)
    started = time.perf_counter()
    path, _ = write_synthetic_pairs(config, args.out)
    print(f"wrote {path} ({path.stat().st_size / 2**20:.0f} MiB, {args.seen_users} seen + {unseen} new users) "
          f"in {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
