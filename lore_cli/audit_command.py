"""`lore-fed audit NAME [RUN_DIR] [options]`: privacy audits of a run (issue 5; lore_core.audits).

NAME: update-leakage | attribute | membership | mechanism | canary | accounting | extraction | fairness.
Inputs come from RUN_DIR (basis.npz or checkpoint.npz, ledger.json, the pair file named by metrics.json["pairs_path"]
or data.json) or from options:
--pairs (pair file or dataset dir; users.jsonl and ground_truth.npz are looked up next to it), --basis, --config
(privacy settings, JSON or TOML, flat or under [privacy]), or --synthetic (a LoRe-shaped population with known
truth: no run needed). Results go to OUT/audits/ (OUT = --out, default RUN_DIR) and the run's ledger; the verdict is
printed. Per-user updates are computed with the client's own code (federation.local_training) at the run's client
settings (its checkpoint's).
`mechanism` runs the server's own aggregation (server.aggregation); `canary` reads the run's release record
(server.release_record) and the auditor's --secrets, never a re-simulation.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
from pathlib import Path

import numpy as np

from lore_core.privacy.privacy_settings import DEFAULTS, user_delta
from lore_core.privacy.record_dp import steps_per_epoch
from lore_core.text_file import json_loads, not_a_file, parse_json, read_jsonl, read_text
from lore_core.termination import interruptions_deferred

NAMES = ("update-leakage", "attribute", "membership", "mechanism", "canary", "accounting", "extraction", "fairness")
PRIVACY_DEFAULTS = {"noise_multiplier": 1.0, "clip_norm": 1.0, "clients_per_round": 50, "population_size": 1400,
                    "rounds": 200, "delta": 1e-5, "mode": "none",
                    # record mode's DP-SGD, as a run takes it
                    **{key: DEFAULTS[key] for key in ("max_grad_norm", "record_batch_size", "record_sample_rate",
                                                      "record_epochs")}}


# Upper bounds on the audits' sizes (a mechanism run is one aggregation step, a shadow one batched fit of every
# user): beyond them an audit runs for days. The defaults are the parser's.
MAX_COUNTS = {"runs": 1_000_000, "shadows": 10_000, "permutations": 1_000_000, "max_users": 10_000_000}
DEFAULT_COUNTS = {"runs": 10_000, "shadows": 64, "permutations": 200, "max_users": 1_000}
# The least that means anything: a Clopper-Pearson bound from 100 runs, LiRA's per-example Gaussians from 4 shadows
# (lore_core.audits checks them again, after its work; here they are refused before it).
MIN_COUNTS = {"runs": 100, "shadows": 4, "permutations": 1, "max_users": 2}
# the one audit each of these minimums is for (update-leakage compares users: a tester's 1 was refused unnamed)
MIN_COUNT_AUDIT = {"runs": "mechanism", "shadows": "membership", "max_users": "update-leakage"}

# `audit NAME --level record RUN_DIR`: RUN_DIR is optional, and argparse alone takes it only right after NAME
INTERMIXED_ARGS = True


class AuditCommandError(ValueError):
    """Missing or inconsistent audit inputs; the message says which option provides them."""


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", choices=NAMES, help="which audit")
    parser.add_argument("run_dir", nargs="?", default=None, help="run directory (lore-fed simulate or train --out)")
    parser.add_argument("--out", default=None, help="where audits/ is written (default: RUN_DIR, else ./audit-out)")
    parser.add_argument("--pairs", default=None, help="pair file or dataset directory (default: from the run)")
    parser.add_argument("--basis", default=None, help="basis file or checkpoint.npz (default: from the run)")
    parser.add_argument("--users", default=None, help="users.jsonl with demographics (default: next to the pairs)")
    parser.add_argument("--config", default=None, help="privacy settings file (JSON/TOML) for mechanism/canary")
    parser.add_argument("--synthetic", action="store_true", help="audit a synthetic population with known truth")
    from lore_core.privacy.privacy_settings import MODES

    parser.add_argument("--mode", default=None, choices=MODES,
                        help="privacy mode whose server view is replayed (default: run's)")
    parser.add_argument("--noise-multiplier", type=float, default=None)
    parser.add_argument("--clip-norm", type=float, default=None)
    parser.add_argument("--clients-per-round", type=int, default=None)
    parser.add_argument("--population", type=int, default=None, help="number of users N")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--delta", type=float, default=None)
    parser.add_argument("--runs", type=int, default=DEFAULT_COUNTS["runs"],
                        help="mechanism: runs with and without the canary (at least 100)")
    parser.add_argument("--secrets", default=None,
                        help="canary: the canaries' secrets file (`lore-fed simulate --canary-secrets`)")
    parser.add_argument("--shadows", type=int, default=DEFAULT_COUNTS["shadows"],
                        help="membership: LiRA shadow fits (at least 4)")
    parser.add_argument("--level", choices=("record", "user"), default="record", help="membership level")
    parser.add_argument("--permutations", type=int, default=DEFAULT_COUNTS["permutations"],
                        help="attribute: label permutations")
    parser.add_argument("--max-users", type=int, default=DEFAULT_COUNTS["max_users"],
                        help="users sampled for the per-user attacks (update-leakage, attribute, membership, "
                             "extraction; fairness scores every user)")
    parser.add_argument("--query-noise", type=float, default=0.0, help="extraction: noise std per served score")
    parser.add_argument("--seed", type=int, default=0)


# --- inputs -----------------------------------------------------------------------------------------------------------
def _load_settings(args: argparse.Namespace, run_dir: Path | None) -> dict:
    settings, stored = dict(PRIVACY_DEFAULTS), {}
    ledger = run_dir / "ledger.json" if run_dir else None
    if ledger and ledger.exists():
        from lore_core.privacy.ledger import read_ledger

        stored = read_ledger(ledger)["config"]  # a damaged or tampered ledger is refused here, before any audit
        settings.update({k: v for k, v in stored.items() if k in PRIVACY_DEFAULTS and v is not None})
        if stored.get("clients_per_round") is None:  # modes none and record: the run's own count (a tester saw 50)
            stored = {**stored, **_checkpoint_clients(run_dir)}  # compared with a flag's or --config's as the rest
            settings.update({k: v for k, v in stored.items() if k == "clients_per_round"})
    source, other, given = {}, [], {}  # where each value came from; flags that differ from the run's; --config's
    if args.config:
        given = _read_config(Path(args.config))
        settings.update(given)
        other += [f"{key} {value!r} in --config {args.config} is not {run_dir}'s {stored[key]!r} (from {ledger})"
                  for key, value in given.items() if stored.get(key) is not None and stored[key] != value]
    stored_in = (f" (from --config {args.config})" if args.config else
                 f" (from {ledger})" if ledger and ledger.exists() else "")
    for key, flag, value in (("noise_multiplier", "--noise-multiplier", args.noise_multiplier),
                             ("clip_norm", "--clip-norm", args.clip_norm),
                             ("clients_per_round", "--clients-per-round", args.clients_per_round),
                             ("population_size", "--population", args.population), ("rounds", "--rounds", args.rounds),
                             ("delta", "--delta", args.delta), ("mode", "--mode", args.mode)):
        if value is not None:
            settings[key], source[key] = value, f" (from {flag})"
            if stored.get(key) is not None and stored[key] != value:  # a what-if filed as the run's (a tester)
                other.append(f"{flag} {value} is not {run_dir}'s {stored[key]} (from {ledger})")
    for key in ("clients_per_round", "population_size", "rounds", "record_batch_size", "record_epochs"):
        value = settings[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise AuditCommandError(f"{key} must be a positive integer, got {value!r}{source.get(key, stored_in)}")
    if args.delta is None and "delta" not in given and stored.get("delta") is None:
        # a run's default follows N (a reviewer: `mechanism --population 200000` was refused its own default 1e-5)
        settings["delta"] = user_delta(settings["population_size"])
    for key in ("noise_multiplier", "clip_norm", "delta", "max_grad_norm", "record_sample_rate"):
        if isinstance(settings[key], bool) or not isinstance(settings[key], (int, float)):
            raise AuditCommandError(f"{key} must be a number, got {settings[key]!r}{source.get(key, stored_in)}")
    try:
        steps_per_epoch(settings["record_sample_rate"])  # the range a run takes
    except ValueError as exc:
        raise AuditCommandError(f"{exc}{source.get('record_sample_rate', stored_in)}") from None
    if settings["mode"] in ("user", "user+secagg"):  # record mode samples every user it holds
        _refuse_more_per_round_than_users(settings, source, stored_in)  # a tester: update-leakage took 50 of 42
    if other:
        raise AuditCommandError(f"{'; '.join(other)}: an audit of a run replays the run's own settings and is filed "
                                "in its ledger; drop the flag (or the --config value), or audit those settings without "
                                "the run directory")
    return settings


def _checkpoint_clients(run_dir: Path) -> dict:
    """{"clients_per_round": the run's users per round} from its checkpoint, or {} without one."""
    from server.checkpoint import CHECKPOINT_FILENAME, load_checkpoint

    if not (run_dir / CHECKPOINT_FILENAME).is_file():
        return {}
    count = load_checkpoint(run_dir).settings.get("clients_per_round")
    return {} if count is None else {"clients_per_round": int(count)}


def _refuse_more_per_round_than_users(settings: dict, source: dict | None = None, stored_in: str = "") -> None:
    """A round samples at most every user: clients_per_round above population_size means nothing (`lore-fed
    privacy` refuses it too); `source` and `stored_in` say where each value came from."""
    source = source or {}
    if settings["clients_per_round"] > settings["population_size"]:
        raise AuditCommandError(f"clients_per_round {settings['clients_per_round']}"
                                f"{source.get('clients_per_round', stored_in)} is above the population, "
                                f"{settings['population_size']}{source.get('population_size', stored_in)}: a round "
                                "samples at most every user (--clients-per-round, --population; `lore-fed privacy` "
                                "refuses it too)")


MAX_QUERY_NOISE = 1e6  # far above any score a basis serves: such noise leaves nothing to extract


def _check_counts(args: argparse.Namespace) -> None:
    """The audits' sizes and noise levels, checked before any work."""
    for flag in ("runs", "shadows", "permutations", "max_users"):
        least = MIN_COUNTS[flag] if MIN_COUNT_AUDIT.get(flag, args.name) == args.name else 1
        if getattr(args, flag) < least:
            raise AuditCommandError(f"--{flag.replace('_', '-')} must be >= {least}, got "
                                    f"{getattr(args, flag)}")
        if getattr(args, flag) > MAX_COUNTS[flag]:  # the work grows with it: 4,000 mechanism runs take ~20 s
            raise AuditCommandError(f"--{flag.replace('_', '-')} {getattr(args, flag)} is above "
                                    f"{MAX_COUNTS[flag]:,}; the defaults are {DEFAULT_COUNTS[flag]:,}")
    if args.name == "attribute" and args.permutations < 20:  # the smallest p-value is 1 / (permutations + 1)
        raise AuditCommandError(f"--permutations {args.permutations} can never reach p < 0.05 (the smallest p-value "
                                f"is 1/{args.permutations + 1}); use 20 or more, about 20 per attribute tested (Holm "
                                "needs p < 0.05 / attributes; default 200)")
    if args.seed < 0:
        raise AuditCommandError(f"--seed must be >= 0, got {args.seed}")
    for flag in ("query_noise",):
        value = getattr(args, flag)
        if not 0 <= value <= MAX_QUERY_NOISE:  # scores are O(1); a tester's 1e308 overflowed to inf mid-audit
            raise AuditCommandError(f"--{flag.replace('_', '-')} must be a number in [0, {MAX_QUERY_NOISE:g}] (the "
                                    f"std of the noise on each served score), got {value}")


def _check_inputs(args: argparse.Namespace, run_dir: Path | None) -> None:
    """--synthetic with a run directory or files: its result would be filed as the run's own (a tester's `fairness
    RUN --synthetic`), or the files would be ignored."""
    if args.synthetic:
        ignored = [flag for flag, value in (("--pairs", args.pairs), ("--basis", args.basis)) if value is not None]
        if run_dir is not None:
            raise AuditCommandError(f"--synthetic audits a synthetic population, not {run_dir}: its result would be "
                                    "filed as the run's own; drop the run directory (or --synthetic)")
        if ignored:
            raise AuditCommandError(f"--synthetic makes its own pairs and basis: drop {' and '.join(ignored)}")


def other_basis_note(args: argparse.Namespace, run_dir: Path | None) -> str:
    """A sentence for the result's summary when --basis is not the run's own basis (a tester's `fairness RUN --basis
    OTHER_RUN/basis.npz` read in RUN's report as RUN's fairness): its figures are that basis's, at the run's
    settings (a what-if the tests use: a run's record-mode mechanism on a basis that has learned the users)."""
    if args.basis is None or run_dir is None:
        return ""
    own = [file for file in (run_dir / "basis.npz", run_dir / "checkpoint.npz") if file.is_file()]
    given = load_run_basis(args.basis, None)[0]
    if not own or any(_same_basis(given, load_run_basis(str(file), None)[0]) for file in own):
        return ""
    return f" Scored on --basis {args.basis}, not {run_dir}'s own basis: these figures are that basis's."


def _same_basis(first: np.ndarray, second: np.ndarray) -> bool:
    return first.shape == second.shape and np.array_equal(first, second)


def _read_config(path: Path) -> dict:
    text = read_text(path, AuditCommandError, "--config")
    if path.suffix == ".toml":
        import tomllib

        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise AuditCommandError(f"--config {path}: not valid TOML ({exc})") from None
    else:
        data = parse_json(text, path, AuditCommandError)
    if isinstance(data, dict) and isinstance(data.get("privacy"), dict):
        data = data["privacy"]
    if not isinstance(data, dict):
        raise AuditCommandError(f"--config {path}: expected privacy settings as an object (flat or under [privacy]), "
                                f"got {type(data).__name__}")
    known = {k.replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(known) - set(PRIVACY_DEFAULTS) - {"population", "sample_rate"})
    if unknown:
        raise AuditCommandError(f"--config {path}: unknown keys {unknown}; known: {sorted(PRIVACY_DEFAULTS)}")
    if "population" in known:
        known["population_size"] = known.pop("population")
    known.pop("sample_rate", None)
    return known


def _synthetic(seed: int):
    from simulations.synthetic_pairs import SyntheticPairsConfig, make_synthetic_pairs

    return make_synthetic_pairs(SyntheticPairsConfig(dim=64, seen_users=300, unseen_users=100, seed=seed))


def run_pair_file(run_dir: Path | None) -> str | Path | None:
    """The pair file a run was trained on: the path in a simulate run's data.json (lore_cli.run_data), `pairs_path`
    in a train run's metrics.json, or a pairs.npz inside the run directory; None when it does not say. A file whose
    digest differs from the one the run recorded is refused."""
    from lore_cli.run_data import DATA_FILENAME

    if run_dir is None:
        return None
    # data.json first: a simulate run's own record, which an edited metrics.json cannot skip (found by a tester)
    for name, key in ((DATA_FILENAME, "path"), ("metrics.json", "pairs_path")):
        file = run_dir / name
        if not file.exists():
            continue
        try:
            record = json_loads(file.read_text())
            value = record.get(key)
        except (ValueError, AttributeError) as exc:
            raise AuditCommandError(f"{file}: not a JSON object ({exc}); pass --pairs PAIRS.npz") from exc
        if not isinstance(value, str):
            if name == DATA_FILENAME:  # the run's own record: damaged, the pair file cannot be checked (a review)
                raise AuditCommandError(f"{file}: no pair-file path (\"path\"); it is the run's record of its pair "
                                        f"file, without which the pair file cannot be checked. Restore {file}, or "
                                        "pass the run's pairs with --pairs")
            continue
        if name == DATA_FILENAME:
            check_recorded_pair_file(file, record, value)
            file, record = run_dir / "metrics.json", _json_or_none(run_dir / "metrics.json")  # its copy too (a tester)
        if isinstance(record, dict) and "pairs_fingerprint" in record:  # a run from before fingerprints has none
            check_recorded_pair_file(file, record["pairs_fingerprint"], value, field="pairs_fingerprint")
        return value
    return run_dir / "pairs.npz" if (run_dir / "pairs.npz").exists() else None


def _json_or_none(file: Path):
    """A run file's JSON, or None where it is missing or not JSON (the caller checks what it needs)."""
    try:
        return json_loads(file.read_text()) if file.is_file() else None
    except ValueError:
        return None


def check_given_pairs(run_dir: Path, pairs_path: Path) -> None:
    """--pairs with a run: that run's pair file, moved or copied, never another population's (a tester's audits of
    a 60-user run on a 50-user file passed and were filed as the run's own), where the run recorded a digest."""
    from lore_cli.run_data import DATA_FILENAME, fingerprint_problem, same_pair_file

    for name, key in ((DATA_FILENAME, None), ("metrics.json", "pairs_fingerprint")):
        file = run_dir / name
        record = _json_or_none(file)
        recorded = record.get(key) if isinstance(record, dict) and key else record
        if recorded is None or fingerprint_problem(recorded):
            continue
        if not same_pair_file(recorded, pairs_path):
            raise AuditCommandError(f"--pairs {pairs_path} is not the pair file {run_dir} was trained on (its size or "
                                    f"digest differs from {file}'s record): an audit of the run reads the run's own "
                                    "pairs (moved or copied is fine); audit another population without the run "
                                    "directory")
        return


def check_recorded_pair_file(file: Path, recorded, pairs_path: str, field: str | None = None) -> None:
    """The pair file a run names against the digest the run recorded in `file` (under `field`): refused when the
    record is damaged (the check would be skipped) or the file has changed since the run."""
    from lore_cli.run_data import fingerprint_problem, same_pair_file

    problem = fingerprint_problem(recorded)
    if problem:
        where = f"{field}: " if field else ""
        raise AuditCommandError(f"{file}: {where}{problem}; it is the run's record of the pair file, without which "
                                f"{pairs_path} cannot be checked. Restore {file}, or pass the run's pairs with --pairs")
    if Path(pairs_path).is_file() and not same_pair_file(recorded, pairs_path):
        raise AuditCommandError(f"{file}: the pair file it names, {pairs_path}, has changed since the run (its size or "
                                "the digest of its arrays' CRC-32s differs); pass the run's pairs with --pairs")


def load_pairs_and_basis(args: argparse.Namespace, run_dir: Path | None):
    """(PairSet, basis (B, D), dataset directory or None)."""
    from lore_core.basis_file import warn_if_other_embedder
    from lore_core.pairs import load_pairs

    if args.synthetic:
        pairs, truth = _synthetic(args.seed)
        return pairs, truth.basis, None
    pairs_path = args.pairs if args.pairs is not None else run_pair_file(run_dir)
    if pairs_path is None:
        raise AuditCommandError("no pair file: pass --pairs PAIRS.npz|DATASET (or --synthetic)")
    pairs = load_pairs(pairs_path)
    if args.pairs is not None and run_dir is not None:
        check_given_pairs(run_dir, Path(pairs.source))
    basis, basis_file = load_run_basis(args.basis, run_dir)
    if basis.shape[1] != pairs.dim:
        where = args.basis or next(f for f in (run_dir / "basis.npz", run_dir / "checkpoint.npz") if f.is_file())
        raise AuditCommandError(f"the basis {where} has dimension {basis.shape[1]}, the pair file {pairs.source} "
                                f"{pairs.dim}: give the pairs the basis was trained on")
    if basis_file is not None:
        warn_if_other_embedder(basis_file, pairs)
    dataset = Path(pairs.source).parent
    return pairs, basis, dataset


def load_run_basis(path: str | None, run_dir: Path | None):
    """(basis (B, D) float64, the BasisFile it came from, or None for a checkpoint, which names no embedder)."""
    from lore_core.basis_file import load_basis

    candidates = [Path(path)] if path else ([run_dir / "basis.npz", run_dir / "checkpoint.npz"] if run_dir else [])
    from lore_core.npz_file import open_npz

    for file in candidates:
        if not file.is_file():
            if path:  # named on the command line: say why it cannot be read
                raise AuditCommandError(not_a_file("--basis", file))
            continue
        with open_npz(file, "a basis file or a run's checkpoint.npz", AuditCommandError) as data:
            names = data.files
            basis = data["basis"] if "basis" in names and "sha256" not in names else None
        if "sha256" in names:
            basis_file = load_basis(file)
            return basis_file.basis.astype(np.float64), basis_file
        if basis is None:
            raise AuditCommandError(f"{file}: no `basis` array (found {sorted(names)}); give a basis file "
                                    "(`lore-fed train --out`) or a run's checkpoint.npz")
        if basis.ndim != 2 or not np.issubdtype(basis.dtype, np.floating) or not np.isfinite(basis).all():
            raise AuditCommandError(f"{file}: basis must be a finite 2-D float array, got {basis.dtype} "
                                    f"{basis.shape}")
        return basis.astype(np.float64), None
    raise AuditCommandError(f"no basis found (looked at {[str(c) for c in candidates]}); pass --basis FILE")


def run_client_settings(run_dir: Path | None):
    """The clients' training settings of the run that happened (federation.protocol.ClientSettings): its
    checkpoint's train prior, local steps, client rate, objective and weighting; the run config's defaults for a run
    without a checkpoint (`train`, or --basis/--synthetic), whose updates no client ever sent."""
    from flwr.common.config import get_fused_config_from_dir

    from federation.protocol import ClientSettings
    from server.checkpoint import CHECKPOINT_FILENAME, load_checkpoint
    from simulations.flower_run import ROOT

    ran = {}
    if run_dir is not None and (run_dir / CHECKPOINT_FILENAME).is_file():
        stored = load_checkpoint(run_dir).settings
        ran = {key: stored[field] for field, key in (("train_prior_pairs", "train-prior-pairs"),
                                                      ("local_steps", "local-steps"), ("client_lr", "client-lr"),
                                                      ("objective", "objective"), ("weight_by", "weight-by"),
                                                      ("pairs_per_user", "pairs-per-user"),
                                                      ("privacy_mode", "privacy-mode")) if field in stored}
        if ran.get("weight-by") != "pair":  # stored as 1.0 under user weighting, where the run config refuses it
            ran.pop("pairs-per-user", None)
        if ran.get("privacy-mode") == "record":  # its clients ran record-epochs, not local steps (refused there)
            ran.pop("local-steps", None)
    return ClientSettings.from_run_config(get_fused_config_from_dir(ROOT, ran))


def run_prior_pairs(args: argparse.Namespace, run_dir: Path | None) -> float:
    """The personal prior the run chose and its devices fit w with (basis.npz's, as `lore-fed evaluate` uses it);
    the default for a basis file without one, a checkpoint or --synthetic."""
    from lore_core.simplex_fit import DEFAULT_PRIOR_PAIRS

    basis_file = None if args.synthetic else load_run_basis(args.basis, run_dir)[1]
    return DEFAULT_PRIOR_PAIRS if basis_file is None or basis_file.prior_pairs is None else basis_file.prior_pairs


def client_updates(pairs, basis: np.ndarray, user_ids: np.ndarray, client=None, *, block: int = 64):
    """Each user's device w (U, B) and basis update dA (U, B, D) as the client computes them in its first round
    (federation.local_training.train_sampled_users at `client`'s settings, default the run config's, from uniform
    w), in node-sized blocks of users. With the marginal objective, which sends no w-dependent update, w is the fit
    the device holds for evaluation (fit_sampled_users)."""
    from federation.local_training import fit_sampled_users, pair_weighted, train_sampled_users
    from federation.user_block import make_block

    client = run_client_settings(None) if client is None else client
    weights, updates = [], []
    for chunk in np.array_split(np.sort(user_ids), max(1, int(np.ceil(len(user_ids) / block)))):
        user_block, local = make_block(pairs, chunk), np.arange(chunk.size)
        if not np.array_equal(user_block.seen_users, chunk):  # row i of the result must be user chunk[i]
            raise AuditCommandError(f"client updates need seen users with training pairs; got {chunk[:3]}...")
        uniform = np.full((chunk.size, basis.shape[0]), 1.0 / basis.shape[0])
        fitted, update = train_sampled_users(basis, user_block, uniform, local, prior_pairs=client.train_prior_pairs,
                                             steps=client.local_steps, lr=client.client_lr, objective=client.objective)
        if client.objective != "joint":
            fitted = fit_sampled_users(basis, user_block, uniform, local, prior_pairs=client.train_prior_pairs)[0]
        if client.weight_by == "pair":  # as the ClientApp sends it (mode none)
            update = pair_weighted(update, user_block, local, client.pairs_per_user)
        weights.append(fitted)
        updates.append(update)
    return np.concatenate(weights), np.concatenate(updates)


def record_client_updates(pairs, basis: np.ndarray, user_ids: np.ndarray, settings: dict, *, lr: float,
                          rounds: int = 1, block: int = 64):
    """Record mode: each user's uploads of its first `rounds` rounds summed (U, B, D), each exactly as the client
    computes it (federation.local_training.record_dp_updates: Opacus DP-SGD over w and A, each pair clipped to
    max_grad_norm, the noise of the run's z), its private w and accountant carried from round to round as the
    client carries them. Fresh secret noise each round: what the server holds of each user over those rounds."""
    from federation.local_training import record_dp_updates
    from federation.user_block import make_block
    from lore_core.privacy.record_dp import RecordDpState

    updates = []
    for chunk in np.array_split(np.sort(user_ids), max(1, int(np.ceil(len(user_ids) / block)))):
        local, users = np.arange(chunk.size), make_block(pairs, chunk)
        logits, states = np.zeros((chunk.size, basis.shape[0])), [RecordDpState() for _ in local]
        summed = np.zeros((chunk.size,) + basis.shape)
        for _ in range(rounds):
            logits, upload, states = record_dp_updates(
                basis, users, logits, local, states, lr=lr, noise_multiplier=float(settings["noise_multiplier"]),
                max_grad_norm=float(settings["max_grad_norm"]), batch_size=int(settings["record_batch_size"]),
                sample_rate=float(settings["record_sample_rate"]), epochs=int(settings["record_epochs"]),
                delta=float(settings["delta"]))
            summed += upload
        updates.append(summed)
    return np.concatenate(updates)


def record_rounds(run_dir: Path | None, settings: dict) -> tuple[int, int | None]:
    """(rounds per user the record audits sum, the median number of rounds the run's users took part in according
    to its ledger, None without one, 0 when it lists no client): a user's rounds are its accountant history's sum of
    q x steps over the epochs (a round is epochs / q steps), the median over the users the ledger holds; at most
    MAX_RECORD_ROUNDS."""
    from lore_core.audits.update_leakage import MAX_RECORD_ROUNDS
    from lore_core.privacy.ledger import read_ledger
    from lore_core.privacy.record_dp import steps_per_epoch

    ledger = run_dir / "ledger.json" if run_dir else None
    if ledger is None or not ledger.exists():
        return 1, None
    clients = read_ledger(ledger)["events"]["clients"].values()
    taken = [sum(k / steps_per_epoch(q) for _, q, k in client["history"]) / int(settings["record_epochs"])
             for client in clients]
    if not taken:
        return 1, 0
    median = max(1, int(round(float(np.median(taken)))))
    return min(median, MAX_RECORD_ROUNDS), median


def observed_updates(pairs, basis: np.ndarray, user_ids: np.ndarray, settings: dict, run_dir: Path | None,
                     record_round_count: int = 1):
    """(device w (U, B), uploads (U, B, D), the flat clip the server's view applies or None) of the run's mode, at
    its clients' settings: in record mode the DP-SGD uploads of `record_round_count` rounds summed, already clipped
    per pair and noised; otherwise the update before the mode's user-level clip and noise (added by the view,
    update_leakage.server_view)."""
    client = run_client_settings(run_dir)
    if settings["mode"] == "record":
        # the target: the user's preference as a non-private fit at the run's prior; record mode's own w, a few
        # rounds of DP-SGD from uniform, is mostly noise, and no recovery could beat the uniform guess against it
        weights = client_updates(pairs, basis, user_ids, client)[0]
        return weights, record_client_updates(pairs, basis, user_ids, settings, lr=client.client_lr,
                                              rounds=record_round_count), None
    clip = settings["clip_norm"] if settings["mode"] != "none" else None
    return (*client_updates(pairs, basis, user_ids, client), clip)


def sample_users(ids: np.ndarray, max_users: int, seed: int) -> np.ndarray:
    if ids.size <= max_users:
        return np.sort(ids)
    return np.sort(np.random.default_rng(seed).choice(ids, size=max_users, replace=False))


def load_demographics(path: Path | None, user_ids: np.ndarray) -> dict[str, np.ndarray]:
    """users.jsonl -> attribute -> labels aligned with user_ids ('missing' where absent); location -> reside_region."""
    if path is None or not path.is_file():
        return {}
    rows, first = {}, {}
    for line, row in read_jsonl(path, AuditCommandError):
        if "user" not in row or not isinstance(row.get("demographics") or {}, dict):
            raise AuditCommandError(f"{path} line {line}: expected {{\"user\": ..., \"demographics\": {{...}}}}")
        user, demographics = str(row["user"]), row.get("demographics") or {}
        if user in rows and rows[user] != demographics:  # a tester's second row silently replaced the first
            raise AuditCommandError(f"{path} line {line}: user {ascii(user)} again, with other demographics than on "
                                    f"line {first[user]}; one row per user")
        rows[user] = demographics
        first.setdefault(user, line)
    attrs = sorted({k for d in rows.values() for k in d})
    out = {}
    for attr in attrs:
        values = []
        for uid in user_ids:
            value = rows.get(str(uid), {}).get(attr)
            if isinstance(value, dict):
                value = value.get("reside_region") or next((v for v in value.values() if isinstance(v, str)), None)
            values.append("missing" if value is None else str(value))
        out[attr] = np.array(values)
    return out


def _users_file(args: argparse.Namespace, dataset: Path | None) -> Path | None:
    if args.users:
        if not Path(args.users).is_file():  # named on the command line: say why it cannot be read
            raise AuditCommandError(not_a_file("--users", args.users))
        return Path(args.users)
    return dataset / "users.jsonl" if dataset else None


# --- audits -----------------------------------------------------------------------------------------------------------
def _update_leakage(args, run_dir, settings) -> dict:
    from lore_core.audits.update_leakage import record_scope, update_leakage_audit

    pairs, basis, _ = load_pairs_and_basis(args, run_dir)
    ids = sample_users(np.unique(pairs.user[pairs.seen]), args.max_users, args.seed)
    rounds, ledger_rounds = record_rounds(run_dir, settings) if settings["mode"] == "record" else (1, None)
    weights, updates, clip = observed_updates(pairs, basis, ids, settings, run_dir, rounds)
    member = pairs.subset(np.isin(pairs.user, ids) & pairs.seen & (pairs.split == "train"))
    held = pairs.subset(np.isin(pairs.user, ids) & pairs.seen & (pairs.split == "test"))
    mode = settings["mode"]
    return update_leakage_audit(updates, weights, member.diff, np.searchsorted(ids, member.user), held.diff,
                                np.searchsorted(ids, held.user), mode=mode, rounds_per_user=rounds,
                                clients_per_round=int(settings["clients_per_round"]), clip_norm=clip,
                                record_scope_text=record_scope(rounds, ledger_rounds) if mode == "record" else None,
                                seed=args.seed)


def _attribute(args, run_dir, settings) -> dict:
    from lore_core.audits.attribute import attribute_audit
    from lore_core.audits.update_leakage import MODE_VIEW, record_scope, recover_from_updates, server_view

    pairs, basis, dataset = load_pairs_and_basis(args, run_dir)
    ids = sample_users(np.unique(pairs.user[pairs.seen]), args.max_users, args.seed)
    users_file = _users_file(args, dataset)
    attributes = load_demographics(users_file, ids)
    if not attributes:
        given = f"{users_file} holds no demographics; " if users_file is not None and users_file.is_file() else \
            "no demographics: "
        raise AuditCommandError(f"{given}pass --users users.jsonl, lines {{\"user\": ..., \"demographics\": {{...}}}} "
                                "(written by `lore-fed prepare`)")
    if all((labels == "missing").all() for labels in attributes.values()):
        raise AuditCommandError(f"{users_file} describes none of the run's {len(ids)} sampled users (ids such as "
                                f"{ids[:3].tolist()}): give the users.jsonl of this run's dataset")
    rounds, ledger_rounds = record_rounds(run_dir, settings) if settings["mode"] == "record" else (1, None)
    weights, updates, _ = observed_updates(pairs, basis, ids, settings, run_dir, rounds)
    view = MODE_VIEW.get(settings["mode"], "single")
    observed, group = server_view(updates, view, clients_per_round=int(settings["clients_per_round"]),
                                  rounds_per_user=1, clip_norm=None, local_noise=0.0,
                                  rng=np.random.default_rng(args.seed))
    recovered = recover_from_updates(observed)[0][group]
    views = {"w_device": weights, "w_from_updates": recovered, "A_only": np.tile(weights.mean(axis=0), (len(ids), 1))}
    result = attribute_audit(views, attributes, permutations=args.permutations, seed=args.seed)
    if settings["mode"] == "record":  # w_from_updates: from the uploads of `rounds` rounds summed
        result["scope"] = record_scope(rounds, ledger_rounds)
        result["summary"] += f" w_from_updates measured on {result['scope']}."
    return result


def _membership(args, run_dir, settings) -> dict:
    from lore_core.audits.membership import record_membership_audit, user_membership_audit

    pairs, basis, _ = load_pairs_and_basis(args, run_dir)
    delta = float(settings["delta"])
    if args.level == "record":
        ids = sample_users(np.unique(pairs.user), args.max_users, args.seed)
        part = pairs.subset(np.isin(pairs.user, ids))
        result = record_membership_audit(basis, part.diff, np.searchsorted(ids, part.user), ids.size,
                                         shadows=args.shadows, prior_pairs=run_prior_pairs(args, run_dir),
                                         delta=delta, seed=args.seed)
        # what it attacks: a w fitted without privacy on the released basis (as a device adapting w does), not a
        # record-mode run's DP-SGD w_i, which stays on its device (a tester read a LEAK as record DP failing)
        result["scope"] = ("w_i refitted without privacy on the run's basis from each user's pairs (as a device "
                           "adapting w does; the personal prior of the run's basis), not record mode's DP-SGD w_i, "
                           "which never leaves its device")
        result["summary"] += f" Attacked: {result['scope']}."
        return result
    part = pairs.subset(pairs.split == "train")  # seen: pairs the basis trained on; unseen: few-shot, never used
    ids, idx = np.unique(part.user, return_inverse=True)
    member = np.isin(ids, np.unique(part.user[part.seen]))
    trained = settings["mode"] if run_dir is not None and (run_dir / "ledger.json").exists() else None
    return user_membership_audit(basis, part.diff, idx, member, delta=delta, seed=args.seed, trained_mode=trained)


def _mechanism(args, run_dir, settings) -> dict:
    """One step of the server's own aggregation (server.aggregation.make_aggregator for the run's privacy settings)."""
    from lore_core.audits.mechanism_audit import mechanism_audit
    from lore_core.privacy.accounting import epsilon
    from lore_core.privacy.privacy_settings import PrivacySettings, validate
    from server.aggregation import UserDpAggregator

    given_mode = args.mode or (_read_config(Path(args.config)).get("mode") if args.config else None)
    if run_dir is None and given_mode not in (None, "user", "user+secagg"):  # a tester's --mode record "passed"
        raise AuditCommandError(f"the mechanism audit covers the user-level modes (user, user+secagg); got mode "
                                f"{given_mode}")
    mode = settings["mode"] if settings["mode"] in ("user", "user+secagg") else "user"
    if run_dir is not None and not (run_dir / "ledger.json").exists():  # a tester's train run "passed", at z = 1
        raise AuditCommandError(f"{run_dir} has no privacy ledger (a `train` run): no mechanism ran there to audit; "
                                "give the settings to audit without the run directory")
    if run_dir is not None and settings["mode"] != mode:
        raise AuditCommandError(f"the mechanism audit covers the user-level modes; {run_dir} ran mode "
                                f"{settings['mode']}")
    from lore_core.privacy.privacy_settings import MAX_SCALE

    for key in ("noise_multiplier", "clip_norm"):  # above MAX_SCALE the accountant overflowed, naming no setting
        if not (math.isfinite(settings[key]) and 0 < settings[key] <= MAX_SCALE):
            raise AuditCommandError(f"{key} must be a finite number in (0, {MAX_SCALE:g}], got {settings[key]}")
    _refuse_more_per_round_than_users(settings)  # any mode, replayed as user-level (a tester: q = 50 passed)
    if not 0 < settings["delta"] < 1 / settings["population_size"]:  # a tester's 0.5 claimed epsilon -0.36
        raise AuditCommandError(f"delta must be in (0, 1/N) = (0, {1 / settings['population_size']:.3g}) for a "
                                f"population of N = {settings['population_size']}, as a run's; got {settings['delta']}")
    shape = (10, 384)
    if run_dir is not None or args.basis:
        try:
            shape = load_run_basis(args.basis, run_dir)[0].shape
        except AuditCommandError:
            pass
    z, clip, delta = float(settings["noise_multiplier"]), float(settings["clip_norm"]), float(settings["delta"])
    population, m = int(settings["population_size"]), int(settings["clients_per_round"])
    if mode == "user":
        aggregator = UserDpAggregator(m, z, clip)
        aggregate, claim = aggregator.aggregate, epsilon(z, 1.0, 1, delta)
    else:
        from server.aggregation import DistributedDpAggregator

        privacy = validate(PrivacySettings(mode="user+secagg", noise_multiplier=z, clip_norm=clip,
                                           clients_per_round=m, population_size=population, rounds=1, delta=delta,
                                           dimension=int(np.prod(shape))))
        aggregator = DistributedDpAggregator.for_audit(privacy)
        aggregate, claim = aggregator.aggregate, aggregator.one_step_epsilon()
    result = mechanism_audit(aggregate, noise_multiplier=z, clip_norm=clip, claimed_epsilon=claim,
                             denominator=m, population=population, shape=shape, runs=args.runs, delta=delta,
                             seed=args.seed)
    if run_dir is not None:  # a reviewer: filed under the run, a pass read as the run's own
        result["scope"] = ("the aggregation code installed now, at this run's settings; not this run's releases "
                           "(those: `audit accounting` and `audit canary`)")
        result["summary"] += f" Tested: {result['scope']}."
    return result


def check_record_covers_ledger(releases, ledger, state, run_dir: Path) -> None:
    """The audit scores the releases against the ledger's epsilon, so every release must name its ledger round, in
    increasing order (a round re-run after a crash is a new ledger round), up to the ledger's last round; a ledger
    round may lack a release only where the server died between the two (its budget stays spent). The record must
    end where the run's checkpoint says the run ended. Found before: a chain.jsonl cut to its header failed with
    numpy's "cannot reshape array of size 0", one cut to 3 of 10 releases was scored against the epsilon of all 10.
    Found by an adversarial tester: a prefix of the chain is itself a valid chain, so with the ledger cut to match
    (and the checkpoint deleted or its round lowered) 20 rounds passed as 5; and releases set to no ledger round
    were left out of the noise check, so a fake release of the claimed noise hid a run whose noise was cut.
    `state`: the run's checkpoint (None when it has none)."""
    counted, ledger_rounds = releases.ledger_rounds, ledger.rounds_released  # -1: a release naming no ledger round
    increasing = counted.size == 0 or (counted[0] >= 1 and (np.diff(counted) > 0).all())
    last_counted = int(counted[-1]) if counted.size else 0
    # A run that died between its last affordable round's ledger entry and its release, then stopped for its budget
    # when run again, keeps that round spent and unreleased: a rerun cannot change it (a reviewer).
    spent_unreleased = ledger.stopped_early and last_counted == ledger_rounds - 1
    if not increasing or (last_counted != ledger_rounds and not spent_unreleased):
        problem = "names no ledger round for a release" if (counted < 1).any() else \
            "lists ledger rounds out of order" if not increasing else \
            f"records releases up to ledger round {last_counted}, but the ledger holds {ledger_rounds} rounds"
        raise AuditCommandError(f"{run_dir}/releases/chain.jsonl {problem}: the record does not cover the run "
                                "(restore releases/ and ledger.json, or finish the run by rerunning its command)")
    last = int(releases.rounds.max()) if len(releases) else 0
    if state is None:
        if last > 1:  # every round writes its checkpoint after its release: only round 1 can lack one
            raise AuditCommandError(f"{run_dir}/checkpoint.npz is missing, but releases/ records round {last}: every "
                                    "round writes the checkpoint, which the audit checks the ledger and the record "
                                    "against; restore it")
        return
    if last > state.round + 1:
        raise AuditCommandError(f"{run_dir}/releases/chain.jsonl records round {last}, but the run's checkpoint is "
                                f"after round {state.round}: restore the run's checkpoint.npz")
    ended = np.flatnonzero(releases.rounds == state.round)
    if state.round and (not ended.size or not np.array_equal(releases.basis_after[ended[-1]], state.basis)):
        raise AuditCommandError(f"{run_dir}/checkpoint.npz holds a basis that is not the one released in its round "
                                f"{state.round} (releases/): the record and the checkpoint are of different runs or "
                                "were altered; restore both from the run")


def _canary(args, run_dir, settings) -> dict:
    """Canary audit of the run's released record with the auditor's secrets (lore_core.audits.canary)."""
    from federation.canary_users import canary_digest, load_canaries
    from lore_cli.run_consistency import published_mismatches
    from lore_cli.run_data import DATA_FILENAME
    from lore_core.audits.canary import canary_audit
    from lore_core.privacy.ledger import PrivacyLedger

    if run_dir is None or not args.secrets:
        raise AuditCommandError("the canary audit needs RUN_DIR and --secrets FILE (from `lore-fed simulate "
                                "--canaries K --canary-secrets FILE`)")
    state = check_run_records_every_round(run_dir)
    ledger = PrivacyLedger.load(run_dir)
    s = ledger.settings
    if s.mode not in ("user", "user+secagg"):
        raise AuditCommandError(f"the canary audit covers the user-level modes; {run_dir} ran mode {s.mode}")
    releases, sums = released_sums(run_dir, ledger, state)
    canaries = load_canaries(args.secrets)
    metrics = run_dir / "metrics.json"
    recorded = parse_json(read_text(metrics), metrics) if metrics.is_file() else {}
    hosted = recorded.get("canaries") if isinstance(recorded, dict) else None
    if isinstance(hosted, int) and hosted != canaries.count:
        raise AuditCommandError(f"--secrets {args.secrets} holds {canaries.count} canaries, but {run_dir} hosted "
                                f"{hosted} ({metrics}): give the secrets file of this run")
    # data.json holds the digest from the run's start (an interrupted run has no metrics.json)
    started = run_dir / DATA_FILENAME
    for record, values in ((started, parse_json(read_text(started), started) if started.is_file() else {}),
                           (metrics, recorded)):
        digest = values.get("canary_secrets_sha256") if isinstance(values, dict) else None
        if digest is not None and digest != canary_digest(canaries):
            # another run's canaries, absent from these releases, would read as a mechanism that leaks nothing
            raise AuditCommandError(f"--secrets {args.secrets} is not the secrets file of {run_dir}: its digest "
                                    f"differs from the canary_secrets_sha256 in {record}; give the file this run was "
                                    "started with")
    # a release whose step was skipped released nothing: no round of the audit
    result = canary_audit(sums[releases.stepped], canaries.directions, canaries.included,
                          noise_multiplier=s.noise_multiplier, clip_norm=s.clip_norm, sample_rate=s.sample_rate,
                          claimed_epsilon=ledger.epsilon().headline, delta=s.delta)
    result.update(release_record_head=releases.head, ledger_rounds=ledger.rounds_released)
    # the canaries use the ledger's q and z; the published basis and metrics must be the record's
    result["ledger_mismatches"] = mismatches = _ledger_mismatches(run_dir, state) + \
        published_mismatches(run_dir, state, releases)
    if mismatches:
        _fail(result, mismatches, "Canaries")
    return result


def _fail(result: dict, found: list[str], part: str) -> None:
    """`result` failed on `found`, what the run's record contradicts; its own summary kept as `part`'s."""
    result.update(verdict="fail", passed=False, problems=list(result.get("problems") or []) + found,
                  summary=f"FAIL: {'; '.join(found)}; the ledger's epsilon is not certified for this run. "
                          f"({part}: {result['summary']})")


def check_run_records_every_round(run_dir: Path):
    """A run directory's ledger and release record must reach its checkpoint's round, as a resume requires (each
    round writes both before its checkpoint). Found by a tester: with releases/ deleted and the ledger's epsilon
    lowered, or a round dropped from it, the accounting audit checked the ledger's events alone and passed.
    Returns the checkpoint (None when the run has none), loaded once for the audit's other checks."""
    from server.checkpoint import load_checkpoint
    from server.release_record import check_record_reaches
    from server.run_ledger import check_ledger_covers

    state = load_checkpoint(run_dir) if run_dir.is_dir() else None
    if state is not None:
        check_ledger_covers(run_dir, state.round)
        check_record_reaches(run_dir, state.round)
    return state


def released_sums(run_dir: Path, ledger, state):
    """The run's verified release record (hashes and the optimizer replay checked: these bases were released) and
    its released noisy sums (R, B, D): the recorded mean updates times the fixed denominator q N."""
    from server.release_record import read_releases

    releases = read_releases(run_dir)
    check_record_covers_ledger(releases, ledger, state, run_dir)
    s = ledger.settings
    return releases, releases.mean_updates * (s.sample_rate * s.population_size)


def _accounting(args, run_dir, settings) -> dict:
    """The ledger's epsilon recomputed from its events, and, for a run directory, whether the released sums carry
    the noise those events claim (lore_core.audits.released_noise): the events alone are what the server wrote."""
    from lore_cli.run_consistency import published_mismatches
    from lore_core.audits.accounting_check import accounting_audit
    from lore_core.privacy.ledger import PrivacyLedger
    from server.release_record import RELEASES_DIR

    if run_dir is None:
        raise AuditCommandError("the accounting audit needs RUN_DIR, the directory of a `lore-fed simulate` run")
    with _config_unreadable_named(run_dir):  # a tester's config.mode flipped to user+secagg: a traceback
        result = accounting_audit(run_dir)
    state = check_run_records_every_round(run_dir)
    ledger = PrivacyLedger.load(run_dir) if (run_dir / RELEASES_DIR).exists() else None  # else: a ledger alone
    record = released_sums(run_dir, ledger, state) if ledger is not None else None
    releases = record[0] if record is not None else None
    noise = _released_noise(run_dir, ledger, record)
    result["released_noise"] = noise
    with _config_unreadable_named(run_dir):  # a config edited past what it can hold (population 1e30)
        mismatches = _ledger_mismatches(run_dir, state) + published_mismatches(run_dir, state, releases)
    result["ledger_mismatches"] = mismatches
    found = mismatches + ([noise["summary"]] if noise["verdict"] == "fail" else [])
    if found:
        _fail(result, found, "Events")
    elif noise["verdict"] == "not-checked" and result["verdict"] == "pass":
        # the events agree, but only the released sums show the noise was added (a reviewer: this read `pass`)
        result.update(verdict="inconclusive", passed=False,
                      summary=f"INCONCLUSIVE: {result['summary'].removeprefix('PASS: ')} Released noise: "
                              f"{noise['summary']}: the epsilon holds only if the server added the noise its events "
                              "claim.")
    else:
        result["summary"] += f" Released noise: {noise['summary']}."
    return result


@contextlib.contextmanager
def _config_unreadable_named(run_dir: Path):
    """A ledger config that no privacy settings can be read from fails the block with exit 2 naming the file."""
    try:
        yield
    except (TypeError, KeyError, OverflowError) as exc:
        raise AuditCommandError(f"{run_dir / 'ledger.json'}: its config cannot be read as the run's privacy settings "
                                f"({type(exc).__name__}: {exc}); restore the ledger") from None


def _debug_stream(ledger: dict, state) -> list[str]:
    """A `user` run labelled private whose sampled counts follow the debug seed's stream (a relabelled
    `--reproducible-noise` run: lore_core.audits.debug_stream); needs the checkpoint for the noise's shape."""
    from lore_core.audits.debug_stream import debug_stream_match

    config, rounds = ledger["config"], ledger["events"]["rounds"]
    if state is None or config.get("mode") != "user" or config.get("reproducible_noise") or not rounds:
        return []  # (a reproducible run says so, and fails as not private)
    match = debug_stream_match([r["sampled"] for r in rounds], int(config["population_size"]),
                               float(rounds[0]["sample_rate"]), tuple(np.shape(state.basis)))
    if match is None:
        return []
    return [f"the sampled counts of its first {match['rounds']} rounds are those the debug seed {match['seed']} "
            f"draws (chance {match['chance']:.1e} for a secret seed): a --reproducible-noise run, whose noise anyone "
            "can remove, labelled private"]


def _ledger_mismatches(run_dir: Path, state) -> list[str]:
    """Where the run's ledger disagrees with itself or with its checkpoint (lore_core.audits.accounting_check): the
    privacy settings the checkpoint's own settings give for its population, z solved as the server solved it; and
    sampled counts that follow the debug seed's stream (`_debug_stream`, read from the same ledger); and its derived
    keys (guarantee, epsilon, delta, noise, ...) against what its config and events give."""
    from lore_core.audits.accounting_check import derived_view_problems, ledger_run_mismatches
    from lore_core.privacy.ledger import read_ledger

    file = run_dir / "ledger.json"
    ledger = read_ledger(file)
    found = derived_view_problems(ledger, _rendered_ledger(run_dir, ledger, state))
    expected, population = None, None
    if state is not None:
        population = int(sum(state.population[:-1]))
        try:
            expected = _privacy_the_run_used(state, population, ledger["config"]["rounds"])
        except (TypeError, ValueError, KeyError, IndexError) as exc:
            found.append(f"the settings in {run_dir / 'checkpoint.npz'} give no privacy settings to check it "
                         f"against ({type(exc).__name__}: {exc})")
    found += ledger_run_mismatches(ledger, expected, population) + _debug_stream(ledger, state)
    return [f"{file}: {problem}" for problem in found]


def _rendered_ledger(run_dir: Path, stored: dict, state) -> dict:
    """The ledger's conclusions as the class that wrote it renders them from its config and events, as JSON (its
    reports show these; readers, the file): a federated run's (any run directory with a checkpoint, releases or
    an `evaluation` key; a reviewer deleted that key to be rendered without the federated not-covered entries) with
    the evaluation policy the checkpoint's eval-every gives (or, without a checkpoint, the file's own policy text)."""
    from lore_core.privacy.ledger import PrivacyLedger
    from lore_core.atomic_io import strict_json
    from server.release_record import RELEASES_DIR
    from server.run_ledger import FederatedLedger, evaluation_policy

    federated = "evaluation" in stored or state is not None or (run_dir / RELEASES_DIR).exists()
    ledger = (FederatedLedger if federated else PrivacyLedger).load(run_dir)
    if federated:
        told = stored.get("evaluation")
        ledger.evaluation = (evaluation_policy(int(state.settings["eval_every"]), ledger.settings.is_dp)
                             if state is not None and "eval_every" in state.settings else
                             told.get("policy") if isinstance(told, dict) and isinstance(told.get("policy"), str)
                             else ledger.evaluation)
    return json.loads(strict_json(ledger.rendered()))  # as the file holds it (NaN -> null)


def _privacy_the_run_used(state, population: int, rounds: int) -> dict:
    """The privacy settings the server derived from its checkpointed settings for this population (PrivacySettings
    fields): the ledger of an honest run holds exactly these, a resume requires it. Only the four run-config fields
    they come from are read, so a checkpoint of an older version (other fields) is rebuilt as well (a reviewer)."""
    import warnings

    from server.run_settings import run_privacy_settings

    s = state.settings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the run already warned about its settings
        settings = run_privacy_settings(s["privacy_mode"], s["privacy"], s["clients_per_round"], s["rank"], int(rounds),
                                        population, int(state.population[-1]))
    return json.loads(json.dumps(settings.to_dict()))


def _released_noise(run_dir: Path, ledger, record) -> dict:
    """released_noise_check on the run's own release record, against each released round's z C in the ledger
    (`record`: released_sums' verified releases and sums, None when the run has no release record)."""
    from lore_core.audits.released_noise import released_noise_check
    from server.release_record import RELEASES_DIR

    if record is None:
        return {"verdict": "not-checked", "noise_ratio": None, "failed_checks": [],
                "summary": f"not checked: no release record ({run_dir / RELEASES_DIR}), only the ledger was given"}
    releases, sums = record
    per_round = np.concatenate([np.full(steps, z) for z, _, steps in ledger.history()] or [np.zeros(0)])
    # every release names its ledger round (check_record_covers_ledger); one whose step was skipped released nothing
    stepped = releases.stepped
    claimed = per_round[releases.ledger_rounds[stepped] - 1] * ledger.settings.clip_norm
    return released_noise_check(sums[stepped], claimed)


def _extraction(args, run_dir, settings) -> dict:
    from lore_core.audits.extraction import extraction_audit

    pairs, basis, _ = load_pairs_and_basis(args, run_dir)
    ids = sample_users(np.unique(pairs.user[pairs.seen]), args.max_users, args.seed)  # users with a trained w
    weights, _ = client_updates(pairs, basis, ids, run_client_settings(run_dir))
    return extraction_audit(basis, weights, noise_std=args.query_noise, seed=args.seed)


def _fairness(args, run_dir, settings) -> dict:
    from lore_core.audits.fairness import fairness_audit, per_user_accuracies

    pairs, basis, dataset = load_pairs_and_basis(args, run_dir)
    per_user = per_user_accuracies(pairs, basis, run_prior_pairs(args, run_dir))
    demographics = load_demographics(_users_file(args, dataset), per_user["user_ids"])
    return fairness_audit(per_user, demographics, seed=args.seed)


AUDITS = {"update-leakage": _update_leakage, "attribute": _attribute, "membership": _membership,
          "mechanism": _mechanism, "canary": _canary, "accounting": _accounting, "extraction": _extraction,
          "fairness": _fairness}


def _run_dir_lock(run_dir: Path | None):
    """The run directory's lock for the whole audit, from its first read to its ledger entry: an audit of a run still
    writing there read an unfinished run's basis and ledger, wrote its files, and only then was refused at the
    ledger, leaving a result that the finished run's report listed as its own. No lock file is left behind."""
    from lore_core.run_lock import RunDirLock

    if run_dir is None:
        return contextlib.nullcontext()
    return RunDirLock(run_dir, announce=False, remedy="audit it once that run has finished")


def _check_not_another_run(out: Path, run_dir: Path | None, basis: str | None) -> None:
    """--out may not be another run's directory: its report links its audits/ (a tester put a train run's audit
    into a simulate run's directory, whose report then showed it as its own). The audited run's own directory, given
    as RUN_DIR, or without one as the folder of --basis, is allowed (with RUN_DIR, --basis's folder is another
    run's: a tester's audit of run A was filed in run B's report, and its ledger entry in A's)."""
    own = [Path(run_dir)] if run_dir is not None else [Path(basis).parent] if basis else []
    if out.exists() and any(p.exists() and out.resolve() == p.resolve() for p in own):
        return
    from lore_core.atomic_io import run_folder_of

    if (folder := run_folder_of(out)) is not None:  # a tester: audits/ inside a simulate run's release record
        raise AuditCommandError(f"--out {out} is inside the run folder {folder}, which only the run writes; give "
                                "the audited run's directory or a new one")
    found = [name for name in ("ledger.json", "checkpoint.npz", "metrics.json") if (out / name).exists()]
    if found:
        raise AuditCommandError(f"--out {out} holds another run ({', '.join(found)}): its report would show this "
                                "audit as its own; give a new directory, or the audited run's own")


def run(args: argparse.Namespace) -> int:
    from lore_core.atomic_io import check_output_path
    from lore_core.audits.audit_report import write_audit

    run_dir = Path(args.run_dir) if args.run_dir else None
    if run_dir is not None and not run_dir.is_dir():
        raise AuditCommandError(f"run directory {run_dir} does not exist" if not run_dir.exists() else
                                f"{run_dir} is not a run directory (lore-fed simulate --out)")
    from lore_core.atomic_io import run_folder_of

    if run_dir is not None and (folder := run_folder_of(run_dir)) is not None:
        # a tester's `audit fairness RUN/client-accountants` wrote audits/ there, and the record run then could not
        # be resumed (its accountant folder held a directory)
        raise AuditCommandError(f"{run_dir} is inside the run folder {folder}, which only the run writes; give the "
                                f"run directory {folder.parent}")
    _check_counts(args)
    _check_inputs(args, run_dir)
    if args.out:
        check_output_path(args.out, "--out", directory=True)
        _check_not_another_run(Path(args.out), run_dir, getattr(args, "basis", None))
    with _run_dir_lock(run_dir):
        settings = _load_settings(args, run_dir)
        result = AUDITS[args.name](args, run_dir, settings)
        result["summary"] += other_basis_note(args, run_dir)
        given = {name: str(Path(value).resolve()) for name in ("pairs", "basis", "config")
                 if (value := getattr(args, name, None))}
        if given:  # files named instead of the run's own: the result says which (a tester found no trace of them)
            result["inputs_given"] = given
        out = Path(args.out) if args.out else (run_dir if run_dir is not None else Path("audit-out"))
        with interruptions_deferred():  # the result, plot, ledger entry and reports land together or not at all
            path = write_audit(out, result, ledger_dir=run_dir)
    print(f"audit {args.name}: {result['verdict'].upper()}")
    print(result["summary"])
    print(f"wrote {path} and {path.parent / 'audits.md'}")
    return 1 if result["verdict"] == "fail" else 0  # a script's `lore-fed audit ... &&` stops on a failed audit
