"""What a completed run leaves beside its checkpoint: `basis.npz` (the reported basis, which devices and `lore-fed
evaluate --basis RUN` read), `metrics.json` (the server's final evaluation, the settings and the privacy keys) and
`report.md`, all from the server's own checkpoint and ledger: no pair data, no benchmark ceiling. The ServerApp
writes them when a run completes, so a run started by hand with `flwr run` leaves them too (before, only the command
that started a run wrote them, and a by-hand run left no basis for devices). `deploy local` writes them again with
the pair file's embedder; `simulate` writes its own, with what it knows beside."""

from __future__ import annotations

from pathlib import Path


def write_run_outputs(run_dir: Path, state, settings, privacy_mode: str, *, nodes: int, seconds: float,
                      previous=None, embedder: str | None = None, command: str) -> Path | None:
    """The three files of a completed run (all rounds, or stopped early by its privacy budget); None, and nothing
    written, for a run that has rounds left (a rerun resumes it). `previous`: the checkpoint before this start (a
    rerun of a finished run keeps the run's recorded wall time). Returns report.md's path."""
    from lore_cli.run_report import write_report
    from lore_cli.simulate_command import (kept_run_record, privacy_metrics, recorded_metrics, run_metrics,
                                           run_problems, save_reported_basis)
    from lore_core.atomic_io import atomic_write_json

    privacy_keys = privacy_metrics(run_dir)
    if state.round < settings.rounds and not privacy_keys["stopped_early"]:
        return None
    record = kept_run_record(round(seconds, 3), command, previous, state, recorded_metrics(run_dir))
    metrics = run_metrics(state, settings, privacy_mode, privacy_keys, wall_seconds=record["wall_seconds"],
                          nodes=nodes, extra={"node_kind": "deployed", "command": record["command"]})
    metrics.update(run_problems(state.history))
    save_reported_basis(run_dir, state, settings, embedder)
    atomic_write_json(run_dir / "metrics.json", metrics)
    return write_report(run_dir, state.history, metrics, None, record["command"])
