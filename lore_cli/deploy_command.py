"""`lore-fed deploy`: Flower's Deployment Engine on this machine (127.0.0.1), secure by default.

  lore-fed deploy certs --out DIR [--host 127.0.0.1] [--nodes 3]
      a trial CA, a server certificate for HOST and EC P-384 OpenSSH key pairs node0..node{N-1}
  lore-fed deploy local --nodes N --pairs PAIRS --run-dir DIR [--rounds R] [--certs DIR] [--insecure] [-c "k=v ..."]
      split PAIRS by user into DIR/nodeK/data/pairs.npz, start a SuperLink (TLS + SuperNode authentication) and N
      SuperNodes, register the nodes' keys, `flwr run` the app, check the run's real status with `flwr ls`, stop
      every process. The server's checkpoint, rounds.jsonl and ledger land in DIR, and once the run completes its
      basis.npz, metrics.json and report.md; rerunning resumes.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="deploy_command", metavar="{certs,local}", required=True)
    certs = sub.add_parser("certs", help="trial certificates and node key pairs (bring your own in production)",
                           description="Trial certificates and node key pairs for a deployment (bring your own in "
                                       "production).")
    certs.add_argument("--out", required=True, help="directory for ca.crt, server.pem, server.key, nodeK, nodeK.pub")
    certs.add_argument("--host", default="127.0.0.1", help="the SuperLink's address as nodes reach it (IP or DNS)")
    certs.add_argument("--nodes", type=int, default=3, help="number of node key pairs")

    local = sub.add_parser("local", help="SuperLink + N SuperNodes on 127.0.0.1, run the app, stop everything",
                           description="A SuperLink and N SuperNodes on 127.0.0.1 (TLS, node authentication), "
                                       "the app run with `flwr run`, every process stopped at the end.")
    local.add_argument("--nodes", type=int, required=True, help="number of SuperNodes N")
    local.add_argument("--pairs", required=True, help="pair file (.npz) or dataset directory, split by user")
    local.add_argument("--run-dir", required=True, help="run directory (resumed if it holds a checkpoint)")
    local.add_argument("--rounds", type=int, default=None, help="num-server-rounds (default: pyproject's)")
    local.add_argument("--certs", default=None, help="certificate directory (default: RUN_DIR/certs, generated)")
    local.add_argument("--insecure", action="store_true", help="plain HTTP, no node authentication (debug only)")
    local.add_argument("-c", "--run-config", action="append", default=None,
                       help='run-config overrides, e.g. "rank=5 seed=1"; repeated -c add up (as `flwr run`\'s)')
    local.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for the run")
    local.add_argument("--app", default=None, help="Flower app directory `flwr run` packs (default: this repository)")


def given_configs(run_config: list[str] | None) -> list[str]:
    """Each -c given, in order; passed on to `flwr run` as they came, so a later -c's key wins there as here. A
    tester's `-c 'weight-by="pair"' -c 'privacy-mode="none"'` kept the last alone and ran user-weighted with exit 0."""
    return list(run_config or [])


def run(args: argparse.Namespace) -> int:
    return run_certs(args) if args.deploy_command == "certs" else run_local(args)


def run_certs(args: argparse.Namespace) -> int:
    from lore_cli.local_deployment import generate_certificates
    from lore_core.atomic_io import check_output_path

    check_output_path(args.out, "--out", directory=True)

    certs = generate_certificates(args.out, host=args.host, nodes=args.nodes)
    print(f"wrote {certs.ca_cert}, {certs.server_cert}, {certs.server_key} and {len(certs.node_keys)} node key "
          f"pairs ({certs.node_keys[0].name}, {certs.node_keys[0].name}.pub, ...) for host {args.host}")
    print("trial certificates: the private keys are unencrypted; production users bring their own")
    return 0


def run_local(args: argparse.Namespace) -> int:
    from server.checkpoint import load_checkpoint
    from lore_cli.run_data import record_pairs
    from lore_cli.local_deployment import (Certificates, DeploymentError, LocalDeployment, earlier_deployment,
                                           generate_certificates, split_pairs, stop_process)

    checked = check_local_flags(args)
    run_dir = Path(args.run_dir).resolve()
    if leftovers := earlier_deployment(run_dir):
        raise ValueError(leftovers)  # before a certificate or a node's file is written (exit 2)
    certs = None
    if not args.insecure:  # (LocalDeployment prints the warning of an insecure deployment)
        cert_dir = Path(args.certs) if args.certs else run_dir / "certs"
        certs = Certificates.in_dir(cert_dir, args.nodes)
        if not certs.ca_cert.exists():
            if args.certs:
                raise FileNotFoundError(f"{certs.ca_cert} does not exist; run `lore-fed deploy certs --out {cert_dir}`")
            certs = generate_certificates(cert_dir, nodes=args.nodes)
            print(f"generated trial certificates in {cert_dir}")
    if certs is not None:
        certs.check()  # every node's key before a node's file is written (a tester's --nodes 3 on 2 nodes' keys)
    split_pairs(args.pairs, run_dir, args.nodes)
    if checked is not None:
        record_pairs(run_dir, checked[3])  # what a rerun compares its --pairs with
    previous = load_checkpoint(run_dir)  # a rerun of a finished run trains nothing: its time stays the run's
    overrides = {} if args.rounds is None else {"num-server-rounds": args.rounds}
    app = {"app": Path(args.app)} if args.app else {}
    try:
        with LocalDeployment(run_dir, args.nodes, certs, insecure=args.insecure, **app) as deployment:
            deployment.start()
            security = "insecure" if args.insecure else "TLS + node authentication"
            print(f"SuperLink on {deployment.address} ({security}), {args.nodes} SuperNodes; logs in "
                  f"{run_dir}/superlink and {run_dir}/node*", flush=True)
            started = time.monotonic()
            process, log = deployment.start_run(overrides, given_configs(args.run_config))
            follow(process, log, started + args.timeout)
            if process.poll() is None:  # (wait_run would name the time left, not --timeout)
                stop_process(process)
                raise DeploymentError(f"the run did not end within --timeout {args.timeout:g} s; log: {log}")
            outcome = deployment.wait_run(process, log, timeout=max(started + args.timeout - time.monotonic(), 1.0),
                                          started=started)
    except DeploymentError as exc:  # a run past --timeout, a process that would not start: a message, not a traceback
        from lore_cli.main import CommandFailed

        raise CommandFailed(f"{exc}; the same command resumes from {run_dir}") from None
    print(f"run {outcome.run_id}: {outcome.status} {outcome.details} ({outcome.seconds:.1f} s); log {outcome.log}")
    state = load_checkpoint(run_dir)
    if state is not None:
        evals = [{k: v for k, v in r.items() if k.endswith("_acc")} for r in state.history if "seen_test_acc" in r]
        print(f"checkpoint after round {state.round} in {run_dir}"
              + (f"; last evaluation {json.dumps(evals[-1])}" if evals else ""))
    if outcome.completed and state is not None and checked is not None:
        write_outputs(run_dir, state, *checked[:3], nodes=args.nodes, seconds=outcome.seconds, previous=previous,
                      command=getattr(args, "_command_line", "lore-fed deploy"))
    return 0 if outcome.completed else 1


def write_outputs(run_dir: Path, state, settings, privacy, population: dict, *, nodes: int, seconds: float,
                  previous=None, command: str = "lore-fed deploy") -> None:
    """The server's outputs of a completed run (`server/run_outputs.py`), as `simulate` writes them, with the pair
    file's embedder named in basis.npz (the ServerApp, which never sees the data, could not name it)."""
    from server.run_outputs import write_run_outputs

    report = write_run_outputs(run_dir, state, settings, privacy.mode, nodes=nodes, seconds=seconds,
                               previous=previous, embedder=population["embedder"],
                               command=command)
    if report is not None:
        print(f"wrote {run_dir / 'metrics.json'}, {run_dir / 'basis.npz'} and {report}")


# Run-config keys `deploy local` sets from its flags. A -c value would win in flwr: run-dir sent the server's
# checkpoint and ledger to another directory than --run-dir (which then showed no run), min-nodes above --nodes had
# the server wait for nodes never started until --timeout.
KEYS_OF_FLAGS = {"run-dir": "--run-dir", "min-nodes": "--nodes"}


def check_local_flags(args: argparse.Namespace) -> tuple | None:
    """Every flag of `deploy local` checked before a file is written or a process starts: counts, the timeout, the
    app directory, the pair file, and the run config (-c) as `simulate` checks it for this pair file's population
    (a bad value used to fail after the SuperLink and nodes had started, with exit 1). Returns (settings, privacy,
    population, the pair file's fingerprint) for this repository's app, None for another app (its keys mean what
    that app says)."""
    import math

    import click
    from flwr.common.config import get_fused_config_from_dir, parse_config_args

    from lore_cli.simulate_command import check_run, read_population, training_nodes
    from lore_core.privacy.privacy_settings import check_secagg_layout
    from lore_core.atomic_io import check_output_path
    from lore_cli.run_data import refuse_a_dataset
    from lore_core.pairs import resolve_pair_path
    from server.run_settings import given_fields
    from simulations.flower_run import ROOT

    if args.nodes < 1:
        raise ValueError(f"--nodes must be >= 1, got {args.nodes}")
    if args.rounds is not None and args.rounds < 1:
        raise ValueError(f"--rounds must be >= 1, got {args.rounds}")
    check_output_path(args.run_dir, "--run-dir", directory=True)
    refuse_a_dataset(Path(args.run_dir), "--run-dir")
    if not (math.isfinite(args.timeout) and args.timeout > 0):
        raise ValueError(f"--timeout must be a finite number of seconds > 0, got {args.timeout}")
    app = Path(args.app) if args.app else ROOT
    if not (app / "pyproject.toml").is_file():
        raise ValueError(f"--app {app}: no pyproject.toml there; give a Flower app directory (`flwr run` packs it)")
    known = get_fused_config_from_dir(app, {})  # the app's run config: its keys and defaults
    extra = {}
    configs = given_configs(args.run_config)
    text = " ".join(f"-c {c!r}" for c in configs)  # (as given, for the messages)
    if any(c.strip().endswith(".toml") for c in configs):
        raise ValueError(f"{text}: deploy local passes its own -c, and flwr takes no TOML file beside "
                         "it; give the values as key=value pairs")
    if configs:
        try:
            extra = parse_config_args(configs)
        except click.ClickException as exc:
            raise ValueError(f"{text}: {exc.message}") from None
        unknown = sorted(set(extra) - set(known))
        if not extra or unknown:
            raise ValueError(f"{text}: " + (f"unknown keys {unknown}" if unknown else "no key=value "
                             "pairs") + f"; the app's run config has {sorted(known)}")
        owned = [f"{key} (set by {flag})" for key, flag in KEYS_OF_FLAGS.items() if key in extra]
        if owned:
            raise ValueError(f"{text}: {', '.join(owned)} is the command's own: use the flag")
        if args.rounds is not None and extra.get("num-server-rounds", args.rounds) != args.rounds:  # -c won (a tester)
            raise ValueError(f"--rounds {args.rounds} and {text} (num-server-rounds={extra['num-server-rounds']}) "
                             "disagree: give the number of rounds once")
    population = read_population(resolve_pair_path(args.pairs), truth=False)  # a deployed run scores no benchmark
    if args.nodes > population["users"]:  # split_pairs refuses it too, but only after the certificates are written
        raise ValueError(f"--nodes {args.nodes} for {population['users']} users in {args.pairs}: every node must "
                         "host at least one user")
    if app.resolve() == ROOT.resolve():  # another app's keys mean what that app says
        # flwr gets our -c (rounds) first and the user's last: the user's value wins, as here
        config = {**({} if args.rounds is None else {"num-server-rounds": args.rounds}), **extra}
        clients = config.get("clients-per-round", known["clients-per-round"])
        mode = config.get("privacy-mode", known["privacy-mode"])
        if mode in ("none", "record") and isinstance(clients, int) and clients > population["seen_users"]:
            config["clients-per-round"] = population["seen_users"]  # these modes sample at most everyone
        settings, privacy = check_run(population, {**config, "run-dir": str(Path(args.run_dir).resolve())})
        check_secagg_layout(privacy, training_nodes(population, args.nodes), f"--nodes {args.nodes}")
        fingerprint = check_deploy_resume(Path(args.run_dir), resolve_pair_path(args.pairs), settings, privacy,
                                          args.nodes, given_fields(extra), population["dim"])  # the fields -c set
        return settings, privacy, population, fingerprint
    return None


def check_deploy_resume(run_dir: Path, pairs_path: Path, settings, privacy, nodes: int,
                        given: frozenset[str] = frozenset(), dim: int | None = None) -> dict:
    """A --run-dir holding a run is resumed only with its settings, pair file and node count, as `simulate` checks
    them (checkpoint, ledger, release record, data.json): -c noise-multiplier=2 on a run of 1 failed in the ServerApp
    after every process had started (exit 1, 15 s), and a tester's --run-dir of a `train` run was overwritten, a
    different pair file of the same size trained nothing new, and --nodes 3 on a 2-node run wrote a third node's
    file (users the second node hosts) before it failed. `given`: the settings -c set (as fields), which a refusal
    names even where their defaults follow another setting. Returns the pair file's fingerprint for data.json."""
    from lore_cli.simulate_command import check_evaluated_prior, check_no_other_run, check_resume

    try:
        check_no_other_run(run_dir)
        previous, fingerprint = check_resume(run_dir, pairs_path, settings, privacy, given, dim)
        check_evaluated_prior(run_dir, previous, settings)
    except ValueError as exc:  # simulate's messages name its --out; here the directory is --run-dir
        raise ValueError(str(exc).replace("--out", "--run-dir")) from None
    hosted = sorted(int(d.name[4:]) for d in run_dir.glob("node*") if d.name[4:].isdigit() and d.is_dir())
    if hosted and hosted != list(range(nodes)):
        raise ValueError(f"--run-dir {run_dir} holds a deployment of {len(hosted)} nodes (node0..node{hosted[-1]}), "
                         f"each with its users' pairs and w: give --nodes {len(hosted)} to resume it, or a new "
                         "--run-dir")
    return fingerprint


def follow(process, log: Path, deadline: float) -> None:
    """Echo the `flwr run --stream` log while it runs (it goes to a file so that the run keeps a record)."""
    with open(log, errors="replace") as handle:
        while process.poll() is None and time.monotonic() < deadline:
            print(handle.read(), end="", flush=True)
            time.sleep(0.5)
        print(handle.read(), end="", flush=True)
