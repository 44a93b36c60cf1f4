"""Every basis the server releases, in a hash-chained record `RUN_DIR/releases/` (docs/privacy.md §8, §10).

An audit of the run that really happened must read what really left the server, not a re-simulation of it. So
`TrainingRun.release` appends, before the new basis leaves the server (next round's train messages, evaluation,
checkpoint), one file per release: the basis the round trained on A_t, the mean update the mechanism released
(noise included; under DP the only data-dependent input of the step) and the new basis A_{t+1} (B, D each).
`chain.jsonl` lists them, line 0 being the header (server optimizer settings, initial basis); every line holds the
SHA-256 of its file and of the line before it, so a file or line changed or dropped afterwards breaks the chain.
`read_releases` checks the chain and replays the public server optimizer: each A_{t+1} must follow from A_t and the
recorded mean update, so the recorded noisy means are exactly what drove the released bases.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from lore_core.atomic_io import atomic_write_bytes, atomic_write_text
from lore_core.setting_names import shown_change
from lore_core.text_file import read_jsonl
from server.optimizer import make_optimizer, pseudo_gradient, reported_basis

RELEASES_DIR = "releases"
# The header fields an older record may lack, as the replay runs them (records written before the schedule was a
# setting ran the cosine); a check of the header against the run compares these, not "absent" (a reviewer).
REPLAY_DEFAULTS = {"schedule": "cosine"}
CHAIN_FILENAME = "chain.jsonl"
SCHEMA = "lore-fed-releases/1"


class ReleaseRecordError(ValueError):
    """A release record that is missing, altered or inconsistent with the bases it claims."""


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _line_hash(line: dict) -> str:
    return _sha256(json.dumps(line, sort_keys=True).encode())


def _npz_bytes(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


class ReleaseRecord:
    """Appends releases to RUN_DIR/releases/ (continuing the chain of a resumed run)."""

    def __init__(self, folder: Path, lines: list[dict]) -> None:
        self.folder, self.lines = folder, lines

    @classmethod
    def open(cls, run_dir: str | Path, *, optimizer: dict, initial_basis: np.ndarray,
             checkpoint_round: int = 0, fixed: frozenset[str] = frozenset()) -> "ReleaseRecord":
        """optimizer: the public step settings {name, server_lr, client_lr, local_steps, l2}. A new record starts
        with the initial basis; an existing one must have been written with the same optimizer settings and hold
        the releases of the `checkpoint_round` rounds the run resumes after."""
        folder = Path(run_dir) / RELEASES_DIR
        lines = check_continuable(run_dir, optimizer, checkpoint_round, fixed, initial_basis)
        if lines is not None:
            return cls(folder, lines)
        record = cls(folder, [])
        data = _npz_bytes(basis=np.asarray(initial_basis, dtype=np.float64))
        atomic_write_bytes(folder / "initial.npz", data)
        record._append({"release": 0, "schema": SCHEMA, "optimizer": optimizer, "file": "initial.npz",
                        "sha256": _sha256(data), "prev": None})
        return record

    def append(self, *, round: int, ledger_round: int | None, basis_before: np.ndarray, mean_update: np.ndarray | None,
               basis_after: np.ndarray) -> None:
        """One release: the file first, then its chain line (a crash between them leaves an unlisted file only).
        mean_update None: nothing was accepted in a mode without noise and the basis did not move."""
        release = len(self.lines)
        stepped = mean_update is not None
        data = _npz_bytes(basis_before=np.asarray(basis_before, dtype=np.float64),
                          mean_update=np.zeros_like(basis_before) if mean_update is None else mean_update,
                          basis_after=np.asarray(basis_after, dtype=np.float64))
        name = f"release-{release:06d}.npz"
        atomic_write_bytes(self.folder / name, data)
        self._append({"release": release, "round": int(round), "ledger_round": ledger_round, "stepped": stepped,
                      "file": name, "sha256": _sha256(data), "prev": _line_hash(self.lines[-1])})

    def _append(self, line: dict) -> None:
        self.lines.append(line)
        atomic_write_text(self.folder / CHAIN_FILENAME, "".join(json.dumps(x, sort_keys=True) + "\n"
                                                                for x in self.lines))


def check_continuable(run_dir: str | Path, optimizer: dict, checkpoint_round: int = 0,
                      fixed: frozenset[str] = frozenset(), initial_basis: np.ndarray | None = None
                      ) -> list[dict] | None:
    """The lines of RUN_DIR/releases/chain.jsonl that a run with these optimizer settings continues, or None when
    there is none; raises ReleaseRecordError naming the file when it is damaged or another run's. Reads only: the
    CLI calls it before anything is written, the server again when it opens the record. `fixed`: the keys this
    run's mode sets whatever is given (ServerSettings.fixed_optimizer_keys), which a refusal does not ask for.
    `initial_basis`: where a start with no checkpoint (checkpoint_round 0) begins; it must be the record's."""
    lines = check_record_reaches(run_dir, checkpoint_round)
    if lines is not None:
        try:  # a resume over a broken chain finished, and its audits then failed for good (a tester)
            verified_files(Path(run_dir) / RELEASES_DIR, lines, keep=False)
        except ReleaseRecordError as exc:
            raise ReleaseRecordError(f"{exc}; the run's audits read this record, so it is not continued: put the "
                                     "run's releases/ back from a copy, or start afresh in a new run directory"
                                     ) from None
        if checkpoint_round == 0 and initial_basis is not None:
            _check_same_start(Path(run_dir) / RELEASES_DIR, lines, initial_basis)
    if lines is not None and lines[0].get("optimizer") != optimizer:
        stored = lines[0].get("optimizer") or {}
        keys = [k for k in sorted(set(stored) | set(optimizer)) if stored.get(k) != optimizer.get(k)]
        changed = "; ".join(shown_change(OPTIMIZER_KEYS.get(k, k), stored.get(k), optimizer.get(k)) for k in keys)
        # a run that stopped before its first checkpoint has only this record to say what it ran (a tester's
        # flag-less resume of a --server-lr 0.5 run), and a record holds no weighting, which local-steps' default
        # follows (a tester changed weight-by and was told only of local-steps)
        give = ", ".join(f"{OPTIMIZER_KEYS.get(k, k)} {stored.get(k)!r}" for k in keys if k in stored)
        follows = " (local-steps' default follows weight-by: 1 under pair, 5 under user)" if "local_steps" in keys \
            else ""
        how = f"give {give}{follows} to resume that run" if give else "resume with that run's settings"
        if fixed & set(keys):  # a reviewer: record mode and the marginal objective refuse the local-steps asked for
            how = ("local-steps is set by the privacy mode and objective here (record: none; marginal: 1), so resume "
                   "with that run's mode and objective")
        raise ReleaseRecordError(f"{Path(run_dir) / RELEASES_DIR / CHAIN_FILENAME} was written with other server "
                                 f"optimizer settings ({changed}; run-config keys); {how}, or use a new run "
                                 "directory")
    return lines


def _check_same_start(folder: Path, lines: list[dict], initial_basis: np.ndarray) -> None:
    """A run that crashed before its first checkpoint starts again from its initial basis; one with another rank,
    seed, init-scale or embedding width would begin elsewhere, and the record's chain, which every audit reads, would
    break for good (a tester's rerun with --rank 3 finished, and no audit of it could run again)."""
    try:
        with np.load(io.BytesIO(verified_files(folder, lines[:1])[0]), allow_pickle=False) as npz:
            recorded = np.asarray(npz["basis"], dtype=np.float64)
        rank, dim = recorded.shape
    except (KeyError, ValueError, TypeError, OSError) as exc:
        raise ReleaseRecordError(f"{folder / 'initial.npz'}: not an initial basis (B, D) ({exc}); put the run's "
                                 "releases/ back from a copy, or start afresh in a new run directory") from None
    if np.array_equal(recorded, initial_basis):
        return
    if recorded.shape != initial_basis.shape:
        what = f"rank {rank} over embedding width D {dim}, not rank {initial_basis.shape[0]} over D " \
               f"{initial_basis.shape[1]} (--rank, or the pair file)"
    else:  # A0's entries have std init-scale / sqrt(D) (server.checkpoint.initial_basis)
        what = (f"another initial basis: another --seed, or another init-scale (the run config key; its entries' "
                f"scale reads about {recorded.std() * np.sqrt(dim):.3g}, this start's "
                f"{initial_basis.std() * np.sqrt(dim):.3g})")
    raise ReleaseRecordError(f"{folder / 'initial.npz'}: the run in this directory, which stopped before its first "
                             f"checkpoint, started from {what}; rerun it with the settings and pair file it began "
                             "with, or use a new run directory")


# The header's optimizer fields by the run-config keys that set them (a refusal names what to change).
OPTIMIZER_KEYS = {"name": "server-optimizer", "server_lr": "server-lr", "client_lr": "client-lr",
                  "local_steps": "local-steps", "rounds": "num-server-rounds", "schedule": "server-lr-schedule"}


def check_record_reaches(run_dir: str | Path, checkpoint_round: int) -> list[dict] | None:
    """chain.jsonl's lines (None when there is none and no round ran), refused unless it holds at least
    `checkpoint_round` releases: each round appends one before its checkpoint. Without, a resumed run began a new
    record at the initial basis (and its canary audit failed with "cannot reshape array of size 0"), and the
    accounting audit of a run whose releases/ was deleted checked the ledger's events alone."""
    chain = Path(run_dir) / RELEASES_DIR / CHAIN_FILENAME
    if not chain.exists():
        if checkpoint_round:
            _not_covering(chain, "is missing", checkpoint_round)
        return None
    lines = read_chain(chain)
    if not lines or lines[0].get("schema") != SCHEMA:
        raise ReleaseRecordError(f"{chain}: {'empty' if not lines else 'no release-record header'}; expected the "
                                 f"release record lore-fed simulate writes (first line a header with schema {SCHEMA}). "
                                 "Restore it from a copy, or give a new --out directory")
    if len(lines) - 1 < checkpoint_round:
        _not_covering(chain, f"holds {len(lines) - 1} releases", checkpoint_round)
    return lines


def _not_covering(chain: Path, found: str, checkpoint_round: int) -> None:
    raise ReleaseRecordError(f"{chain} {found}, but the run's checkpoint is after round {checkpoint_round}: the "
                             "record would not hold what the run released, which its audits read; put the run's "
                             "releases/ back, or start afresh in a new run directory")


def read_chain(chain: Path) -> list[dict]:
    """chain.jsonl's lines (blank lines skipped); ReleaseRecordError naming the file and line for one that is not a
    JSON object (the file is written atomically: damage came from outside, or it is not a lore-fed record)."""
    try:
        return [line for _, line in read_jsonl(chain, ReleaseRecordError)]
    except ReleaseRecordError as exc:
        raise ReleaseRecordError(f"{exc}: the line is not a JSON object; expected the hash-chained release record "
                                 "lore-fed simulate writes, one JSON object per line. It is written atomically, so it "
                                 "was damaged afterwards or belongs to no lore-fed run: restore it from a copy, or "
                                 "give a new --out directory") from None


@dataclass(frozen=True)
class Releases:
    """A verified release record: per release (R,) rounds and ledger rounds, (R, B, D) bases and mean updates."""

    optimizer: dict
    initial_basis: np.ndarray
    rounds: np.ndarray
    ledger_rounds: np.ndarray
    basis_before: np.ndarray
    mean_updates: np.ndarray
    basis_after: np.ndarray
    stepped: np.ndarray  # (R,) bool: False where nothing was released (the step was skipped; mean update stored as 0)
    head: str  # hash of the last chain line: names exactly this record
    # (R, B, D): the basis the run reports after each release (the optimizer's tail average, else basis_after), from
    # the replay; None when read without it. A finished run's basis.npz is the last one (the audits check it).
    reported: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.rounds.size)


def read_releases(run_dir: str | Path, *, replay: bool = True) -> Releases:
    """Load RUN_DIR/releases/, check every hash and (replay) that each released basis is the public optimizer's
    step from the recorded basis and noisy mean update. Raises ReleaseRecordError naming what does not hold."""
    folder = Path(run_dir) / RELEASES_DIR
    chain = folder / CHAIN_FILENAME
    if not chain.exists():
        raise ReleaseRecordError(f"{chain} does not exist: this run recorded no releases (a run from before the "
                                 "release record, or not a lore-fed run directory)")
    lines = read_chain(chain)
    arrays = []
    for data in verified_files(folder, lines):
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            arrays.append({key: npz[key] for key in npz.files})
    if lines[0].get("schema") != SCHEMA:
        raise ReleaseRecordError(f"{chain}: schema {lines[0].get('schema')!r}, expected {SCHEMA!r}")
    body = lines[1:]

    def stack(key: str) -> np.ndarray:
        return np.stack([a[key] for a in arrays[1:]]) if body else np.zeros((0,) + arrays[0]["basis"].shape)

    releases = Releases(optimizer=lines[0]["optimizer"], initial_basis=arrays[0]["basis"],
                        rounds=np.array([x["round"] for x in body], dtype=np.int64),
                        ledger_rounds=np.array([-1 if x["ledger_round"] is None else x["ledger_round"] for x in body]),
                        basis_before=stack("basis_before"), mean_updates=stack("mean_update"),
                        basis_after=stack("basis_after"), stepped=np.array([bool(x["stepped"]) for x in body]),
                        head=_line_hash(lines[-1]))
    if replay:
        releases = replace(releases, reported=replay_optimizer(releases, [x["stepped"] for x in body]))
    return releases


def verified_files(folder: Path, lines: list[dict], keep: bool = True) -> list[bytes]:
    """Each release file's bytes, checked against the hash chain of `lines` (folder/chain.jsonl's); raises
    ReleaseRecordError naming the first line or file that does not hold. keep=False checks without keeping them
    (a resume: one file in memory at a time, not the whole record)."""
    files = []
    for i, line in enumerate(lines):
        if line.get("release") != i or line.get("prev") != (None if i == 0 else _line_hash(lines[i - 1])):
            raise ReleaseRecordError(f"{folder / CHAIN_FILENAME} line {i + 1}: broken chain (a line was altered, "
                                     "dropped or reordered)")
        name = line.get("file")
        path = folder / name if isinstance(name, str) and name and "/" not in name and name not in (".", "..") \
            else None
        data = path.read_bytes() if path is not None and path.is_file() else b""
        if _sha256(data) != line.get("sha256"):
            raise ReleaseRecordError(f"{path or folder / str(name)}: missing or altered (SHA-256 differs from the "
                                     "chain)")
        if keep:
            files.append(data)
    return files


def replay_optimizer(releases: Releases, stepped: list[bool]) -> np.ndarray:
    """Every release's basis_after = the public server step from its basis_before and mean update. A round re-run
    after a crash starts, like the resumed server, from the state after the last release of the round before.
    Returns the basis the run reports after each release (R, B, D): the replayed optimizer's tail average."""
    settings = releases.optimizer
    after: dict[int, tuple[np.ndarray, dict]] = {0: (releases.initial_basis, {})}
    reported = np.empty_like(releases.basis_after)
    for i, t in enumerate(releases.rounds):
        previous = after.get(int(t) - 1)
        if previous is None or not np.array_equal(previous[0], releases.basis_before[i]):
            raise ReleaseRecordError(f"release {i + 1} (round {t}) did not start from the basis released after round "
                                     f"{t - 1}")
        optimizer = make_optimizer(settings["name"], settings["server_lr"], settings.get("rounds"),
                                   settings.get("schedule", REPLAY_DEFAULTS["schedule"]))
        optimizer.load_state_dict({k: np.array(v) for k, v in previous[1].items()})
        basis = releases.basis_before[i]
        if stepped[i]:
            grad = pseudo_gradient(basis, releases.mean_updates[i], client_lr=settings["client_lr"],
                                   local_steps=settings["local_steps"], l2=settings["l2"])
            basis = optimizer.step(basis, grad)
        if not np.allclose(basis, releases.basis_after[i], rtol=1e-12, atol=1e-15):
            raise ReleaseRecordError(f"release {i + 1} (round {t}): the released basis is not the server optimizer's "
                                     "step from the recorded mean update: the record does not describe what was "
                                     "released")
        after[int(t)] = (releases.basis_after[i], {k: np.array(v) for k, v in optimizer.state_dict().items()})
        reported[i] = reported_basis(after[int(t)][1], releases.basis_after[i])
    return reported
