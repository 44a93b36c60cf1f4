"""Flower's Deployment Engine on one machine (127.0.0.1): certificates, a SuperLink, N SuperNodes, `flwr run`.

The same ServerApp and ClientApp as the simulation, run as real processes (docs/flower-1.42.md §5):
- `generate_certificates`: a CA, a server certificate for the SuperLink's host, EC P-384 OpenSSH node key pairs
  (trials only; production users bring their own).
- `split_pairs`: one data directory per node (`RUN_DIR/nodeK/data/pairs.npz`), users cut into blocks exactly like
  the simulation's virtual nodes; the node keeps its users' w file (`user_weights.npz`) there.
- `LocalDeployment`: starts and stops the SuperLink (TLS + SuperNode authentication unless `insecure`), the
  SuperNodes, registers node keys, runs the app with `flwr run --stream` and checks the run's real status with
  `flwr ls` (`flwr run` exits 0 on a failed run). Every process is started in its own process group and stopped
  by it; `close()` (also via `with`) stops whatever is still running.

Layout of RUN_DIR: the server's run directory itself (checkpoint.npz, rounds.jsonl, ledger.json), `superlink/`
(its FLWR_HOME, state.db, log), `nodeK/` (FLWR_HOME, `data/`, log), `cli/` (the CLI's FLWR_HOME with the
connection in config.toml; pyproject is never touched), `runs/` (one `flwr run` log per run).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lore_core.atomic_io import atomic_write_bytes, atomic_write_text
from lore_core.pairs import load_pairs, save_pairs

ROOT = Path(__file__).resolve().parents[1]
CONNECTION = "lore-fed-local"
# Offline/CI hygiene (docs/flower-1.42.md §6): no telemetry, no update check, no `uv sync` of the app's dependencies.
HYGIENE_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
}
NODE_KEY_PREFIX = "node"
COMPLETED = "finished:completed"
# Flower 1.42's SuperNode logs this line when a run stops while the node takes one of its messages. If the node had
# already served the run, the stop met it between creating a task for the message and pulling the message's content
# (`_pull_and_store_message` in flwr/supernode/start_client_internal.py): its `except RunNotRunningException` branch,
# unlike its `except Exception` one, leaves that task pending and the message stored, and a ClientApp is started for
# them. It happens to connected nodes when a SuperLink restarts with messages of the crashed run in flight, and now
# and then such a node stops answering until it is restarted. tests/test_flower_supernode_race.py reproduces it
# with Flower's own function. The log tells that case apart only for a run the node had served: for the first
# message of a run the same line may also come before any task exists, so such a run is not counted.
ORPHANED_TASK_LOG_LINE = re.compile(r"Run ID (\d+) is not in `RUNNING` status\. Ignoring message")
RUN_LOG_LINE = re.compile(r"\[RUN (\d+)")
RECEIVED_LOG_LINE = "Received successfully"
NODE_JOINED_LOG_LINE = "SuperNode ID:"
# Flower refuses to activate a node whose key is still counted online (an earlier process with that key exited
# without deactivating: killed, or stopped while the SuperLink was down; it stays online until it misses 2 heartbeats
# of 30 s) or was never registered.
NODE_REFUSED_LOG_LINE = "[code: 2004]"
NODE_JOIN_TIMEOUT = 120.0
STALE_RUN_STATUSES = ("pending", "starting", "running")
INSECURE_WARNING = ("WARNING: insecure deployment: the SuperLink and SuperNodes talk plain HTTP without node "
                    "authentication; any process that reaches the port can join and read the basis. Debug only.")


class DeploymentError(RuntimeError):
    """A Flower process that did not start, a command that failed, or a run that did not complete."""


# --- certificates ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Certificates:
    ca_cert: Path
    server_cert: Path
    server_key: Path
    node_keys: tuple[Path, ...]  # OpenSSH private keys; the public key is `<key>.pub`

    @classmethod
    def in_dir(cls, directory: str | Path, nodes: int) -> "Certificates":
        d = Path(directory)
        return cls(d / "ca.crt", d / "server.pem", d / "server.key",
                   tuple(d / f"{NODE_KEY_PREFIX}{k}" for k in range(nodes)))

    def check(self) -> None:
        missing = [str(p) for p in (self.ca_cert, self.server_cert, self.server_key, *self.node_keys,
                                    *(k.with_name(k.name + ".pub") for k in self.node_keys)) if not p.exists()]
        if missing:
            raise FileNotFoundError(f"certificate files missing: {missing}; make a complete set in a new directory "
                                    f"with `lore-fed deploy certs --out NEW_DIR --nodes {len(self.node_keys)}` (or "
                                    f"remove {self.ca_cert.parent} first)")


MAX_TRIAL_NODES = 1000  # a key pair takes ~10 ms; beyond this, bring your own PKI


def check_host(host: str) -> None:
    """The SuperLink's address as nodes reach it: an IP address or a DNS name (RFC 1123 labels)."""
    try:
        ipaddress.ip_address(host)
        return
    except ValueError:
        pass
    label = r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)"
    if len(host) > 253 or not re.fullmatch(rf"{label}(\.{label})*", host) or re.fullmatch(r"[0-9.]+", host):
        raise ValueError(f"--host {host!r} is neither an IP address nor a DNS name")


def generate_certificates(out: str | Path, host: str = "127.0.0.1", nodes: int = 3, days: int = 30) -> Certificates:
    """A self-signed CA, a CA-signed server certificate whose SAN is `host` (an IP or a DNS name), and `nodes` EC
    P-384 OpenSSH key pairs. For trials: the private keys are written unencrypted (mode 0600)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    if not 1 <= nodes <= MAX_TRIAL_NODES:
        raise ValueError(f"--nodes must be in 1..{MAX_TRIAL_NODES} (trial certificates for one machine), got {nodes}")
    check_host(host)
    certs = Certificates.in_dir(out, nodes)
    if certs.ca_cert.exists():
        raise ValueError(f"{out} already holds certificates ({certs.ca_cert.name}); a new CA would orphan its node "
                         "keys: give a new --out directory, or remove the old one first")
    now = dt.datetime.now(dt.timezone.utc)

    def name(common: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "lore-fed trial"),
                          x509.NameAttribute(NameOID.COMMON_NAME, common)])

    def pem_key(key: ec.EllipticCurvePrivateKey, fmt: serialization.PrivateFormat) -> bytes:
        return key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption())

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_cert = (x509.CertificateBuilder().subject_name(name("lore-fed trial CA")).issuer_name(name("lore-fed trial CA"))
               .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                            content_commitment=False, key_encipherment=False,
                                            data_encipherment=False, key_agreement=False, encipher_only=False,
                                            decipher_only=False), critical=True)
               .sign(ca_key, hashes.SHA256()))
    try:
        san: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        san = x509.DNSName(host)
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (x509.CertificateBuilder().subject_name(name(host)).issuer_name(ca_cert.subject)
                   .public_key(server_key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
                   .add_extension(x509.SubjectAlternativeName([san]), critical=False)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
                   .sign(ca_key, hashes.SHA256()))
    _write_public(certs.server_cert, server_cert.public_bytes(serialization.Encoding.PEM))
    _write_private(certs.server_key, pem_key(server_key, serialization.PrivateFormat.TraditionalOpenSSL))
    for k, key_file in enumerate(certs.node_keys):
        node_key = ec.generate_private_key(ec.SECP384R1())
        _write_private(key_file, pem_key(node_key, serialization.PrivateFormat.OpenSSH))
        public = node_key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                    serialization.PublicFormat.OpenSSH)
        _write_public(key_file.with_name(key_file.name + ".pub"), public + f" lore-fed-node{k}\n".encode())
    # Last: its presence means the set is whole, and is what a rerun refuses (an interrupted start leaves none)
    _write_public(certs.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM))
    return certs


def _write_private(path: Path, data: bytes) -> None:
    atomic_write_bytes(path, data)  # temp files are created 0600
    path.chmod(0o600)


def _write_public(path: Path, data: bytes) -> None:
    atomic_write_bytes(path, data)
    path.chmod(0o644)


# --- data -----------------------------------------------------------------------------------------------------

def node_dir(run_dir: str | Path, k: int) -> Path:
    return Path(run_dir) / f"node{k}"


def node_data_dir(run_dir: str | Path, k: int) -> Path:
    return node_dir(run_dir, k) / "data"


def split_pairs(pairs_path: str | Path, run_dir: str | Path, nodes: int) -> list[Path]:
    """Cut the pair file by user into `nodes` files `RUN_DIR/nodeK/data/pairs.npz` (the simulation's blocks:
    sorted user ids in contiguous blocks). An existing node file is kept: it may sit next to that node's w file."""
    from federation.user_block import block_of_partition

    pairs = load_pairs(pairs_path)
    user_ids = np.unique(pairs.user)
    files = []
    for k in range(nodes):
        file = node_data_dir(run_dir, k) / "pairs.npz"
        if not file.exists():
            save_pairs(pairs.subset(np.isin(pairs.user, block_of_partition(user_ids, k, nodes))), file)
        files.append(file)
    return files


# --- processes ------------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def flower_env(flwr_home: Path) -> dict[str, str]:
    """The environment of every Flower process: hygiene variables, its own FLWR_HOME, this venv's scripts first."""
    env = dict(os.environ, **HYGIENE_ENV, FLWR_HOME=str(flwr_home))
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))  # a TOML basic string for paths and names


def format_config(config: dict) -> str:
    """{key: value} -> the `k=v k2="v2"` string of `flwr run -c` and `--node-config`."""
    return " ".join(f"{key}={toml_value(value)}" for key, value in config.items())


def wait_for_port(port: int, timeout: float, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise DeploymentError(f"process {process.args[0]} exited with code {process.returncode} before "
                                  f"listening on 127.0.0.1:{port}")
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise DeploymentError(f"nothing listened on 127.0.0.1:{port} within {timeout} s")


def stop_process(process: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int | None:
    """Signal the process group of `process` (started with its own session), escalate to SIGKILL after
    `timeout` s, and reap it. Children that left the group (none of Flower's do) are not touched."""
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        pass
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait()
    # The group may outlive its leader (e.g. a flower-superexec child): make sure it is gone.
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return process.returncode


def processes_matching(match: Callable[[list[bytes]], bool]) -> list[int]:
    """PIDs, other than this process's, of the processes whose command-line arguments `match` accepts (Linux /proc;
    elsewhere none are found)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue  # the process ended while we looked
        if int(cmdline.parent.name) != os.getpid() and match(args):
            found.append(int(cmdline.parent.name))
    return sorted(found)


def deployment_processes(run_dir: Path) -> list[int]:
    """PIDs of the processes of a deployment on `run_dir`: the SuperLink (its `--database` argument), the SuperNodes
    (`data-path` as `--node-config` writes it), `flwr run` (`run-dir` as its -c writes it), the ServerApp (a
    `flwr-serverapp` holding the run directory's lock: its command line names no path), and every other member of
    a process group one of them leads (the SuperLink's SuperExec); never this process, its ancestors or their
    groups. A tester's rerun after `kill -9` of `deploy local` named the SuperLink and nodes only: `flwr run` kept
    the SuperLink from exiting, and the ServerApp, still training, failed the next run minutes after its start."""
    from lore_core.run_lock import live_holder

    database = str(run_dir / "superlink" / "state.db").encode()
    named = [f"data-path={toml_value(str(path))}".encode() for path in run_dir.glob("node*/data")]
    named.append(f"run-dir={toml_value(str(run_dir))}".encode())
    found = set(processes_matching(lambda args: database in args or any(n in arg for arg in args for n in named)))
    if (holder := live_holder(run_dir)) is not None and _is_serverapp(holder):
        found.add(holder)
    lineage, lineage_groups = own_lineage()
    found -= lineage
    leaders = {pid for pid in found if process_group(pid) == pid and pid not in lineage_groups}
    return sorted(found | (set(group_members(leaders)) - lineage))


def earlier_deployment(run_dir: Path, mine: set[int] = frozenset()) -> str | None:
    """What refuses a deployment's start: processes of an earlier deployment on `run_dir` still running (outside the
    process groups `mine`), named for `kill`, or another process holding the run directory's lock (a `simulate`,
    `train` or audit there: named, not offered for `kill`); None when there are none."""
    from lore_core.run_lock import live_holder

    pids = [str(pid) for pid in deployment_processes(run_dir) if pid not in mine and process_group(pid) not in mine]
    if pids:
        return (f"processes of an earlier deployment on {run_dir} are still running: stop them (`kill "
                f"{' '.join(pids)}`) and run again")
    holder = live_holder(run_dir)
    if holder is not None and holder not in mine and process_group(holder) not in mine:
        return (f"{run_dir} is in use by another process (pid {holder}, `{command_of(holder)}`): wait for it to "
                "finish, or give another --run-dir")
    return None


def _stat_fields(pid: int) -> list[str]:
    """/proc/PID/stat's fields after "(comm)": state, ppid, pgrp, ... ([] when the process is gone or unknown)."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []


def process_group(pid: int) -> int | None:
    """The process group of `pid` (Linux /proc; None when it is gone or unknown)."""
    fields = _stat_fields(pid)
    return int(fields[2]) if len(fields) > 2 else None


def own_lineage() -> tuple[set[int], set[int]]:
    """This process and its ancestors, and their process groups: what a refusal never offers for `kill` (a reviewer's
    launcher holding the run's lock was named with its own group)."""
    pids, pid = set(), os.getpid()
    while pid > 1 and pid not in pids:
        pids.add(pid)
        fields = _stat_fields(pid)
        pid = int(fields[1]) if len(fields) > 1 else 0
    return pids, {group for group in map(process_group, pids) if group is not None}


def command_of(pid: int) -> str:
    """A process's command line as a shell would take it, secrets masked (`run_lock.shown_command`)."""
    from lore_core.run_lock import shown_command

    try:
        args = (Path("/proc") / str(pid) / "cmdline").read_bytes().rstrip(b"\0").split(b"\0")
    except OSError:
        return "unknown"
    return shown_command([arg.decode(errors="replace") for arg in args])


def _is_serverapp(pid: int) -> bool:
    try:
        args = (Path("/proc") / str(pid) / "cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return any(Path(arg.decode(errors="replace")).name == "flwr-serverapp" for arg in args[:2])


def group_members(pgids: set[int]) -> list[int]:
    """Live (non-zombie) processes in the process groups `pgids` (Linux /proc)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # the process ended while we looked
        if int(fields[2]) in pgids and fields[0] != "Z":  # fields after "(comm)": state, ppid, pgrp, ...
            members.append(int(stat.parent.name))
    return members


def group_alive(pgid: int) -> bool:
    """Whether any non-zombie process is still in process group `pgid` (Linux: /proc; else a signal 0 probe)."""
    proc = Path("/proc")
    if not proc.is_dir():
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        return True
    return bool(group_members({pgid}))


@dataclass
class RunOutcome:
    run_id: int | None
    status: str  # "finished:completed", "finished:failed", ...; "unknown" (never started), "unreachable" (no SuperLink)
    details: str
    log: Path
    seconds: float

    @property
    def completed(self) -> bool:
        return self.status == COMPLETED


class LocalDeployment:
    """A SuperLink and N SuperNodes on 127.0.0.1, each a process group that `close()` stops.

    Secure (default): TLS with `certs` and `--enable-supernode-auth`; node k authenticates with
    `certs.node_keys[k]` after `register_node(k)`. `insecure=True`: plain HTTP, no node authentication."""

    def __init__(self, run_dir: str | Path, nodes: int, certs: Certificates | None = None, *,
                 insecure: bool = False, port: int | None = None, app: str | Path = ROOT,
                 node_extra: dict | None = None) -> None:
        if not insecure and certs is None:
            raise ValueError("a secure deployment needs certificates (`lore-fed deploy certs`) or insecure=True")
        if insecure:
            print(INSECURE_WARNING, file=sys.stderr, flush=True)
        if not insecure:
            certs.check()
            if len(certs.node_keys) < nodes:
                raise ValueError(f"{nodes} nodes but only {len(certs.node_keys)} node keys in the certificates")
        self.run_dir = Path(run_dir).resolve()
        self.nodes = nodes
        self.certs = certs
        self.insecure = insecure
        self.port = port or free_port()
        self.app = Path(app).resolve()  # the Flower app directory `flwr run` packs into a FAB
        self.node_extra = dict(node_extra or {})  # more --node-config keys for every node (client/node_limits.py)
        self.superlink: subprocess.Popen | None = None
        self.supernodes: dict[int, subprocess.Popen] = {}
        self.node_ports: dict[int, int] = {}
        self.node_args: dict[int, list[str]] = {}  # each SuperNode's command line, for restarts
        self.node_log_starts: dict[int, int] = {}  # where each SuperNode's log began at its last start
        self.stopped_runs: list[int] = []  # stale runs `start` stopped
        self.started_pgids: list[int] = []  # every process group ever started, for the "all stopped" check
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.write_cli_config()

    # -- paths and config --
    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def cli_home(self) -> Path:
        return self.run_dir / "cli"

    def write_cli_config(self) -> None:
        """The CLI's connection in `RUN_DIR/cli/config.toml` (never pyproject's federations)."""
        lines = ["[superlink]", f'default = "{CONNECTION}"', "", f"[superlink.{CONNECTION}]",
                 f'address = "{self.address}"']
        if self.insecure:
            lines.append("insecure = true")
        else:
            lines.append(f"root-certificates = {toml_value(self.certs.ca_cert.resolve())}")
        atomic_write_text(self.cli_home / "config.toml", "\n".join(lines) + "\n")

    def _spawn(self, args: list[str], flwr_home: Path, log_name: str) -> subprocess.Popen:
        flwr_home.mkdir(parents=True, exist_ok=True)
        log = open(flwr_home / log_name, "ab")
        try:
            process = subprocess.Popen(args, cwd=flwr_home, env=flower_env(flwr_home), stdout=log,
                                       stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        finally:
            log.close()
        self.started_pgids.append(process.pid)
        return process

    def _cli(self, *args: str, timeout: float = 120.0, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run(["flwr", *args], cwd=ROOT, env=flower_env(self.cli_home), capture_output=True,
                                text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        if check and result.returncode != 0:
            raise DeploymentError(f"`flwr {' '.join(args)}` failed (exit {result.returncode}):\n"
                                  f"{result.stdout[-2000:]}{result.stderr[-2000:]}")
        return result

    # -- SuperLink --
    def start_superlink(self, timeout: float = 90.0) -> None:
        """Start the SuperLink (Fleet, Control and Runtime APIs on one port) with an on-disk state database, so
        registered nodes and past runs survive a restart."""
        if self.superlink is not None and self.superlink.poll() is None:
            raise DeploymentError("the SuperLink is already running")
        home = self.run_dir / "superlink"
        args = ["flower-superlink", "--host", "127.0.0.1", "--port", str(self.port),
                "--database", str(home / "state.db"), "--disable-runtime-dependency-installation"]
        if self.insecure:
            args.append("--insecure")
        else:
            args += ["--ssl-ca-certfile", str(self.certs.ca_cert.resolve()),
                     "--ssl-certfile", str(self.certs.server_cert.resolve()),
                     "--ssl-keyfile", str(self.certs.server_key.resolve()), "--enable-supernode-auth"]
        self.superlink = self._spawn(args, home, "superlink.log")
        wait_for_port(self.port, timeout, self.superlink)

    def stop_superlink(self, sig: int = signal.SIGTERM) -> None:
        """Stop the SuperLink and its ServerApp processes (one process group)."""
        if self.superlink is not None:
            stop_process(self.superlink, sig)

    # -- SuperNodes --
    def node_config(self, k: int) -> dict:
        return {"partition-id": k, "num-partitions": self.nodes, "data-path": str(node_data_dir(self.run_dir, k)),
                **self.node_extra}

    def register_node(self, k: int) -> None:
        """Register node k's public key with the SuperLink (`flwr supernode register`); secure mode only."""
        if self.insecure:
            raise DeploymentError("node registration needs SuperNode authentication, which --insecure turns off")
        public = self.certs.node_keys[k].with_name(self.certs.node_keys[k].name + ".pub")
        result = self._cli("supernode", "register", str(public.resolve()), CONNECTION, "--name", f"node{k}",
                           "--format", "json", check=False)
        if result.returncode != 0 and "already" not in (result.stdout + result.stderr).lower():
            raise DeploymentError(f"registering node {k} failed (exit {result.returncode}):\n"
                                  f"{result.stdout[-2000:]}{result.stderr[-2000:]}")

    def start_supernode(self, k: int, private_key: Path | None = None, max_wait_time: float | None = None) -> \
            subprocess.Popen:
        """Start SuperNode k with its own Runtime API port and `--node-config` (partition, data path).
        `private_key` overrides node k's key (e.g. an unregistered one)."""
        port = self.node_ports.setdefault(k, free_port())
        args = ["flower-supernode", "--superlink", self.address, "--port", str(port),
                "--node-config", format_config(self.node_config(k))]
        if self.insecure:
            args.append("--insecure")
        else:
            key = private_key or self.certs.node_keys[k]
            args += ["--root-certificates", str(self.certs.ca_cert.resolve()),
                     "--auth-supernode-private-key", str(Path(key).resolve())]
        if max_wait_time is not None:
            args += ["--max-wait-time", str(max_wait_time)]
        self.node_args[k] = args
        return self._spawn_node(k)

    def _spawn_node(self, k: int) -> subprocess.Popen:
        if k in self.supernodes and self.supernodes[k].poll() is None:
            raise DeploymentError(f"SuperNode {k} is already running")
        node_dir(self.run_dir, k).mkdir(parents=True, exist_ok=True)
        log = self.node_log(k)
        self.node_log_starts[k] = log.stat().st_size if log.exists() else 0
        self.supernodes[k] = self._spawn(self.node_args[k], node_dir(self.run_dir, k), log.name)
        return self.supernodes[k]

    def stop_supernode(self, k: int, sig: int = signal.SIGTERM) -> None:
        """Stop SuperNode k and its ClientApp processes; SIGKILL simulates a device that dies."""
        if k in self.supernodes:
            stop_process(self.supernodes[k], sig)

    def node_log(self, k: int) -> Path:
        return node_dir(self.run_dir, k) / "supernode.log"

    def node_log_since_start(self, k: int) -> str:
        """What SuperNode k has logged since its last start."""
        with open(self.node_log(k), "rb") as handle:
            handle.seek(self.node_log_starts.get(k, 0))
            return handle.read().decode(errors="replace")

    def orphaned_task_nodes(self) -> list[int]:
        """SuperNodes that, since their last start, hit Flower 1.42's orphaned-task race (ORPHANED_TASK_LOG_LINE):
        they may stop answering; `restart_supernode` clears it."""
        return [k for k in sorted(self.supernodes) if orphaned_task_runs(self.node_log_since_start(k))]

    def wait_for_nodes(self, nodes: list[int] | None = None, timeout: float = NODE_JOIN_TIMEOUT,
                       retry_every: float = 5.0, join_grace: float = 15.0) -> None:
        """Block until SuperNodes `nodes` (default: all) run and have joined the SuperLink. One refused with
        NODE_REFUSED_LOG_LINE is started again `retry_every` s later while a start still has `join_grace` s before
        the deadline: after a crash the SuperLink counts the dead nodes' keys as online for up to a minute, and a
        rerun right after it would otherwise fail for want of nodes."""
        deadline = time.monotonic() + timeout
        waiting = set(range(self.nodes) if nodes is None else nodes)
        refused: set[int] = set()
        while waiting:
            for k in sorted(waiting):
                exited = self.supernodes[k].poll() is not None  # (before reading the log it may have ended)
                log = self.node_log_since_start(k)
                if not exited and NODE_JOINED_LOG_LINE in log:
                    waiting.discard(k)
                elif exited:
                    if NODE_REFUSED_LOG_LINE not in log or time.monotonic() + retry_every + join_grace > deadline:
                        raise DeploymentError(f"SuperNode {k} exited (code {self.supernodes[k].returncode}) before "
                                              f"joining the SuperLink; see {self.node_log(k)}")
                    if k not in refused:
                        refused.add(k)
                        print(f"SuperNode {k} was refused {NODE_REFUSED_LOG_LINE}: its key is still counted online (an "
                              f"earlier process that did not deactivate) or not registered; starting it again "
                              f"{retry_every:g} s after each refusal, for up to {timeout:g} s", file=sys.stderr,
                              flush=True)
                    time.sleep(retry_every)
                    self.restart_supernode(k)
            if waiting and time.monotonic() > deadline:
                raise DeploymentError(f"SuperNodes {sorted(waiting)} did not join the SuperLink within {timeout:g} "
                                      f"s; see {', '.join(str(self.node_log(k)) for k in sorted(waiting))}")
            time.sleep(0.2)

    def restart_supernode(self, k: int) -> None:
        """Stop SuperNode k gracefully (it deactivates itself on the SuperLink, if it reaches it) and start it again
        with the same command line."""
        self.stop_supernode(k)
        self._spawn_node(k)

    def start(self, register: bool = True) -> None:
        """SuperLink, node registrations, then all SuperNodes (once no run left by an earlier SuperLink is live), and
        wait until they have joined. Refused while processes of an earlier deployment on RUN_DIR still run: a second
        SuperLink on the same database and nodes on the same data would corrupt both."""
        if leftovers := earlier_deployment(self.run_dir, set(self.started_pgids)):
            raise DeploymentError(leftovers)
        self.start_superlink()
        self.stopped_runs = self.stop_stale_runs()
        if register and not self.insecure:
            for k in range(self.nodes):
                self.register_node(k)
        for k in range(self.nodes):
            self.start_supernode(k)
        self.wait_for_nodes()

    # -- runs --
    def run_config(self, overrides: dict | None = None) -> dict:
        return {"run-dir": str(self.run_dir), "min-nodes": self.nodes, **(overrides or {})}

    def start_run(self, overrides: dict | None = None,
                  extra_configs: list[str] = ()) -> tuple[subprocess.Popen, Path]:
        """`flwr run . CONNECTION --stream -c ... [-c EXTRA ...]` in the background (a later -c's key wins); its
        output goes to `RUN_DIR/runs/*.log`."""
        args = ["flwr", "run", str(self.app), CONNECTION, "--stream", "-c", format_config(self.run_config(overrides))]
        for extra in extra_configs:
            args += ["-c", extra]
        logs = self.run_dir / "runs"
        logs.mkdir(parents=True, exist_ok=True)
        log = logs / f"run-{time.strftime('%Y%m%d-%H%M%S')}-{time.monotonic_ns() % 10**6}.log"
        with open(log, "wb") as handle:
            process = subprocess.Popen(args, cwd=self.app, env=flower_env(self.cli_home), stdout=handle,
                                       stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        self.started_pgids.append(process.pid)
        return process, log

    def wait_run(self, process: subprocess.Popen, log: Path, timeout: float = 600.0,
                 started: float | None = None) -> RunOutcome:
        """Wait for `flwr run` to return, then ask the SuperLink for the run's real status."""
        started = started or time.monotonic()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            stop_process(process)
            raise DeploymentError(f"`flwr run` did not return within {timeout} s; log: {log}") from None
        run_id = parse_run_id(log.read_text(errors="replace"))
        if run_id is None:
            return RunOutcome(None, "unknown", f"no run was started (exit {process.returncode})", log,
                              time.monotonic() - started)
        status, details = self.run_status(run_id, wait=30.0)
        return RunOutcome(run_id, status, details, log, time.monotonic() - started)

    def run(self, overrides: dict | None = None, extra_configs: list[str] = (), timeout: float = 600.0) -> RunOutcome:
        started = time.monotonic()
        process, log = self.start_run(overrides, extra_configs)
        return self.wait_run(process, log, timeout, started)

    def run_status(self, run_id: int, wait: float = 0.0) -> tuple[str, str]:
        """(status, details) of a run from `flwr ls --run-id ID --format json`; with `wait`, poll up to that many
        seconds for the run to reach `finished:*` (the log stream can end just before the status is written)."""
        deadline = time.monotonic() + wait
        while True:
            result = self._cli("ls", CONNECTION, "--run-id", str(run_id), "--format", "json", check=False)
            status, details = parse_run_status(result.stdout, run_id)
            if status.startswith("finished") or status == "unreachable" or time.monotonic() >= deadline:
                return status, details
            time.sleep(1.0)

    def stop_stale_runs(self) -> list[int]:
        """Stop the runs a SuperLink started from an existing database still lists as live: their ServerApp died with
        the earlier SuperLink. Done before any SuperNode connects, so that no node is sent a message of a run that
        stops while the message is being delivered (ORPHANED_TASK_LOG_LINE)."""
        stale = self.live_runs()
        for run_id in stale:
            self._cli("stop", str(run_id), CONNECTION, check=False)  # (it may have ended meanwhile)
        if still := self.live_runs():
            raise DeploymentError(f"runs {still} of an earlier SuperLink would not stop (`flwr stop`)")
        return stale

    def live_runs(self) -> list[int]:
        """The runs `flwr ls` lists as pending, starting or running (all runs: it shows the newest 20 by default)."""
        try:
            listing = self._cli("ls", CONNECTION, "--format", "json", "--limit", "1000000", check=False)
            answer = json.loads(listing.stdout)
            if not answer.get("success", False):
                raise ValueError(answer.get("error-message", "no success"))
            return [int(run["run-id"]) for run in answer["runs"] if str(run.get("status", "")) in STALE_RUN_STATUSES]
        except (subprocess.TimeoutExpired, json.JSONDecodeError, AttributeError, KeyError, TypeError,
                ValueError) as exc:
            raise DeploymentError(f"`flwr ls` could not list the SuperLink's runs: {exc}") from None

    # -- teardown --
    def close(self) -> None:
        """Stop the runs the SuperLink still lists as live, then every process group this deployment started
        (SuperNodes first, then the SuperLink). A run's ServerApp is not in those groups: a tester's Ctrl-C left it
        running, releasing rounds no node answered and holding the run directory, so that the rerun failed. The
        processes are stopped even when a signal interrupts the runs' stop, and a signal meanwhile waits for them (a
        tester's SIGTERM, landing as the command ended, left the SuperLink and SuperNodes running)."""
        from lore_core.termination import interruptions_deferred

        try:
            if self.superlink is not None and self.superlink.poll() is None:
                try:
                    for run_id in self.live_runs():
                        self._cli("stop", str(run_id), CONNECTION, check=False)
                except (DeploymentError, subprocess.SubprocessError, OSError):
                    pass  # the processes are stopped below all the same
        finally:
            with interruptions_deferred():
                for process in list(self.supernodes.values()):
                    stop_process(process)
                if self.superlink is not None:
                    stop_process(self.superlink)

    def alive_groups(self, wait: float = 5.0) -> list[int]:
        """Process groups started here that still have a live process after up to `wait` s (expected: none)."""
        deadline = time.monotonic() + wait
        while True:
            alive = [pgid for pgid in self.started_pgids if group_alive(pgid)]
            if not alive or time.monotonic() >= deadline:
                return alive
            time.sleep(0.2)

    def __enter__(self) -> "LocalDeployment":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def orphaned_task_runs(node_log: str) -> set[int]:
    """Runs a SuperNode log shows the orphaned-task race for: ORPHANED_TASK_LOG_LINE for a run the node had already
    received a message of since the log began (only then was the run stored and a task created before the failure)."""
    current, received, orphaned = None, set(), set()
    for line in node_log.splitlines():
        if run := RUN_LOG_LINE.search(line):
            current = int(run.group(1))
        elif RECEIVED_LOG_LINE in line and current is not None:
            received.add(current)
        elif (ignored := ORPHANED_TASK_LOG_LINE.search(line)) and int(ignored.group(1)) in received:
            orphaned.add(int(ignored.group(1)))
    return orphaned


def parse_run_id(stream_output: str) -> int | None:
    match = re.search(r"Successfully started run (\d+)", stream_output)
    return int(match.group(1)) if match else None


def parse_run_status(ls_json: str, run_id: int) -> tuple[str, str]:
    """`flwr ls --format json` -> (status, details). It exits 0 also when it cannot reach the SuperLink and then
    prints {"success": false, "error-message": ...}: that is "unreachable"."""
    try:
        answer = json.loads(ls_json)
        runs = answer.get("runs", [])
    except (json.JSONDecodeError, AttributeError):
        return "unknown", f"unreadable `flwr ls` output: {ls_json[-500:]!r}"
    if not answer.get("success", False):
        return "unreachable", str(answer.get("error-message", ""))[-500:]
    for run in runs:
        if int(run.get("run-id", -1)) == run_id:
            return str(run.get("status", "unknown")), str(run.get("status-details", ""))
    return "unknown", f"run {run_id} not listed"
