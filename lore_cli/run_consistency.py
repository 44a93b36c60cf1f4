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

# The release record header's optimizer fields by the checkpoint settings (ServerSettings) they were written from.
HEADER_SETTINGS = {"name": "server_optimizer", "server_lr": "server_lr", "client_lr": "client_lr",
                   "local_steps": "local_steps", "l2": "l2", "schedule": "server_lr_schedule"}
# metrics.json's settings keys by the header field that must hold the same value.
METRICS_HEADER = {"server_optimizer": "name", "server_lr": "server_lr", "client_lr": "client_lr",
                  "local_steps": "local_steps", "l2": "l2"}


def published_mismatches(run_dir: Path, state, releases) -> list[str]:
    """What `basis.npz`, `metrics.json` and the release record's header say that the verified record and the run's
    checkpoint (`state`, None when there is none) contradict; empty when they agree. `releases`: the verified record
    (server.release_record.read_releases), None when the run has none."""
    found = []
    if releases is not None:
        found += _header_mismatches(run_dir, state, releases.optimizer)
        found += _basis_mismatches(run_dir, releases)
    found += _metrics_mismatches(run_dir, state, None if releases is None else releases.optimizer)
    return found


def _header_mismatches(run_dir: Path, state, header: dict) -> list[str]:
    if state is None:
        return []
    differ = [f"{field} {header.get(field)!r} (the checkpoint's {key} {state.settings[key]!r})"
              for field, key in HEADER_SETTINGS.items()
              if key in state.settings and not _same(header.get(field), state.settings[key])]
    if not differ:
        return []
    return [f"{run_dir / 'releases' / 'chain.jsonl'}: its header's server optimizer settings are not the run's: "
            f"{'; '.join(differ)}; the replay of the releases would use settings the run did not run with"]


def _basis_mismatches(run_dir: Path, releases) -> list[str]:
    """basis.npz must be the basis the replayed record reports after the round it names (its `version`)."""
    from lore_core.basis_file import load_basis

    path = run_dir / "basis.npz"
    if not path.is_file():
        return []
    basis = load_basis(path)
    if basis.version == 0:
        expected = releases.initial_basis
    else:
        rows = np.flatnonzero(releases.rounds == basis.version)
        if not rows.size:
            return [f"{path}: names round {basis.version}, which releases/ does not record: the published basis "
                    "is not one the audited releases produced"]
        expected = releases.reported[rows[-1]]
    # basis.npz holds float32 (lore_core.basis_file): equal up to that rounding
    if basis.basis.shape != expected.shape or not np.allclose(basis.basis, expected, rtol=1e-5, atol=1e-7):
        return [f"{path}: not the basis the release record reports after round {basis.version} (the server's tail "
                "average of the released bases): the published model is not what the audited releases produced"]
    return []


def _metrics_mismatches(run_dir: Path, state, header: dict | None) -> list[str]:
    """metrics.json's privacy keys against the ledger's (as `simulate` derives them) and its optimizer settings
    against the header's. A metrics.json of fewer rounds than the checkpoint is an earlier finish of a run being
    extended: not compared (its run has not written its own yet)."""
    from lore_cli.simulate_command import privacy_metrics
    from lore_core.text_file import parse_json, read_text

    path = run_dir / "metrics.json"
    if not path.is_file():
        return []
    metrics = parse_json(read_text(path), path)
    if not isinstance(metrics, dict):
        return [f"{path}: not a JSON object"]
    rounds = metrics.get("rounds")
    if state is not None and isinstance(rounds, int) and rounds < state.round:
        return []
    expected = privacy_metrics(run_dir)
    if state is not None and rounds != state.round:
        expected["rounds"] = state.round
    if header is not None:
        expected.update({key: header[field] for key, field in METRICS_HEADER.items()
                         if field in header and metrics.get(key) is not None})
    differ = [f"{key} {metrics[key]!r} (the record's {value!r})" for key, value in expected.items()
              if key in metrics and not _same(metrics[key], value)]
    if not differ:
        return []
    return [f"{path} states what the run's ledger and release record do not: {'; '.join(differ)}"]


def _same(a, b) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool) and \
            not isinstance(b, bool):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    return a == b
