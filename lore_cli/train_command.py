"""`lore-fed train PAIRS.npz|DATASET --rank B|auto --out DIR`: centralized LoRe, the reference for federated runs."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from lore_core.atomic_io import atomic_path, atomic_save_npz, atomic_write_json, check_output_path
from lore_core.marginal_fit import DEFAULT_WEIGHTING


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pairs", help="pair file (.npz) or dataset directory holding pairs.npz")
    parser.add_argument("--rank", default="auto",
                        help="basis size B, or 'auto' (held-out groups, one-SE rule against rank 1)")
    parser.add_argument("--rank-grid", default=None, help="comma-separated ranks for --rank auto (must include 1)")
    parser.add_argument("--l2", default="auto", help="L2 penalty on the basis, or 'auto'")
    parser.add_argument("--prior-pairs", default="auto",
                        help="personal prior of every user's final w fit, in pairs, or 'auto' (held-out groups)")
    parser.add_argument("--train-prior-pairs", type=float, default=None,
                        help="prior of the w fits inside joint training, in pairs (default 3)")
    parser.add_argument("--objective", default="auto", choices=("auto", "joint", "marginal"),
                        help="how the basis is fit: joint (w fitted with it), marginal (w integrated out: thin "
                             "users), or auto (both are candidates of the held-out selection)")
    parser.add_argument("--weight-by", default=DEFAULT_WEIGHTING, choices=("user", "pair"),
                        help="how much each seen user pulls the basis: pair (every pair once, the likelihood: "
                             "users with many pairs pull more; the default) or user (every user's mean loss once)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--out", required=True, help="run directory for metrics.json and basis.npz")


def parse_rank(value: str, dim: int | None = None, flag: str = "--rank", source: str = "the pair file") -> int | str:
    """--rank: 'auto' or an integer B in 1..D (a basis of more rows than the embedding has dimensions adds nothing
    but memory: the server's per-user updates are (users, B, D))."""
    if value == "auto" and flag == "--rank":
        return "auto"
    try:
        rank = int(value)
    except ValueError:
        expected = "a positive integer or 'auto'" if flag == "--rank" else "a positive integer"
        raise ValueError(f"{flag} must be {expected}, got {value!r}") from None
    return check_rank(rank, dim, flag, source)


def check_rank(rank: int, dim: int | None, flag: str = "--rank", source: str = "the pair file") -> int:
    if rank < 1:
        raise ValueError(f"{flag} must be >= 1, got {rank}")
    if dim is not None and rank > dim:
        raise ValueError(f"{flag} {rank} is more than the embedding width D = {dim} of {source}: the basis size B "
                         f"must be <= D; choose B <= {dim} (LoRe uses a handful)")
    return rank


def parse_number(value, flag: str, *, minimum: float = 0.0, inclusive: bool = True,
                 maximum: float = float("inf")) -> float:
    """A finite number >= minimum (> minimum unless inclusive) and <= maximum, or a ValueError that names the flag."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    ok = np.isfinite(number) and (number >= minimum if inclusive else number > minimum) and number <= maximum
    if not ok:
        bound = f">= {minimum:g}" if inclusive else f"> {minimum:g}"
        bound += f" and <= {maximum:g}" if np.isfinite(maximum) else ""
        raise ValueError(f"{flag} must be a finite number {bound}, got {value!r}")
    return number


def check_device(device: str) -> str:
    """--device: cpu, cuda or cuda:N (anything else would reach torch as an unreadable error), and one this machine
    has, checked before any work."""
    from lore_core.joint_trainer import resolve_device

    if not re.fullmatch(r"cpu|cuda(:(0|[1-9][0-9]*))?", device):  # cuda: and cuda:01 reached torch's traceback
        raise ValueError(f"--device must be cpu, cuda or cuda:N, got {device!r}")
    resolve_device(device)
    return device


def check_seed(seed: int) -> int:
    if not 0 <= seed < 2**32:
        raise ValueError(f"--seed must be an integer in [0, 2**32), got {seed}")
    return seed


def check_trainable(pairs) -> None:
    """Refuse a pair file whose seen users (those that take part in training) include users without a training
    pair: they could be neither trained nor given joint weights. Checked before any training starts."""
    seen_users = np.unique(pairs.user[pairs.seen])
    trainers = np.unique(pairs.user[pairs.seen & (pairs.split == "train")])
    refuse_untrainable(pairs.source, trainers.size, np.setdiff1d(seen_users, trainers))


def refuse_untrainable(source: str, trainers: int, idle: np.ndarray) -> None:
    """`check_trainable` from counts: `trainers` seen users with a training pair, `idle` (ids) those without."""
    if trainers == 0:
        raise ValueError(f"{source}: no seen user has a training pair (split 'train'), so there is nothing to "
                         "train on; mark some users seen with training pairs")
    if idle.size:
        raise ValueError(f"{source}: {idle.size} seen user(s) have only test pairs, no training pair "
                         f"({idle[:5].tolist()}{' ...' if idle.size > 5 else ''}); a seen user takes part in "
                         "training: give them training pairs or mark them unseen (seen = False)")


def run(args: argparse.Namespace) -> int:
    from lore_core.pair_columns import PairColumns
    from lore_core.pairs import resolve_pair_path
    from lore_core.reward_math import MAX_L2
    from lore_core.run_lock import RunDirLock

    if args.rank_grid is not None and args.rank != "auto":
        raise ValueError(f"--rank-grid is for --rank auto; --rank {args.rank} fixes the rank: drop one of them")
    options = {"seed": check_seed(args.seed), "device": check_device(args.device), "objective": args.objective,
               "weight_by": args.weight_by}
    if args.l2 != "auto":
        # Above 0: unpenalized, a basis on pairs it can separate grows until L-BFGS stalls (a tester's 2e6)
        options["l2"] = parse_number(args.l2, "--l2", inclusive=False, maximum=MAX_L2)
    from lore_core.simplex_fit import MAX_PRIOR_PAIRS

    if args.prior_pairs != "auto":
        options["prior_pairs"] = parse_number(args.prior_pairs, "--prior-pairs", inclusive=False,
                                              maximum=MAX_PRIOR_PAIRS)
    if args.train_prior_pairs is not None:
        options["train_prior_pairs"] = parse_number(args.train_prior_pairs, "--train-prior-pairs", inclusive=False,
                                                    maximum=MAX_PRIOR_PAIRS)
    out = Path(args.out)
    check_output_path(out, "--out", directory=True)
    pairs_file = resolve_pair_path(args.pairs)
    columns = PairColumns.open(pairs_file)
    # Held from the checks to the last write: a `simulate` starting in --out (before its first checkpoint) or another
    # `train` there is refused by name, not raced (a tester found train writing into a live simulate's directory).
    # The lock file is written only when the results are: a run that fails leaves the directory as it was (one the
    # lock had to create is removed again).
    first_new = _first_missing(out)  # the lock creates out and its missing parents: a failed run removes them
    try:
        with RunDirLock(out, announce=False) as lock:
            federated = [name for name in ("checkpoint.npz", "ledger.json") if (out / name).exists()]
            if federated:
                raise ValueError(f"--out {out} holds a federated run ({', '.join(federated)}): a centralized basis "
                                 "there would be read as that run's by reports and audits; give another directory")
            check_no_other_files(out)
            _train_and_write(args, options, out, pairs_file, columns, lock.announce)
    except BaseException:
        folder = out
        while first_new is not None:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only when empty: what the lock created, nothing of anyone's
            if folder == first_new:
                break
            folder = folder.parent
        raise
    return 0


def _first_missing(path: Path) -> Path | None:
    """The outermost folder of `path` that does not exist yet (`path` itself when only it is new); None if it exists."""
    if path.exists():
        return None
    while not path.parent.exists() and path.parent != path:
        path = path.parent
    return path


def _train_and_write(args: argparse.Namespace, options: dict, out: Path, pairs_file: Path, columns,
                     announce) -> None:
    """Fit, evaluate and write the run's basis.npz, user_weights.npz, selection_heldout.npz (where a selection was
    made) and metrics.json to `out` (`announce`: name this run in the lock file, just before the first write)."""
    from lore_core.basis_file import UNKNOWN_EMBEDDER, save_basis
    from lore_core.pair_columns import PairIndex
    from lore_cli.run_data import pair_file_fingerprint
    from lore_core.selection_record import FILENAME as HELDOUT_FILENAME, save_record
    from lore_core.streamed_training import LARGE_POPULATION

    embedder = columns.embedder or UNKNOWN_EMBEDDER  # the pair file's embedder: basis.npz says which space it lives in
    large = PairIndex.build(columns).n_users > LARGE_POPULATION
    fit, config, metrics, summary, evaluate_seconds = (_train_streamed if large else _train_in_memory)(args, options)
    metrics.update(
        train_seconds=fit.train_seconds,
        evaluate_seconds=evaluate_seconds,
        l2=fit.l2,
        objective=fit.objective,
        train_prior_pairs=config.train_prior_pairs,
        weight_by=config.weight_by,
        seconds_per_rank=_seconds_per_rank(fit.selection),
        selection=fit.selection,
        held_out=fit.held_out,
        pairs=summary,
        pairs_path=str(pairs_file.resolve()),  # where audits of this run find its pairs
        pairs_fingerprint=pair_file_fingerprint(pairs_file),  # and check they are the same
        device=config.device,
        seed=config.seed,
    )
    check_trained_basis(fit, pairs_file)
    if not any(key in metrics for key in ("seen_test_acc", "unseen_test_acc")):  # as `evaluate` says (a tester)
        warnings.warn(f"{pairs_file} has no test pairs (split 'test'): only training-pair figures are reported",
                      UserWarning, stacklevel=2)
    announce()
    # metrics.json is the run's record and is written last. The basis, weights and held-out figures are written in
    # full first, then an earlier run's metrics.json goes and they are renamed into place: a run killed among the
    # renames leaves no metrics.json describing another basis (a tester found one saying rank 6 beside a rank-2
    # basis), one that fails while writing (a full disk) leaves the earlier run whole. A rerun writes them all; one
    # with nothing to select removes an earlier run's held-out figures, which would describe another selection.
    # The renames run in reverse order of the `with`: basis.npz first, so a run killed among them leaves a lore-fed
    # basis beside what was renamed, which a rerun replaces (check_no_other_files; a reviewer killed one after the
    # weights' rename, with basis.npz last, and its rerun was refused).
    # A rename that fails (a file made immutable, a read-only bind mount) before basis.npz moved puts the earlier
    # metrics.json back, so the earlier run stays whole (a tester found it gone); after that the run is mixed, and
    # the message says a rerun mends it.
    record, earlier_metrics, new_basis = out / HELDOUT_FILENAME, None, None
    try:
        with (atomic_path(record) if fit.heldout_record else contextlib.nullcontext()) as record_file, \
                atomic_path(out / "user_weights.npz") as weights_file, atomic_path(out / "basis.npz") as basis_file:
            save_basis(basis_file, fit.basis, version=0, embedder=embedder, prior_pairs=fit.prior_pairs)
            new_basis = os.stat(basis_file).st_ino
            # Centralized training holds every user's data anyway; the weights are saved for analysis.
            atomic_save_npz(weights_file, user_id=fit.user_ids.astype(str), user_weights=fit.user_weights)
            if record_file is not None:
                save_record(record_file, fit.heldout_record)
            earlier_metrics = _set_aside(out / "metrics.json")
    except OSError as exc:
        mixed = new_basis is not None and _inode(out / "basis.npz") == new_basis
        if earlier_metrics is not None and not mixed:
            os.replace(earlier_metrics, out / "metrics.json")
        if exc.errno is None or exc.filename is None:
            raise
        outcome = ("the new run's files could not all be put in place, so --out holds parts of two runs and no "
                   "metrics.json: mend the cause and rerun") if mixed else "--out still holds the earlier run, whole"
        raise OSError(exc.errno, f"{exc.strerror}; {outcome}", exc.filename2 or exc.filename) from exc
    if not fit.heldout_record:  # after the renames: a failed one must leave the earlier run whole (a reviewer)
        record.unlink(missing_ok=True)
    atomic_write_json(out / "metrics.json", metrics)
    if earlier_metrics is not None:
        earlier_metrics.unlink(missing_ok=True)
    print(format_metrics(metrics))
    written = ["basis.npz", "user_weights.npz", *([HELDOUT_FILENAME] if fit.heldout_record else [])]
    print(f"wrote {out / 'metrics.json'}, " + ", ".join(str(out / name) for name in written))


def _set_aside(path: Path) -> Path | None:
    """Move `path` to a temp name beside it (one a rerun clears if this run is killed) and return that name."""
    fd, aside = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        os.replace(path, aside)
    except FileNotFoundError:
        os.unlink(aside)
        return None
    return Path(aside)


def _inode(path: Path) -> int | None:
    try:
        return os.stat(path).st_ino
    except FileNotFoundError:
        return None


def check_trained_basis(fit, pairs_file: Path) -> None:
    """Refuse a basis that basis.npz cannot hold before anything is written: the check in the write named a temp
    file and left the new --out behind (a tester, with `--l2 0`, now refused, on pairs a basis can separate). A
    basis this large is what pairs at a tiny scale need, as the fits are scale-free (joint_trainer.FitScale)."""
    from lore_core.basis_file import MAX_ABS_BASIS

    if not np.isfinite(fit.basis).all():
        raise ValueError(f"{pairs_file}: the fit diverged (NaN or Inf in the trained basis); nothing was written. "
                         "Give a larger --l2, or check the embeddings for extreme values")
    largest = float(np.abs(fit.basis).max())
    if largest <= MAX_ABS_BASIS:
        return
    unit = fit.held_out.get("l2_unit")
    size = f" (rms |d| {math.sqrt(2 * unit):.1e})" if unit else ""
    raise ValueError(f"{pairs_file}: the trained basis reaches {largest:.1e}, beyond the +-{MAX_ABS_BASIS:g} a "
                     f"basis file holds: the embedding differences are tiny{size}, so a basis that scores them is "
                     "huge; multiply the embeddings by a constant (no preference changes)")


def check_no_other_files(out: Path) -> None:
    """--out may hold files by the names this command writes only as a lore-fed run, which a rerun replaces: its
    basis.npz (written first) is a lore-fed basis file. Without one they are the user's, and the run is refused."""
    from lore_core.basis_file import load_basis

    from lore_core.selection_record import FILENAME as HELDOUT_FILENAME

    present = [name for name in ("basis.npz", "user_weights.npz", "metrics.json", HELDOUT_FILENAME)
               if (out / name).exists()]
    if not present:
        return
    try:
        load_basis(out / "basis.npz")
    except ValueError as exc:
        raise ValueError(f"--out {out} holds {', '.join(present)} but no lore-fed basis.npz ({exc}), so no run to "
                         "replace: these files would be overwritten; give a new directory") from None


def _config(args: argparse.Namespace, options: dict, dim: int, source: str, few_shot: int):
    """The TrainConfig of the flags, the ranks checked against the pair file's embedding width."""
    from lore_core.joint_trainer import TrainConfig

    options = {**options, "rank": parse_rank(args.rank, dim, source=source), "few_shot": few_shot}
    if args.rank_grid is not None:
        options["rank_grid"] = tuple(parse_rank(r.strip(), dim, "--rank-grid", source)
                                     for r in args.rank_grid.split(","))
        if 1 not in options["rank_grid"]:
            raise ValueError(f"--rank-grid must include 1 (the single-reward baseline), got {args.rank_grid!r}")
    return TrainConfig(**options)


def _train_in_memory(args: argparse.Namespace, options: dict):
    """The full-batch trainer on the whole file in memory -> (fit, config, metrics, summary, evaluation seconds)."""
    from lore_core.evaluation import evaluate_model
    from lore_core.joint_trainer import MARGINAL_MAX_MEDIAN_PAIRS, candidate_objectives, train_joint
    from lore_core.pairs import load_pairs

    pairs = load_pairs(args.pairs)
    check_trainable(pairs)
    true_basis = benchmark_truth(pairs)
    train = pairs.select(seen=True, split="train")
    config = _config(args, options, pairs.dim, pairs.source, few_shot_size(pairs.select(seen=False, split="train").user))
    pairs_per_user = np.unique(train.user, return_counts=True)[1]
    users = pairs_per_user.size
    print(f"training on {train.n} pairs of {users} seen user{'s' * (users != 1)} (D={pairs.dim}, rank {config.rank}, "
          f"weight-by {config.weight_by})")
    if len(candidate_objectives(config.objective, pairs_per_user)) > 1 and config.rank != 1:
        print("objectives: joint and marginal (users are thin: the median has under "
              f"{MARGINAL_MAX_MEDIAN_PAIRS} training pairs); the marginal fits add to the time, "
              "`--objective joint` skips them")
    if train.group is None:
        print(f"note: {pairs.source} has no `group` array: held-out sets split by pair (repeats of the same two "
              "items kept together), so pairs that share one response may fall on both sides; `lore-fed prepare` + "
              "`embed` write the conversation as the group")
    fit = train_joint(train.diff, train.user, config, group=train.group)
    started = time.perf_counter()
    metrics = evaluate_model(pairs, fit.basis, prior_pairs=fit.prior_pairs,
                             joint_weights=(fit.user_ids, fit.user_weights))
    metrics.update(benchmark_ceiling(pairs, true_basis))
    return fit, config, metrics, pairs.summary(), time.perf_counter() - started


def _train_streamed(args: argparse.Namespace, options: dict):
    """A population above LARGE_POPULATION users (lore_core.streamed_training): the file is validated block by
    block, model selection runs on a sample of users, the minibatch trainer fits all of them, evaluation reads the
    file in blocks -> (fit, config, metrics, summary, evaluation seconds)."""
    from lore_core.pair_columns import check_pair_file
    from lore_core.streamed_training import LARGE_POPULATION, SELECTION_USERS, evaluate_streamed, train_streamed

    if options["objective"] == "marginal":
        raise ValueError(f"{args.pairs}: more than {LARGE_POPULATION} users, where --objective marginal is not "
                         "offered (the minibatch trainer fits the joint objective); use --objective joint or auto")
    options = {**options, "objective": "joint"}
    columns, _, counts = check_pair_file(args.pairs)
    refuse_untrainable(columns.source, counts.train_users, counts.idle_users)
    true_basis = benchmark_truth(columns)
    config = _config(args, options, columns.dim, columns.source, counts.few_shot_pairs)
    print(f"training on {counts.train_users} seen users (D={counts.dim}, rank {config.rank}; model selection on "
          f"{min(SELECTION_USERS, counts.train_users)} of them, then minibatches of users)", flush=True)
    fit = train_streamed(columns.source, config)
    started = time.perf_counter()
    metrics, summary = evaluate_streamed(columns.source, fit.basis, prior_pairs=fit.prior_pairs,
                                         joint_weights=(fit.user_ids, fit.user_weights), true_basis=true_basis)
    metrics["trainer"] = "minibatch"
    return fit, config, metrics, summary, time.perf_counter() - started


def personal_prior(value: float | None, default: float | None = None) -> float:
    """A prior in pairs (--prior-pairs), checked; None gives `default` (the project default when that is None)."""
    from lore_core.simplex_fit import DEFAULT_PRIOR_PAIRS, MAX_PRIOR_PAIRS

    if value is None:
        return DEFAULT_PRIOR_PAIRS if default is None else default
    if not (np.isfinite(value) and value > 0):
        raise ValueError(f"--prior-pairs must be a finite number > 0, got {value}")
    if value > MAX_PRIOR_PAIRS:
        raise ValueError(f"--prior-pairs {value:g} is above {MAX_PRIOR_PAIRS:g} (w would not move from the "
                         "population's; the default is 3)")
    return float(value)


def few_shot_size(unseen_train_users: np.ndarray) -> int:
    """`pair_columns.median_few_shot` of an in-memory file (`unseen_train_users`: one user id per few-shot pair)."""
    from lore_core.joint_trainer import TrainConfig
    from lore_core.pair_columns import median_few_shot

    return median_few_shot(np.unique(unseen_train_users, return_counts=True)[1], TrainConfig.few_shot)


TRUTH_CHECK_ROWS = 5000  # pairs whose true logits a benchmark's truth must reproduce


def benchmark_truth(pairs):
    """The hidden basis of a benchmark (ground_truth.npz beside the pair file, same embedding size) or None; read
    before any training, so that a damaged file is refused up front. A truth of another width is ignored with a
    warning; one with users' weights that does not give the pair file's own true logits (`logit_true`; a PairSet
    or streamed PairColumns) is another population's truth and is refused (a tester's copy reported a ceiling below
    chance without a word)."""
    from lore_core.basis_file import other_embedders
    from lore_core.evaluation import read_truth, true_basis_of
    from lore_core.prism_schema import GROUND_TRUTH_FILE

    truth = read_truth(pairs.source)  # once: the basis, its embedder and the users' weights
    if truth is None:
        return None
    true_basis = true_basis_of(truth)
    truth_path = Path(pairs.source).parent / GROUND_TRUTH_FILE
    if true_basis.ndim != 2 or true_basis.shape[1] != pairs.dim:
        warnings.warn(f"{truth_path} holds a basis of shape {true_basis.shape}, not (B, {pairs.dim}) as the pairs "
                      f"of {pairs.source}: not this population's truth; no true-basis ceiling is reported")
        return None
    made_with, embedded_with = truth.get("embedder"), pairs.embedder
    if made_with is not None and embedded_with is not None and other_embedders(str(made_with), str(embedded_with)):
        # a tester's `embed --max-length 6` copy reported a ceiling of 0.61 for a true 0.86, without a word
        warnings.warn(f"{truth_path} was made with embedder {made_with}, {pairs.source} with {embedded_with}: not "
                      "this file's truth; no true-basis ceiling is reported")
        return None
    check_truth_logits(pairs, truth, truth_path)
    return true_basis


def _first_rows(pairs, count: int) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
    """(logit_true or None without it, user, diff) of the first `count` pairs of an in-memory PairSet or a streamed
    PairColumns (a reviewer: simulate, deploy and large-population train read the file as columns)."""
    if hasattr(pairs, "has"):
        stop = min(count, pairs.n)
        given = pairs.read("logit_true", 0, stop) if pairs.has("logit_true") else None
        return given, pairs.read("user", 0, stop), pairs.read("diff", 0, stop)
    given = None if pairs.logit_true is None else pairs.logit_true[:count]
    return given, pairs.user[:count], pairs.diff[:count]


def check_truth_logits(pairs, truth: dict[str, np.ndarray], truth_path: Path) -> None:
    """Refuse a truth (`evaluation.read_truth`) whose users' weights and basis do not give the pair file's true
    logits (its first TRUTH_CHECK_ROWS pairs: equal signs on 99 % of those with a clear sign). A truth without
    weights (a bare basis, as the synthetic benchmarks write) cannot be checked."""
    from lore_cli.embed_command import true_logits

    if not {"user_id", "user_weights"} <= set(truth):
        return
    given, users, diff = _first_rows(pairs, TRUTH_CHECK_ROWS)
    try:  # without logit_true the users alone are checked (a tester's copy of another population's truth passed)
        implied = true_logits(truth, np.asarray(users).astype(str), np.asarray(diff), truth_path)
    except ValueError as exc:  # users it has no weights for
        raise ValueError(f"{exc}: not the truth of {pairs.source}; remove it, or put that population's own beside "
                         "the pair file") from None
    if given is None:
        return
    given = np.asarray(given, np.float64)
    clear = np.abs(given) > 1e-6 * max(float(np.abs(given).max(initial=0.0)), 1e-300)
    agree = float(np.mean(np.sign(given[clear]) == np.sign(implied[clear]))) if clear.any() else 1.0
    if agree < 0.99:
        raise ValueError(f"{truth_path}: its weights and basis give the sign of {pairs.source}'s true logits "
                         f"(logit_true) on {agree:.0%} of its first {int(clear.sum())} pairs: not that population's "
                         "truth; remove it, or put that population's own beside the pair file")


def benchmark_ceiling(pairs, true_basis) -> dict:
    """On a benchmark: the true-basis few-shot ceiling, reported beside the oracle, with the ceiling's own personal
    prior (3 pairs, as the stress matrix's), not the run's: with a run's prior of 30 pairs a tester's "ceiling" fell
    7 points below what the true basis reaches."""
    from lore_core.evaluation import true_basis_metrics

    return {} if true_basis is None else true_basis_metrics(pairs, true_basis)


def _seconds_per_rank(selection: list[dict]) -> dict[str, float]:
    per_rank: dict[str, float] = {}
    for row in selection:
        per_rank[str(row["rank"])] = per_rank.get(str(row["rank"]), 0.0) + row["seconds"]
    return per_rank


def format_metrics(metrics: dict) -> str:
    keys = [k for k in metrics if k.endswith("_acc")]
    parts = [f"rank {metrics['rank']}" + (f" ({metrics['objective']})" if "objective" in metrics else "")]
    parts += [f"{k} {metrics[k]:.4f}" for k in keys]
    if "train_seconds" in metrics:
        parts.append(f"train {metrics['train_seconds']:.1f}s")
    return " | ".join(parts)


def dumps(metrics: dict) -> str:
    return json.dumps(metrics, indent=2)
