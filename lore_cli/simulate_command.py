"""`lore-fed simulate PAIRS.npz|DATASET --out DIR [--rounds R] [--clients-per-round M] [--rank B] [--privacy MODE ...]`:
federated LoRe through Flower's simulation engine, user-level DP by default (defaults: DEFAULT_ROUNDS rounds,
DEFAULT_CLIENTS_PER_ROUND users per round or all of a smaller population; without privacy NONPRIVATE_ROUNDS rounds
of every seen user, at most NONPRIVATE_MOST_USERS; rank from the run config). Writes
DIR/metrics.json (the final evaluation's keys of `lore-fed train`, the true-basis ceiling on a benchmark, rank,
prior_pairs, objective, train_prior_pairs, l2, pairs_path, pairs_fingerprint, + rounds, wall_seconds, privacy_mode,
and under DP epsilon, epsilon_rdp, delta, noise_multiplier, clip_norm; `reference` when a centralized reference was
given, kept by reruns), DIR/ledger.json (the privacy ledger), DIR/rounds.jsonl, DIR/report.md (+ plot; and the
audits' section when DIR/audits/ holds any) and DIR/checkpoint.npz.
The pair file is read and validated once, here, before Ray starts or DIR is written; the privacy settings are
validated against its population at the same time. DIR is locked for the whole run (a second run on it is refused);
a resume refused under the lock leaves DIR as it was, its lock file included.
Re-running with the same DIR and settings resumes after the last finished round (and continues the ledger)."""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

from lore_cli.main import CommandFailed
from lore_cli.run_data import check_same_pairs, record_pairs, refuse_a_dataset
from lore_core.atomic_io import atomic_write_json, check_output_path
from lore_core.pairs import resolve_pair_path
from lore_core.text_file import json_loads

TRAIN_KEYS = ("seen_test_acc", "unseen_test_acc", "oracle_seen_test_acc", "oracle_unseen_test_acc")
DEFAULT_ROUNDS = 200
DEFAULT_CLIENTS_PER_ROUND = 50  # the DP-FedAvg operating point of docs/privacy.md (m = 50 at N = 1,400)
# Without privacy nothing needs the DP plan's short run of few users; what `--privacy none` runs by default is what
# the stress matrix runs (bench_results/matrix_every_user.md: within 0.3 points of `train`), its rounds chosen on its
# pilots (300 rounds left up to 1.4 points on iso-5-15-1400's, 600 at most 0.3; 200 rounds of 50 users are about
# 7 passes over 1,400 users against about 430 here). Every seen user takes part in every round (0.2.5; a fifth
# before): a fifth left two of nineteen pilot cells more than a point below `train`, where every user closed them
# (bench_results/federated_rounds_pilot_every_user.md). Without privacy nothing is gained by sampling.
NONPRIVATE_ROUNDS = 600
NONPRIVATE_MOST_USERS = 1000  # a round's work stays bounded at scale (the 1,400-user matrix population reaches it)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pairs", help="pair file (.npz) or dataset directory holding pairs.npz")
    parser.add_argument("--out", required=True, help="run directory (resumed if it holds a checkpoint)")
    parser.add_argument("--rounds", type=int, default=None,
                        help=f"federated rounds R (default {DEFAULT_ROUNDS}; with --privacy none {NONPRIVATE_ROUNDS}; "
                             "a rerun on a run directory: that run's, under the same privacy mode)")
    parser.add_argument("--clients-per-round", type=int, default=None,
                        help=f"users sampled per round M (default {DEFAULT_CLIENTS_PER_ROUND}, or every seen user of "
                             f"a smaller population; with --privacy none every seen user, at most "
                             f"{NONPRIVATE_MOST_USERS}; a rerun on a run directory: that run's, under the same "
                             "privacy mode)")
    parser.add_argument("--rank", type=int, default=None, help="basis size B (default: the run config's `rank`)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--users-per-node", default="auto",
                        help="users hosted per virtual node, or 'auto' (1 up to 64 users, else ~50)")
    parser.add_argument("--eval-every", type=int, default=None,
                        help="federated evaluation every E rounds and after the last; 0: only after the last (default: 10 "
                             "without DP; under DP 0, and E > 0 needs --allow-uncovered-eval)")
    add_privacy_arguments(parser)
    parser.add_argument("--reference", default=None, help="`lore-fed train` run dir or metrics.json for the plot")
    parser.add_argument("--l2", type=float, default=None, help="L2 on the basis (default: the trainer's)")
    parser.add_argument("--server-optimizer", choices=["adam", "sgd"], default=None,
                        help="the server's step on the noisy mean update (default adam)")
    parser.add_argument("--server-lr", type=float, default=None,
                        help="server learning rate (default 1.0 without privacy, 0.05 under DP; a resume keeps "
                             "its run's rate)")
    parser.add_argument("--local-steps", type=int, default=None,
                        help="each user's gradient steps on A per round (default 5 with --weight-by user, 1 with pair, "
                             "where one exact step is what the pair weighting scales; always 1 with --objective "
                             "marginal); without it a resume keeps its run's")
    parser.add_argument("--client-lr", type=float, default=None, help="each user's step size on A (default 1.0)")
    parser.add_argument("--prior-pairs", type=float, default=None,
                        help="personal prior of every user's final w fit, in pairs (default 3; 10 under DP, whose "
                             "basis is noisier)")
    parser.add_argument("--objective", default=None, choices=("joint", "marginal"),
                        help="clients' update: joint (fit w, then local steps; default) or marginal (w integrated "
                             "out, one exact step; privacy none only); take the one `lore-fed train` chose")
    parser.add_argument("--train-prior-pairs", type=float, default=None,
                        help="prior of the clients' w fits inside training, in pairs (default 3, as `train`)")
    parser.add_argument("--weight-by", default=None, choices=("user", "pair"),
                        help="each user's update counts in proportion to its training pairs (pair, as `train`; the "
                             "default under --privacy none) or once (user; the only choice, and default, under DP); "
                             "without it a resume keeps its run's weighting")
    parser.add_argument("--canaries", type=int, default=0,
                        help="K canary users for `lore-fed audit canary` (user modes; default 0): each sends the "
                             "clip norm times a secret direction when sampled, if its secret coin says in")
    parser.add_argument("--canary-secrets", default=None,
                        help="file for the canaries' directions and coins, for the auditor alone (outside --out; "
                             "reused when it exists, e.g. on resume)")


def add_privacy_arguments(parser: argparse.ArgumentParser) -> None:
    """The privacy flags of `simulate` (also for `lore-fed demo`). Unset = the mode's default
    (lore_core.privacy.privacy_settings.DEFAULTS); every value is checked by lore_core.privacy.privacy_settings.validate."""
    from lore_core.privacy.privacy_settings import MODES

    parser.add_argument("--privacy", default="user", choices=MODES,
                        help="privacy mode (default user: user-level DP-FedAvg, docs/privacy.md §7)")
    parser.add_argument("--noise-multiplier", type=float, default=None, help="z: noise std on the sum = z * C")
    parser.add_argument("--target-epsilon", type=float, default=None,
                        help="solve z so that the planned rounds reach this epsilon (not with --noise-multiplier)")
    parser.add_argument("--max-epsilon", type=float, default=None,
                        help="refuse a plan above it; stop before a round that would exceed it")
    parser.add_argument("--clip-norm", type=float, default=None, help="C: flat L2 clip of each user's update")
    parser.add_argument("--delta", type=float, default=None, help="delta (default 1e-5, or below 1/(10 N) above 10,000 users; must be < 1/N)")
    parser.add_argument("--max-grad-norm", type=float, default=None, help="record mode: per-pair clip norm")
    parser.add_argument("--record-sample-rate", type=float, default=None,
                        help="record mode: public Poisson rate per pair of each DP-SGD step (default 0.25: int(1/q) = 4 "
                             "steps per epoch)")
    parser.add_argument("--num-shares", type=int, default=None, help="user+secagg: SecAgg+ shares (odd, default 3)")
    parser.add_argument("--reconstruction-threshold", type=int, default=None,
                        help="user+secagg: shares needed to unmask (default 2)")
    parser.add_argument("--dropout-tolerance", type=float, default=None,
                        help="user+secagg: fraction of a round's sampled users that may drop out with the guarantee "
                             "intact (default 0.1; rounds with more are aborted before unmasking)")
    parser.add_argument("--reproducible-noise", action="store_true",
                        help="debug: fixed noise/sampling seed; the run is marked NOT PRIVATE")
    parser.add_argument("--allow-uncovered-eval", action="store_true",
                        help="under DP, evaluate during training (simulate: every --eval-every rounds) although "
                             "evaluation sums are not covered")
    parser.add_argument("--device", default=None, help="record mode: torch device of the DP-SGD step (cpu, cuda)")


def privacy_overrides(args: argparse.Namespace) -> dict:
    """Run-config keys of the privacy flags (server.run_settings.PRIVACY_KEYS); unset flags are left out."""
    values = {"privacy-mode": args.privacy, "noise-multiplier": args.noise_multiplier,
              "target-epsilon": args.target_epsilon, "max-epsilon": args.max_epsilon, "clip-norm": args.clip_norm,
              "delta": args.delta, "max-grad-norm": args.max_grad_norm, "device": args.device,
              "record-sample-rate": args.record_sample_rate,
              "num-shares": args.num_shares, "reconstruction-threshold": args.reconstruction_threshold,
              "dropout-tolerance": args.dropout_tolerance}
    overrides = {key: value for key, value in values.items() if value is not None}
    if args.reproducible_noise:
        overrides["reproducible-noise"] = True
    if args.allow_uncovered_eval:
        overrides["allow-uncovered-eval"] = True
    return overrides


def weighting(args: argparse.Namespace, stored: dict | None = None) -> str:
    """--weight-by; by default the weighting of the run --out holds (a resume: the same command resumes a run
    started when user was the default), else `train`'s (pair) without privacy and user under DP, whose clip bounds
    every user alike (the server refuses pair there). The run config's own default stays user: pair needs the
    population's mean pairs per user, which `simulate` reads from the file and a deployment must give
    (`pairs-per-user`)."""
    from lore_core.marginal_fit import DEFAULT_WEIGHTING

    if args.weight_by is not None:
        return args.weight_by
    if args.privacy != "none":
        return "user"
    stored = resumed_settings(Path(args.out)) if stored is None else stored
    return stored.get("weight_by") or DEFAULT_WEIGHTING


def resumed_settings(out: Path) -> dict:
    """The settings (server.run_settings fingerprint fields) of the run whose checkpoint `out` holds (one from before
    a setting existed: its value then), or {} without a readable checkpoint (check_resume then says what is wrong
    with it). run_overrides reads it once and hands it (`stored`) to weighting, local_steps and server_rate."""
    from server.checkpoint import CHECKPOINT_FILENAME, SETTINGS_BEFORE_THEY_EXISTED, CheckpointError, load_checkpoint

    if not (out / CHECKPOINT_FILENAME).is_file():
        return {}
    try:
        return {**SETTINGS_BEFORE_THEY_EXISTED, **load_checkpoint(out).settings}
    except CheckpointError:
        return {}


def local_steps(args: argparse.Namespace, stored: dict | None = None) -> int | None:
    """--local-steps; by default those of the run --out holds (a resume: the same command resumes a pair-weighted run
    begun when five steps were the default), else None: the run config's "" (federation.protocol.local_steps)."""
    if args.local_steps is not None or args.privacy == "record":
        return args.local_steps  # record mode takes none (federation.protocol.RECORD_UPDATE_STEPS)
    stored = resumed_settings(Path(args.out)) if stored is None else stored
    if stored.get("objective") != (args.objective or "joint"):
        return None  # another objective: check_resume names it (a joint run's 5 steps were refused under marginal)
    return stored.get("local_steps")


def server_rate(args: argparse.Namespace, stored: dict | None = None) -> float | None:
    """--server-lr; by default the rate of the run --out holds under the same privacy mode (a resume: the same
    command resumes a run begun when 1 was the default without privacy, before lore-fed 0.2.2), else None: the run
    config's "" (the mode's default, server/optimizer.py)."""
    if args.server_lr is not None:
        return args.server_lr
    stored = resumed_settings(Path(args.out)) if stored is None else stored
    return stored.get("server_lr") if stored.get("privacy_mode") == args.privacy else None


def planned_rounds(args: argparse.Namespace, stored: dict) -> int:
    """--rounds; by default those its ledger plans for the run --out holds (checkpointed) under the same privacy mode
    (the same command resumes a run begun under an earlier default), else the mode's default. A run that never
    checkpointed takes the defaults for rounds and users per round alike; check_resume names a ledger's other plan."""
    if args.rounds is not None:
        return args.rounds
    config = planned_config(Path(args.out)) if stored.get("privacy_mode") == args.privacy else {}
    if config.get("mode") == args.privacy and isinstance(config.get("rounds"), int) and config["rounds"] > 0:
        return config["rounds"]
    return NONPRIVATE_ROUNDS if args.privacy == "none" else DEFAULT_ROUNDS


def planned_config(out: Path) -> dict:
    """The `config` of the ledger in `out` (the run's plan: mode, rounds, ...), {} without a readable one: a damaged
    ledger is check_resume's to name."""
    from lore_core.privacy.ledger import LEDGER_FILENAME, LedgerError, read_ledger

    try:
        return read_ledger(out / LEDGER_FILENAME)["config"]
    except (LedgerError, OSError):
        return {}


def users_per_round(args: argparse.Namespace, seen_users: int, stored: dict) -> int:
    """--clients-per-round; by default that of the run --out holds under the same privacy mode, else the mode's
    default: under DP DEFAULT_CLIENTS_PER_ROUND, without privacy every seen user (at most NONPRIVATE_MOST_USERS);
    never more than the seen users."""
    if args.clients_per_round is not None:
        return args.clients_per_round
    if stored.get("privacy_mode") == args.privacy and stored.get("clients_per_round"):
        return stored["clients_per_round"]
    return default_users_per_round(args.privacy, seen_users)


def default_users_per_round(privacy_mode: str, seen_users: int) -> int:
    """The default M of a new run (the stress matrix runs its federated row with it)."""
    most = NONPRIVATE_MOST_USERS if privacy_mode == "none" else DEFAULT_CLIENTS_PER_ROUND
    return min(most, seen_users)


def run_overrides(args: argparse.Namespace, seen_users: int, seen_train_pairs: int) -> dict:
    """Run-config overrides of the flags; unset flags keep the run config's defaults (pyproject.toml). With
    --weight-by pair, `pairs-per-user` is the file's mean training pairs per seen user."""
    from lore_core.reward_math import DEFAULT_L2

    eval_every = args.eval_every
    if eval_every is None:
        eval_every = 10 if args.privacy == "none" else 0  # DP: only after the last round unless opted in
    stored = resumed_settings(Path(args.out))  # read once for the settings a resume keeps (`stored`: not again)
    overrides = {
        "num-server-rounds": planned_rounds(args, stored),
        "clients-per-round": users_per_round(args, seen_users, stored),
        "seed": args.seed, "eval-every": eval_every,
        "l2": DEFAULT_L2 if args.l2 is None else args.l2,
        "prior-pairs": "" if args.prior_pairs is None else args.prior_pairs, "progress": "bar",
        **privacy_overrides(args),
    }
    for key, value in (("rank", args.rank), ("server-optimizer", args.server_optimizer),
                       ("server-lr", server_rate(args, stored)), ("local-steps", local_steps(args, stored)),
                       ("client-lr", args.client_lr), ("train-prior-pairs", args.train_prior_pairs),
                       ("objective", args.objective),
                       ("weight-by", weighting(args, stored))):
        if value is not None:
            overrides[key] = value
    if overrides["weight-by"] == "pair":
        if not seen_train_pairs:
            raise ValueError("--weight-by pair needs the pair file's count of seen users' training pairs")
        overrides["pairs-per-user"] = seen_train_pairs / max(seen_users, 1)
    return overrides


def read_population(pairs_path: Path, *, truth: bool = True) -> dict:
    """Read and validate the pair file once, here where it arrives, in chunks of whole users (never all of it at
    once) -> the counts the run needs; `truth` False: without a benchmark's hidden basis (true_basis None), for a
    caller that never scores against it (`deploy local`)."""
    from lore_core.pair_columns import check_pair_file
    from lore_core.pairs import check_federated_scale

    from lore_cli.train_command import benchmark_truth, refuse_untrainable

    columns, _, counts = check_pair_file(pairs_path)
    refuse_untrainable(columns.source, counts.train_users, counts.idle_users)  # every seen user has a training pair
    check_federated_scale(counts.column_squares, counts.pairs, columns.source)
    return {"users": counts.users, "seen_users": counts.seen_users, "largest_client_pairs": counts.largest_client_pairs,
            "seen_train_pairs": counts.seen_train_pairs, "seen_positions": counts.seen_positions,
            "dim": counts.dim, "source": columns.source, "embedder": columns.embedder,
            # a benchmark's hidden basis (ground_truth.npz beside the pair file), read now so that a damaged one is
            # refused before anything runs; used only after the last round (`benchmark_metrics`)
            "true_basis": benchmark_truth(columns) if truth else None}


def training_nodes(population: dict, nodes: int) -> int:
    """Of `nodes` blocks of the population's sorted users, those that hold a seen user: the nodes a round can ask."""
    from federation.user_block import partitions_holding

    return partitions_holding(population["seen_positions"], population["users"], nodes)


def check_run(population: dict, overrides: dict):
    """Validate the whole run config as the ServerApp will, for the pair file's population, before Ray starts or
    anything is written. Returns (ServerSettings, resolved PrivacySettings); raises a ValueError that says what to
    change (the CLI exits 2 with it)."""
    from flwr.common.config import get_fused_config_from_dir

    from server.run_settings import ServerSettings
    from simulations.flower_run import ROOT

    settings = ServerSettings.from_run_config(get_fused_config_from_dir(ROOT, overrides))
    settings.check_population(population["seen_users"], population["dim"], population["source"])
    privacy = settings.privacy_settings(population["seen_users"], population["dim"])
    largest = population["largest_client_pairs"]
    if privacy.mode == "record" and not privacy.delta < 1 / largest:
        raise ValueError(f"record mode needs delta < 1/n_i for every client; the largest client has {largest} "
                         f"pairs, so delta must be < {1 / largest:.3g}; got {privacy.delta}")
    return settings, privacy


def privacy_summary(metrics: dict) -> str:
    """The summary line's privacy part, which is read without the ledger: it says what epsilon is of and who is
    trusted (it printed "epsilon 2.633" alone, also for a NOT PRIVATE debug run, and nothing in record mode)."""
    if metrics.get("privacy_mode", "none") == "none":
        return ""
    if metrics.get("not_private"):
        return "  NOT PRIVATE (reproducible debug noise)"
    if metrics.get("epsilon") is not None:
        trusted = "the server trusted" if metrics["privacy_mode"] == "user" else "against all but the server"
        against_server = metrics.get("epsilon_against_server")
        if metrics["privacy_mode"] == "user+secagg" and against_server is not None:
            trusted += f"; against the server, which knows the sample, {against_server:.3f}"
        return f"  user-level epsilon {metrics['epsilon']:.3f} (delta {metrics['delta']:g}; {trusted})"
    if metrics.get("record_epsilon_max_over_clients") is not None:
        return (f"  per-pair epsilon {metrics['record_epsilon_max_over_clients']:.3f} (max over clients, delta "
                f"{metrics['delta']:g}; not user-level)")
    return ""


def privacy_metrics(run_dir: Path) -> dict:
    """metrics.json's privacy keys, read back from the run's ledger (the ledger derives epsilon from its events)."""
    from lore_core.privacy.ledger import PrivacyLedger

    ledger = PrivacyLedger.load(run_dir)
    s, eps = ledger.settings, ledger.epsilon()
    out = {"privacy_guarantee": ledger.guarantee(), "not_private": ledger.not_private_reason() is not None,
           "stopped_early": ledger.summary()["stopped_early"], "ledger": "ledger.json"}
    if s.mode in ("user", "user+secagg"):
        out.update(epsilon=eps.headline, epsilon_accountant=eps.accountant, epsilon_rdp=eps.rdp, delta=s.delta,
                   noise_multiplier=s.noise_multiplier, clip_norm=s.clip_norm, sample_rate=s.sample_rate)
        if s.mode == "user+secagg":
            out.update(epsilon_against_server=ledger.epsilon_against_server(),
                       most_user_rounds=ledger.most_user_rounds())
    elif s.mode == "record":  # per pair, max over clients: deliberately not under the user-level key `epsilon`
        out.update(record_epsilon_max_over_clients=None if eps is None else eps.prv,
                   record_epsilon_rdp=None if eps is None else eps.rdp, delta=s.delta,
                   noise_multiplier=s.noise_multiplier, max_grad_norm=s.max_grad_norm, record_epochs=s.record_epochs,
                   record_sample_rate=s.record_sample_rate, record_batch_size=s.record_batch_size)
    return out


# What went wrong in a run that still finished, from the round records (rounds.jsonl): metrics.json carries each
# non-zero total, and the command prints it; a finished run with problems is never reported as a clean success.
PROBLEMS = {
    "rejected_replies": "{} train replies were rejected",
    "missing_replies": "{} nodes did not answer a train request",
    "unasked_nodes": "{} nodes hosting sampled users were not asked: their round's users lay on too few nodes for a "
                     "secure sum, and it released a data-free noise step (user+secagg)",
    "non_finite_users": "{} users' updates were not finite and were left out",
    "skipped_steps": "{} server steps gave a non-finite basis and were skipped: the basis did not move in those rounds "
                     "(rates or updates far too large)",
    "record_budget_exhausted_users": "{} sampled users had spent their record-level budget and sent a zero update",
    "eval_failed_nodes": "{} nodes failed the final evaluation: its accuracy covers the other nodes' users only",
    "eval_missing_nodes": "{} nodes did not answer the final evaluation: its accuracy covers the others' users only",
}


def run_problems(history: list[dict]) -> dict[str, int]:
    """Totals over the rounds of PROBLEMS' keys (the evaluation keys: of the final round), zeros left out."""
    totals = {}
    for key in PROBLEMS:
        rows = history[-1:] if key.startswith("eval_") else history
        value = sum(len(r[key]) if isinstance(r.get(key), list) else int(r.get(key) or 0) for r in rows)
        if value:
            totals[key] = value
    return totals


def run(args: argparse.Namespace) -> int:
    from lore_cli.run_report import check_reference_run, load_reference
    from lore_cli.train_command import check_device, check_seed, parse_number
    from lore_core.reward_math import MAX_L2
    from lore_core.privacy.privacy_settings import check_secagg_layout
    from lore_core.run_lock import RunDirLock
    from simulations.flower_run import nodes_for

    for name in ("rounds", "clients_per_round", "rank"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.eval_every is not None and args.eval_every < 0:
        raise ValueError(f"--eval-every must be >= 0 (0: evaluate only after the last round), got {args.eval_every}")
    check_seed(args.seed)
    if args.device is not None:
        # simulate runs every node here, so the device must be here: the nodes fell back to the CPU with a warning
        # only their Ray worker logs showed, and the run went on (a tester); a deployment's nodes decide for themselves
        check_device(args.device)
    if args.l2 is not None:
        parse_number(args.l2, "--l2", maximum=MAX_L2)
    out = Path(args.out)
    check_output_path(out, "--out", directory=True)
    refuse_a_dataset(out, "--out")
    check_no_other_run(out)
    pairs_path = resolve_pair_path(args.pairs)
    reference = load_reference(args.reference)
    if reference is not None:
        check_reference_run(args.reference, reference, pairs_path)
    population = read_population(pairs_path)
    check_canary_flags(args, out)
    nodes_for(population["users"], args.users_per_node)  # a bad --users-per-node is named before the privacy plan
    # canary users are users of the population the server samples (federation/canary_users.py)
    overrides = run_overrides(args, population["seen_users"], population["seen_train_pairs"])
    try:
        settings, privacy = check_run({**population, "seen_users": population["seen_users"] + args.canaries},
                                      overrides)
    except ValueError:  # a plan refused for a mode the run in --out never had: the mode is the cause
        check_same_mode(out, args.privacy)
        raise
    canary_nodes = nodes_for(args.canaries, args.users_per_node) if args.canaries else 0  # as node_counts has them
    check_secagg_layout(privacy, training_nodes(population, nodes_for(population["users"], args.users_per_node))
                        + canary_nodes, f"--users-per-node {args.users_per_node} for {population['users']} users")
    canaries = canary_secrets(args, (settings.rank, population["dim"]))  # fail closed: before Ray, before DIR exists
    # The lock is taken before the checks (a concurrent run could be writing the checkpoint), but the lock file is
    # written only once they pass: a refused run leaves the directory as it was, .lock included.
    with RunDirLock(out, announce=False) as lock:
        # before Ray: another run's is refused
        previous, data = check_resume(out, pairs_path, settings, privacy, given_followers(args), population["dim"])
        check_evaluated_prior(out, previous, settings)
        if canaries is not None:
            data["canary_secrets_sha256"] = check_canary_digest(out, canaries, args.canary_secrets)
        lock.announce()
        if canaries is not None and not Path(args.canary_secrets).exists():
            from federation.canary_users import save_canaries

            save_canaries(args.canary_secrets, canaries)
        record_pairs(out, data)
        return _simulate(args, pairs_path, population, overrides, settings, privacy, reference, out, previous, data)


def check_canary_digest(out: Path, canaries, secrets_path: str) -> str:
    """The SHA-256 of this run's canaries, recorded in DIR/data.json when the run starts (and in metrics.json), so
    that the canary audit refuses another run's secrets file, also for a run that was interrupted; a resume with
    other canaries than the run started with is refused."""
    from federation.canary_users import canary_digest
    from lore_cli.run_data import DATA_FILENAME

    digest = canary_digest(canaries)
    record = out / DATA_FILENAME
    started = json_loads(record.read_text()).get("canary_secrets_sha256") if record.exists() else None
    if started is not None and started != digest:
        raise ValueError(f"--canary-secrets {secrets_path} holds other canaries than the run in --out {out} was "
                         f"started with ({record}): give that run's secrets file, or a new --out")
    return digest


def check_no_other_run(out: Path) -> None:
    """--out holds files by the names this command writes only as a run of its own, to resume or rerun: every one is
    written after the federated checkpoint. Without one they are another run's or the user's, and would be replaced."""
    from lore_cli.run_report import DP_PLOT_FILENAME, PLOT_FILENAME
    from server.checkpoint import CHECKPOINT_FILENAME, ROUNDS_FILENAME

    written = ("metrics.json", "basis.npz", ROUNDS_FILENAME, "report.md", PLOT_FILENAME, DP_PLOT_FILENAME)
    other = [name for name in written if (out / name).exists()]
    if other and not (out / CHECKPOINT_FILENAME).exists():
        raise ValueError(f"--out {out} holds another run or other files by the names this run writes "
                         f"({', '.join(other)}; no federated checkpoint, so no run of lore-fed simulate to resume): "
                         "they would be replaced; give a new directory")


# simulate's flags that set a setting whose default follows another's (server.checkpoint.FOLLOWERS), by run-config key
FOLLOWER_FLAGS = {"server-lr": "server_lr", "eval-every": "eval_every", "weight-by": "weight_by",
                  "local-steps": "local_steps", "clients-per-round": "clients_per_round"}


def given_followers(args: argparse.Namespace) -> frozenset[str]:
    """The following settings the user gave as flags, as checkpoint fields (server.run_settings.given_fields): a
    resume refusal names them beside the leading one (one was hidden behind a changed --privacy until the next
    try)."""
    from server.run_settings import given_fields

    flags = {key for key, flag in FOLLOWER_FLAGS.items() if getattr(args, flag, None) is not None}
    return given_fields(flags | set(privacy_overrides(args)))


def check_resume(out: Path, pairs_path: Path, settings, privacy, given: frozenset[str] = frozenset(),
                 dim: int | None = None):
    """Refuse, before Ray starts or anything is written, a run directory whose checkpoint, ledger or release record
    is damaged or holds other settings (the ledger's privacy settings included: a finished run asked for more rounds)
    or that was trained on another pair file (the server checks the users per node again once its nodes report). A
    ledger or release record without a checkpoint is checked too: the server continues them (a run that crashed
    before its first checkpoint; with the same pair file and the same start, `dim` being its embedding width).
    Returns the checkpoint (None for a new run) and the pair file's fingerprint for DIR/data.json."""
    from client.user_state import check_simulated_accountants
    from lore_core.privacy.ledger import LEDGER_FILENAME
    from server.checkpoint import CheckpointError, check_resumable, initial_basis, load_checkpoint
    from server.release_record import check_continuable
    from server.run_ledger import FederatedLedger, check_ledger_covers

    previous = load_checkpoint(out)
    # The pair file first: another file (of another dimension, say) changes settings too, and a tester was told
    # about eval_every before the file was named. A start that crashed before its checkpoint counts: its ledger
    # spent on that file's users (a tester's rerun on another file mixed the two runs' spending in one ledger).
    fingerprint = check_same_pairs(out, pairs_path, resuming=previous is not None or spent_or_released(out))
    if previous is not None:
        check_resumable(previous, settings.fingerprint(), previous.population, out, given)
        check_ledger_covers(out, previous.round)
    if (out / LEDGER_FILENAME).exists():
        planned_settings = FederatedLedger.load(out).settings
        planned = planned_settings.rounds
        # a tester read "other privacy settings (rounds)" of a run without privacy; another mode is named by the
        # ledger's comparison below (its rounds would follow that mode's default)
        if planned != settings.rounds and planned_settings.mode == settings.privacy_mode:
            raise CheckpointError(f"{out} holds a run of {planned} rounds, not {settings.rounds}: a run's rounds are "
                                  "fixed when it starts (the server's learning-rate schedule, and under DP the "
                                  f"accountant's plan, follow them); resume it with --rounds {planned}"
                                  + (" and the --clients-per-round it was started with (a run without privacy "
                                     "records it only from its first checkpoint)" if previous is None and
                                     planned_settings.mode == "none" else "")
                                  + ", or start a new --out directory (a longer run from scratch)")
        FederatedLedger.load(out, privacy)  # reads and compares only; the server opens it again to write
    start = None if dim is None else initial_basis(settings.rank, dim, settings.seed, settings.init_scale)
    check_continuable(out, settings.release_optimizer(), previous.round if previous is not None else 0,
                      settings.fixed_optimizer_keys(), start)
    check_simulated_accountants(out, (out / LEDGER_FILENAME).exists())
    return previous, fingerprint


def spent_or_released(out: Path) -> bool:
    """Whether a start in `out` without a checkpoint got as far as a round in its ledger or a release in its record
    (a start that stopped before them spent and released nothing, and may be rerun on any pair file)."""
    from lore_core.privacy.ledger import LEDGER_FILENAME, LedgerError, PrivacyLedger
    from server.release_record import CHAIN_FILENAME, RELEASES_DIR

    chain = out / RELEASES_DIR / CHAIN_FILENAME
    try:
        if chain.is_file() and len(chain.read_text(encoding="utf-8").splitlines()) > 1:  # line 1: the header
            return True
        return (out / LEDGER_FILENAME).exists() and PrivacyLedger.load(out).rounds_released > 0
    except (OSError, ValueError, LedgerError):  # damaged: counted as a start, and check_resume names the damage
        return True


def check_same_mode(out: Path, privacy_mode: str) -> None:
    """A run in --out (checkpointed, or only its ledger) under another privacy mode: refused for its mode where the
    mode asked gave a settings error (a tester who left out --privacy none was told to raise the noise multiplier).
    Otherwise check_resume names the mode beside the flags given that differ."""
    # a run that crashed before its first checkpoint: its ledger's mode
    stored = resumed_settings(out).get("privacy_mode") or planned_config(out).get("mode")
    if stored is not None and stored != privacy_mode:
        raise ValueError(f"{out} holds a run under privacy mode {stored!r}, not {privacy_mode!r}: resume it with "
                         f"--privacy {stored} (and its other settings), or use a new --out directory")


def check_canary_flags(args: argparse.Namespace, out: Path) -> None:
    """--canaries K needs --canary-secrets FILE outside the run directory, and a user-level DP mode."""
    from lore_core.audits.canary import GUESSES as CANARY_GUESSES

    if args.canaries < 0:
        raise ValueError(f"--canaries must be >= 0, got {args.canaries}")
    if not args.canaries:
        if args.canary_secrets:
            raise ValueError("--canary-secrets without --canaries K: give the number of canaries")
        return
    if not args.canary_secrets:
        raise ValueError("--canaries needs --canary-secrets FILE: where the auditor's secrets (directions, coins) go")
    if args.privacy not in ("user", "user+secagg"):
        raise ValueError(f"--canaries audits user-level DP: use --privacy user or user+secagg, not {args.privacy}")
    if args.canaries < CANARY_GUESSES[0]:  # the audit refuses fewer: running them would cost accuracy for nothing
        raise ValueError(f"--canaries {args.canaries}: the canary audit needs at least {CANARY_GUESSES[0]} canaries "
                         f"(use {2 * CANARY_GUESSES[0]} or more; hundreds for a tight bound)")
    if args.canaries < 2 * CANARY_GUESSES[0]:
        print(f"note: the canary audit guesses at least {CANARY_GUESSES[0]} canaries in, so with {args.canaries} "
              f"(about half of them in) it will read inconclusive; use {2 * CANARY_GUESSES[0]} or more (hundreds "
              "for a tight bound)", file=sys.stderr)
    secrets_file, run_dir = Path(args.canary_secrets).resolve(), out.resolve()
    if secrets_file == run_dir or run_dir in secrets_file.parents:
        raise ValueError(f"--canary-secrets {args.canary_secrets} is inside the run directory {out}: the secrets "
                         "must stay with the auditor, away from what the run releases; put the file elsewhere")


MAX_CANARY_BYTES = 2**30  # the canaries' directions, held by the command, the canary nodes and the audit


def check_canary_size(count: int, shape: tuple[int, int]) -> None:
    """K directions of the basis's shape must fit in memory: --canaries 100000000 was a numpy MemoryError
    traceback (59.6 GiB) after the checks."""
    per_canary = 8 * shape[0] * shape[1]
    if count * per_canary > MAX_CANARY_BYTES:
        raise ValueError(f"--canaries {count}: their secret directions ({shape[0]} x {shape[1]} each) would take "
                         f"{count * per_canary / 2**30:.1f} GiB; use at most {MAX_CANARY_BYTES // per_canary} for this "
                         "basis (hundreds give a tight bound)")


def canary_secrets(args: argparse.Namespace, shape: tuple[int, int]):
    """The canaries of this run: read from --canary-secrets if it exists (same K and shape required), else drawn
    here (written once the run directory is locked). None without canaries."""
    if not args.canaries:
        return None
    from federation.canary_users import draw_canaries, load_canaries

    path = Path(args.canary_secrets)
    check_canary_size(args.canaries, shape)
    if not path.exists():
        return draw_canaries(args.canaries, shape)
    canaries = load_canaries(path)
    if canaries.count != args.canaries or canaries.shape != shape:
        raise ValueError(f"--canary-secrets {path} holds {canaries.count} canaries of shape {canaries.shape}, this "
                         f"run needs {args.canaries} of shape {shape}; give another file (or remove it)")
    return canaries


def benchmark_metrics(pairs_path: Path, true_basis) -> dict:
    """On a benchmark (a hidden basis beside the pair file): the true-basis ceiling, every user's w fit on the
    hidden basis (`evaluation.true_basis_metrics`: a personal prior of 3 pairs, whatever the run's). Computed by
    this command from the pair file, in blocks of whole users, once the last round is done: it reads raw data
    without noise (the ledger lists it as not covered, with the evaluation) and a deployed server could not
    compute it."""
    if true_basis is None:
        return {}
    from lore_core.streamed_training import true_basis_streamed

    return true_basis_streamed(pairs_path, true_basis)


def recorded_metrics(out: Path) -> dict:
    """The run directory's metrics.json as an earlier start of this run wrote it ({} if none or unreadable)."""
    try:
        metrics = json_loads((out / "metrics.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return metrics if isinstance(metrics, dict) else {}


def reference_record(path: str | None, reference: dict | None, earlier: dict) -> dict | None:
    """metrics.json's `reference`: the centralized run's figures that the report shows, from --reference, else as
    an earlier start of this run recorded them (a rerun without --reference keeps the report's column)."""
    keys = ("seen_test_acc", "unseen_test_acc")
    if reference is not None:  # checked by load_reference
        return {"path": str(Path(path).resolve()), **{k: reference[k] for k in keys if reference.get(k) is not None}}
    recorded = earlier.get("reference")
    if not isinstance(recorded, dict):
        return None

    def accuracy(value) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value <= 1.0

    return {key: value for key, value in recorded.items()
            if (key == "path" and isinstance(value, str)) or (key in keys and accuracy(value))}


def finished_nodes(previous, settings, out: Path, users: int, args) -> int | None:
    """The node count of a run that has nothing left to do: all rounds (or stopped by its privacy budget), the last
    one evaluated, on the nodes this command would start. None otherwise: the engine runs (it resumes, retries a
    failed final evaluation, or refuses another population). A rerun of a finished run used to start Ray only to
    find nothing to do."""
    from simulations.flower_run import node_counts

    if previous is None or not previous.history or "seen_test_acc" not in previous.history[-1]:
        return None
    if previous.round < settings.rounds and not privacy_metrics(out)["stopped_early"]:
        return None
    nodes = node_counts(users, args.users_per_node, args.canaries)[0]  # as simulate_pairs would start them
    return nodes if len(previous.population) - 1 == nodes else None


def check_evaluated_prior(out: Path, previous, settings) -> None:
    """A finished, evaluated run is rerun only with the personal prior it was evaluated with: the rerun trains and
    evaluates nothing, and a tester's `--prior-pairs 30` relabelled figures evaluated at 3 (exit 0). A resume of an
    unfinished run may change it: its final evaluation is still to come. The prior is the last evaluation's own
    (server.training_round records it), or metrics.json's for a run checkpointed before it did."""
    from lore_core.privacy.ledger import LEDGER_FILENAME, PrivacyLedger

    if previous is None or not previous.history or "seen_test_acc" not in previous.history[-1]:
        return
    if previous.round < settings.rounds and not (
            (out / LEDGER_FILENAME).exists() and PrivacyLedger.load(out).stopped_early):
        return
    evaluated = previous.history[-1].get("prior_pairs")
    if evaluated is None:  # checkpointed before evaluations recorded it
        evaluated = recorded_metrics(out).get("prior_pairs")
    if isinstance(evaluated, (int, float)) and not math.isclose(evaluated, settings.prior_pairs, rel_tol=1e-9):
        raise ValueError(f"{out} holds a finished run evaluated with the personal prior prior-pairs {evaluated:g}, "
                         f"not {settings.prior_pairs:g}: a rerun trains and evaluates nothing, so its figures would "
                         f"not change. Rerun it with prior-pairs {evaluated:g} (--prior-pairs, or -c in `deploy "
                         f"local`), or score its basis at another prior with `lore-fed evaluate PAIRS --basis "
                         f"{out / 'basis.npz'} --prior-pairs {settings.prior_pairs:g}`")


def require_final_evaluation(state) -> None:
    """CommandFailed when the last round's evaluation failed on every node (the basis is kept; a rerun evaluates)."""
    final = state.history[-1]
    if "seen_test_acc" not in final:
        raise CommandFailed(f"training finished, but the final evaluation failed on every node "
                            f"({final.get('eval_failed_nodes', 0)} failed, {final.get('eval_missing_nodes', 0)} did "
                            "not answer); the trained basis is kept: run the same command again to evaluate it")


def run_metrics(state, settings, privacy_mode: str, privacy_keys: dict, *, wall_seconds: float, nodes: int,
                benchmark: dict | None = None, extra: dict | None = None) -> dict:
    """metrics.json's keys that every run of the apps has, simulated or deployed, from its checkpoint and ledger:
    the last round's own evaluation (never an earlier round's), the settings and the privacy keys; a command's own
    keys (`benchmark`, `extra`) in their places. The caller adds `run_problems` after its own privacy keys."""
    require_final_evaluation(state)
    final = state.history[-1]
    # A figure this population has none of (no unseen users: NaN in the round record) is left out, as train does.
    metrics = {key: final[key] for key in TRAIN_KEYS if math.isfinite(final.get(key, math.nan))}
    metrics.update(benchmark or {})
    metrics.update(rank=settings.rank, prior_pairs=settings.prior_pairs, objective=settings.objective,
                   weight_by=settings.weight_by,
                   local_steps=None if privacy_mode == "record" else settings.local_steps,  # record: record_epochs
                   # the rates a flag-less resume kept (a tester found them only in releases/chain.jsonl)
                   server_optimizer=settings.server_optimizer, server_lr=settings.server_lr,
                   client_lr=settings.client_lr,
                   train_prior_pairs=settings.train_prior_pairs, l2=settings.l2,
                   train_seconds=round(sum(r["seconds"] for r in state.history), 3),
                   rounds=state.round, wall_seconds=wall_seconds, privacy_mode=privacy_mode,
                   users_per_round=settings.clients_per_round, nodes=nodes, **(extra or {}), **privacy_keys)
    return metrics


def kept_run_record(wall_seconds: float, command: str, previous, state, earlier: dict) -> dict:
    """metrics.json's `wall_seconds` and `command` (the command line as run): this start's, or the run's recorded
    ones when this start trained nothing (the checkpoint's history unchanged: a rerun of a finished run)."""
    if previous is not None and previous.history == state.history:
        return {"wall_seconds": earlier.get("wall_seconds", wall_seconds), "command": earlier.get("command", command)}
    return {"wall_seconds": wall_seconds, "command": command}


def save_reported_basis(out: Path, state, settings, embedder: str | None) -> None:
    """DIR/basis.npz: the server's tail average of the released bases (server/optimizer.py), else the last."""
    from lore_core.basis_file import UNKNOWN_EMBEDDER, save_basis
    from server.optimizer import reported_basis

    save_basis(out / "basis.npz", reported_basis(state.optimizer, state.basis), version=state.round,
               embedder=embedder or UNKNOWN_EMBEDDER, prior_pairs=settings.prior_pairs)


def _simulate(args, pairs_path, population, overrides, settings, privacy, reference, out, previous, data) -> int:
    from lore_cli.run_report import update_steps, write_report
    from server.checkpoint import load_checkpoint, write_rounds
    from simulations.flower_run import AppShadowedError, simulate_pairs

    started = time.monotonic()
    noise = f", z {privacy.noise_multiplier:.4g}" if privacy.is_dp else ""
    print(f"federated LoRe on {pairs_path}: {settings.rounds} rounds, {settings.clients_per_round} users/round, "
          f"rank {settings.rank}, privacy {args.privacy}{noise}, weight-by {settings.weight_by}, "
          f"{update_steps(privacy.mode, settings.local_steps, privacy.record_epochs)}; run dir {out}", flush=True)
    if previous is not None:
        print(f"resuming after round {previous.round} from {out / 'checkpoint.npz'}", flush=True)
    earlier = recorded_metrics(out)  # before the run: the ServerApp writes a metrics.json of its own at the end
    try:
        nodes = finished_nodes(previous, settings, out, population["users"], args)
        if nodes is None:
            nodes = simulate_pairs(pairs_path, out, n_users=population["users"], users_per_node=args.users_per_node,
                                   overrides=overrides, canaries=args.canaries, canary_secrets=args.canary_secrets)
        else:
            print(f"the run in {out} is complete and evaluated (round {previous.round}): its outputs are written "
                  "again without starting the engine", flush=True)
    except AppShadowedError as exc:
        raise CommandFailed(str(exc)) from exc
    except RuntimeError as exc:  # the engine failed (a worker died, every node failed a round): nothing is lost
        state = load_checkpoint(out)
        done = f"after round {state.round}" if state is not None else "from the start"
        raise CommandFailed(f"{exc}; the run directory {out} is intact: run the same command again to resume {done}"
                            ) from exc
    wall = time.monotonic() - started
    state = load_checkpoint(out)
    if state is not None:
        write_rounds(out, state.history)  # derived from the checkpoint: a damaged copy is rewritten by any rerun
    privacy_keys = privacy_metrics(out)
    if state is None or not state.history or (state.round < settings.rounds and not privacy_keys["stopped_early"]):
        raise CommandFailed(f"the simulation ended before round {settings.rounds}; run the same command again to "
                            "resume")
    require_final_evaluation(state)  # before the ceiling reads the whole pair file
    record = kept_run_record(round(wall, 3), getattr(args, "_command_line", "lore-fed simulate"), previous, state,
                             earlier)
    wall_seconds = record["wall_seconds"]
    metrics = run_metrics(state, settings, args.privacy, privacy_keys, wall_seconds=wall_seconds, nodes=nodes,
                          benchmark=benchmark_metrics(pairs_path, population["true_basis"]),
                          extra={"seed": args.seed, "canaries": args.canaries, "command": record["command"]})
    if "canary_secrets_sha256" in data:  # binds the auditor's secrets file to this run (the canary audit checks it)
        metrics["canary_secrets_sha256"] = data["canary_secrets_sha256"]
    metrics.update(run_problems(state.history))
    metrics.update(pairs_path=data["path"],  # where audits of this run find its pairs (as data.json says)
                   pairs_fingerprint={key: value for key, value in data.items()
                                      if key not in ("path", "canary_secrets_sha256")})
    reference = reference_record(args.reference, reference, earlier)
    if reference:
        metrics["reference"] = reference
    save_reported_basis(out, state, settings, population["embedder"])
    atomic_write_json(out / "metrics.json", metrics)
    report = write_report(out, state.history, metrics, reference, record["command"])
    line = "  ".join(f"{group} {metrics[f'{group}_test_acc']:.4f}" for group in ("seen", "unseen")
                     if f"{group}_test_acc" in metrics)
    line += privacy_summary(metrics)
    if metrics["stopped_early"]:
        line += "  STOPPED EARLY (max epsilon)"
    print(f"{line}  ({state.round} rounds, {wall_seconds:.1f} s)")  # a finished run's rerun: the run's own time
    for key, value in run_problems(state.history).items():
        print(f"warning: {PROBLEMS[key].format(value)} (rounds.jsonl has the details)", file=sys.stderr)
    print(f"wrote {out / 'metrics.json'}, {out / 'basis.npz'}, {out / 'ledger.json'}, {out / 'rounds.jsonl'} and "
          f"{report}")
    return 0
