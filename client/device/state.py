"""Durable on-device state in ONE directory: the basis, the user's weights w, the user's pairs and settings.

Layout (content-addressed data files; the manifest is the single commit point):
  .lore-fed-device-state     the marker: this directory is a device state (checked before anything is deleted)
  manifest.json              format, generation, settings (strength, encoder, encoder_identity) and, per data file,
                             name/size/sha256
  basis-v<version>-<sha>.npz the basis file (lore_core.basis_file format)
  personal-<sha>.npz         user_weights (B,) float64 | (0,) before any adaptation; pair_diff (n, D) float32;
                             choices (m,) uint8: the raw choices as UTF-8 JSON lines, one per pair_diff row
                             (states before 0.2.4: (n,) str, every choice padded to the longest);
                             posterior_mode (B-1,) and posterior_cov (B-1, B-1): w's Laplace posterior in the
                             softmax chart (client.device.posterior) | (0,), (0, 0) without one; prior_mean (B,)
                             from declared attributes | (0,); attributes: the declared attributes as JSON
A save writes new data files (atomically, under new names), then atomically replaces the manifest, then deletes
files the manifest no longer names. A process killed at any moment leaves the old or the new manifest, and every
file it names intact. Load checks sizes and checksums: a corrupted or truncated file is reported, never used.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import stat
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np

from client.device.encoder import MODEL_FILE, TOKENIZER_FILE, is_encoder_identity
from client.device.personalize import ChoicesError, check_choice_shape, is_unicode_text
from lore_core.atomic_io import atomic_write_bytes, atomic_write_json
from lore_core.basis_file import BasisFile, BasisFileError, load_basis, other_embedders
from lore_core.text_file import is_json_integer, json_loads

# /2 (lore-fed 0.2.4): the personal file's choices are UTF-8 JSON lines; /1 states are read and written again as /2
STATE_FORMAT = "lore-fed-device-state/2"
STATE_FORMATS = ("lore-fed-device-state/1", STATE_FORMAT)  # the formats this version reads
MANIFEST = "manifest.json"
LOCK = ".lock"
# Written once by the first save; deleting anything requires it (or, for states older than the marker, a readable
# manifest of this format): `forget --all` on a folder that is not a device state must never delete a thing.
MARKER = ".lore-fed-device-state"
STATE_HOME_ENV = "LORE_DEVICE_HOME"
_DATA_PREFIXES = ("basis-", "personal-")
# The names a state writes (save_state, _write_data), and the temp files of lore_core.atomic_io that a killed write
# may leave (".NAME.<random>.tmp"): nothing else is ever deleted.
_STATE_FILE = re.compile(
    r"(?P<tmp>\.)?(?P<name>manifest\.json|\.lore-fed-device-state|(?:basis-v\d+-|personal-)[0-9a-f]{16}\.npz)"
    r"(?(tmp)\.[^/]+\.tmp)"
)


class StateError(ValueError):
    """The device state is missing or cannot be used as asked."""


class StateCorruptError(StateError):
    """A state file is truncated, altered or unreadable. `advice` is how to repair the state, which a command that
    stops on this error adds to its message (`python -m client.device` and `lore-fed device` alike; a tester found
    only the first said so); `forget`, which deletes the personal data anyway, quotes the error without it."""

    @property
    def advice(self) -> str:
        return "" if "reinit" in str(self) else \
            " (`init --reinit --basis FILE` repairs the state, keeping what is intact; `forget` deletes its personal " \
            "data)"


class BasisMismatchError(StateError):
    """A basis of another dimension, version or embedder than the state's."""


@dataclass(frozen=True)
class DeviceState:
    directory: Path
    basis: BasisFile
    user_weights: np.ndarray | None = None  # (B,) on the simplex; None = not adapted yet (population reward)
    pair_diff: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))  # (n, D)
    choices: tuple[str, ...] = ()  # (n,) raw choices as JSON strings
    strength: float | None = 1.0  # personalization strength in [0, 1]; None = off
    encoder: str | None = None  # directory of the exported ONNX encoder
    # encoder.json's embedder and digests when `encoder` was set (client.device.encoder.encoder_identity); None =
    # not recorded (no encoder, or a state written before the record existed: its encoder is not checked)
    encoder_identity: dict | None = None
    generation: int = 0
    posterior_mode: np.ndarray | None = None  # (B-1,) Laplace centre in the softmax chart; None = the prior's
    posterior_cov: np.ndarray | None = None  # (B-1, B-1)
    prior_mean: np.ndarray | None = None  # (B,) from declared attributes; None = uniform (the population)
    attributes: tuple[tuple[str, str], ...] = ()  # declared (field, value), kept on the device only

    @property
    def n_pairs(self) -> int:
        return int(self.pair_diff.shape[0])

    @property
    def has_personal_data(self) -> bool:
        return (self.user_weights is not None or self.n_pairs > 0 or self.prior_mean is not None
                or bool(self.attributes))


def default_state_dir() -> Path:
    """$LORE_DEVICE_HOME (a leading ~ expanded, as a quoted "~/..." is not by the shell), else ~/.lore-fed/device."""
    value = os.environ.get(STATE_HOME_ENV, "")
    if not value:
        return Path.home() / ".lore-fed" / "device"
    if not value.strip():
        raise StateError(f"${STATE_HOME_ENV} is blank ({value!r}): unset it, or set it to the state directory")
    return Path(value).expanduser()


def new_state(directory: str | Path, basis: BasisFile, *, encoder: str | None = None,
              encoder_identity: dict | None = None) -> DeviceState:
    return DeviceState(directory=Path(directory), basis=basis, pair_diff=np.zeros((0, basis.dim), np.float32),
                       encoder=encoder, encoder_identity=encoder_identity)


def check_compatible(state: DeviceState, basis: BasisFile) -> None:
    """Refuse a basis that does not match the state's dimension, version or content."""
    old = state.basis
    where = f"{basis.source} vs the device state in {state.directory}"
    if basis.dim != old.dim:
        raise BasisMismatchError(
            f"{where}: basis dimension {basis.dim} differs from the state's {old.dim} "
            f"(embedder {basis.embedder!r} vs {old.embedder!r}); use `init --reinit` to replace it"
        )
    differences = [f"{what} {new!r}, the state's {held!r}" for what, new, held in (
        ("version", basis.version, old.version), ("rank", basis.rank, old.rank),
        ("embedder", basis.embedder, old.embedder), ("content", basis.sha256[:12], old.sha256[:12])) if new != held]
    if differences:  # each named: a tester read two equal versions and digests where the embedder differed
        raise BasisMismatchError(f"{where}: another basis ({'; '.join(differences)}); use `init --reinit` to adopt "
                                 "it (w is refitted)")


def save_state(state: DeviceState) -> DeviceState:
    """Commit `state` to its directory (crash-safe, see module docstring); returns it with generation + 1.

    Refuses (StateError, before anything is written) what load_state would refuse, by the same checks: a tester's
    save_state committed NaN weights and choices not aligned with pair_diff, which every later load called corrupted."""
    directory = state.directory
    where = f"the device state in {directory} was not saved"
    strength = "off" if state.strength is None else state.strength
    _check_settings(strength, state.encoder, state.encoder_identity, where, StateError)
    personal = _personal_arrays(state) if state.has_personal_data else None
    if personal is not None:
        _check_personal(personal, state.basis, where, StateError)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not (directory / MARKER).is_file():
        atomic_write_bytes(directory / MARKER, (STATE_FORMAT + "\n").encode())
    basis = state.basis
    basis_bytes = _npz_bytes(
        basis=basis.basis, version=np.int64(basis.version), embedder=np.str_(basis.embedder),
        dim=np.int64(basis.dim), rank=np.int64(basis.rank), sha256=np.str_(basis.sha256),
        **({} if basis.prior_pairs is None else {"prior_pairs": np.float64(basis.prior_pairs)}),
    )
    entries = {"basis": _write_data(directory, f"basis-v{basis.version}-", basis_bytes)}
    if personal is not None:
        entries["personal"] = _write_data(directory, "personal-", _npz_bytes(**personal))
    committed = replace(state, generation=state.generation + 1)
    manifest = {
        "format": STATE_FORMAT,
        "generation": committed.generation,
        "strength": strength if strength == "off" else float(strength),
        "encoder": state.encoder,
        "encoder_identity": state.encoder_identity,
        "basis_version": basis.version,
        "embedder": basis.embedder,
        "dim": basis.dim,
        "rank": basis.rank,
        "pairs": state.n_pairs,
        "files": entries,
    }
    atomic_write_json(directory / MANIFEST, manifest)
    _remove_unreferenced(directory, {entry["name"] for entry in entries.values()})
    return committed


# A reader (status, rank, next-question) takes no lock: a writer may commit a new manifest and delete the files of
# the old one between the reader's reading the manifest and reading those files. A load that fails while the
# manifest changed under it is such a race, not corruption: it is tried again on the new manifest.
_LOAD_ATTEMPTS = 5


def load_state(directory: str | Path) -> DeviceState:
    """Load and fully check the state in `directory`."""
    directory = Path(directory)
    path = directory / MANIFEST
    for attempt in range(_LOAD_ATTEMPTS):
        if not path.is_file():
            orphans = personal_files(directory)
            if orphans:  # only a committed state has personal files: its manifest was lost, not never written
                raise StateCorruptError(
                    f"{path}: missing, but {directory} holds personal data ({', '.join(p.name for p in orphans)}): "
                    "the device state is corrupted. `forget` deletes the personal data; `init --reinit --basis "
                    "FILE` starts afresh without it")
            if directory.exists() and not directory.is_dir():  # a tester's `--state afile status` was told to init
                require_state(directory)  # says it is a file
            raise StateError(f"no device state in {directory}: run `init --basis FILE` first (`lore-fed device "
                             "init` or `python -m client.device init`)")
        raw = _bytes_or_none(path)
        if raw is None:  # deleted since the check (`forget --all`, or a writer's commit): look again
            continue
        try:
            return _load_state(directory, raw)
        except StateCorruptError:
            if attempt + 1 == _LOAD_ATTEMPTS or _bytes_or_none(path) in (raw, None):
                raise
    raise StateError(f"no device state in {directory}: its manifest kept vanishing while this command read it "
                     "(a `forget --all` or `init --reinit` at the same time); run the command again")


def _bytes_or_none(path: Path) -> bytes | None:
    """The file's bytes, or None once it is gone (a reader races writers that replace and delete files)."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def _load_state(directory: Path, raw: bytes) -> DeviceState:
    """The state `raw` (the manifest's bytes) describes, fully checked."""
    path = directory / MANIFEST
    try:
        manifest = json_loads(raw)
        files, generation = manifest["files"], _manifest_count(manifest["generation"], "generation")
        strength = manifest["strength"]
        declared_pairs = _manifest_count(manifest["pairs"], "pairs") if "pairs" in manifest else -1
        if not isinstance(files, dict):
            raise TypeError(f"files must be an object, got {files!r}")
    except (ValueError, KeyError, TypeError, OverflowError, AttributeError) as exc:
        raise StateCorruptError(f"{path}: unreadable manifest ({exc}); the state is corrupted") from exc
    if manifest.get("format") not in STATE_FORMATS:  # a later version's state is not read as a damaged one
        raise StateCorruptError(f"{path}: format {manifest.get('format')!r}, expected one of {list(STATE_FORMATS)} "
                                "(a later format is a newer lore-fed's: use that version)")
    if "basis" not in files:
        raise StateCorruptError(f"{path}: the manifest names no basis file")
    try:
        basis = load_basis(_checked_file(directory, files["basis"]))
    except BasisFileError as exc:
        raise StateCorruptError(f"corrupted device state: {exc}") from exc
    declared = (manifest.get("basis_version"), manifest.get("dim"), manifest.get("rank"), manifest.get("embedder"))
    if declared != (basis.version, basis.dim, basis.rank, basis.embedder):
        raise StateCorruptError(
            f"{path}: declares basis (version, dim, rank, embedder) = {declared}, but the basis file holds "
            f"{(basis.version, basis.dim, basis.rank, basis.embedder)}"
        )
    encoder = manifest.get("encoder")
    identity = manifest.get("encoder_identity")  # absent in states written before it was recorded
    checked_strength = _check_settings(strength, encoder, identity, str(path), StateCorruptError)
    state = DeviceState(
        directory=directory, basis=basis, pair_diff=np.zeros((0, basis.dim), np.float32),
        strength=checked_strength,
        encoder=encoder, encoder_identity=identity, generation=generation,
    )
    if "personal" in files:
        state = _load_personal(state, _checked_file(directory, files["personal"]), declared_pairs)
    elif declared_pairs > 0:  # a tester removed the entry: the state loaded as a cold start and `adapt` then
        raise StateCorruptError(f"{path}: declares {declared_pairs} pairs but names no personal file; the state is "
                                "corrupted")  # deleted the personal file as unreferenced
    return state


def salvage_choices(directory: str | Path, basis: BasisFile) -> tuple[DeviceState, bool] | None:
    """A new state on `basis` keeping the stored choices of a corrupted state, where its personal file is intact (its
    manifest's checksum and pair count hold, its contents are what `adapt` writes) and its pairs live in `basis`'
    space (_stored_spaces): `init --reinit` repairs a lost or damaged basis file without dropping the
    user's answers (a tester's dropped 5 intact ones). Its encoder and strength are kept where valid; w, the
    posterior and declared attributes are not (the caller refits w). Returns (that state, whether attributes were
    declared and so dropped), or None when nothing can be kept."""
    directory = Path(directory)
    try:
        manifest = json_loads((directory / MANIFEST).read_bytes())
        path = _checked_file(directory, manifest["files"]["personal"])
        with np.load(path, allow_pickle=False) as data:
            diff, stored = data["pair_diff"], data["choices"]
            declared = "attributes" in data.files and str(data["attributes"]) != "{}"
        if _stored_spaces(directory, manifest) != {(basis.dim, basis.embedder)}:
            return None
        if "pairs" in manifest and _manifest_count(manifest["pairs"], "pairs") != diff.shape[0]:
            return None
        arrays = {**_OPTIONAL_PERSONAL, "user_weights": np.zeros(0), "pair_diff": diff, "choices": stored}
        _check_personal(arrays, basis, str(path), StateCorruptError)
        choices = _choices_of(stored)
        settings = salvage_settings(directory, basis)
    except Exception:  # any damage there too: nothing is kept, as before
        return None
    if settings is None:
        return None
    return replace(settings, pair_diff=diff.astype(np.float32), choices=choices), declared


def salvage_settings(directory: str | Path, basis: BasisFile) -> DeviceState | None:
    """A new state on `basis` with the settings (strength, encoder and its identity) and generation of a corrupted
    state's manifest, where those are valid, else None: `init --reinit` over a damaged personal file kept nothing
    of them, and `rank` then had no encoder (a tester)."""
    directory = Path(directory)
    try:
        manifest = json_loads((directory / MANIFEST).read_bytes())
        encoder, identity = manifest.get("encoder"), manifest.get("encoder_identity")
        strength = _check_settings(manifest.get("strength", 1.0), encoder, identity, MANIFEST, StateCorruptError)
        generation = _manifest_count(manifest["generation"], "generation")
    except Exception:
        return None
    if identity is not None and other_embedders(identity["embedder"], basis.embedder):
        encoder, identity = None, None  # an encoder of another model than `basis`: refused by every command anyway
    return replace(new_state(directory, basis, encoder=encoder, encoder_identity=identity), strength=strength,
                   generation=generation)


def _stored_spaces(directory: Path, manifest: dict) -> set[tuple]:
    """The embedding spaces (dim, embedder) a damaged state says its pairs are in: its manifest's, and its stored
    basis file's where that is intact (a reviewer: a manifest naming another embedder than its intact basis file
    kept pairs of one model under another's basis)."""
    spaces = {(manifest.get("dim"), manifest.get("embedder"))}
    try:
        stored = load_basis(_checked_file(directory, manifest["files"]["basis"]))
    except (StateError, BasisFileError, KeyError, TypeError):
        return spaces
    return spaces | {(stored.dim, stored.embedder)}


def is_device_state(directory: str | Path) -> bool:
    """True when `directory` carries the state marker, or (a state written before the marker) a readable manifest
    of this format."""
    directory = Path(directory)
    if (directory / MARKER).is_file():
        return True
    try:
        return json_loads((directory / MANIFEST).read_bytes()).get("format") in STATE_FORMATS
    except (OSError, ValueError, AttributeError):
        return False


def holds_other_files(directory: str | Path) -> bool:
    """True when `directory` holds anything but the lock and temp files that a concurrent or killed `init` leaves
    before the marker (a manifest or data file without the marker is another tool's: counted)."""
    def left_by_init(path: Path) -> bool:
        match = _STATE_FILE.fullmatch(path.name)
        return path.is_file() and (path.name == LOCK or bool(match and match["tmp"]))

    return not all(left_by_init(path) for path in Path(directory).iterdir())


def only_init_leftovers(directory: str | Path) -> bool:
    """True when `directory` is not a device state and holds only what a killed `init` leaves (its lock and temp
    files), at least one of them: `forget --all` removes those (a tester's could not, and said to delete by hand)."""
    directory = Path(directory)
    return (directory.is_dir() and not directory.is_symlink() and not is_device_state(directory)
            and any(directory.iterdir()) and not holds_other_files(directory))


def require_state(directory: str | Path) -> Path:
    """`directory`, refused (StateError) unless it is a device state: nothing is created or deleted elsewhere."""
    directory = Path(directory)
    try:
        is_dir = stat.S_ISDIR(os.stat(directory).st_mode)  # one look: an `init` may make it meanwhile
        why = "it is a file, not a directory"
    except (FileNotFoundError, NotADirectoryError):
        is_dir, why = False, "the directory does not exist"
    if not is_dir:
        raise StateError(f"no device state in {directory}: {why} (nothing was changed)")
    if not is_device_state(directory):
        orphans = personal_files(directory)
        if orphans:  # a state that lost its marker and its manifest: no command can tell it is one
            raise StateError(f"{directory} holds personal data files ({', '.join(p.name for p in orphans)}) but no "
                             f"{MARKER} marker and no device manifest, so no command treats it as a device state; "
                             "nothing was changed. Delete those files by hand to remove the data, then run `init`")
        if not holds_other_files(directory):  # empty, or what a killed `init` or `forget --all` leaves (.lock)
            left = ", ".join(sorted(path.name for path in directory.iterdir()))
            held = (f"it holds only {left}, left by an interrupted (or running) `init` or "
                    "`forget --all`, no personal data file" if left else "the directory is empty")
            raise StateError(f"no device state in {directory}: {held}; nothing was changed. Run `init --basis FILE` to "
                             "make one there, or remove the directory")
        raise StateError(f"{directory} is not a device state (no {MARKER} marker, no device manifest); nothing was "
                         "changed. Pass the directory given to `init` (--state), or run `init --basis FILE` first")
    return directory


class Forgotten(NamedTuple):
    """What `forget` did: notes for the user (what could not be kept or removed; empty when all went as asked),
    whether the rest of the state still loads (False after `everything`, or when its note says how to repair it), and
    whether there was personal data to delete (a second `forget` has none)."""

    notes: list[str]
    usable: bool
    had_personal_data: bool = True


def forget(directory: str | Path, *, everything: bool = False) -> Forgotten:
    """Delete all personal data (weights, pairs, raw choices) and keep the basis and settings; with `everything`
    delete every file of the state (and the directory when nothing else is in it). Refuses a directory that is not a
    device state. Personal data is deleted even when the state is corrupted."""
    if everything and only_init_leftovers(directory):
        left = ", ".join(sorted(path.name for path in Path(directory).iterdir()))
        return Forgotten([f"{directory} held no device state, only {left}, left by an interrupted `init` or "
                          "`forget --all`: removed", *_delete_state(Path(directory))], False)
    directory = require_state(directory)
    if everything:
        return Forgotten(_delete_state(directory), False)
    had = bool(personal_files(directory))
    try:
        state = load_state(directory)
    except Exception as exc:  # corrupted in any way, or the manifest is gone: personal files may still be on disk
        return _forget_corrupted(directory, exc, "was corrupted" if isinstance(exc, StateError) else
                                 "could not be read")._replace(had_personal_data=had)
    try:
        save_state(replace(state, user_weights=None, pair_diff=state.pair_diff[:0], choices=(), posterior_mode=None,
                           posterior_cov=None, prior_mean=None, attributes=()))
    except Exception as exc:  # e.g. a full disk: the personal data goes all the same, by deletion
        return _forget_corrupted(directory, exc, "could not be saved without its personal data")._replace(
            had_personal_data=had)
    return Forgotten([], True, had)


def personal_files(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    return sorted(path for path in directory.iterdir()
                  if path.is_file() and _is_personal(path.name) and not path.name.startswith("."))


def _is_personal(name: str) -> bool:
    match = _STATE_FILE.fullmatch(name)
    return bool(match) and match["name"].startswith("personal-")


def _forget_corrupted(directory: Path, problem: Exception, what: str = "was corrupted") -> Forgotten:
    """The state cannot be loaded (or saved): delete every personal data file regardless, and drop it from the
    manifest when the manifest is readable; the rest is left as it is (and checked again for the note)."""
    removed = [path for path in directory.iterdir() if path.is_file() and _is_personal(path.name)]
    for path in removed:
        path.unlink()
    try:
        manifest = json_loads((directory / MANIFEST).read_bytes())
        if isinstance(manifest.get("files"), dict) and manifest["files"].pop("personal", None) is not None:
            manifest["pairs"] = 0
            atomic_write_json(directory / MANIFEST, manifest)
    except (OSError, ValueError, AttributeError):
        pass  # an unreadable manifest names nothing we could still use
    deleted = (f"its personal data was deleted all the same ({len(removed)} file(s))" if removed else
               "it holds no personal data file")  # a tester's second `forget` read "deleted ... (0 file(s))"
    note = f"the device state {what} ({problem}); {deleted}"
    try:
        load_state(directory)
    except Exception:
        return Forgotten([note + "; the rest is still unusable: repair it with `init --reinit --basis FILE`, or "
                          "remove it with `forget --all`"], False)
    return Forgotten([note + "; the rest of the state checks out"], True)


def _delete_state(directory: Path) -> list[str]:
    """Delete the state's own files (marker, then the lock file, last: the caller holds it, see `state_lock`), then
    the directory if nothing else is left in it."""
    entries = list(directory.iterdir())
    own = [path for path in entries if path.is_file() and _is_state_file(path.name) and path.name != LOCK]
    for path in sorted(own, key=lambda path: path.name == MARKER):
        path.unlink()
    (directory / LOCK).unlink(missing_ok=True)
    for _ in range(20):
        left = sorted(path.name for path in directory.iterdir())
        if LOCK not in left or len(left) > 1:
            break
        # A command that checked the state before the marker went created a lock file of its own: it finds no
        # state under it and removes it (`state_lock`).
        time.sleep(0.05)
    left = [name for name in left if name != LOCK]
    there_before = {path.name for path in entries} - {path.name for path in own} - {LOCK}  # found, not deleted
    if left and all(name not in there_before and _is_state_file(name) and (directory / name).is_file()
                    for name in left):  # state files written since the deletion began: only `init` does that
        return [f"an `init` started during the deletion is making a new device state in {directory}: it was kept "
                "(the state this command deleted is gone)"]
    if left:
        return [f"kept the directory {directory}: it also holds files that are not part of the device state "
                f"({', '.join(left[:5])}{', ...' if len(left) > 5 else ''}; {len(left)} in all)"]
    if directory.is_symlink():  # the link is the user's; its target directory is empty now
        return [f"kept {directory}, a symbolic link to {directory.resolve()}, and that directory (now empty)"]
    try:
        directory.rmdir()
    except OSError:
        if not (directory / LOCK).exists():
            raise
        # pragma: no cover - a waiting command re-created the lock once more
        return [f"kept the directory {directory}: a device command started during the deletion re-created its "
                f"{LOCK} file; remove the directory when it has ended"]
    return []


def _is_state_file(name: str) -> bool:
    return name == LOCK or bool(_STATE_FILE.fullmatch(name))


_LOCK_ATTEMPTS = 10  # a lock file deleted under a waiting command: once or twice, not forever


@contextlib.contextmanager
def state_lock(directory: str | Path, *, create: bool = False):
    """Serialise read-modify-write of the state between processes (POSIX advisory lock; no-op elsewhere). Only
    `init` (create=True) may make the directory; elsewhere a directory that is not a device state is refused before
    anything (the lock file included) is written in it. `forget --all` deletes the lock file last, while holding it:
    a command that waited on it wakes holding a deleted file, so it locks the path's current file instead (checking
    again that there is a state), and a command that created a lock file in a state deleted meanwhile removes it
    and stops; no two commands ever hold the path's lock file at once."""
    directory = Path(directory)
    if not create:
        require_state(directory)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        if create:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        yield
        return
    for _ in range(_LOCK_ATTEMPTS):
        if create:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        if (directory / LOCK).is_dir():
            raise StateError(f"{directory / LOCK} is a directory, not the state's lock file: remove it (rmdir) and "
                             "rerun")
        try:
            handle = open(directory / LOCK, "a+b")
        except FileNotFoundError:
            if directory.is_dir():  # a dangling link, say: retrying would not help
                raise StateError(f"{directory / LOCK}: cannot be opened as the state's lock file (a link to nowhere?);"
                                 " remove it and rerun") from None
            if create:
                continue  # the directory went away since it was made (`forget --all` at the same time): make it again
            raise StateError(f"no device state in {directory}: it was deleted while this command started (nothing "
                             "was changed)") from None
        fcntl.flock(handle, fcntl.LOCK_EX)
        if _is_current(handle, directory / LOCK):
            break
        handle.close()  # woke on a lock file deleted meanwhile (`forget --all`): lock the path's current one
        if not create:
            require_state(directory)
    else:
        raise StateError(f"{directory / LOCK}: kept changing while this command tried to lock it (another command "
                         "deleting the state?); run the command again")
    with handle:
        try:
            if not create and not is_device_state(directory):  # deleted after this command's check
                (directory / LOCK).unlink(missing_ok=True)  # the file this command created: it holds it
                raise StateError(f"no device state in {directory}: it was deleted while this command started "
                                 "(nothing was changed)")
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _is_current(handle, path: Path) -> bool:
    """Whether the open `handle` is still the file at `path` (not deleted or replaced since it was opened)."""
    try:
        now = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(handle.fileno())
    return (held.st_dev, held.st_ino) == (now.st_dev, now.st_ino)


def _npz_bytes(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def _write_data(directory: Path, prefix: str, data: bytes) -> dict:
    digest = hashlib.sha256(data).hexdigest()
    name = f"{prefix}{digest[:16]}.npz"
    target = directory / name
    # Content-addressed: an existing file of this name is kept only when it holds exactly these bytes (a damaged one
    # of the same size, which `init --reinit` is run to repair, is rewritten).
    if not (target.is_file() and target.stat().st_size == len(data)
            and hashlib.sha256(target.read_bytes()).hexdigest() == digest):
        atomic_write_bytes(target, data)
    return {"name": name, "bytes": len(data), "sha256": digest}


def _checked_file(directory: Path, entry: dict) -> Path:
    try:
        name, size, digest = entry["name"], _manifest_count(entry["bytes"], "bytes"), entry["sha256"]
        if not (isinstance(name, str) and isinstance(digest, str)):
            raise TypeError("name and sha256 must be strings")
        path = directory / name
    except (KeyError, TypeError) as exc:
        raise StateCorruptError(f"{directory / MANIFEST}: malformed file entry {str(entry)[:300]} ({exc})") from exc
    if Path(name).name != name:
        raise StateCorruptError(f"{directory / MANIFEST}: file entry {name!r} leaves the state directory")
    data = _bytes_or_none(path) if path.is_file() else None
    if data is None:
        raise StateCorruptError(f"{path}: missing (the manifest names it); the device state is incomplete")
    if len(data) != size:
        raise StateCorruptError(f"{path}: {len(data)} bytes, the manifest says {size}: truncated or altered")
    if hashlib.sha256(data).hexdigest() != digest:
        raise StateCorruptError(f"{path}: checksum mismatch: the file is corrupted")
    return path


def _manifest_count(value, what: str) -> int:
    """A count the manifest holds (generation, pairs, a file's bytes): a JSON integer in 0..2**63 - 1, nothing else
    (a float, true, or Infinity, which Python's json reads, is another tool's or a damaged manifest)."""
    if not is_json_integer(value):
        raise TypeError(f"{what} must be an integer from 0 to 2**63 - 1, got {json.dumps(value)[:40]}")
    return value


_OPTIONAL_PERSONAL = {  # arrays that states written before the posterior existed lack: no posterior, no declared prior
    "posterior_mode": np.zeros(0), "posterior_cov": np.zeros((0, 0)), "prior_mean": np.zeros(0),
    "attributes": np.str_("{}"),
}


def _load_personal(state: DeviceState, path: Path, declared_pairs: int) -> DeviceState:
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in ("user_weights", "pair_diff", "choices")}
            arrays.update({key: data[key] for key in _OPTIONAL_PERSONAL if key in data.files})
    except Exception as exc:  # a checksum-valid file can still be malformed (written by another tool)
        raise StateCorruptError(f"{path}: unreadable personal state ({type(exc).__name__}: {exc})") from exc
    arrays = {**_OPTIONAL_PERSONAL, **arrays}
    _check_personal(arrays, state.basis, str(path), StateCorruptError)
    weights, diff, mode, prior_mean = (arrays["user_weights"], arrays["pair_diff"], arrays["posterior_mode"],
                                       arrays["prior_mean"])
    if declared_pairs != diff.shape[0]:
        raise StateCorruptError(f"{path}: {diff.shape[0]} pairs, the manifest says {declared_pairs} pairs")
    return replace(
        state, user_weights=weights if weights.size else None, pair_diff=diff,
        choices=_choices_of(arrays["choices"]), posterior_mode=mode if mode.size else None,
        posterior_cov=arrays["posterior_cov"] if mode.size else None,
        prior_mean=prior_mean if prior_mean.size else None,
        attributes=tuple(json_loads(str(arrays["attributes"])).items()),
    )


def _personal_arrays(state: DeviceState) -> dict[str, np.ndarray]:
    """The arrays of the personal file (module docstring), as save_state writes them."""
    diff = np.asarray(state.pair_diff, np.float32)
    return {
        "user_weights": np.zeros(0) if state.user_weights is None else np.asarray(state.user_weights, np.float64),
        "pair_diff": diff if diff.size else diff.reshape(0, state.basis.dim),
        "choices": _choices_array(state.choices),
        "posterior_mode": _or_empty(state.posterior_mode, (0,)),
        "posterior_cov": _or_empty(state.posterior_cov, (0, 0)),
        "prior_mean": _or_empty(state.prior_mean, (0,)),
        "attributes": np.str_(json.dumps(dict(state.attributes), ensure_ascii=False)),
    }


def _check_personal(arrays: dict[str, np.ndarray], basis: BasisFile, where: str, error: type[StateError]) -> None:
    """Raise error(f"{where}: ...") unless the personal file's arrays are what `adapt` writes for `basis`: the one
    check of save_state (before it writes) and load_state (after it reads)."""
    weights, diff, choices = arrays["user_weights"], arrays["pair_diff"], arrays["choices"]
    mode, cov, prior_mean = arrays["posterior_mode"], arrays["posterior_cov"], arrays["prior_mean"]
    rank, dim = basis.rank, basis.dim
    numbers = {"user_weights": weights, "pair_diff": diff, "posterior_mode": mode, "posterior_cov": cov,
               "prior_mean": prior_mean}
    wrong = [f"{key} ({array.dtype})" for key, array in numbers.items() if array.dtype.kind != "f"]
    wrong += [] if choices.dtype.kind == "U" or choices.dtype == np.uint8 else [f"choices ({choices.dtype})"]
    if wrong:
        raise error(f"{where}: {', '.join(wrong)}: choices must be UTF-8 bytes or strings, the other arrays floats")
    if mode.size and (mode.shape != (rank - 1,) or cov.shape != (rank - 1, rank - 1)
                      or not (np.isfinite(mode).all() and np.isfinite(cov).all()) or not _positive_definite(cov)):
        raise error(f"{where}: the posterior must be ({rank - 1},) and ({rank - 1}, {rank - 1}), finite, its "
                    f"covariance positive definite; got {mode.shape} and {cov.shape}")
    if prior_mean.size and (prior_mean.shape != (rank,) or not prior_mean.min() > 0
                            or abs(prior_mean.sum() - 1.0) > 1e-6):
        raise error(f"{where}: prior_mean must be ({rank},) inside the simplex, got {_shown(prior_mean)}")
    if weights.size and (
        weights.shape != (rank,) or not np.isfinite(weights).all() or weights.min() < 0
        or abs(weights.sum() - 1.0) > 1e-6
    ):  # the values, not only the shape: a tester read "must be (3,) on the simplex, got (3,)"
        raise error(f"{where}: user_weights must be ({rank},) on the simplex (finite, >= 0, summing to 1), got "
                    f"{_shown(weights)}")
    if diff.ndim != 2 or diff.shape[1] != dim or not np.isfinite(diff).all():
        raise error(f"{where}: pair_diff must be finite (n, {dim}), got shape {diff.shape}")
    try:
        texts = _choices_of(choices)
    except (UnicodeDecodeError, ValueError):
        raise error(f"{where}: choices are not UTF-8 JSON lines") from None
    if len(texts) != diff.shape[0]:
        raise error(f"{where}: {diff.shape[0]} pairs, {len(texts)} choices: one choice per pair_diff row")
    try:
        declared = json_loads(str(arrays["attributes"]))
    except ValueError:
        declared = None
    if not (isinstance(declared, dict) and all(isinstance(value, str) for value in declared.values())):
        raise error(f"{where}: attributes must be a JSON object of strings, got {str(arrays['attributes'])[:100]}")
    for number, text in enumerate(texts, 1):
        _check_stored_choice(text, f"{where}: stored choice {number}", error)


def _check_settings(strength, encoder, identity, where: str, error: type[StateError]) -> float | None:
    """Raise error(f"{where}: ...") unless the manifest's settings are valid: strength 'off' or in [0, 1], encoder
    a directory path or None, its identity None or (with an encoder) encoder.json's record. Returns the strength as
    the state holds it (None: off)."""
    checked = None if strength == "off" else _checked_strength(strength, where, error)
    if encoder is not None and not (isinstance(encoder, str) and encoder):
        raise error(f"{where}: encoder must be a directory path or null, got {encoder!r}")
    if identity is not None and not (encoder is not None and is_encoder_identity(identity)):
        raise error(
            f'{where}: encoder_identity must be null, or with an encoder {{"embedder": NAME or null, "sha256": '
            f'{{"{MODEL_FILE}": DIGEST, "{TOKENIZER_FILE}": DIGEST}}}}; got {json.dumps(identity)[:200]} with encoder '
            f"{encoder!r}")
    return checked


def _shown(values: np.ndarray) -> str:
    """An array for a message: its first values and its shape."""
    flat = values.ravel()
    return f"{np.array2string(flat[:8], precision=6)}{' ...' if flat.size > 8 else ''} (shape {values.shape})"


def _positive_definite(cov: np.ndarray) -> bool:
    try:
        np.linalg.cholesky(cov)  # what drawing posterior samples does with it
    except np.linalg.LinAlgError:
        return False
    return True


def _check_stored_choice(text: str, where: str, error: type[StateError]) -> None:
    """A stored choice is what `adapt` stores: a choice of the shape `read_choices` takes (check_choice_shape: an
    earlier `adapt` stored some that today's input rules refuse, such as two equal responses), or
    {"precomputed": "FILE#ROW"} for a row of an .npz of diffs. Another tool's file may hold anything: refused here,
    not where it is used."""
    try:
        record = json_loads(text)
    except ValueError:
        raise error(f"{where} is not JSON: {text[:80]!r}") from None
    if isinstance(record, dict) and isinstance(record.get("precomputed"), str):
        return
    try:
        check_choice_shape(record, where)
    except ChoicesError as exc:
        raise error(str(exc)) from None


def _choices_array(choices: tuple[str, ...]) -> np.ndarray:
    """The raw choices as one array of UTF-8 JSON lines: a (n,) str array pads every choice to the longest (a
    tester's 7 choices, one of 5 MB, made a 140 MB file). json.dumps writes no newline inside a choice; one that
    another tool wrote with newlines between its tokens is written again on one line, and one holding a lone
    surrogate (a file name that is not UTF-8, kept by an earlier `adapt`) with it escaped, as JSON allows."""
    lines = [text if "\n" not in text and is_unicode_text(text) else json.dumps(json_loads(text), ensure_ascii=True)
             for text in choices]
    return np.frombuffer("\n".join(lines).encode("utf-8"), np.uint8).copy()


def _choices_of(array: np.ndarray) -> tuple[str, ...]:
    """The raw choices of a personal file's `choices` array (`_choices_array`, or a state's before 0.2.4)."""
    if array.ndim != 1:
        raise ValueError(f"choices of shape {array.shape}")
    if array.dtype.kind == "U":
        return tuple(array.tolist())
    text = array.tobytes().decode("utf-8")
    return tuple(text.split("\n")) if text else ()


def _or_empty(array: np.ndarray | None, empty_shape: tuple[int, ...]) -> np.ndarray:
    return np.zeros(empty_shape) if array is None else np.asarray(array, np.float64)


def _checked_strength(value, where, error: type[StateError] = StateCorruptError) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise error(f"{where}: strength must be in [0, 1] or 'off', got {value!r}")
    return float(value) + 0.0  # -0 is 0 (a state written before parse_strength said so)


def _remove_unreferenced(directory: Path, keep: set[str]) -> None:
    """Delete data files the manifest no longer names and temp files of interrupted writes: only names the state
    writes (`_STATE_FILE`), never a user's own file that merely starts like one (basis-backup.npz, notes.tmp)."""
    for path in directory.iterdir():
        match = _STATE_FILE.fullmatch(path.name)
        if not match or not path.is_file():
            continue
        stale_data = match["name"].startswith(_DATA_PREFIXES) and path.name not in keep
        if match["tmp"] or stale_data:
            path.unlink(missing_ok=True)
