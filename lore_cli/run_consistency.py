"""Whether what a run published agrees with the record the audits verify.

The accounting and canary audits certify the ledger against the release record (its hashes, the replayed server
optimizer, the noise in the released sums). A run also publishes `basis.npz` (the model devices download),
`metrics.json` (the epsilon and settings tools read) and the record's header (the server optimizer settings the
replay uses). An adversarial tester changed each of them while the audits passed:
- `basis.npz` replaced by a non-private basis: the per-user audits and `evaluate` then read it;
- `metrics.json`'s epsilon lowered;
- the header's client-lr scaled by 10 together with every recorded mean update, which the replay cannot tell from
  the honest run, while the ledger claimed ten times the noise. The header must name the settings the run was started
  with (its checkpoint); that the clients ran with them only the nodes can confirm (README, "What `accounting` and
  `canary` cannot catch").
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

# The release record header's optimizer fields by the checkpoint settings (ServerSettings) they were written from;
# metrics.json names them as the checkpoint does (it has no schedule).
HEADER_SETTINGS = {"name": "server_optimizer", "server_lr": "server_lr", "client_lr": "client_lr",
                   "local_steps": "local_steps", "l2": "l2", "schedule": "server_lr_schedule"}
# metrics.json's privacy keys that the ledger's epsilon depends on, compared within EPSILON_TOLERANCE (another
# accountant version computes them a little apart; the accounting audit's own 0.05 let a small epsilon be understated
# by a quarter: a reviewer); the others are copied settings, compared exactly. A key on one side only is a mismatch
# (a reviewer's metrics.json claimed secure aggregation's epsilon against the server on a `user` run). The
# guarantee sentence's numbers are compared (accounting_check.same_numbers), not its wording, which follows the
# version, nor the accountant's name.
EPSILON_KEYS = ("epsilon", "epsilon_rdp", "epsilon_against_server")
EPSILON_TOLERANCE = {"rel_tol": 0.02, "abs_tol": 1e-3}
COPIED_KEYS = ("delta", "noise_multiplier", "clip_norm", "sample_rate", "most_user_rounds", "not_private",
               "stopped_early")
# metrics.json's keys that name the run's own settings, by the checkpoint settings they copy.
METRICS_SETTINGS = {"privacy_mode": "privacy_mode", "users_per_round": "clients_per_round", "rank": "rank"}


def published_mismatches(run_dir: Path, state, releases) -> list[str]:
    """What `basis.npz`, `metrics.json` and the release record's header say that the verified record, the ledger
    and the run's checkpoint (`state`, None when there is none) contradict; empty when they agree. `releases`: the
    verified record (server.release_record.read_releases), None when the run has none."""
    found = []
    if releases is not None:
        found += _header_mismatches(run_dir, state, releases.optimizer)
        found += _basis_mismatches(run_dir, state, releases)
    found += _metrics_mismatches(run_dir, state, None if releases is None else releases.optimizer)
    return found


def _header_mismatches(run_dir: Path, state, header: dict) -> list[str]:
    """The header's optimizer settings, as the replay runs them (a field an older record lacks at its default: a
    reviewer rescaled the updates of a constant-schedule SGD run to replay as a cosine one without the field), must
    be the checkpoint's."""
    from server.release_record import REPLAY_DEFAULTS

    if state is None:
        return []
    replayed = {**REPLAY_DEFAULTS, **header}
    differ = [f"{field} {replayed.get(field)!r} (the checkpoint's {key} {state.settings[key]!r})"
              for field, key in HEADER_SETTINGS.items()
              if key in state.settings and not _same(replayed.get(field), state.settings[key])]
    planned = _planned_rounds(run_dir)  # the cosine's length (the checkpoint keeps none: a resume may not change it)
    if "rounds" in header and planned is not None and header["rounds"] != planned:
        differ.append(f"rounds {header['rounds']!r} (the ledger's planned {planned})")
    if not differ:
        return []
    return [f"{run_dir / 'releases' / 'chain.jsonl'}: its header's server optimizer settings are not the run's: "
            f"{'; '.join(differ)}; the replay of the releases would use settings the run did not run with"]


def _planned_rounds(run_dir: Path) -> int | None:
    from lore_core.privacy.ledger import read_ledger

    file = run_dir / "ledger.json"
    return read_ledger(file)["config"].get("rounds") if file.is_file() else None


def _basis_mismatches(run_dir: Path, state, releases) -> list[str]:
    """basis.npz must be the basis the replayed record reports after the run's last round (its `version`)."""
    from lore_core.basis_file import load_basis

    path = run_dir / "basis.npz"
    if not path.is_file():
        return []
    basis = load_basis(path)
    if state is not None and basis.version != state.round:  # a finished run cannot be extended: written at its end
        return [f"{path}: names round {basis.version}, but the run's checkpoint is after round {state.round}: the "
                "published basis is not the run's"]
    rows = np.flatnonzero(releases.rounds == basis.version)
    if basis.version and not rows.size:
        return [f"{path}: names round {basis.version}, which releases/ does not record: the published basis is not "
                "one the audited releases produced"]
    expected = releases.reported[rows[-1]] if basis.version else releases.initial_basis
    # basis.npz holds float32 (lore_core.basis_file): equal up to that rounding
    if basis.basis.shape != expected.shape or not np.allclose(basis.basis, expected, rtol=1e-5, atol=1e-7):
        return [f"{path}: not the basis the release record reports after round {basis.version} (the server's tail "
                "average of the released bases): the published model is not what the audited releases produced"]
    return []


def _metrics_mismatches(run_dir: Path, state, header: dict | None) -> list[str]:
    """metrics.json's round against the checkpoint's, its privacy keys against the ledger's (as `simulate` derives
    them) and its optimizer settings against the record header's."""
    from lore_cli.simulate_command import privacy_metrics
    from lore_core.audits.accounting_check import same_numbers
    from lore_core.text_file import parse_json, read_text

    path = run_dir / "metrics.json"
    if not path.is_file():
        return []
    metrics = parse_json(read_text(path), path)
    if not isinstance(metrics, dict):
        return [f"{path}: not a JSON object"]
    differ = []
    if state is not None:
        if "rounds" in metrics and metrics["rounds"] != state.round:  # a finished run's last
            differ.append(f"rounds {metrics['rounds']!r} (the checkpoint's {state.round})")
        differ += [f"{key} {metrics[key]!r} (the checkpoint's {state.settings[setting]!r})"
                   for key, setting in METRICS_SETTINGS.items()
                   if key in metrics and setting in state.settings and metrics[key] != state.settings[setting]]
    ledger = privacy_metrics(run_dir)
    for key in (*EPSILON_KEYS, *COPIED_KEYS):
        if key in metrics and key not in ledger:
            differ.append(f"{key} {metrics[key]!r} (the ledger has none: another privacy mode's)")
        elif key in metrics and not _same(metrics[key], ledger[key], **(EPSILON_TOLERANCE if key in EPSILON_KEYS
                                                                        else {})):
            differ.append(f"{key} {metrics[key]!r} (the ledger's {ledger[key]!r})")
    guarantee = metrics.get("privacy_guarantee")
    if guarantee is not None and not (isinstance(guarantee, str) and same_numbers(guarantee,
                                                                                  ledger["privacy_guarantee"])):
        # an audit tester's "(0.500, 1e-05)-DP" where the ledger gives 5.984 passed: its numbers are compared
        differ.append(f"privacy_guarantee {str(guarantee)[:160]!r} (the ledger's {ledger['privacy_guarantee'][:160]!r})")
    for field, key in HEADER_SETTINGS.items() if header is not None else ():
        if metrics.get(key) is not None and field in header and not _same(metrics[key], header[field]):
            differ.append(f"{key} {metrics[key]!r} (the release record header's {header[field]!r})")
    if not differ:
        return []
    return [f"{path} states what the run's checkpoint, ledger and release record do not: {'; '.join(differ)}"]


def _same(a, b, rel_tol: float = 1e-9, abs_tol: float = 1e-12) -> bool:
    numbers = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (a, b))
    return math.isclose(a, b, rel_tol=rel_tol, abs_tol=abs_tol) if numbers else a == b
