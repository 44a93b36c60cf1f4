"""Does fitting the basis with every pair counted once (`lore-fed train --weight-by pair`) beat every user's mean
counted once (`--weight-by user`, the default)? Judged on pilot populations; reported seeds only measured.

    python -m simulations.bench_pair_weighting [--cells heavy-tail:11,...] [--reported heavy-tail] [--simulate]
                                               [--work runs/bench_pair_weighting]
                                               [--out bench_results/pair_weighting_pilot.md]

A user's share of the basis fit is `joint_trainer.user_shares`: equal shares let the many thin users of a population
whose users hold 2 to 400 pairs (the hostile `heavy-tail`) outweigh the few rich ones. Each cell is a pilot: a
hostile population at seed 11 or 12 (`bench_hostile_populations`, reported at seeds 0-2) or a stress-matrix
population at seed 101 (`bench_matrix`, reported at 0-2), so that a default chosen here is never chosen on the seeds
it is reported for. `--reported heavy-tail` adds that population's reported seeds 0-2 as a measurement, apart.
Rows: `lore-fed train --rank 1` (one shared reward, BT) and `lore-fed train` (default flags), each
under both weightings, through the CLI; with `--simulate`, on the reported cells also `simulate` (the hostile
benchmark's federated row before 0.2.5: the real apps in-process, 600 rounds of a fifth of the seen users, privacy
none) with the
rank, l2, personal prior and objective `train` chose under that weighting, and the same `--weight-by`. Cells cached
under --work.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lore_core.atomic_io import atomic_write_json
from lore_core.marginal_fit import WEIGHTINGS
from simulations import bench_hostile_populations as hostile
from simulations import bench_matrix as matrix
from simulations.bench_output import write_outputs

REPORTED_SEEDS = (0, 1, 2)
CELLS = ("heavy-tail:11", "heavy-tail:12", "clickers:11", "thin-majority:11", "minority:11", "weak-few:11",
         "iso-5-15:101", "iso-20-40:101", "iso-shared:101", "iso-noise:101", "iso-zero:101", "aniso-20-40:101",
         "iso-weak:101", "iso-5-15-1400:101", "iso-150-250:101", "prism-synth:101")


def pair_file(name: str, seed: int, work: Path) -> Path:
    """The pilot population's pair file (a hostile one or a stress-matrix one, built once under `work`)."""
    if name in hostile.POPULATIONS:
        return hostile.population_file(name, seed, work / "hostile")
    pop = next(p for p in matrix.POPULATIONS if p.name == name)
    return matrix.population_file(pop, seed, work / "matrix", quick=False)[0]


def run_cell(name: str, seed: int, work: Path, simulate: bool = False) -> dict:
    """{weighting: {"bt": row, "train": row[, "simulate": row]}} of one cell (each row cached as a JSON record)."""
    path = pair_file(name, seed, work)
    cell = {}
    for weighting in WEIGHTINGS:
        for row, flags in (("bt", ["--rank", "1"]), ("train", [])):
            cache = work / "results" / name / f"seed{seed}" / f"{weighting}-{row}.json"
            if not cache.exists():
                run_dir = matrix._fresh(work / "runs" / name / f"seed{seed}" / f"{weighting}-{row}")
                cache.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_json(cache, matrix.train_row(path, run_dir, [*flags, "--weight-by", weighting]))
            cell.setdefault(weighting, {})[row] = json.loads(cache.read_text())
        cache = work / "results" / name / f"seed{seed}" / f"{weighting}-simulate.json"
        chosen = matrix.train_choice(cell[weighting]["train"], weighting)
        # a row cached with other local steps or another server rate than `simulate` now takes is rerun (a reviewer)
        cached = json.loads(cache.read_text()) if cache.exists() else None
        outdated = cached is not None and (matrix.other_steps(cached, chosen) or matrix.other_rate(cached))
        if simulate and (not cache.exists() or outdated):
            run_dir = matrix._fresh(work / "runs" / name / f"seed{seed}" / f"{weighting}-simulate")
            atomic_write_json(cache, matrix.simulate_row(path, run_dir, chosen, hostile.federated_a_fifth(name),
                                                         ["--privacy", "none"]))
        if cache.exists() and not (outdated and not simulate):  # an outdated row is not reported (a reviewer)
            cell[weighting]["simulate"] = json.loads(cache.read_text())
    return cell


def is_reported(key: str) -> bool:
    return int(key.split(":")[1]) in REPORTED_SEEDS


def markdown(cells: dict[str, dict], command: str) -> str:
    def acc(entry):
        return f"{entry['seen_test_acc']:.3f} / {entry['unseen_test_acc']:.3f}"

    def gain(a, b, key):
        return 100.0 * (a[key] - b[key])

    lines = [f"# Basis fit weighted by user or by pair (`{command}`)", "",
             "Seen / new-user test accuracy. `user`: every seen user's mean loss counts once in the basis fit (the "
             "default); `pair`: every pair counts once. Pilot cells: hostile populations at seeds 11-12, matrix "
             "populations at 101. Cells marked (reported seed) are a measurement apart: nothing is chosen on them.",
             "",
             "| cell | BT user | BT pair | train user | train pair | train pair - train user (points) | "
             "train - BT, each weighting (points) | train chose (user; pair) |", "|---|---|---|---|---|---|---|---|"]
    for key, cell in cells.items():
        u, p = cell["user"], cell["pair"]
        if is_reported(key):
            key += " (reported seed)"
        lines.append(
            f"| {key} | {acc(u['bt'])} | {acc(p['bt'])} | {acc(u['train'])} | {acc(p['train'])} | "
            f"{gain(p['train'], u['train'], 'seen_test_acc'):+.1f} / "
            f"{gain(p['train'], u['train'], 'unseen_test_acc'):+.1f} | "
            f"user {gain(u['train'], u['bt'], 'seen_test_acc'):+.1f} / "
            f"{gain(u['train'], u['bt'], 'unseen_test_acc'):+.1f}"
            f"; pair {gain(p['train'], p['bt'], 'seen_test_acc'):+.1f} / "
            f"{gain(p['train'], p['bt'], 'unseen_test_acc'):+.1f} | "
            f"rank {u['train']['rank']}; rank {p['train']['rank']} |")
    federated = [(key, c) for key, c in cells.items() if all("simulate" in c[w] for w in WEIGHTINGS)]
    if federated:
        lines += ["", "`simulate` (privacy none, 600 rounds of a fifth of the seen users) with `train`'s choice under "
                      "each weighting, and its distance to that `train` (points):", "",
                  "| cell | simulate user | simulate - train, user | simulate pair | simulate - train, pair |",
                  "|---|---|---|---|---|"]
        for key, c in federated:
            row = [f"| {key}{' (reported seed)' if is_reported(key) else ''} "]
            for w in WEIGHTINGS:
                sim, train = c[w]["simulate"], c[w]["train"]
                row.append(f"| {acc(sim)} | {gain(sim, train, 'seen_test_acc'):+.1f} / "
                           f"{gain(sim, train, 'unseen_test_acc'):+.1f} ")
            lines.append("".join(row) + "|")
    for label, keep in (("pilots", lambda key: not is_reported(key)), ("reported seeds", is_reported)):
        diffs = [(c["pair"]["train"][k] - c["user"]["train"][k]) * 100 for key, c in cells.items() if keep(key)
                 for k in ("seen_test_acc", "unseen_test_acc")]
        if diffs:
            lines += ["", f"`train` pair - user over the {len(diffs) // 2} {label}, seen and new together: mean "
                          f"{sum(diffs) / len(diffs):+.2f} points, lowest {min(diffs):+.1f}, "
                          f"highest {max(diffs):+.1f}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", default=",".join(CELLS), help="NAME:SEED,... (the pilot cells)")
    parser.add_argument("--reported", default="", help="populations whose reported seeds 0-2 are measured too")
    parser.add_argument("--simulate", action="store_true", help="the federated row on the reported cells too")
    parser.add_argument("--work", default="runs/bench_pair_weighting")
    parser.add_argument("--out", default="bench_results/pair_weighting_pilot.md")
    args = parser.parse_args(argv)
    work = Path(args.work)
    cells = {}
    reported = [f"{name}:{seed}" for name in filter(None, args.reported.split(",")) for seed in REPORTED_SEEDS]
    for item in [*args.cells.split(","), *reported]:
        name, seed = item.split(":")
        cells[item] = run_cell(name, int(seed), work, simulate=args.simulate and is_reported(item))
    flags = (f" --reported {args.reported}" if args.reported else "") + (" --simulate" if args.simulate else "")
    command = f"python -m simulations.bench_pair_weighting{flags}"
    write_outputs(Path(args.out), markdown(cells, command), cells)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
