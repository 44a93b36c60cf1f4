"""Stress benchmark matrix: does personalization ever hurt, and where does it help?

    python -m simulations.bench_matrix [--seeds 0,1,2] [--populations NAME,...] [--rows NAME,...] [--quick]
                                       [--rerun NAME,...] [--work runs/bench_matrix] [--out bench_results]
                                       [--name matrix]

Populations vary one factor at a time around a base (isotropic D = 384, true rank 4, 300 seen users with 20-40
training pairs, 100 new users with 10 few-shot pairs, 20 test pairs each, strong personalization): embeddings
(anisotropic), pairs per user (5-15, 150-250), personalization (weak, zero: every user the same w), PRISM-style
shared responses (three pairs per turn share the chosen response), label noise, many thin users (1,400 x 5-15), and
the PRISM-shaped `lore-fed synth` population (MiniLM embeddings, cached; its seed is the split seed of `prepare`).
Rows per population and seed:
  bt          `lore-fed train --rank 1`: one shared reward (Bradley-Terry)
  published   the published LoRe recipe (simulations/published_baseline.py) at ranks 1, 2, 4, 8; the matrix shows
              its best rank on the test set (mean over seeds), the bar to clear
  train       `lore-fed train` with default flags
  simulate    `lore-fed simulate --privacy none` with the rank, l2 and personal prior `train` chose, through the real
              ServerApp strategy and ClientApp on the in-process grid (simulations/in_process_grid.py); defaults otherwise
  simulate_dp the same with user-level DP at epsilon 3 (delta 1e-5), only where N >= 1,000 seen users; the personal
              prior is `simulate`'s DP default (DP_PRIOR_PAIRS, chosen on DP pilots), not `train`'s
  bt_dp       `lore-fed simulate --rank 1` under the same DP: one shared reward trained with the same privacy, the
              reference a DP run must not fall below
  true_basis  the true basis, only w fit (the ceiling of any learned basis); oracle: true basis and true w
Seen and new (unseen) test accuracy, mean and standard error over seeds. Each cell is cached as JSON under --work,
so a rerun only computes what is missing, the `--rerun` rows, and a federated row whose `train` (or `bt`) row now
chooses otherwise than when it ran (`FOLLOWS`: rank, l2, personal prior, objective and weighting for `simulate`;
rank and l2 for the DP rows; a federated row cached without that record reruns once). Seeds >= 100 are pilot seeds
(defaults are chosen on them, never on the reported seeds 0-2); the PRISM-shaped pilot is another `lore-fed synth`
population (seed 101).
`--quick`: small populations (D = 64, a fifth of the users), one seed, short runs; a smoke test of the harness.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from lore_core.atomic_io import atomic_write_json, atomic_write_text
from lore_core.pairs import PAIRS_FILENAME, load_pairs, save_pairs
from lore_core.prism_schema import population_written
from lore_core.simplex_fit import DP_PRIOR_PAIRS
from simulations.synthetic_pairs import SyntheticPairsConfig, make_synthetic_pairs

ROOT = Path(__file__).resolve().parents[1]
BASE = SyntheticPairsConfig(isotropic=True, true_rank=4, seen_users=300, unseen_users=100, train_pairs=(20, 40),
                            few_shot_pairs=10, test_pairs=20)
PUBLISHED_RANKS = (1, 2, 4, 8)
ROWS = ("bt", "published", "train", "simulate", "bt_dp", "simulate_dp", "true_basis", "oracle")
DP_MIN_USERS = 1000
DP_EPSILON = 3.0
DP_FLAGS = ["--privacy", "user", "--target-epsilon", str(DP_EPSILON)]
PRISM_USERS = 2400
PRISM_SEED, PRISM_PILOT_SEED = 1, 101  # `lore-fed synth` seeds of the reported and the pilot population


@dataclass(frozen=True)
class Population:
    name: str
    description: str
    synthetic: SyntheticPairsConfig | None = None  # None: the PRISM-shaped `lore-fed synth` population
    federated: dict = field(default_factory=dict)  # rounds, clients-per-round


POPULATIONS = (
    Population("iso-20-40", "base: isotropic D=384, rank 4, 300 x 20-40 pairs, 10 few-shot", BASE),
    Population("iso-150-250", "150-250 pairs per seen user, 20 few-shot",
               replace(BASE, train_pairs=(150, 250), few_shot_pairs=20)),
    Population("iso-5-15", "5-15 pairs per seen user", replace(BASE, train_pairs=(5, 15))),
    Population("aniso-20-40", "anisotropic embeddings (sentence-embedding-like spectrum)",
               replace(BASE, isotropic=False)),
    Population("iso-weak", "weak personalization (w = 0.3 own + 0.7 population)", replace(BASE, personalization=0.3)),
    Population("iso-zero", "no personalization: every user the same w", replace(BASE, personalization=0.0)),
    Population("iso-shared", "PRISM-style turns: 4 responses, 3 pairs share the chosen one",
               replace(BASE, responses_per_turn=4)),
    Population("iso-noise", "20 % of labels flipped", replace(BASE, label_noise=0.2)),
    Population("iso-5-15-1400", "1,400 seen users x 5-15 pairs, 200 new users",
               replace(BASE, seen_users=1400, unseen_users=200, train_pairs=(5, 15))),
    Population("prism-synth", f"`lore-fed synth --users {PRISM_USERS}` (PRISM-shaped, MiniLM), split seed = seed"),
)


# --- populations --------------------------------------------------------------------------------------------------
def population_file(pop: Population, seed: int, work: Path, quick: bool) -> tuple[Path, np.ndarray | None]:
    """The population's pair file for `seed` (built once, cached) and its true basis in logit units."""
    if pop.synthetic is None:
        return prism_file(seed, work, quick)
    config = replace(pop.synthetic, seed=seed)
    if quick:
        config = replace(config, dim=64, seen_users=max(40, config.seen_users // 5),
                         unseen_users=max(10, config.unseen_users // 5))
    path = work / "data" / pop.name / f"seed{seed}" / PAIRS_FILENAME
    pairs, truth = make_synthetic_pairs(config)
    if not path.exists():
        save_pairs(pairs, path)
    return path, truth.basis


def prism_file(seed: int, work: Path, quick: bool) -> tuple[Path, np.ndarray | None]:
    """`lore-fed synth` (once per synth seed) -> `prepare --split-seed seed` -> `embed` (MiniLM, cached)."""
    from lore_core.evaluation import load_true_basis
    from lore_cli.main import main as cli

    synth_seed = PRISM_PILOT_SEED if seed >= 100 else PRISM_SEED
    users = 300 if quick else PRISM_USERS
    release = work / "data" / "prism-synth" / f"release-users{users}-seed{synth_seed}"
    dataset = work / "data" / "prism-synth" / f"users{users}-seed{synth_seed}-split{seed}"
    if not population_written(release):
        _check(cli(["synth", "--users", str(users), "--seed", str(synth_seed), "--out", str(release)]), "synth")
    if not (dataset / PAIRS_FILENAME).exists():
        _check(cli(["prepare", str(release), "--out", str(dataset), "--split-seed", str(seed)]), "prepare")
        _check(cli(["embed", str(dataset)]), "embed")
    return dataset / PAIRS_FILENAME, load_true_basis(dataset / PAIRS_FILENAME)


def _check(code: int, stage: str) -> None:
    if code != 0:
        raise RuntimeError(f"`lore-fed {stage}` failed (exit {code})")


# --- rows ---------------------------------------------------------------------------------------------------------
def train_row(path: Path, run_dir: Path, flags: list[str]) -> dict:
    """`lore-fed train PAIRS --out RUN_DIR [flags]`; its metrics.json."""
    from lore_cli.main import main as cli

    started = time.perf_counter()
    _check(cli(["train", str(path), "--out", str(run_dir), *flags]), "train")
    return train_row_of(json.loads((run_dir / "metrics.json").read_text()), time.perf_counter() - started)


TRAIN_CHOICE = ("rank", "l2", "prior_pairs", "objective", "weight_by")  # what `lore-fed train` chose (metrics.json)


def train_choice(train: dict, weight_by: str) -> dict:
    """What a federated row takes from a `train` row: its choice (the TRAIN_CHOICE keys it holds; rows cached before
    the weighting was recorded lack it) with the weighting the row runs under."""
    return {**{k: v for k, v in train.items() if k in TRAIN_CHOICE}, "weight_by": weight_by}


def train_row_of(metrics: dict, seconds: float) -> dict:
    """The matrix's record of a `lore-fed train` run from its metrics.json: accuracies, choice, references."""
    keep = ("seen_test_acc", "unseen_test_acc", *TRAIN_CHOICE, "oracle_seen_test_acc", "oracle_unseen_test_acc",
            "true_basis_seen_test_acc", "true_basis_unseen_test_acc", "seen_test_expected_acc",
            "unseen_test_expected_acc")
    return {**{k: metrics[k] for k in keep if k in metrics}, "seconds": seconds}


def published_row(path: Path, quick: bool) -> dict:
    """The published recipe at each rank of PUBLISHED_RANKS: {"by_rank": {rank: {seen, unseen}}}."""
    from lore_core.evaluation import weights_for
    from lore_core.reward_math import mean_user_accuracy
    from simulations.published_baseline import published_few_shot, published_fit

    pairs = load_pairs(path)
    train, few = pairs.select(seen=True, split="train"), pairs.select(seen=False, split="train")

    def accuracy(part, basis, ids, weights):
        w = weights_for(part.user, ids, weights)
        u_ids, u_idx = np.unique(part.user, return_inverse=True)
        return mean_user_accuracy(np.einsum("nb,nb->n", part.diff @ basis.T, w), u_idx, u_ids.size)

    out, started = {}, time.perf_counter()
    for rank in PUBLISHED_RANKS:
        basis, ids, weights = published_fit(train.diff, train.user, rank, iterations=200 if quick else 1000)
        u_ids, u_w = published_few_shot(basis, few.diff, few.user, iterations=100 if quick else 500)
        out[str(rank)] = {"seen_test_acc": accuracy(pairs.select(seen=True, split="test"), basis, ids, weights),
                          "unseen_test_acc": accuracy(pairs.select(seen=False, split="test"), basis, u_ids, u_w)}
    return {"by_rank": out, "seconds": time.perf_counter() - started}


def federated_settings(pop: Population, n_seen: int, quick: bool, private: bool = False) -> dict:
    """Rounds and users per round of the matrix's federated runs: without privacy `lore-fed simulate --privacy
    none`'s defaults (600 rounds of every seen user, at most 1,000: the marginal update needs the rounds: 300 left up
    to 1.4 points on the iso-5-15-1400 pilots, seeds 101-103, 600 at most 0.3; before 0.2.5 a fifth of the users a
    round, bench_results/matrix.md); under DP the project's recipe for populations of about 1,400 (200 rounds of 100
    users, README)."""
    from lore_cli.simulate_command import NONPRIVATE_ROUNDS, default_users_per_round

    if quick:
        return {"rounds": 40, "clients_per_round": max(4, n_seen // 5)}
    if private:
        return {"rounds": 200, "clients_per_round": 100}
    return {"rounds": NONPRIVATE_ROUNDS, "clients_per_round": default_users_per_round("none", n_seen), **pop.federated}


def objective_flags(chosen: dict, privacy: list[str]) -> list[str]:
    """`--objective` of the federated run: the one `train` chose; under DP the joint update (the only one the DP
    defaults are calibrated for)."""
    private = privacy[privacy.index("--privacy") + 1] != "none"
    return ["--objective", "joint" if private else chosen.get("objective", "joint")]


def simulate_row(path: Path, run_dir: Path, chosen: dict, fed: dict, privacy: list[str],
                 extra: tuple[str, ...] = (), keep_messages: bool = False) -> dict:
    """`lore-fed simulate` with the settings `chosen` by `lore-fed train`, every other flag at its default (or as
    the `extra` flags set it: pilots), through the real ServerApp strategy and ClientApp handlers on the in-process
    grid (no Ray; `keep_messages` as LocalGrid's, for `bench_rounds_memory` to show what keeping them costs)."""
    import logging

    from flwr.common.config import get_fused_config_from_dir

    from client.client_app import app as client_app
    from lore_cli.simulate_command import configure, run_overrides
    from server.run_settings import ServerSettings
    from server.server_app import run_federated
    from simulations.flower_run import nodes_for
    from simulations.in_process_grid import LocalGrid  # the real apps, sequential, no Ray

    parser = argparse.ArgumentParser()
    configure(parser)  # the flags of `lore-fed simulate`, so every default is the command's own
    prior = ["--prior-pairs", str(chosen["prior_pairs"])] if "prior_pairs" in chosen else []
    private = privacy[privacy.index("--privacy") + 1] != "none"  # DP weighs users equally (the clip bounds each)
    # `train`'s weighting (a row cached before it was recorded: user); under DP simulate's default, user
    weighting = [] if private else ["--weight-by", chosen.get("weight_by", "user")]
    args = parser.parse_args([str(path), "--rounds", str(fed["rounds"]), "--clients-per-round",
                              str(fed["clients_per_round"]), "--rank", str(chosen["rank"]), "--l2", str(chosen["l2"]),
                              *prior, "--out", str(run_dir), *privacy, *objective_flags(chosen, privacy), *weighting,
                              *extra])
    pairs = load_pairs(path)
    seen_train = pairs.seen & (pairs.split == "train")
    overrides = {**run_overrides(args, int(np.unique(pairs.user[pairs.seen]).size), int(seen_train.sum())),
                 "progress": "log"}
    n_users = int(np.unique(pairs.user).size)
    nodes = nodes_for(n_users)
    cfg = get_fused_config_from_dir(ROOT, {**overrides, "pairs-path": str(path.resolve()),
                                           "run-dir": str(run_dir.resolve()), "min-nodes": nodes})
    grid = LocalGrid(client_app, [{"partition-id": i, "num-partitions": nodes} for i in range(nodes)], cfg,
                     keep_messages=keep_messages)
    logging.getLogger("flwr").setLevel(logging.WARNING)
    started = time.perf_counter()
    settings = ServerSettings.from_run_config(cfg)
    state = run_federated(grid, settings)
    evals = [r for r in state.history if "seen_test_acc" in r]
    last = evals[-1]
    out = {"seen_test_acc": last["seen_test_acc"], "unseen_test_acc": last["unseen_test_acc"],
           "rounds": fed["rounds"], "clients_per_round": fed["clients_per_round"], "rank": chosen["rank"],
           "prior_pairs": settings.prior_pairs, "local_steps": settings.local_steps, "server_lr": settings.server_lr,
           "seconds": time.perf_counter() - started}
    tail = [r for r in evals if r["round"] > 3 * fed["rounds"] // 4]
    if len(tail) > 1:  # how much the reported model moves between evaluations over the last quarter of the run
        out["swing_seen"] = max(r["seen_test_acc"] for r in tail) - min(r["seen_test_acc"] for r in tail)
        out["swing_unseen"] = max(r["unseen_test_acc"] for r in tail) - min(r["unseen_test_acc"] for r in tail)
    if "epsilon" in state.history[-1]:
        out["epsilon"] = state.history[-1]["epsilon"]
    return out


def ceiling_rows(path: Path, true_basis: np.ndarray | None) -> dict:
    from lore_core.evaluation import reference_metrics, true_basis_metrics

    pairs = load_pairs(path)
    out = {"oracle": {}, "true_basis": {}}
    for key, value in reference_metrics(pairs).items():
        if key.startswith("oracle_"):
            out["oracle"][key.removeprefix("oracle_")] = value
    if true_basis is not None and true_basis.shape[1] == pairs.dim:
        for key, value in true_basis_metrics(pairs, true_basis).items():
            out["true_basis"][key.removeprefix("true_basis_")] = value
    return out


def run_cell(pop: Population, seed: int, rows: tuple[str, ...], work: Path, quick: bool,
             rerun: tuple[str, ...] = ()) -> dict:
    """All rows of one population and seed; each row cached in WORK/results/POP/seedS.json, except the `rerun`
    rows, recomputed (a federated row also follows its source row's choice, `due`)."""
    cache = work / "results" / pop.name / f"seed{seed}.json"
    done = json.loads(cache.read_text()) if cache.exists() else {}
    if {"true_basis", "oracle"} & set(rerun):
        rerun = (*rerun, "true_basis", "oracle")  # computed together
    done = {row: value for row, value in done.items() if row not in rerun}
    rows = tuple(dict.fromkeys(rows + rerun))  # a row to rerun is a row to run
    path, true_basis = population_file(pop, seed, work, quick)
    runs = work / "runs" / pop.name / f"seed{seed}"

    def save(row: str, value: dict) -> None:
        done[row] = value
        atomic_write_json(cache, done)
        print(f"  {pop.name} seed {seed} {row}: {_brief(value)}", flush=True)

    if {"true_basis", "oracle"} & set(rows) and "oracle" not in done:
        for row, value in ceiling_rows(path, true_basis).items():
            save(row, value)
    if "bt" in rows and "bt" not in done:
        save("bt", train_row(path, runs / "bt", ["--rank", "1", "--seed", str(seed)]))
    if "train" in rows and "train" not in done:
        save("train", train_row(path, runs / "train", ["--seed", str(seed)]))
    if "published" in rows and "published" not in done:
        save("published", published_row(path, quick))
    n_seen = int(np.unique(load_pairs(path).select(seen=True, split="train").user).size)
    fed = federated_settings(pop, n_seen, quick)

    def due(row: str, plan: dict) -> bool:
        return row in rows and due_after_source(row, done, plan)

    if due("simulate", fed):
        save("simulate", {**simulate_row(path, _fresh(runs / "simulate"), done["train"], fed, ["--privacy", "none"]),
                          "source_choice": source_choice("simulate", done)})
    if n_seen < DP_MIN_USERS:
        return done
    dp_fed = federated_settings(pop, n_seen, quick, private=True)
    for row, source in (("bt_dp", "bt"), ("simulate_dp", "train")):
        old_prior = row == "simulate_dp" and done.get(row, {}).get("prior_pairs") != DP_PRIOR_PAIRS  # an older default
        if due(row, dp_fed) or (row in rows and source in done and old_prior):
            chosen = source_choice(row, done)  # rank and l2; the personal prior: simulate's DP default
            save(row, {**simulate_row(path, _fresh(runs / row), chosen, dp_fed, DP_FLAGS), "source_choice": chosen})
    rescored_prior = done.get("simulate_dp", {}).get("at_train_prior", {}).get("train_prior", {}).get("prior_pairs")
    if "simulate_dp" in done and "train" in done and rescored_prior != done["train"]["prior_pairs"]:
        save("simulate_dp", {**done["simulate_dp"], "at_train_prior": rescored(
            path, runs / "simulate_dp", done["train"]["prior_pairs"])})
    return done


# Each federated row: the row whose choice it takes, and what it takes (DP rows keep simulate's DP personal prior
# and the joint objective).
FOLLOWS = {"simulate": ("train", TRAIN_CHOICE),
           "bt_dp": ("bt", ("rank", "l2")), "simulate_dp": ("train", ("rank", "l2"))}


def source_choice(row: str, done: dict) -> dict:
    """What the federated `row` takes from the cell's row it follows."""
    source, keys = FOLLOWS[row]
    return {k: done[source][k] for k in keys if k in done[source]}


def other_steps(row: dict, chosen: dict) -> bool:
    """A cached `simulate --privacy none` row that ran other local steps than `simulate` now takes by default for
    `train`'s choice (one under pair weighting since lore-fed 0.2.1); a row without the record ran 0.2.0's default."""
    from federation.protocol import JOINT_LOCAL_STEPS, local_steps

    config = {"objective": chosen.get("objective", "joint"), "weight-by": chosen.get("weight_by", "user"),
              "privacy-mode": "none"}
    ran = row.get("local_steps", 1 if config["objective"] == "marginal" else JOINT_LOCAL_STEPS)
    return ran != local_steps({**config, "local-steps": ""})


# The server rate without privacy that a cached row not recording its rate ran (every default until now).
RATE_BEFORE_RECORDED = 1.0


def other_rate(row: dict) -> bool:
    """A cached `simulate --privacy none` row that ran another server rate than today's default (a pilot of another
    rate wrote into a benchmark's cache)."""
    from server.optimizer import default_server_lr

    return row.get("server_lr", RATE_BEFORE_RECORDED) != default_server_lr("none")


def stale(row: dict, choice: dict, private: bool = False, fed: dict | None = None) -> bool:
    """A cached federated row run with a choice its source no longer makes (a rerun `train` that chose otherwise), or
    with other local steps than `simulate` now takes for that choice (`other_steps`), or (without privacy: `private`
    False) another server rate than its default (`other_rate`), or other rounds or users per round than `fed` (a row
    cached before 0.2.5's default of every user)."""
    other_plan = fed is not None and any(row.get(key) != fed[key] for key in ("rounds", "clients_per_round"))
    return (row.get("source_choice") != choice or other_steps(row, choice) or (not private and other_rate(row))
            or other_plan)


def due_after_source(row: str, done: dict, fed: dict | None = None) -> bool:
    """The federated `row` can run (its source row is done) and is missing or `stale` (against the plan `fed`)."""
    return FOLLOWS[row][0] in done and (row not in done or stale(done[row], source_choice(row, done),
                                                                 private=row != "simulate", fed=fed))


def rescored(path: Path, run_dir: Path, prior_pairs: float) -> dict:
    """The run's reported basis (from its checkpoint) scored with another personal prior by `lore_core.evaluation`:
    post-processing of the same DP release, so the two priors are compared on one noise draw."""
    from lore_core.evaluation import evaluate_model
    from server.checkpoint import load_checkpoint
    from server.optimizer import reported_basis

    state = load_checkpoint(run_dir)
    basis = reported_basis(state.optimizer, state.basis)
    pairs = load_pairs(path)
    out = {}
    for role, prior in (("train_prior", prior_pairs), ("dp_prior", DP_PRIOR_PAIRS)):
        metrics = evaluate_model(pairs, basis, prior_pairs=prior)
        out[role] = {"prior_pairs": prior, "seen_test_acc": metrics["seen_test_acc"],
                     "unseen_test_acc": metrics["unseen_test_acc"]}
    return out


def _fresh(run_dir: Path) -> Path:
    """A run directory without a previous (possibly unfinished) run: cells are recomputed from round 1."""
    import shutil

    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    return run_dir


def _brief(value: dict) -> str:
    if "by_rank" in value:
        return ", ".join(f"B={r}: {v['seen_test_acc']:.3f}/{v['unseen_test_acc']:.3f}" for r, v in
                         value["by_rank"].items())
    seen, unseen = value.get("seen_test_acc"), value.get("unseen_test_acc")
    extra = f" rank {value['rank']}" if "rank" in value else ""
    rescore = value.get("at_train_prior", {}).get("train_prior")
    if rescore:  # the DP row saved again with its basis rescored, not a second run
        extra += (f"; rescored at `train`'s prior ({rescore['prior_pairs']:g} pairs): "
                  f"{rescore['seen_test_acc']:.3f} / {rescore['unseen_test_acc']:.3f}")
    return f"{seen:.3f} / {unseen:.3f}{extra}" if seen is not None else json.dumps(value)


# --- the matrix ---------------------------------------------------------------------------------------------------
def _mean_se(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return math.nan, math.nan
    se = float(np.std(values, ddof=1) / math.sqrt(len(values))) if len(values) > 1 else math.nan
    return float(np.mean(values)), se


def row_values(cells: dict[int, dict], row: str, best_published: str | None) -> dict[int, dict]:
    """{seed: {"seen_test_acc", "unseen_test_acc"}} of one row (published: at its best rank)."""
    out = {}
    for seed, cell in cells.items():
        if row == "published" and "published" in cell:
            out[seed] = cell["published"]["by_rank"][best_published]
        elif row in ("true_basis", "oracle") and cell.get(row):
            out[seed] = {"seen_test_acc": cell[row].get("seen_test_acc"),
                         "unseen_test_acc": cell[row].get("unseen_test_acc")}
        elif row in cell:
            out[seed] = cell[row]
    return out


def best_published_rank(cells: dict[int, dict]) -> str | None:
    """The published recipe's best rank on the test set: mean of seen and new accuracy over seeds."""
    ranks = [c["published"]["by_rank"] for c in cells.values() if "published" in c]
    if not ranks:
        return None
    return max(ranks[0], key=lambda r: np.mean([(x[r]["seen_test_acc"] + x[r]["unseen_test_acc"]) / 2
                                                 for x in ranks]))


def pilot_choices(pop: Population, work: Path) -> list[dict]:
    """What `lore-fed train` chose on the population's pilot seeds (>= 100) found in the cache: the settings an
    honest federated run of this kind of population would take from its public pilot."""
    out = []
    for file in sorted((work / "results" / pop.name).glob("seed*.json")):
        seed = int(file.stem.removeprefix("seed"))
        train = json.loads(file.read_text()).get("train")
        if seed >= 100 and train:
            out.append({"seed": seed, **{k: train[k] for k in ("rank", "l2", "prior_pairs")},
                        "objective": train.get("objective", "joint")})
    return out


def summarize(pop: Population, cells: dict[int, dict], work: Path) -> dict:
    best = best_published_rank(cells)
    summary = {"population": pop.name, "description": pop.description, "seeds": sorted(cells), "rows": {},
               "published_best_rank": best, "pilot_choices": pilot_choices(pop, work)}
    for row in ROWS:
        values = row_values(cells, row, best)
        if not values:
            continue
        entry = {}
        for group in ("seen", "unseen"):
            mean, se = _mean_se([v.get(f"{group}_test_acc") for v in values.values()])
            entry[group] = {"mean": mean, "se": se}
        if row in ("train", "simulate", "simulate_dp"):
            entry["ranks"] = [values[s].get("rank") for s in sorted(values)]
        if row in ("bt", "train"):  # wall seconds of the command (a shared machine: a rough guide)
            entry["median_seconds"] = float(np.median([values[s]["seconds"] for s in sorted(values)]))
        if row == "train":
            entry["l2"] = [values[s].get("l2") for s in sorted(values)]
            entry["prior_pairs"] = [values[s].get("prior_pairs") for s in sorted(values)]
            entry["objectives"] = [values[s].get("objective", "joint") for s in sorted(values)]
        rescores = [values[s]["at_train_prior"] for s in sorted(values) if "at_train_prior" in values[s]]
        if rescores:  # the same DP bases scored with train's prior and with the DP default (paired)
            entry["rescored"] = {role: {g: float(np.mean([r[role][f"{g}_test_acc"] for r in rescores]))
                                        for g in ("seen", "unseen")} for role in ("train_prior", "dp_prior")}
        if row in ("simulate", "simulate_dp", "bt_dp"):
            for key in ("swing_seen", "swing_unseen", "epsilon"):
                got = [values[s][key] for s in sorted(values) if key in values[s]]
                if got:
                    entry[key] = float(np.max(got)) if key.startswith("swing") else float(np.mean(got))
        summary["rows"][row] = entry
    summary["checks"] = done_when(cells, best)
    return summary


def _differences(cells: dict[int, dict], a: str, b: str, group: str, best: str | None) -> dict[int, float]:
    """Row a minus row b, per seed."""
    va, vb = row_values(cells, a, best), row_values(cells, b, best)
    return {s: va[s][f"{group}_test_acc"] - vb[s][f"{group}_test_acc"] for s in sorted(set(va) & set(vb))}


def _paired(cells: dict[int, dict], a: str, b: str, group: str, best: str | None) -> tuple[float, float]:
    """Mean and SE over seeds of row a minus row b."""
    return _mean_se(list(_differences(cells, a, b, group, best).values()))


def done_when(cells: dict[int, dict], best: str | None) -> dict:
    """The issue's criteria for this population (None where a row is missing)."""
    checks = {}
    for group in ("seen", "unseen"):
        gain, se = _paired(cells, "train", "bt", group, best)
        ceiling, _ = _paired(cells, "true_basis", "bt", group, best)
        over_pub, _ = _paired(cells, "train", "published", group, best)
        fed, _ = _paired(cells, "simulate", "train", group, best)
        checks[group] = {
            "train_minus_bt": gain, "train_minus_bt_se": se,
            "train_minus_bt_by_seed": _differences(cells, "train", "bt", group, best),
            "within_2se_of_bt_or_above": None if math.isnan(gain) else bool(gain >= 0 or gain >= -2 * (se or 0)),
            "ceiling_minus_bt": ceiling,
            "two_points_where_ceiling_5": None if math.isnan(ceiling) or math.isnan(gain) else (
                bool(gain >= 0.02) if ceiling >= 0.05 else "n/a (ceiling < 5 points)"),
            "train_minus_published_best": over_pub,
            "at_or_above_published": None if math.isnan(over_pub) else bool(over_pub >= 0),
            "simulate_minus_train": fed,
            "federated_within_1_point": None if math.isnan(fed) else bool(abs(fed) <= 0.01 or fed > 0),
        }
        dp_gain, dp_se = _paired(cells, "simulate_dp", "bt_dp", group, best)
        if not math.isnan(dp_gain):
            checks[group].update(simulate_dp_minus_bt_dp=dp_gain, simulate_dp_minus_bt_dp_se=dp_se)
    return checks


def _subset_flags(args: argparse.Namespace) -> str:
    """The command-line flags that narrow a run to some populations or rows, or rename its output, as typed."""
    defaults = {"populations": ",".join(p.name for p in POPULATIONS), "rows": ",".join(ROWS), "name": "matrix"}
    return "".join(f" --{flag} {getattr(args, flag, default)}" for flag, default in defaults.items()
                   if getattr(args, flag, default) != default)


def markdown(summaries: list[dict], seeds: list[int], args: argparse.Namespace) -> str:
    lines = [f"# Stress matrix (`python -m simulations.bench_matrix{' --quick' if args.quick else ''} "
             f"--seeds {','.join(map(str, seeds))}{_subset_flags(args)}`)", "",
             "Seen / new-user test accuracy, mean ± standard error over seeds "
             f"{', '.join(map(str, seeds))}. `published` is the published recipe at its best rank on the test set "
             "(the bar); `train` is `lore-fed train` with default flags; `simulate` is `lore-fed simulate "
             "--privacy none` with the rank, l2, personal prior, objective and weighting `train` chose (defaults "
             "otherwise; 600 rounds of every seen user, at most 1,000, since lore-fed 0.2.5: a fifth before), "
             f"`simulate_dp` the same under user-level DP at epsilon {DP_EPSILON:g} (only N >= {DP_MIN_USERS:,}; "
             "joint objective, 200 rounds of 100 users, `simulate`'s DP personal prior); `bt_dp` is `simulate "
             "--rank 1` under the same DP, one shared reward trained with the same privacy. "
             "`swing` is the largest change of the reported model's accuracy between evaluations (every 10 rounds) "
             "over the last quarter of a federated run.", ""]
    for s in summaries:
        lines += [f"## {s['population']}: {s['description']}", "",
                  "| row | seen | new | notes |", "|---|---|---|---|"]
        for row, e in s["rows"].items():
            cell = lambda g: f"{e[g]['mean']:.3f} ± {e[g]['se']:.3f}" if not math.isnan(e[g]["se"]) else \
                f"{e[g]['mean']:.3f}"  # noqa: E731
            notes = []
            if row == "published":
                notes.append(f"best rank {s['published_best_rank']}")
            if "ranks" in e:
                notes.append(f"ranks {e['ranks']}")
            if "l2" in e:
                notes.append(f"l2 {[f'{v:.1e}' for v in e['l2']]}, prior pairs {e['prior_pairs']}")
            if "objectives" in e:
                notes.append(f"objectives {e['objectives']}")
            if "median_seconds" in e:
                notes.append(f"median {e['median_seconds']:.0f} s")
            if "swing_seen" in e:
                notes.append(f"swing {e['swing_seen']:.3f} / {e['swing_unseen']:.3f}")
            if "epsilon" in e:
                notes.append(f"epsilon {e['epsilon']:.2f}")
            if "rescored" in e:
                r = e["rescored"]
                notes.append("the same bases rescored: `train`'s prior {:.3f} / {:.3f}, the DP default {:.3f} / "
                             "{:.3f}".format(r["train_prior"]["seen"], r["train_prior"]["unseen"],
                                             r["dp_prior"]["seen"], r["dp_prior"]["unseen"]))
            lines.append(f"| {row} | {cell('seen')} | {cell('unseen')} | {'; '.join(notes)} |")
        if s["pilot_choices"] and not all(c["seed"] in s["seeds"] for c in s["pilot_choices"]):
            lines += ["", "Pilot choice of `lore-fed train` (rank, l2, prior pairs, objective): " + "; ".join(
                f"seed {c['seed']}: {c['rank']}, {c['l2']:.1e}, {c['prior_pairs']:g}, {c['objective']}"
                for c in s["pilot_choices"])]
        by_seed = [s["checks"][g].get("train_minus_bt_by_seed", {}) for g in ("seen", "unseen")]
        if by_seed[0]:
            lines += ["", "`train` - BT by seed (points, seen / new): " + "; ".join(
                f"seed {seed}: {100 * by_seed[0][seed]:+.1f} / {100 * by_seed[1].get(seed, math.nan):+.1f}"
                for seed in by_seed[0])]
        lines += ["", "Criteria (seen / new): " + "; ".join(
            f"{name} {_fmt(s['checks']['seen'][key])} / {_fmt(s['checks']['unseen'][key])}" for name, key in (
                ("train - BT", "train_minus_bt"), ("within 2 SE of BT or above", "within_2se_of_bt_or_above"),
                ("ceiling - BT", "ceiling_minus_bt"), (">= 2 points where ceiling >= 5", "two_points_where_ceiling_5"),
                ("train - published best", "train_minus_published_best"),
                ("simulate - train", "simulate_minus_train"), ("federated within 1 point", "federated_within_1_point"),
                *([("simulate_dp - bt_dp", "simulate_dp_minus_bt_dp"), ("its SE", "simulate_dp_minus_bt_dp_se")]
                  if "simulate_dp_minus_bt_dp" in s["checks"]["seen"] else []))),
            ""]
    return "\n".join(lines) + "\n"


def _fmt(value) -> str:
    if isinstance(value, float):
        return "–" if math.isnan(value) else f"{value:+.3f}"
    return "–" if value is None else str(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated; >= 100 are pilot seeds")
    parser.add_argument("--populations", default=",".join(p.name for p in POPULATIONS))
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--rerun", default="", help="comma-separated rows to recompute although cached (the "
                        "federated rows that follow them rerun where the choice they follow changed)")
    parser.add_argument("--quick", action="store_true", help="small populations, one seed, short runs")
    parser.add_argument("--work", default=None, help="cache of pair files, runs and per-cell results")
    parser.add_argument("--out", default=None, help="directory for NAME.md and NAME.json")
    parser.add_argument("--name", default="matrix")
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.quick and args.seeds == "0,1,2":
        seeds = [0]
    names = args.populations.split(",")
    unknown = sorted(set(names) - {p.name for p in POPULATIONS})
    rows = tuple(args.rows.split(","))
    rerun = tuple(r for r in args.rerun.split(",") if r)
    if unknown or set(rows + rerun) - set(ROWS):
        parser.error(f"unknown populations {unknown} or rows {sorted(set(rows + rerun) - set(ROWS))}")
    work = Path(args.work or ("runs/bench_matrix_quick" if args.quick else "runs/bench_matrix"))
    out = Path(args.out or ("runs/bench_matrix_quick" if args.quick else "bench_results"))
    summaries = []
    for pop in (p for p in POPULATIONS if p.name in names):
        print(f"== {pop.name}: {pop.description}", flush=True)
        cells = {seed: run_cell(pop, seed, rows, work, args.quick, rerun) for seed in seeds}
        summaries.append(summarize(pop, cells, work))
        atomic_write_json(out / f"{args.name}.json", {"seeds": seeds, "quick": args.quick, "populations": summaries})
        atomic_write_text(out / f"{args.name}.md", markdown(summaries, seeds, args))
    print(markdown(summaries, seeds, args))
    print(f"wrote {out / (args.name + '.md')} and {out / (args.name + '.json')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
