"""`lore-fed demo`: the main job on the bundled benchmark, end to end, in about ten minutes on two cores.

benchmark population (PRISM schema, hidden truth) -> PRISM pipeline -> MiniLM pair embeddings (cached)
-> centralized reference (`lore-fed train`, which also picks the rank) -> federated training through Flower's
simulation engine (`lore-fed simulate`, user-level DP by default) -> few-shot adaptation of unseen users on their
devices -> one report. Every stage is the real command with its own files; a stage whose output already exists is
skipped, so an interrupted demo resumes where it stopped (the federated run resumes from its checkpoint). The
settings that shape the results (the flags after their defaults) and the lore-fed version are recorded in
DIR/demo_flags.json before the first stage; a demo directory made with other settings, by another lore-fed, or from
before that record is refused before anything is written, never reported as a run of these settings.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from lore_core import __version__
from lore_core.atomic_io import atomic_write_json, atomic_write_text, check_output_path
from lore_core.prism_schema import population_written
from lore_core.text_file import json_loads


def configure(parser: argparse.ArgumentParser) -> None:
    from simulations.prism_population import DEMO_CONFIG
    from lore_cli.simulate_command import add_privacy_arguments

    parser.add_argument("--out", default="runs/demo", help="demo directory (default %(default)s)")
    parser.add_argument("--users", type=int, default=DEMO_CONFIG.users, help="benchmark participants")
    parser.add_argument("--rounds", type=int, default=60, help="rounds of the private federated run")
    parser.add_argument("--clients-per-round", type=int, default=None,
                        help=f"expected users per round of the private run (default {DEMO_CLIENTS_PER_ROUND}, or every "
                             "seen user of a smaller population)")
    parser.add_argument("--nonprivate-rounds", type=int, default=150,
                        help="rounds of the non-private federated run (all seen users every round); 0 skips it")
    parser.add_argument("--rank", default="auto", help="basis size, or 'auto' (chosen by the centralized run)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", default=None, help="embedding cache (default: $LORE_CACHE_DIR or ~/.cache)")
    add_privacy_arguments(parser)


# A demo population has ~180 seen users: z = 2 with 60 users per round for 60 rounds gives epsilon ~ 7 at delta
# 1e-5 (DP on small populations is expensive; the report says so). Used when neither z nor a target is given.
DEMO_NOISE_MULTIPLIER = 2.0
DEMO_CLIENTS_PER_ROUND = 60
DEMO_DIM = 384  # the demo embeds with the default MiniLM


def resolve_demo_flags(args: argparse.Namespace) -> None:
    """Check every flag and fill in the defaults of the unset ones, in `args`: what the demo records, compares and
    passes on to its stages are the settings, whether a default was typed out or left out."""
    if args.privacy in ("user", "user+secagg") and args.noise_multiplier is None and args.target_epsilon is None:
        args.noise_multiplier = DEMO_NOISE_MULTIPLIER
    fill_privacy_defaults(args, check_demo_flags(args))


def check_demo_flags(args: argparse.Namespace):
    """Every flag checked before the first stage writes anything: the privacy flags as `simulate` will check them,
    on a provisional population of --users seen users (the exact count is known after `prepare`). Returns the
    resolved PrivacySettings of that population."""
    from lore_cli.simulate_command import check_run, privacy_overrides

    for flag in ("users", "rounds", "clients_per_round"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    if args.nonprivate_rounds < 0:
        raise ValueError(f"--nonprivate-rounds must be >= 0 (0 skips that run), got {args.nonprivate_rounds}")
    rank = 1
    if args.rank != "auto":
        try:
            rank = int(args.rank)
        except ValueError:
            rank = 0
        if rank < 1:
            raise ValueError(f"--rank must be 'auto' or a positive integer, got {args.rank!r}")
    from lore_core.prism_pairs import DEFAULTS

    seen = max(1, int(DEFAULTS.seen_fraction * args.users))  # what `prepare` will make seen, about
    if args.clients_per_round is not None and args.clients_per_round > seen:  # `seen` is an upper bound
        raise ValueError(f"--clients-per-round {args.clients_per_round} is more than the at most {seen} seen users "
                         f"`prepare` makes of --users {args.users}; lower it (or leave it unset)")
    clients = min(args.clients_per_round or DEMO_CLIENTS_PER_ROUND, seen)
    population = {"seen_users": seen, "dim": DEMO_DIM, "source": f"a demo population of about {seen} seen users",
                  "largest_client_pairs": 1}
    overrides = {"num-server-rounds": args.rounds, "clients-per-round": clients, "rank": rank,
                 **privacy_overrides(args)}
    return check_run(population, overrides)[1]


# The privacy flags that have a default, by their PrivacySettings field (the same name as their argparse dest).
PRIVACY_DEFAULTED = ("noise_multiplier", "clip_norm", "delta", "max_grad_norm", "num_shares",
                     "reconstruction_threshold", "dropout_tolerance")


def fill_privacy_defaults(args: argparse.Namespace, privacy) -> None:
    """Set each unset privacy flag to the value `simulate` resolves it to (`privacy`, resolved on the provisional
    population), where the flags alone decide it. Left unset, as they follow the population `prepare` makes: a noise
    multiplier solved for --target-epsilon, and a user mode's delta above 10,000 seen users (user_delta(N))."""
    from lore_core.privacy.privacy_settings import USER_MODES, user_delta

    for name in PRIVACY_DEFAULTED:
        if getattr(args, name) is not None:
            continue
        if name == "noise_multiplier" and privacy.noise_from_target:
            continue
        # The provisional population is the most `prepare` can keep: the default is exact if every size up to it
        # has the same one.
        if name == "delta" and privacy.mode in USER_MODES and user_delta(privacy.population_size) != user_delta(1):
            continue
        setattr(args, name, getattr(privacy, name))


FLAGS_FILE = "demo_flags.json"
STAGE_SECONDS = "stage_seconds.json"  # each stage's seconds over every start, for the report's total
FLAGS_FORMAT = 2  # 2: the settings after defaults, and the lore-fed version; 1 (flags as given, no version): refused
# What each stage writes under DIR: any of them without DIR/demo_flags.json is a demo whose flags are unknown.
STAGE_OUTPUTS = ("prism", "dataset", "centralized", "federated-nonprivate", "federated", "report.md")
RUN_OUTPUTS = ("basis.npz", "metrics.json", "ledger.json", "checkpoint.npz")  # a train or simulate run's files
# Flags that change where or how fast the demo computes, not what it computes: they may differ on a resume.
# --cache-dir: the embedding cache (same embeddings from the cache or computed); --device: the torch device of record
# mode's DP-SGD step (`simulate` resumes a run on another device too).
NEUTRAL_FLAGS = ("out", "cache_dir", "device")
# Flags that only the federated stages read, by the stage directory they shape: a rerun may change them while that
# stage has not begun (`check_demo_dir`); every other flag shapes the population or the reference.
PRIVATE_STAGE_FLAGS = ("rounds", "clients_per_round", "privacy", "noise_multiplier", "target_epsilon", "max_epsilon",
                       "clip_norm", "delta", "max_grad_norm", "num_shares", "reconstruction_threshold",
                       "dropout_tolerance", "reproducible_noise", "allow_uncovered_eval")
LATE_FLAGS = {"nonprivate_rounds": "federated-nonprivate", **{key: "federated" for key in PRIVATE_STAGE_FLAGS}}


def demo_flags(args: argparse.Namespace) -> dict:
    """The settings that determine a demo's results, as recorded in DIR/demo_flags.json (JSON values; `args` as
    resolve_demo_flags leaves them)."""
    flags = {key: value for key, value in vars(args).items()
             if not key.startswith("_") and key not in NEUTRAL_FLAGS and key != "command"}
    if flags.get("rank") not in (None, "auto"):
        flags["rank"] = int(flags["rank"])  # "--rank 02" is "--rank 2"
    return json.loads(json.dumps(flags))


def demo_record(flags: dict) -> dict:
    """DIR/demo_flags.json of a demo of these settings (demo_flags) made by this lore-fed."""
    return {"format": FLAGS_FORMAT, "command": "lore-fed demo", "lore_fed_version": __version__, "flags": flags}


def _shown(value) -> str:
    if value is None or value is False:
        return "(not given)"
    return "(given)" if value is True else json.dumps(value)


def check_demo_dir(out: Path, flags: dict) -> bool:
    """Refuse (ValueError: exit 2, nothing written) a demo directory made with other settings or by another lore-fed
    version, or one whose settings or version are unknown because it predates DIR/demo_flags.json or the version in
    it. Returns whether DIR already records these settings (a resume)."""
    record_file = out / FLAGS_FILE
    if not record_file.exists():
        run = [name for name in RUN_OUTPUTS if (out / name).exists()]
        if run:  # a tester: a `train` run's directory was taken for a new demo's
            raise ValueError(f"--out {out} holds a run ({', '.join(run)}), not a demo: give a new --out")
        found = [name for name in STAGE_OUTPUTS if (out / name).exists()]
        if found:
            raise ValueError(
                f"--out {out} holds a demo ({', '.join(found)}) without {FLAGS_FILE}, from a lore-fed that did not "
                "record a demo's flags: its stages cannot be checked against these flags, so they are not reused; "
                f"give a new --out (or delete {out} to rerun the demo there)")
        return False
    try:
        record = json_loads(record_file.read_text())
        stored = record["flags"]
        if not isinstance(stored, dict):
            raise TypeError("'flags' is not an object")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"--out {out}: cannot read {record_file} ({exc}); give a new --out") from None
    start_afresh = f"give a new --out (or delete {out} to rerun the demo there)"
    version = record.get("lore_fed_version")
    if version is None:
        raise ValueError(f"--out {out}: {record_file} does not record which lore-fed made this demo (written before "
                         f"the version was recorded), so its stages are not reused by lore-fed {__version__}; "
                         + start_afresh)
    if version != __version__:
        raise ValueError(f"--out {out}: {record_file} records a demo made by lore-fed {version}, not {__version__}: "
                         f"stages are not reused across versions; {start_afresh}")
    changed = sorted(key for key in set(flags) | set(stored) if flags.get(key) != stored.get(key) or key not in stored)
    if changed and all(key in LATE_FLAGS and not _started(out / LATE_FLAGS[key]) for key in changed):
        # Only flags of stages not yet begun: nothing made so far depends on them (a tester: a --clients-per-round
        # above the seen users `prepare` made failed at the simulate stage, and the corrected flag was refused).
        atomic_write_json(record_file, demo_record(flags))
        print(f"resuming {out} with new settings for the stages not yet begun: "
              + ", ".join(f"--{key.replace('_', '-')}" for key in changed), flush=True)
        return True
    differ = [f"--{key.replace('_', '-')}: asked {_shown(flags.get(key))}, "
              + (f"stored {_shown(stored[key])}" if key in stored else "not recorded") for key in changed]
    if differ:
        raise ValueError(f"--out {out} holds a demo made with other settings ({'; '.join(differ)}); give a new --out, "
                         "or run with the flags it was made with to resume it")
    return True


def _started(stage_dir: Path) -> bool:
    """Whether a stage has begun writing its directory (a run's files, even of an interrupted run)."""
    return stage_dir.exists() and any(stage_dir.iterdir())


def _stage(name: str, done: bool, argv: list[str], out: Path) -> None:
    from lore_cli.main import CommandFailed, main
    from lore_core.termination import Terminated

    if done:
        print(f"== {name}: already done, skipped", flush=True)
        return
    print(f"== {name}: lore-fed {' '.join(argv)}", flush=True)
    started = time.perf_counter()
    try:
        code = main(argv)
    finally:  # every start's time in the stage, a failed or interrupted one's too (it resumes where that stopped)
        seconds = time.perf_counter() - started
        times = stage_seconds(out)
        try:
            atomic_write_json(out / STAGE_SECONDS, {**times, name: round(times.get(name, 0.0) + seconds, 1)})
        except OSError:  # the times only inform: never in the way of the stage's own outcome
            pass
    if code in (130, 143):  # the stage was interrupted: so is the demo (its own message, its exit code)
        raise Terminated() if code == 143 else KeyboardInterrupt()
    if code != 0:
        raise CommandFailed(f"stage {name!r} failed (exit {code}, see above); rerun `lore-fed demo` to resume after "
                            "fixing it")
    print(f"== {name}: {seconds:.1f} s", flush=True)


def stage_seconds(out: Path) -> dict[str, float]:
    """Each stage's time, summed over the starts that ran it ({} for an unreadable record: the times only inform):
    a resumed demo's report totals them, not the last start's own seconds (a tester's rerun read "Total 5 s")."""
    try:
        times = json_loads((out / STAGE_SECONDS).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(times, dict):
        return {}
    return {k: float(v) for k, v in times.items()  # a damaged record's odd values are left out (a tester's NaN)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1e9}


def stages_time(seconds: float | None) -> str:
    """The stages' total time in words (None: no record of them)."""
    return f"{seconds:.0f} s in all" if seconds is not None else "an unknown time (no readable stage_seconds.json)"


def stages_total(out: Path) -> float | None:
    times = stage_seconds(out)
    return sum(times.values()) if times else None


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    resolve_demo_flags(args)
    out = Path(args.out)
    check_output_path(out, "--out", directory=True)
    flags = demo_flags(args)
    if not check_demo_dir(out, flags):  # a new demo: its flags are on disk before its first stage writes
        atomic_write_json(out / FLAGS_FILE, demo_record(flags))
    prism, dataset, central = out / "prism", out / "dataset", out / "centralized"
    nonprivate, federated = out / "federated-nonprivate", out / "federated"
    cache = ["--cache-dir", args.cache_dir] if args.cache_dir else []

    _stage("benchmark population", population_written(prism),
           ["synth", "--users", str(args.users), "--max-turns", "3", "--seed", str(args.seed), "--out", str(prism)]
           + cache, out)
    _stage("PRISM pipeline", (dataset / "summary.json").exists(), ["prepare", str(prism), "--out", str(dataset)],
           out)
    _stage("pair embeddings", (dataset / "pairs.npz").exists(), ["embed", str(dataset)] + cache, out)
    _stage("centralized reference", (central / "metrics.json").exists(),
           ["train", str(dataset), "--rank", str(args.rank), "--seed", str(args.seed), "--out", str(central)], out)
    reference = json.loads((central / "metrics.json").read_text())
    rank = reference["rank"] if args.rank == "auto" else int(args.rank)
    common = ["--rank", str(rank), "--seed", str(args.seed), "--reference", str(central)]
    chosen = train_choice(reference)
    seen_users = json.loads((dataset / "summary.json").read_text())["seen_users"]
    if args.clients_per_round is not None and args.clients_per_round > seen_users:  # checked up front: 0.8 x users
        raise ValueError(f"--clients-per-round {args.clients_per_round} is more than the {seen_users} seen users "
                         f"`prepare` made of --users {args.users}: run the demo again with --clients-per-round "
                         f"{seen_users} or less (or unset); the stages done are kept")
    clients = args.clients_per_round or min(DEMO_CLIENTS_PER_ROUND, seen_users)
    if args.nonprivate_rounds:
        _stage("federated training without privacy (Flower simulation engine)", (nonprivate / "metrics.json").exists(),
               ["simulate", str(dataset), "--rounds", str(args.nonprivate_rounds), "--clients-per-round",
                str(seen_users), "--privacy", "none", "--out", str(nonprivate)] + common + chosen["none"], out)
    _stage(f"federated training, privacy {args.privacy} (Flower simulation engine)", (federated / "metrics.json").exists(),
           ["simulate", str(dataset), "--rounds", str(args.rounds), "--clients-per-round", str(clients),
            "--out", str(federated)] + common + chosen["dp" if args.privacy != "none" else "none"]
           + simulate_privacy_argv(args), out)
    runs = {"federated": json.loads((federated / "metrics.json").read_text())}
    if (nonprivate / "metrics.json").exists():
        runs["federated-nonprivate"] = json.loads((nonprivate / "metrics.json").read_text())
    total = stages_total(out)
    taken = (("rank",) if args.rank == "auto" else ()) + (("l2",) if args.privacy != "none" and chosen["dp"] else ())
    report = write_demo_report(out, dataset, reference, runs, total, reference_choices=taken)
    text = report.read_text()
    print("\n" + text[text.index("## Accuracy"):text.index("Details:")].strip())
    print(f"\ndemo finished: this start took {time.perf_counter() - started:.0f} s, its stages "
          f"{stages_time(total)}; report: {report}")
    return 0


def train_choice(reference: dict) -> dict[str, list[str]]:
    """`simulate` flags for what the centralized run chose besides the rank, as the stress matrix passes them: without
    privacy its l2, personal prior, objective and weighting (like for like with the reference row); under DP its l2
    only (the DP defaults are calibrated for the joint update, user weighting and their own personal prior)."""
    flags = {key: ["--" + key.replace("_", "-"), str(reference[key])]
             for key in ("l2", "prior_pairs", "objective", "weight_by") if reference.get(key) is not None}
    return {"none": [f for key in ("l2", "prior_pairs", "objective", "weight_by") for f in flags.get(key, [])],
            "dp": flags.get("l2", [])}


def _choices_sentence(choices: tuple[str, ...], rank, l2) -> str:
    """The private run's settings that the centralized, non-private run chose on the same users (not covered), or ""
    (a reviewer: the l2 the DP run takes from `train --l2 auto` went unnamed)."""
    named = {"rank": (f"the rank {rank}", "`--rank auto`", "`--rank`"),
             "l2": (f"the l2 penalty {l2:g}" if isinstance(l2, (int, float)) else "the l2 penalty", "`--l2 auto`",
                    "`--l2`")}
    parts = [named[c] for c in choices if c in named]
    if not parts:
        return ""
    what, how, flags = (" and ".join(p[i] for p in parts) for i in range(3))
    verb, those = ("was", "that choice is") if len(parts) == 1 else ("were", "those choices are")
    return (f"{what[0].upper()}{what[1:]} {verb} chosen by the centralized, non-private run on the same users ({how}): "
            f"{those} not covered; for a run whose settings owe nothing to the private data, run `lore-fed simulate` "
            f"with {flags} from a public pilot population.")


def simulate_privacy_argv(args: argparse.Namespace) -> list[str]:
    """The demo's privacy flags (resolved: see resolve_demo_flags), passed on unchanged to `lore-fed simulate`."""
    from lore_cli.simulate_command import privacy_overrides

    argv = []
    for key, value in privacy_overrides(args).items():
        flag = "--privacy" if key == "privacy-mode" else f"--{key}"
        argv += [flag] if value is True else [flag, str(value)]
    return argv


def write_demo_report(out: Path, dataset: Path, central: dict, runs: dict[str, dict], seconds: float | None, *,
                      reference_choices: tuple[str, ...] = ()) -> Path:
    """report.md; `reference_choices`: what the private run took from the centralized run's choices on the same users
    ("rank" with `--rank auto`, "l2": its `--l2 auto` penalty), which the privacy section names as not covered."""
    summary = json.loads((dataset / "summary.json").read_text())
    federated = runs["federated"]
    rows = [("centralized (`lore-fed train`)", central)]
    if "federated-nonprivate" in runs:
        rows.append(("federated, no privacy (all seen users each round)", runs["federated-nonprivate"]))
    rows.append((f"federated, privacy `{federated.get('privacy_mode')}`", federated))
    lines = [
        "# lore-fed demo",
        "",
        f"Benchmark population -> PRISM pipeline -> MiniLM embeddings -> centralized reference and federated "
        f"training -> few-shot adaptation of unseen users. Its stages took {stages_time(seconds)}.",
        "",
        "## Data",
        "",
        "```json",
        json.dumps({k: v for k, v in summary.items() if not isinstance(v, (dict, list))}, indent=2),
        "```",
        "",
        "## Accuracy (per-user pair accuracy, mean over users)",
        "",
        "| model | rank | seen users (test) | unseen users, few-shot (test) |",
        "|---|---|---|---|",
    ]
    for name, metrics in rows:
        lines.append(f"| {name} | {metrics.get('rank')} | {metrics.get('seen_test_acc', float('nan')):.4f} | "
                     f"{metrics.get('unseen_test_acc', float('nan')):.4f} |")
    if "true_basis_seen_test_acc" in central:
        lines.append(f"| true basis, each user fits only w (ceiling) | - | {central['true_basis_seen_test_acc']:.4f} | "
                     f"{central['true_basis_unseen_test_acc']:.4f} |")
    if "oracle_seen_test_acc" in central:
        lines.append(f"| oracle (true basis and weights) | - | {central['oracle_seen_test_acc']:.4f} | "
                     f"{central['oracle_unseen_test_acc']:.4f} |")
    lines += ["", "## Privacy", ""]
    mode = federated.get("privacy_mode", "none")
    ledger_file = out / "federated" / "ledger.json"
    ledger = json.loads(ledger_file.read_text()) if ledger_file.exists() else {}
    others = ("runs of this report (`centralized/`, `federated-nonprivate/`) trained on the same users without "
              "privacy and release their bases" if "federated-nonprivate" in runs else
              "run of this report (`centralized/`) trained on the same users without privacy and releases its basis")
    rank_choice = _choices_sentence(reference_choices, federated.get("rank"), central.get("l2"))
    if "epsilon" in federated:
        accountant = ("the distributed discrete Gaussian's RDP bound" if federated.get("epsilon_accountant") ==
                      "ddg-rdp" else f"the Opacus PRV accountant (RDP: {federated.get('epsilon_rdp', float('nan')):.3f})")
        sentences = [f"Mode `{mode}`: user-level (epsilon, delta) = ({federated['epsilon']:.3f}, "
                     f"{federated.get('delta')}) from {accountant}, {federated.get('rounds')} rounds, noise "
                     f"multiplier {federated.get('noise_multiplier')}, clip norm {federated.get('clip_norm')}; see "
                     "`federated/ledger.json` for what is and is not covered. This epsilon is that of the "
                     f"`federated/` run alone: the {others} and accuracies without any guarantee.",
                     "Differential privacy over a population of a few hundred users is expensive: larger populations "
                     "reach a smaller epsilon at the same accuracy."]
        if rank_choice:
            sentences.append(rank_choice)
        if federated.get("epsilon_against_server") is not None:
            sentences.append(f"This epsilon holds against everyone but the server; the server draws the sample, and "
                             f"against it the run is ({federated['epsilon_against_server']:.3f}, "
                             f"{federated.get('delta')})-DP over the {federated.get('most_user_rounds')} rounds of "
                             "the most-sampled user.")
        lines.append(" ".join(sentences))
    elif mode != "none" and federated.get("privacy_guarantee"):  # record: per pair, not user-level (the ledger's)
        # the other runs and the rank choice, as in the user modes (a privacy reviewer found them left out here)
        lines.append(" ".join([f"Mode `{mode}`: {federated['privacy_guarantee']}.",
                               f"It is that of the `federated/` run alone: the {others} and accuracies without any "
                               "guarantee."] + ([rank_choice] if rank_choice else [])))
    else:
        lines.append(f"Mode `{mode}`: no differential-privacy guarantee for this run.")
    if ledger:
        lines += ["", f"Who is trusted (threat model): {ledger['threat_model']}", "",
                  "Not covered by the accountant: " + "; ".join(ledger["not_covered"]) + "."]
    lines += ["", "Details: " + ", ".join(f"[{name}]({name}/report.md)" for name in runs), ""]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path
