"""Where a node keeps its users' private weights w (S, B) between rounds. They never enter a reply.

Simulation: `Context.state` (one Context per virtual node for the whole run).
Deployment: a SuperNode keeps one Context per run, and a device may take part in several runs, so w also goes to
`<data-path>/user_weights.npz` on the device, written atomically, and is read back from there first (a restarted
SuperNode's run resumes with it). The file keeps one slot per run, named by the run id the server sends (drawn
when the run starts, kept by its resumes; server/checkpoint.py): w is fitted against one run's basis, so another
run on the device, in turn or at once, or a new run in a reused directory, starts from the prior instead of
continuing it. A server that sends no run id (a run whose checkpoint predates it) gets a slot named by a digest of
its `run-dir`. What the device's users spent (record mode) is shared by every run: `record_dp_state.npz` holds one
set of accountant histories. A message's read-train-write holds the device's lock (`device_lock`), so two runs on
one device never write over each other's spending or slots.
"""

from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, Context

from lore_core.atomic_io import TEMP_FILE, atomic_save_npz

STATE_KEY = "lore-private"
WEIGHTS_KEY = "user_weights"
WEIGHTS_FILENAME = "user_weights.npz"


def _device_file(context: Context, name: str) -> Path | None:
    """The file `name` in the node's data directory (deployment: the device's own disk); None in simulation."""
    data_path = context.node_config.get("data-path")
    return Path(str(data_path)) / name if data_path else None


LOCK_FILENAME = ".lore-fed.lock"


@contextlib.contextmanager
def device_lock(context: Context):
    """Hold the device's lock (`<data-path>/.lore-fed.lock`, POSIX advisory) for one message's read-train-write;
    nothing to hold in a simulation (no data-path) or where fcntl is missing."""
    data_path = context.node_config.get("data-path")
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        fcntl = None
    if not data_path or fcntl is None:
        yield
        return
    with open(Path(str(data_path)) / LOCK_FILENAME, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


RUN_SLOTS = 8  # runs whose w a device file keeps; the least recently written slot goes first


def run_slot(context: Context, array_key: str, run_id: str | None = None) -> str:
    """The name of this run's array in a device file: `array_key@<run id>` (16 hex digits, checked by
    protocol.run_id), else `array_key@<16 hex of sha256(run-dir)>`, else `array_key` alone where the run config
    names no run directory."""
    if run_id:
        return f"{array_key}@{run_id}"
    run_dir = context.run_config.get("run-dir")
    return array_key if not run_dir else f"{array_key}@{hashlib.sha256(str(run_dir).encode()).hexdigest()[:16]}"


def _is_slot(name: str, array_key: str) -> bool:
    return name == array_key or name.startswith(array_key + "@")


def _save_slot(file: Path, array_key: str, slot: str, array: np.ndarray, **shared: np.ndarray) -> None:
    """Write `array` as `slot` of `file`, keeping the other runs' slots of `array_key` (at most RUN_SLOTS in all,
    this one last: the file's order is the order of writing) and replacing the `shared` arrays."""
    kept = {}
    if file.exists():
        with np.load(file) as data:
            kept = {name: data[name] for name in data.files if _is_slot(name, array_key) and name != slot}
    kept = dict(list(kept.items())[-(RUN_SLOTS - 1):]) if RUN_SLOTS > 1 else {}
    atomic_save_npz(file, **shared, **kept, **{slot: np.ascontiguousarray(array)})


def _stored(context: Context, state_key: str, array_key: str, file: Path | None,
            shape: tuple[int, int], run_id: str | None) -> np.ndarray | None:
    """An array kept in the device file (deployment: it outlives any one run's Context; this run's slot) or else in
    Context.state (simulation); None when absent or of another shape."""
    stored = None
    if file is not None and file.exists():
        slot = run_slot(context, array_key, run_id)
        with np.load(file) as data:
            stored = data[slot] if slot in data.files else None
    elif state_key in context.state:
        stored = context.state[state_key][array_key].numpy()
    return None if stored is None or stored.shape != shape else stored.astype(np.float64)


def load_weights(context: Context, n_users: int, rank: int, run_id: str | None) -> np.ndarray:
    """The stored w (n_users, rank) of run `run_id`; uniform (the prior) when none is stored or the rank changed."""
    stored = _stored(context, STATE_KEY, WEIGHTS_KEY, _device_file(context, WEIGHTS_FILENAME), (n_users, rank), run_id)
    return np.full((n_users, rank), 1.0 / rank) if stored is None else stored


def save_weights(context: Context, weights: np.ndarray, run_id: str | None) -> None:
    context.state[STATE_KEY] = ArrayRecord({WEIGHTS_KEY: Array(np.ascontiguousarray(weights))})
    file = _device_file(context, WEIGHTS_FILENAME)
    if file is not None:
        _save_slot(file, WEIGHTS_KEY, run_slot(context, WEIGHTS_KEY, run_id), weights)


# Record mode: each local user's Opacus accountant history, rows (local user index, z, q, steps). Persisted like w
# (Context.state, and the device file in deployment) and never reset: a re-created accountant would under-report.
RECORD_DP_KEY = "lore-record-dp"
RECORD_DP_FILENAME = "record_dp_state.npz"
# Simulation: a resumed run's nodes are new (Context.state is gone), so each node also keeps its users' histories
# (never their w) under the run directory; a round whose replies never reached the ledger before a crash is then
# reported by the new node, not lost (record_dp.spending_to_report).
SIMULATED_ACCOUNTANTS = "client-accountants"


def _simulated_accountant_file(context: Context) -> Path | None:
    """`<run-dir>/client-accountants/partition-K-of-N.npz` for a simulated node (no data-path); None elsewhere."""
    run_dir, config = context.run_config.get("run-dir"), context.node_config
    if config.get("data-path") or not run_dir or "partition-id" not in config or "num-partitions" not in config:
        return None
    name = f"partition-{int(config['partition-id'])}-of-{int(config['num-partitions'])}.npz"
    return Path(str(run_dir)) / SIMULATED_ACCOUNTANTS / name


def check_simulated_accountants(run_dir: Path, has_ledger: bool) -> None:
    """Before a simulation starts: `<run-dir>/client-accountants/` belongs to the run the directory's ledger records,
    and every file in it is one a node wrote. ValueError names the folder or file (found by a tester: another
    run's folder made a fresh run count that run's spending; a damaged file failed its node every round)."""
    folder = Path(run_dir) / SIMULATED_ACCOUNTANTS
    if not folder.exists():
        return
    if not has_ledger:  # the ledger is written before any node trains: without one, the folder is another run's
        raise ValueError(f"{folder} holds accountant histories but {run_dir} has no ledger.json, so no record run to "
                         "resume: they are another run's; delete the folder or give a new directory")
    for file in sorted(folder.iterdir()):
        if TEMP_FILE.fullmatch(file.name):  # a write killed midway: the run's lock holder removes it (run_lock)
            continue
        problem = _accountant_problem(file)
        if problem:
            raise ValueError(f"{file}: {problem}; restore it, or delete it (the ledger keeps every step it recorded; "
                             "only the steps of a round a crash kept from the ledger would then go uncounted)")


def _accountant_problem(file: Path) -> str | None:
    """What is wrong with a simulated node's accountant file, or None."""
    from lore_core.privacy.accounting import check_history

    try:
        with np.load(file) as data:
            rows = np.asarray(data[RECORD_DP_KEY], dtype=np.float64)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is reported the same way
        return f"not a readable accountant file ({type(exc).__name__}: {exc})"
    if rows.ndim != 2 or rows.shape[1] != 4 or not np.isfinite(rows).all():
        return f"expected finite rows (user, z, q, steps), got shape {rows.shape}"
    if (rows[:, 0] < 0).any() or (rows[:, 0] != np.round(rows[:, 0])).any():
        return "user indices must be whole numbers >= 0"
    try:
        check_history(rows[:, 1:].tolist())
    except ValueError as exc:
        return str(exc)
    return None


def load_record_histories(context: Context) -> np.ndarray:
    """All local users' accountant histories as rows (user, z, q, steps), (s, 4); empty before the first round. The
    device file first: it holds what every run on this device spent. A simulated node's own Context next (its file
    holds the same), and its file only when the node is new (a resumed run): no disk read each round."""
    rows = _histories_in(_device_file(context, RECORD_DP_FILENAME))
    if rows is None and RECORD_DP_KEY in context.state:
        rows = context.state[RECORD_DP_KEY][RECORD_DP_KEY].numpy()
    if rows is None:
        rows = _histories_in(_simulated_accountant_file(context))
    return np.zeros((0, 4)) if rows is None else rows


def _histories_in(file: Path | None) -> np.ndarray | None:
    if file is None or not file.exists():
        return None
    with np.load(file) as data:
        return data[RECORD_DP_KEY]


# Record mode: each local user's private weights as logits (S, B), w = softmax(logits): DP-SGD outputs, kept apart
# from the evaluation's w (which is refit without privacy and must never feed the private step); one slot per run in
# the device file, as w.
RECORD_LOGITS_KEY = "lore-record-logits"


def load_record_logits(context: Context, n_users: int, rank: int, run_id: str | None) -> np.ndarray:
    """The stored logits (n_users, rank) of run `run_id`; zeros (uniform w) when none are stored or the rank
    changed."""
    file = _device_file(context, RECORD_DP_FILENAME)
    stored = _stored(context, RECORD_LOGITS_KEY, RECORD_LOGITS_KEY, file, (n_users, rank), run_id)
    return np.zeros((n_users, rank)) if stored is None else stored


def save_record_state(context: Context, rows: np.ndarray, logits: np.ndarray, run_id: str | None) -> None:
    """Record mode's private state in one write: the accountant histories (rows) and the logits."""
    rows = np.ascontiguousarray(rows, dtype=np.float64).reshape(-1, 4)
    context.state[RECORD_DP_KEY] = ArrayRecord({RECORD_DP_KEY: Array(rows)})
    context.state[RECORD_LOGITS_KEY] = ArrayRecord({RECORD_LOGITS_KEY: Array(np.ascontiguousarray(logits))})
    file = _device_file(context, RECORD_DP_FILENAME)
    if file is not None:  # the histories are the device's (every run's spending), the logits this run's slot
        _save_slot(file, RECORD_LOGITS_KEY, run_slot(context, RECORD_LOGITS_KEY, run_id), logits,
                   **{RECORD_DP_KEY: rows})
    simulated = _simulated_accountant_file(context)
    if simulated is not None:
        simulated.parent.mkdir(parents=True, exist_ok=True)
        atomic_save_npz(simulated, **{RECORD_DP_KEY: rows})
