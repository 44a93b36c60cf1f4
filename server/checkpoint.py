"""The run's durable state, one atomic file per write (`RUN_DIR/checkpoint.npz`) after every round.

It holds the basis A (B, D) after round `round`, the server optimizer state, the sampler state, the settings and
population fingerprints and every round's metrics. A restarted server resumes at round+1: a round is either in the
checkpoint (never repeated) or not (re-run from the same state, never lost). `rounds.jsonl` is derived from it.
"""

from __future__ import annotations

import json
import secrets
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from federation.protocol import valid_run_id
from lore_core.atomic_io import atomic_save_npz, atomic_write_text, strict_json
from lore_core.setting_names import shown_change
from lore_core.text_file import json_loads

CHECKPOINT_FILENAME = "checkpoint.npz"
ROUNDS_FILENAME = "rounds.jsonl"
SCHEMA = "lore-fed-checkpoint/1"


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed with this run's settings."""


@dataclass
class RunState:
    round: int
    basis: np.ndarray  # (B, D) float64
    optimizer: dict[str, np.ndarray] = field(default_factory=dict)
    aggregator: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)
    population: list[int] = field(default_factory=list)
    history: list[dict] = field(default_factory=list)
    # A random name for this run, drawn when it starts and kept by every resume: nodes keep their users' w in a slot
    # of this name (client/user_state.py), so a new run in a reused directory never continues an old run's w.
    # Empty in checkpoints written before it existed: their nodes name the slot by the run directory instead.
    run_id: str = ""


def new_run_id() -> str:
    return secrets.token_hex(8)


def save_checkpoint(run_dir: str | Path, state: RunState) -> None:
    meta = {"schema": SCHEMA, "round": state.round, "aggregator": state.aggregator, "settings": state.settings,
            "population": state.population, "history": state.history, "run_id": state.run_id}
    arrays = {f"optimizer.{key}": value for key, value in state.optimizer.items()}
    atomic_save_npz(Path(run_dir) / CHECKPOINT_FILENAME, basis=state.basis, meta=np.array(json.dumps(meta)), **arrays)
    write_rounds(run_dir, state.history)


def load_checkpoint(run_dir: str | Path) -> RunState | None:
    file = Path(run_dir) / CHECKPOINT_FILENAME
    if not file.exists():
        return None
    try:
        with np.load(file, allow_pickle=False) as data:
            meta = json_loads(str(data["meta"]))
            if meta.get("schema") != SCHEMA:
                raise CheckpointError(f"{file}: schema {meta.get('schema')!r}, expected {SCHEMA!r}")
            optimizer = {key.split(".", 1)[1]: data[key] for key in data.files if key.startswith("optimizer.")}
            basis = data["basis"]
        return RunState(round=int(meta["round"]), basis=basis, optimizer=optimizer, aggregator=meta["aggregator"],
                        settings=meta["settings"], population=meta["population"], history=meta["history"],
                        run_id=_run_id_of(meta))
    except CheckpointError:
        raise
    except (OSError, EOFError, ValueError, KeyError, TypeError, zipfile.BadZipFile) as exc:
        # Written atomically, so damage came from outside (a copy cut short, a disk error): say so, do not guess.
        raise CheckpointError(f"{file}: not a readable lore-fed checkpoint ({type(exc).__name__}: {exc}); it is "
                              "written atomically, so it was damaged after the run wrote it: restore it from a "
                              "copy, or start the run afresh in a new --out directory") from exc


def _run_id_of(meta: dict) -> str:
    """The checkpoint's run id, checked; "" in a checkpoint written before run ids."""
    run_id = meta.get("run_id", "")
    return "" if run_id == "" else valid_run_id(run_id, "run_id")


# Settings added after checkpoints were first written, with the value every run before them had.
SETTINGS_BEFORE_THEY_EXISTED = {"weight_by": "user", "pairs_per_user": 1.0}


# Settings whose defaults follow another's (server.run_settings, `lore-fed simulate`): where the leading one changed,
# a refusal names it alone, not the defaults it moved (a tester resuming a DP run under --privacy none was shown the
# mode's server rate, schedule and evaluation beside the one real cause; pairs-per-user is 1 under user weighting).
FOLLOWERS = {"privacy_mode": ("privacy", "server_lr", "server_lr_schedule", "init_scale", "eval_every", "weight_by",
                              "pairs_per_user", "local_steps", "clients_per_round"),
             "weight_by": ("pairs_per_user", "local_steps")}


def check_resumable(state: RunState, settings: dict, population: list[int], run_dir: str | Path,
                    given: frozenset[str] = frozenset()) -> None:
    """Refuse a resume whose fingerprinted settings or population differ; a key the checkpoint holds but today's
    fingerprint leaves out (now volatile, e.g. prior_pairs) is not compared, and one it lacks has its value from
    before the setting existed. `given`: the fields the user set (a caller that knows), named even where they follow
    a changed leading setting (FOLLOWERS)."""
    stored = {**SETTINGS_BEFORE_THEY_EXISTED, **state.settings}
    if isinstance(stored.get("privacy"), dict) and isinstance(settings.get("privacy"), dict):
        from server.run_settings import chosen_privacy

        users = sum(population[:-1])  # training users per node, then D
        stored["privacy"] = chosen_privacy(stored.get("privacy_mode"), stored["privacy"], users)
        settings = {**settings, "privacy": chosen_privacy(settings.get("privacy_mode"), settings["privacy"], users)}
    changed = sorted(k for k in settings if stored.get(k) != settings[k])
    if changed:  # named as run-config keys (`simulate`'s flags share them): a tester read `weight_by` as internal
        shown = [k for k in changed
                 if k in given or not any(k in FOLLOWERS.get(lead, ()) for lead in changed)]
        differences = "; ".join(shown_change(k.replace('_', '-'), stored.get(k), settings[k]) for k in shown)
        how = "resume it with that run's settings or use a new --out directory"
        if "local_steps" in shown and settings.get("privacy_mode") == stored.get("privacy_mode") == "record":
            how = ("record mode takes no local-steps since lore-fed 0.2.2 (its clients run record-epochs), so that "
                   "run cannot resume: use a new --out directory")  # a reviewer: the old K is refused now
        raise CheckpointError(f"{run_dir} holds a run with other settings ({differences}; run-config keys); {how}")
    if state.population != population:
        raise CheckpointError(f"{Path(run_dir) / CHECKPOINT_FILENAME} holds a run over another population: "
                              f"{_population_change(state.population, population)}; use a new --out directory or "
                              "the pair file and nodes of that run")


def _population_change(before: list[int], now: list[int]) -> str:
    """What differs between two population fingerprints (training users per node, then the embedding width D)."""
    if before[-1:] != now[-1:]:
        return f"embedding width D {before[-1] if before else '?'}, now {now[-1]}"
    shown = [f"{len(counts)} nodes with {sum(counts)} training users"
             + (f" {counts}" if len(counts) <= 8 else "") for counts in (before[:-1], now[:-1])]
    return f"{shown[0]}, now {shown[1]}"


def initial_basis(rank: int, dim: int, seed: int, scale: float) -> np.ndarray:
    """A0 (B, D): seeded Gaussian entries of std scale/sqrt(D) (scale 1 = the centralized trainer's init); w starts
    uniform, so the randomness breaks the symmetry between basis rows. Without DP federated runs start larger (run
    config `init-scale`, 5, chosen on the pilot populations): with rows barely apart, every user's update pushes them
    the same way and they take many rounds to separate. Under DP the default stays 1 (its pilot: small noisy steps
    do not move a large random start away)."""
    return np.random.default_rng([seed, 1]).normal(scale=scale / np.sqrt(dim), size=(rank, dim))


def start_or_resume(settings, population) -> tuple[RunState, bool]:
    """The run state of `settings.run_dir`: resumed from its checkpoint (refused if settings or population changed)
    or a new run from the initial basis. Returns (state, resumed); the caller restores its optimizer/sampler."""
    state = load_checkpoint(settings.run_dir)
    if state is None:
        basis = initial_basis(settings.rank, population.dim, settings.seed, settings.init_scale)
        return RunState(round=0, basis=basis, settings=settings.fingerprint(),
                        population=population.fingerprint(), run_id=new_run_id()), False
    check_resumable(state, settings.fingerprint(), population.fingerprint(), settings.run_dir)
    return state, True


def write_rounds(run_dir: str | Path, history: list[dict]) -> None:
    atomic_write_text(Path(run_dir) / ROUNDS_FILENAME, "".join(strict_json(r) + "\n" for r in history))
